"""How much memory a training run will need, from the model's config and the settings alone.

`habit train` asks this before loading any weights: a 7B base in bf16 fills most of a 24 GiB
machine, and an out-of-memory kill halfway through loading says nothing useful. The parts:

- weights: every parameter in the compute dtype, except that `--quantize nf4` holds the Linear
  layers of the decoder in 4 bits (half a byte a weight plus one fp32 scale per 64 weights);
  embeddings, norms and the lm_head stay in the compute dtype;
- adapter: the LoRA weights and their gradients in the model dtype, the fp32 master copies and
  their gradients, and AdamW's two fp32 moments;
- activations of one pass of `micro_tokens` tokens: what each decoder layer keeps for its
  backward, roughly ACT_PER_LAYER·hidden bytes a token, or with checkpointing only the layer's
  input (2·hidden bytes a token) plus one layer's worth, recomputed in the backward;
- the head: logits of HEAD_ROWS rows at a time (fp32, with their gradient), or the plain path's
  full logits of one row on the first batch, which checks the fast paths against it;
- transient: one dequantized or merged weight, and the Python + torch runtime.

The constants are calibrated against peak RSS measured on the tiny test model, SmolLM2-135M and a
Llama-3.2-1B-shaped checkpoint (BENCHMARKS.md, "sizes"); the estimate aims a little high.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings

GB = 1e9
ACT_PER_LAYER = 34  # bytes per token per hidden unit one decoder layer keeps for backward (bf16)
PLAIN_HEAD_BYTES = 10  # per logit of the plain-path check, at --max-len (its row is often shorter)
HEAD_ROWS = 256  # rows of logits alive at once in the chunked head loss (fastpath.HEAD_CHUNK)
MERGED_KEEP_MAX = 1 << 30  # fastpath.MERGED_KEEP_MAX: merged weights kept through a step below it
RUNTIME = 0.55 * GB  # Python, torch, transformers and the tokenizer, before any weights
NF4_BLOCK = 64
NF4_LAYERS_IN_FLIGHT = 3  # nf4: 1B-shape peak was 0.35 GB over the estimate without this term


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a model: parameter counts by kind, and the layer sizes."""

    linear: int  # weights of the decoder's Linear layers (quantized by nf4)
    other: int  # embeddings, norms, biases, an untied lm_head
    largest_linear: int  # the biggest single Linear weight (one is dequantized or merged at a time)
    lora: int  # LoRA parameters at the given rank and targets
    adapted: int  # weights of the Linear layers that get adapters
    hidden: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Estimate:
    weights: float
    adapter: float
    activations: float
    head: float
    transient: float
    checkpointing: bool

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.head + self.transient

    def describe(self) -> str:
        ck = "on" if self.checkpointing else "off"
        return (f"memory estimate {self.total / GB:.1f} GB: weights {self.weights / GB:.2f}, "
                f"adapter+optimizer {self.adapter / GB:.2f}, activations {self.activations / GB:.2f} "
                f"(checkpointing {ck}), head {self.head / GB:.2f}, runtime {self.transient / GB:.2f}")


def shape(config, lora: LoraSettings) -> Shape:
    """Count the parameters of `config`'s model on the meta device (no memory, any architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    targets = lora.target_modules()
    linear = other = largest = lora_n = adapted = 0
    seen = set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            is_linear = isinstance(module, torch.nn.Linear) and module is not head and p.dim() == 2
            if is_linear:
                linear += p.numel()
                largest = max(largest, p.numel())
                leaf = name.rsplit(".", 1)[-1]
                if targets == "all-linear" or leaf in targets:
                    lora_n += lora.rank * (module.in_features + module.out_features)
                    adapted += p.numel()
            else:
                other += p.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Shape(linear, other, largest, lora_n, adapted, text.hidden_size, text.num_hidden_layers,
                 text.vocab_size)


def estimate(s: Shape, settings: TrainSettings, dtype_bytes: int, checkpointing: bool) -> Estimate:
    """The memory a run with these settings needs at its peak, in bytes."""
    per_weight = 0.5 + 4 / NF4_BLOCK if settings.quantize == "nf4" else dtype_bytes
    weights = s.linear * per_weight + s.other * dtype_bytes
    adapter = s.lora * (2 * dtype_bytes + 4 * 4)  # weight + grad, fp32 master + grad + 2 moments
    tokens = min(settings.micro_tokens, settings.batch_tokens // settings.grad_accum)
    scale = dtype_bytes / 2  # the per-layer constant is for bf16 activations
    if checkpointing:
        activations = tokens * s.hidden * (2 * dtype_bytes * s.layers + ACT_PER_LAYER * scale)
    else:
        activations = tokens * s.hidden * ACT_PER_LAYER * scale * s.layers
    # the first batch also runs the plain path once (training.check_fast): one packed row's full
    # logits, fp32 copies and gradient; a row is at most --max-len tokens and often half of it
    plain = min(tokens, settings.max_len) * s.vocab * PLAIN_HEAD_BYTES
    head = max(HEAD_ROWS * s.vocab * 4 * 3, plain) + tokens * s.hidden * 4 * 2
    merged = s.adapted * dtype_bytes if s.adapted * dtype_bytes <= MERGED_KEEP_MAX else 0
    transient = RUNTIME + merged + 2 * s.largest_linear * dtype_bytes
    if settings.quantize == "nf4":  # dequantized weights in flight (measured: ~3 layers' worth)
        transient += NF4_LAYERS_IN_FLIGHT * s.linear / s.layers * dtype_bytes
    return Estimate(weights, adapter, activations, head, transient, checkpointing)


def available(device: str) -> float:
    """Bytes this run may use: HABIT_MEMORY_AVAILABLE if set (e.g. '8G'), else free GPU memory on
    CUDA, else MemAvailable from /proc/meminfo (None where neither can be read)."""
    given = os.environ.get("HABIT_MEMORY_AVAILABLE")
    if given:
        return parse_size(given)
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_size(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    t = text.strip().upper().rstrip("B")
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise HabitError(f"HABIT_MEMORY_AVAILABLE={text!r}: expected bytes such as 8G or 512M") from None


def plan(s: Shape, settings: TrainSettings, dtype_bytes: int, room: float | None) -> Estimate:
    """The estimate for these settings, with `--grad-checkpointing auto` decided; raises a one-line
    HabitError saying what would fit when even that does not."""
    mode = settings.grad_checkpointing
    est = estimate(s, settings, dtype_bytes, checkpointing=mode == "on")
    if mode == "auto" and room is not None and est.total > room:
        est = estimate(s, settings, dtype_bytes, checkpointing=True)
    if room is None or est.total <= room:
        return est
    raise HabitError(f"{est.describe()}; only {room / GB:.1f} GB available. "
                     f"{_what_fits(s, settings, dtype_bytes, room)}")


def _what_fits(s: Shape, settings: TrainSettings, dtype_bytes: int, room: float) -> str:
    """The smallest change of flags (checkpointing, then smaller passes, then nf4) that fits."""
    import dataclasses

    ck = settings.grad_checkpointing != "off"
    tried = [([], settings, ck)]
    if not ck:
        tried.append((["--grad-checkpointing on"], settings, True))
    options = []
    for micro in (512, 256, 128):
        if micro < settings.micro_tokens:
            options.append((f"--micro-tokens {micro}", {"micro_tokens": micro}))
    if settings.quantize != "nf4":
        options.append(("--quantize nf4", {"quantize": "nf4"}))
    for flags, base, on in list(tried):
        for flag, change in options:
            tried.append((flags + [flag], dataclasses.replace(base, **change), on))
    for flag in ("--micro-tokens 256", "--micro-tokens 128"):
        if settings.quantize != "nf4" and int(flag.split()[1]) < settings.micro_tokens:
            both = dataclasses.replace(settings, quantize="nf4", micro_tokens=int(flag.split()[1]))
            tried.append((["--grad-checkpointing on", "--quantize nf4", flag], both, True))
    for flags, changed, on in tried[1:]:
        if estimate(s, changed, dtype_bytes, on).total <= room:
            return "Would fit: " + " ".join(flags) + "."
    return "No setting habit has fits this model here: use a machine with more memory or a smaller base."
