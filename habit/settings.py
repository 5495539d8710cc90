"""Every setting habit has, each defined once.

A setting is a dataclass field whose metadata holds its one-line help. The CLI builds its flags from
these fields (so `--help`, the defaults and the library agree), and `run.json` stores them as they
were used. Each class checks its values on creation and raises HabitError naming the setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from habit.errors import HabitError

DEFAULT_MODEL = "smollm2-135m"
METHODS = ("sft", "dpo", "simpo", "orpo", "kto")  # losses.METHODS plus plain supervised tuning
VAL_POINTS = 8  # validations a run makes by default (--val-every 0), besides each epoch end


def _opt(default: Any, help: str, flag: str | None = None, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


@dataclass(frozen=True)
class LoraSettings:
    rank: int = _opt(16, "LoRA rank r: size of the low-rank update")
    alpha: float = _opt(32.0, "LoRA alpha: the update is scaled by alpha/rank")
    dropout: float = _opt(
        0.0, "dropout on the LoRA input (0 by default: on a CPU its random masks cost ~20% of a step)"
    )
    targets: str = _opt(
        "all-linear",
        "modules that get adapters: 'all-linear' or a comma list such as q_proj,v_proj",
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "--rank must be at least 1")
        _check(self.alpha > 0, "--alpha must be positive")
        _check(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        _check(bool(self.targets.strip()), "--targets must name at least one module")

    def target_modules(self) -> str | list[str]:
        if self.targets == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass(frozen=True)
class TrainSettings:
    epochs: float | None = _opt(
        None, "passes over the training split (ignored when --steps is given; default: 3, and 1 with "
        "a preference --method)")
    steps: int | None = _opt(None, "optimizer steps to run instead of --epochs")
    lr: float | None = _opt(
        None, "peak learning rate, linear warm-up then cosine decay to 10% (default: 1e-3, and 1e-4 "
        "with a preference --method: at 1e-3 DPO on the tutorial's table unlearned stopping)")
    warmup: float = _opt(0.05, "fraction of the steps spent warming up the learning rate")
    batch_tokens: int = _opt(
        2048, "tokens per optimizer step in total, split across processes (examples are packed, "
        "no padding is trained on): a recipe means the same on 1 or 64 processes")
    grad_accum: int = _opt(1, "micro-batches per optimizer step on each process (memory; the "
                              "gradient is the same)")
    micro_tokens: int = _opt(
        1024, "most tokens in one forward/backward pass (memory): a micro-batch runs as passes of "
        "whole packed rows, at least one; the gradient is the same")
    max_len: int = _opt(
        0, "longest example in tokens; longer examples are dropped (never cut: a cut loses EOS). "
        "0: the most one micro-batch holds (--batch-tokens / --grad-accum), so only examples no "
        "step could hold are dropped; rows are as wide as the longest kept example needs")
    val_frac: float = _opt(0.1, "fraction of examples held out for validation (split by input)")
    seed: int = _opt(0, "random seed for LoRA init, data order and split")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA weights")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 turns clipping off)")
    precision: str = _opt(
        "auto", "auto | bf16 | fp32: weights and compute dtype (auto: bf16 where the hardware has it)"
    )
    train_on_prompt: bool = _opt(False, "also train on prompt tokens (default: response + EOS only)")
    plain_path: bool = _opt(
        False, "train without the fast paths (packed attention, merged LoRA, chunked head loss); "
        "by default they run after a check on the first batch that they match this plain path")
    eval_every: int = _opt(0, "log a small generation eval every N steps (0: off)")
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (0: at each epoch end)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    report_to: str = _opt("none", "none | tensorboard | mlflow | wandb (through accelerate)")
    val_every: int = _opt(
        0, "validate every N steps as well as at each epoch end (0: about VAL_POINTS times a run)")
    keep: str = _opt(
        "best", "best | last: the run's adapter is the validated one with the lowest validation "
        "loss (best: a run that starts to overfit keeps its earlier state), or the final one")
    quantize: str = _opt(
        "none", "none | nf4: hold the frozen base in 4 bits (QLoRA through bitsandbytes, CPU and "
        "CUDA); merge and export still use the full-precision base")
    grad_checkpointing: str = _opt(
        "auto", "auto | on | off: recompute activations in the backward pass instead of keeping "
        "them (auto: on when the memory estimate says they would not fit)")
    compile: str = _opt(
        "auto", "auto | on | off: compile the decoder layers for the training step (regional "
        "torch.compile: one layer's code, every layer; checked against eager on the first batch). "
        "auto: on a CPU with a C++ compiler, for runs of at least 500 steps, where the start-up "
        "cost of compiling is repaid")
    shard: str = _opt(
        "none", "none | fsdp: under torchrun or accelerate launch, shard the base and the adapter "
        "across the processes with FSDP2 (for bases too big to hold once a process; the default "
        "replicates them, DDP)")
    method: str = _opt(
        "sft", "sft | dpo | simpo | orpo | kto: what to learn from; the preference losses train on "
        "prompt,chosen,rejected pairs (kto: prompt,completion,label) and teach what not to do")
    beta: float | None = _opt(
        None, "strength of the preference loss (default by method: dpo 0.1, kto 0.1, simpo 2.0, "
        "orpo 0.1 as its odds-ratio weight); a larger beta keeps closer to the reference")
    from_run: str | None = _opt(
        None, "continue the adapter of this SFT run (its base, LoRA shape and template); the "
        "frozen run is the preference reference. Without it the reference is the base",
        flag="--from", metavar="RUN")

    def __post_init__(self) -> None:
        # defaults that depend on --method, resolved here so run.json records (and a resume reuses)
        # the numbers; measured in docs/preference.md
        preference = self.method != "sft"
        if self.epochs is None:
            object.__setattr__(self, "epochs", 1.0 if preference else 3.0)
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-4 if preference else 1e-3)
        _check(self.epochs > 0, "--epochs must be positive")
        _check(self.steps is None or self.steps >= 1, "--steps must be at least 1")
        _check(self.lr > 0, "--lr must be positive")
        _check(0 <= self.warmup < 1, "--warmup must be in [0, 1)")
        _check(self.batch_tokens >= 16, "--batch-tokens must be at least 16")
        _check(self.grad_accum >= 1, "--grad-accum must be at least 1")
        _check(self.micro_tokens >= 1, "--micro-tokens must be at least 1")
        _check(self.max_len == 0 or self.max_len >= 8, "--max-len must be 0 (from the batch) or at least 8")
        if self.max_len == 0:  # resolved here, so run.json records (and a resume reuses) the number
            object.__setattr__(self, "max_len", max(8, self.batch_tokens // max(1, self.grad_accum)))
        _check(
            self.batch_tokens // self.grad_accum >= self.max_len,
            f"--batch-tokens/--grad-accum ({self.batch_tokens // self.grad_accum}) must be at least "
            f"--max-len ({self.max_len}) so the longest example fits a micro-batch",
        )
        _check(0 <= self.val_frac <= 0.9, "--val-frac must be in [0, 0.9]")
        _check(self.weight_decay >= 0, "--weight-decay must not be negative")
        _check(self.max_grad_norm >= 0, "--max-grad-norm must not be negative")
        _check(self.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32")
        _check(self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every must be >= 0")
        _check(self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
        _check(self.val_every >= 0, "--val-every must be >= 0")
        _check(self.keep in ("best", "last"), "--keep must be best or last")
        _check(
            self.report_to in ("none", "tensorboard", "mlflow", "wandb"),
            "--report-to must be none, tensorboard, mlflow or wandb",
        )
        _check(self.quantize in ("none", "nf4"), "--quantize must be none or nf4")
        _check(self.grad_checkpointing in ("auto", "on", "off"),
               "--grad-checkpointing must be auto, on or off")
        _check(self.compile in ("auto", "on", "off"), "--compile must be auto, on or off")
        _check(self.shard in ("none", "fsdp"), "--shard must be none or fsdp")
        _check(not (self.shard == "fsdp" and self.eval_every),
               "--eval-every cannot run with --shard fsdp (its generation runs on one process, and "
               "a sharded model needs every process in each forward)")
        _check(not (self.shard == "fsdp" and self.quantize != "none"),
               "--shard fsdp cannot shard a --quantize nf4 base")
        _check(self.method in METHODS, "--method must be " + ", ".join(METHODS[:-1]) + " or kto")
        _check(self.beta is None or self.beta > 0, "--beta must be positive")
        _check(self.from_run is None or self.method != "sft",
               "--from continues a run with a preference loss; give --method dpo, simpo, orpo or kto")
        # the reference cache and KTO's reference point run forwards some processes skip, which a
        # sharded model (every process in every forward) cannot
        _check(not (self.shard == "fsdp" and self.method != "sft"),
               "--shard fsdp trains --method sft only; preference losses run replicated (DDP)")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = _opt(256, "most tokens to generate per answer")
    temperature: float = _opt(0.0, "sampling temperature (0: greedy, reproducible)")
    top_p: float = _opt(1.0, "nucleus sampling: keep the smallest token set with this much mass")
    repetition_penalty: float = _opt(
        1.1, "scale down the scores of tokens already in the text by this (1: plain greedy); 1.1 is "
        "llama.cpp's and Ollama's default and keeps a 135M model from looping")

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
        _check(self.temperature >= 0, "--temperature must not be negative")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.repetition_penalty >= 1, "--repetition-penalty must be at least 1")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise HabitError(message)


def as_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild settings from run.json, ignoring keys a newer or older habit wrote."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
