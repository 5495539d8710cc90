"""The processes `habit bench` runs, one per variant or sub-bench: `python -m habit.bench_workers
--worker KIND SPEC.json`. Each trains or measures in a fresh process (so its peak RSS is its own)
and writes one JSON object to the spec's result path, atomically; a failure becomes {"error": ...}.

The recipe worker is the tutorial as written (fp32, pad = EOS, HF Trainer and its LM collator);
the TRL workers are SFTTrainer with its defaults; the habit workers call habit.train. Every
training worker is clocked at the same point of its step and reports through `_finish`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from habit import allocator, data, models, render, training
from habit.bench import TEMPLATE, flops_per_token, int_list, steady_rate
from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _split(spec: dict):
    table = data.load_examples(spec["data"], template=TEMPLATE)
    train_ex, val_ex = data.split(table, TrainSettings.val_frac, TrainSettings.seed)
    if not val_ex:
        raise HabitError(f"{spec['data']}: too few examples for a held-out split")
    return table, train_ex, val_ex


def _prompt(ex: data.Example) -> str:
    return TEMPLATE.split("{prompt}")[0].format(act=ex.fields["act"])


# the flags that decide a CPU's matmul speed: AMX tiles reach ~5x what AVX512-BF16 alone does
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_name_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of SPEED_FLAGS it has (from /proc/cpuinfo)."""
    import platform

    cpu, flags = platform.processor() or platform.machine(), []
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        have = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
        cpu = names[0] if names else cpu
        flags = [f for f in SPEED_FLAGS if f in have]
    return cpu, flags


def machine_line(extra: str = "") -> str:
    """One line naming what a bench script ran on: CPU and speed flags, cores, torch and its
    threads, the malloc (the scripts' tables head with it; `extra` ends it)."""
    import torch

    cpu, flags = cpu_name_and_flags()
    return (f"{cpu} (flags: {' '.join(flags)}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, malloc {allocator.active() or 'system'}{extra}. "
            f"{datetime.date.today()}.")


def worker_peak(spec: dict) -> dict:
    import platform

    import peft
    import torch
    import transformers

    device = _device()
    n = spec["peak_size"] or (8192 if device == "cuda" else 2048)
    reps = 5 if device == "cuda" else 3
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = math.inf
        for i in range(reps + 1):  # the first is warm-up
            _sync()
            t = time.perf_counter()
            a @ b
            _sync()
            if i:
                best = min(best, time.perf_counter() - t)
        peaks[name] = round(2 * n**3 / best / 1e9, 1)
        del a, b
    cpu, flags = cpu_name_and_flags()
    trl = importlib.util.find_spec("trl") and __import__("trl").__version__
    auto = models.best_dtype("auto", device)
    return {"size": n, "peak_gflops": peaks, "auto_dtype": "bf16" if auto == torch.bfloat16 else "fp32",
            "machine": {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "trl": trl or None, "python": platform.python_version(),
                        "reps": reps}}


def _model_flops(folder: str, adapter: Path, mean_len: float, head_share: float = 1.0) -> float:
    """flops_per_token for a base (its matmul weights, counted on the meta device) + an adapter.
    `head_share`: the fraction of tokens the lm_head runs on (habit: only where a target is)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    n_frozen = sum(m.in_features * m.out_features for m in skeleton.modules() if isinstance(m, torch.nn.Linear))
    head = skeleton.get_output_embeddings()
    n_frozen -= (1 - head_share) * head.in_features * head.out_features
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        n_lora = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return flops_per_token(n_frozen, n_lora, text.num_hidden_layers, text.num_attention_heads * head_dim, mean_len)


def heldout_loss(spec: dict, adapter: Path) -> float | None:
    """Response + EOS loss on the held-out split: fp32 base + the adapter, habit's render."""
    import torch
    from peft import PeftModel

    device = _device()
    table, _, val_ex = _split(spec)
    base, tokenizer = models.load_model(spec["model"], dtype=torch.float32, device=device)
    model = PeftModel.from_pretrained(base, str(adapter))
    template = render.choose_template(table, tokenizer)
    enc, _ = render.encode_all(val_ex, template, tokenizer, models.stop_ids(tokenizer, base), spec["max_len"])
    if not enc:
        return None
    width = training.row_width(enc, spec["max_len"])
    batches = training.plan_epoch(enc, width, max(width, TrainSettings.batch_tokens), 0, 0, shuffle=False)
    return training.eval_loss(model, batches, tokenizer.pad_token_id, device)


def _finish(spec: dict, marks: list, folder: str, adapter: Path, dtype: str, mean_len: float, seconds: float,
            computed: float = 1.0, head_share: float = 1.0) -> dict:
    """What every training worker reports: speed from marks, memory now, then the held-out loss.
    `computed`: the fraction of the real tokens the model ran on (habit computes a shared prefix
    once a pass), so MFU counts the FLOPs done, not those saved; `head_share` likewise for the
    lm_head (habit runs it at targets only; the Trainer rows make logits for every token)."""
    import torch

    rate, step_s = steady_rate(marks)
    out = {"tokens_per_s": rate, "step_s": step_s, "steps": len(marks), "tokens_trained": marks[-1][1] if marks else 0,
           "peak_rss_mb": _peak_rss_mb(), "dtype": dtype, "seconds": round(seconds, 2),
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    gc.collect()
    out["flops_per_token"] = _model_flops(folder, adapter, mean_len, head_share) * computed
    out["heldout_loss"] = heldout_loss(spec, adapter)
    return out


def _max_steps(tokens: int, per_step: float) -> int:
    # a little over the estimate; the clock stops training once the tokens are in (batches vary)
    return max(2, math.ceil(1.2 * tokens / max(1.0, per_step)) + 1)


def _clock(trainer, target: int):
    """Count real tokens at each training forward (attention-mask sum, or every token when there is
    no mask: padding-free) and mark (time, tokens) at each step end; stop once target is reached."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.seen, self.marks = 0, []

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.marks.append((time.perf_counter(), self.seen))
            if self.seen >= target and len(self.marks) >= 2:
                control.should_training_stop = True

    clock = Clock()

    def count(module, args, kwargs):
        if module.training:
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            clock.seen += int(mask.sum()) if mask is not None else int(ids.numel())

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(clock)
    return clock


def _trainer_args(spec: dict, name: str) -> dict:
    return {"output_dir": str(Path(spec["work"]) / f"{name}-out"), "per_device_train_batch_size": 4,
            "save_strategy": "no", "report_to": "none", "seed": TrainSettings.seed, "disable_tqdm": True,
            "dataloader_num_workers": 0, "use_cpu": _device() == "cpu"}


def worker_recipe(spec: dict) -> dict:
    """The tutorial's recipe, as it was written: fp32, pad = EOS, HF Trainer and its LM collator."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    _, train_ex, _ = _split(spec)
    folder = models.model_dir(models.resolve(spec["model"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token  # the tutorial's choice; its collator then masks EOS too
    enc = tokenizer([TEMPLATE.format(**ex.fields) for ex in train_ex], truncation=True, max_length=spec["max_len"])
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    lengths = [sum(m) for m in enc["attention_mask"]]
    mean_len = sum(lengths) / len(lengths)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.enable_input_require_grads()  # gradient checkpointing through a frozen embedding
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(**_trainer_args(spec, "recipe"), gradient_checkpointing=True, learning_rate=2e-4,
                             max_steps=_max_steps(spec["tokens"], 4 * mean_len), logging_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    clock = _clock(trainer, spec["tokens"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    adapter = Path(spec["work"]) / "adapter"
    model.save_pretrained(adapter)
    del trainer, model
    return _finish(spec, clock.marks, folder, adapter, "fp32", mean_len, seconds)


def worker_trl(spec: dict, packing: bool = False, matched: bool = False) -> dict:
    """TRL's SFTTrainer as a peer: prompt/completion data, its defaults, LoRA as habit's. `matched`:
    habit's hyperparameters instead (tokens a step, lr and schedule, clipping, no checkpointing),
    so the row differs from habit's in the implementation only."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _, train_ex, _ = _split(spec)
    device = _device()
    dtype = models.best_dtype("auto", device)
    bf16 = dtype == torch.bfloat16
    folder = models.model_dir(models.resolve(spec["model"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [{"prompt": _prompt(ex), "completion": ex.fields["prompt"]} for ex in train_ex]
    lengths = [len(tokenizer(r["prompt"] + r["completion"]).input_ids) + 1 for r in rows]  # + EOS
    mean_len = sum(lengths) / len(lengths)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    lora = LoraSettings()
    hyper = dict(learning_rate=2e-4, max_length=spec["max_len"], packing=packing)
    if matched:
        s = TrainSettings()
        # one packed row of --batch-tokens a step, as habit's step holds --batch-tokens
        hyper = dict(learning_rate=s.lr, max_length=s.batch_tokens, packing=True, padding_free=True,
                     per_device_train_batch_size=1, warmup_steps=s.warmup, max_grad_norm=s.max_grad_norm,
                     weight_decay=s.weight_decay, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1}, gradient_checkpointing=False)
    config = SFTConfig(**{**_trainer_args(spec, "trl"), **hyper}, bf16=bf16, fp16=False, max_steps=2)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules(), task_type="CAUSAL_LM"))
    # the step count needs the tokenized (packed) dataset, which only the trainer builds
    sizes = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    per_step = sum(sizes) / len(sizes) * min(config.per_device_train_batch_size, len(sizes))
    # matched: the schedule ends where the tokens do, as habit's does; else a margin past them
    trainer.args.max_steps = (max(2, math.ceil(spec["tokens"] / per_step)) if matched
                              else _max_steps(spec["tokens"], per_step))
    clock = _clock(trainer, spec["tokens"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    adapter = Path(spec["work"]) / "adapter"
    trainer.model.save_pretrained(adapter)
    del trainer, model
    return _finish(spec, clock.marks, folder, adapter, "bf16" if bf16 else "fp32", mean_len, seconds)


def habit_steps(encoded, tokens: int, max_len: int, settings: TrainSettings | None = None) -> int:
    """Optimizer steps for habit.train to consume about `tokens` real tokens (at least 2): walks
    the same schedule train() walks, epoch after epoch."""
    settings = settings or TrainSettings()
    width = training.row_width(encoded, max_len)
    seen = 0
    plan = training.schedule(encoded, width, settings.batch_tokens, settings.seed)
    for step, (_, _, batch, _) in enumerate(plan, start=1):
        seen += batch.tokens
        if seen >= tokens and step >= 2:
            return step
    raise AssertionError("unreachable: the schedule is endless")


def _train_habit(table, out: Path, model: str, settings: TrainSettings) -> list[dict]:
    """habit.train with these settings; returns its step log rows, each with `t`: the clock at the
    step's end (the same point where the Trainer variants are clocked)."""
    rows = []

    def on_log(row: dict) -> None:
        if "loss" in row:
            _sync()
            rows.append({**row, "t": time.perf_counter()})

    training.train(table, out, model=model, settings=settings, on_log=on_log)
    return rows


def _marks(rows: list[dict]) -> list[tuple[float, int]]:
    return [(r["t"], r["tokens"]) for r in rows]


def _only_train(table, examples) -> data.Table:
    # train() splits again; with val_frac 0 it trains on exactly these examples and runs no
    # in-loop validation, whose time would otherwise land inside a timed step
    return dataclasses.replace(table, examples=tuple(examples))


def worker_habit(spec: dict, precision: str = "auto", qlora: bool = False, plain: bool = False,
                 compile: str = "auto") -> dict:
    import torch

    table, train_ex, _ = _split(spec)
    device = _device()
    source = models.resolve(spec["model"])
    folder = models.model_dir(source)
    if qlora and importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "skipped: needs bitsandbytes (pip install 'habit[nf4]')"}
    tokenizer = models.load_tokenizer(source)
    template = render.choose_template(table, tokenizer)
    enc, _ = render.encode_all(train_ex, template, tokenizer, models.stop_ids(tokenizer), spec["max_len"])
    steps = habit_steps(enc, spec["tokens"], spec["max_len"])
    settings = TrainSettings(steps=steps, val_frac=0.0, save_every=10**9, precision=precision,
                             max_len=spec["max_len"], plain_path=plain, quantize="nf4" if qlora else "none",
                             compile=compile)
    run = Path(spec["work"]) / "run"
    rows = _train_habit(_only_train(table, train_ex), run, spec["model"], settings)
    dtype = models.best_dtype(precision, device)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    mean, head_share = _lengths_and_targets(enc)
    return _finish(spec, _marks(rows), folder, run, f"nf4+{name}" if qlora else name, mean, rows[-1]["elapsed_s"],
                   rows[-1]["tokens_computed"] / rows[-1]["tokens"], head_share=head_share)


def _lengths_and_targets(enc) -> tuple[float, float]:
    """The mean example length of encoded examples, and the share of their tokens that are
    targets (where habit runs the lm_head): what their FLOPs per token depend on."""
    tokens = sum(len(e) for e in enc)
    return tokens / max(1, len(enc)), sum(sum(e.loss[1:]) for e in enc) / max(1, tokens)


def _synthetic(train_ex, tokenizer, length: int, count: int) -> list[data.Example]:
    """`count` examples of about `length` tokens: the data's responses, run together and cut."""
    ids = tokenizer("\n\n".join(ex.fields["prompt"] for ex in train_ex), add_special_tokens=False).input_ids
    body = max(8, length - 32)  # room for the prompt and EOS: no example may pass max_len
    ids = ids * math.ceil(body * count / len(ids) + 1)
    return [data.Example(fields={"act": train_ex[k % len(train_ex)].fields["act"],
                                 "prompt": tokenizer.decode(ids[k * body:(k + 1) * body])}, where=f"synthetic:{k}")
            for k in range(count)]


def worker_scale(spec: dict) -> dict:
    """habit's tokens/s by example length, and training time for 1x/4x/16x the data."""
    import torch

    table, train_ex, _ = _split(spec)
    source = models.resolve(spec["model"])
    folder = models.model_dir(source)
    tokenizer = models.load_tokenizer(source)
    template = render.choose_template(table, tokenizer)
    stop = models.stop_ids(tokenizer)
    dtype = "bf16" if models.best_dtype("auto", _device()) == torch.bfloat16 else "fp32"
    lengths = []
    for length in int_list(spec["scale_lengths"]):
        batch = max(TrainSettings.batch_tokens, length)
        examples = _synthetic(train_ex, tokenizer, length, spec["scale_steps"] * max(1, batch // length))
        enc, _ = render.encode_all(examples, template, tokenizer, stop, length)
        settings = TrainSettings(steps=spec["scale_steps"], val_frac=0.0, save_every=10**9, max_len=length,
                                 batch_tokens=batch)
        run = Path(spec["work"]) / f"len-{length}"
        rows = _train_habit(_only_train(table, examples), run, spec["model"], settings)
        rate, step_s = steady_rate(_marks(rows))
        mean, head_share = _lengths_and_targets(enc)
        # attention's FLOPs per token grow with the length: MFU, not tokens/s, is what can stay flat
        flops = _model_flops(folder, run, mean, head_share)
        lengths.append({"length": length, "mean_length": mean, "batch_tokens": batch, "tokens_per_s": rate,
                        "step_s": step_s, "flops_per_token": flops * rows[-1]["tokens_computed"] / rows[-1]["tokens"],
                        "dtype": dtype})
    base, total = [], 0
    for ex in train_ex:  # the first examples, up to --scale-tokens: the data at 1x
        n = len(render.encode(ex, template, tokenizer, stop))
        if n <= spec["max_len"] and total < spec["scale_tokens"]:
            base.append(ex)
            total += n
    sizes = []
    for k in int_list(spec["scale_data"]):
        settings = TrainSettings(epochs=1.0, val_frac=0.0, save_every=10**9, max_len=spec["max_len"])
        examples = [dataclasses.replace(ex, where=f"{ex.where}#{i}") for i in range(k) for ex in base]
        rows = _train_habit(_only_train(table, examples), Path(spec["work"]) / f"data-{k}x", spec["model"],
                            settings)
        seconds, tokens = rows[-1]["elapsed_s"], rows[-1]["tokens"]
        sizes.append({"multiple": k, "tokens": tokens, "steps": len(rows), "seconds": seconds,
                      "s_per_1k_tokens": 1000 * seconds / max(1, tokens)})
    return {"lengths": lengths, "data": sizes}


def worker_generation(spec: dict) -> dict:
    """Tokens/s of habit.generation.generate: batches of 16 vs one prompt at a time."""
    import torch

    from habit.generation import generate
    from habit.settings import GenerationSettings

    device = _device()
    dtype = models.best_dtype("auto", device)
    model, tokenizer = models.load_model(spec["model"], dtype=dtype, device=device)
    stop = models.stop_ids(tokenizer, model)
    prompts, template = _gen_prompts(spec, tokenizer)
    settings = GenerationSettings(max_new_tokens=spec["gen_tokens"])
    generate(model, tokenizer, template, prompts[:2], stop, GenerationSettings(max_new_tokens=2))  # warm-up
    out = {"prompts": len(prompts), "max_new_tokens": spec["gen_tokens"], "batch_size": 16,
           "dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}

    def timed(size: int) -> dict:
        _sync()
        start = time.perf_counter()
        gens = generate(model, tokenizer, template, prompts, stop, settings, batch_size=size)
        _sync()
        seconds = time.perf_counter() - start
        tokens = sum(g.tokens for g in gens)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    for mode, size in (("batched", 16), ("single", 1)):
        out[mode] = timed(size)
    out["speedup"] = out["batched"]["tokens_per_s"] / out["single"]["tokens_per_s"]
    out["anatomy"] = _decode_anatomy(model, tokenizer, template, prompts[0], stop, settings)
    out["compiled"] = _compiled_single(model, tokenizer, template, prompts, stop, settings)
    if device == "cpu" and dtype == torch.bfloat16:
        # the same weights in fp16: a CPU's fp16 matrix-vector kernel may read weights faster
        # than its bf16 one (one row per step) while its fp16 matrix products are slower (many)
        model.to(torch.float16)
        generate(model, tokenizer, template, prompts[:2], stop, GenerationSettings(max_new_tokens=2))
        out["fp16"] = {mode: timed(size) for mode, size in (("batched", 16), ("single", 1))}
    return out


def _decode_anatomy(model, tokenizer, template, prompt: str, stop, settings) -> dict:
    """Where one prompt's decode time goes, under torch.profiler: the matrix products (every
    weight read once per new token) against everything else (Python, dispatch, small ops)."""
    import torch
    from torch.profiler import profile

    from habit.generation import generate

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gens = generate(model, tokenizer, template, [prompt], stop, settings, batch_size=1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    calls = sum(e.count for e in events)
    tokens = max(1, gens[0].tokens)
    return {"tokens": tokens, "ms_per_token": total / 1000 / tokens, "products_share": products / max(1, total),
            "ops_per_token": calls / tokens}


def _compiled_single(model, tokenizer, template, prompts, stop, settings) -> dict:
    """One prompt at a time with a static KV cache and generate's decode step compiled
    (torch.compile, inductor): what compiling removes of the per-token Python and dispatch."""
    from dataclasses import replace

    from transformers import CompileConfig

    from habit.generation import generate

    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles the decode step on GPUs only unless told
    extra = {"cache_implementation": "static", "compile_config": config}

    def run(some, settings_) -> int:
        return sum(g.tokens for g in generate(model, tokenizer, template, some, stop, settings_,
                                              batch_size=1, extra=extra))

    try:
        start = time.perf_counter()
        run(prompts[:1], replace(settings, max_new_tokens=3))  # compiles the decode step
        compile_s = time.perf_counter() - start
        run(prompts[1:2], replace(settings, max_new_tokens=3))
        start = time.perf_counter()
        tokens = run(prompts, settings)
        seconds = time.perf_counter() - start
    except Exception as e:  # a missing C++ compiler or an inductor failure: the row says so
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "compile_s": compile_s}


def _gen_prompts(spec: dict, tokenizer) -> list[str]:
    """The prompts both generation workers answer: held-out roles first, repeated to --gen-prompts."""
    table, train_ex, val_ex = _split(spec)
    template = render.choose_template(table, tokenizer)
    prompts = [render.prompt_text(template, tokenizer, fields=ex.fields) for ex in (val_ex + train_ex)]
    return (prompts * math.ceil(spec["gen_prompts"] / len(prompts)))[: spec["gen_prompts"]], template


def _f16_copy(q_path: str, out: Path) -> Path:
    """The same GGUF with every quantized tensor dequantized to f16: llama.cpp then reads the
    weights habit generates from (habit dequantizes the file too), at 16 bits a weight."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(q_path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        value = int(gguf.LlamaFileType.MOSTLY_F16) if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    for t in reader.tensors:
        plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        data_ = t.data if plain else gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)
        writer.add_tensor(t.name, np.ascontiguousarray(data_))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def worker_llamacpp(spec: dict) -> dict:
    """llama.cpp (xllamacpp, in process) on the GGUF habit loads, answering the same prompt ids
    greedily to the same length: all prompts in one request over parallel slots (continuous
    batching) vs one request at a time, on the file's own 4-bit weights and on an f16 copy."""
    try:
        import xllamacpp as xlc
    except ImportError:
        return {"skipped": "needs xllamacpp (pip install xllamacpp)"}
    source = models.resolve(spec["model"])
    if source.kind != "gguf":
        return {"skipped": f"{spec['model']} is not a GGUF file (llama.cpp reads GGUF)"}
    tokenizer = models.load_tokenizer(source)
    prompts, template = _gen_prompts(spec, tokenizer)
    ids = [render.prompt_ids(p, template, tokenizer) for p in prompts]
    n_new = spec["gen_tokens"]
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)

    def server(path: str, slots: int):
        params = xlc.CommonParams()
        params.model.path = path
        params.n_parallel = slots
        params.n_ctx = slots * (max(map(len, ids)) + n_new + 8)
        params.warmup = True
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        return xlc.Server(params)

    def answer(srv, batch: list[list[int]]) -> int:
        reply = srv.handle_completions({"prompt": batch, "n_predict": n_new, "temperature": 0,
                                        "top_k": 1, "return_tokens": True})
        if "choices" not in reply:
            raise HabitError(f"llama.cpp: {str(reply)[:300]}")
        return sum(len(c.get("tokens") or tokenizer(c["text"], add_special_tokens=False).input_ids)
                   for c in reply["choices"])

    quant = Path(source.path).stem.rsplit(".", 1)[-1].lower()  # q4_1 for the embedded file
    work = Path(spec["result"]).parent
    files = {quant: source.path, "f16": str(_f16_copy(source.path, work / "f16.gguf"))}
    out = {"prompts": len(prompts), "max_new_tokens": n_new, "threads": threads, "gguf": quant}
    for name, path in files.items():
        for mode, slots in (("batched", len(ids)), ("single", 1)):
            srv = server(path, slots)
            answer(srv, ids[:1])  # warm-up: first-call allocations
            start = time.perf_counter()
            tokens = answer(srv, ids) if slots > 1 else sum(answer(srv, [one]) for one in ids)
            seconds = time.perf_counter() - start
            out[f"{name}-{mode}"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            del srv
    return out


LONG_MEDIAN, LONG_SIGMA = 240, 1.0  # answer tokens: the 2026 table's median, and a tail past 4k


def long_table(spec: dict, tokenizer, rows: int, seed: int = 0) -> list[dict]:
    """A long-tailed act,prompt table from --data's rows: each answer is its prompts joined (in a
    seeded order) up to a log-normal number of tokens, cut at a word."""
    import random

    source = data.load_examples(spec["data"], template=TEMPLATE).examples
    texts = [ex.fields["prompt"] for ex in source]
    counts = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        want = max(8, round(rng.lognormvariate(math.log(LONG_MEDIAN), LONG_SIGMA)))
        parts, have = [], 0
        while have < want:
            j = rng.randrange(len(texts))
            words = texts[j].split()
            take = len(words) if have + counts[j] <= want else max(1, len(words) * (want - have) // counts[j])
            parts.append(" ".join(words[:take]))
            have += counts[j] if take == len(words) else want - have
        out.append({"act": f"{source[i % len(source)].fields['act']} ({i + 1})",
                    "prompt": " ".join(parts)})
    return out


def worker_long(spec: dict) -> dict:
    """One whole `habit train --epochs 1` process on long_table, wall-clocked from outside."""
    import csv
    import subprocess

    source = models.resolve(spec["model"])
    tokenizer = models.load_tokenizer(source)
    work = Path(spec["result"]).parent
    table_path = work / "long.csv"
    with open(table_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["act", "prompt"])
        writer.writeheader()
        writer.writerows(long_table(spec, tokenizer, spec["long_rows"]))
    table = data.load_examples(str(table_path))
    template = render.choose_template(table, tokenizer)
    enc, _ = render.encode_all(table.examples, template, tokenizer, models.stop_ids(tokenizer), 10**9)
    lengths = sorted(len(e) for e in enc)
    run = work / "run"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "habit", "train", str(table_path), "--model", spec["model"],
                           "--epochs", "1", "--out", str(run)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise HabitError(f"habit train exited {done.returncode}: {done.stderr.strip()[-300:]}")
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    result = info["result"]
    kept = result["train_examples"] + result["val_examples"]
    return {"rows": len(table.examples), "data": spec["data"], "median_target": LONG_MEDIAN, "sigma": LONG_SIGMA,
            "lengths": {"median": lengths[len(lengths) // 2], "p99": lengths[math.ceil(0.99 * len(lengths)) - 1],
                        "max": lengths[-1]},
            "kept": kept, "dropped": len(table.examples) - kept, "max_len": info["settings"]["train"]["max_len"],
            "dropped_at_1024": sum(n > 1024 for n in lengths), "steps": result["steps"],
            "tokens": round(result["tokens_per_s"] * result["seconds"]),  # trained: the split that trains
            "train_s": result["seconds"], "wall_s": wall, "tokens_per_s": result["tokens_per_s"]}


def worker_load(spec: dict) -> dict:
    """Seconds for models.load_model in a fresh process (HABIT_CACHE as the parent set it). The
    model's code is imported first where the folder already exists, so a cached load is timed
    without the one-off import of transformers' model classes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = models.resolve(spec["model"])
    folder = (Path(source.path) if source.kind == "dir" else
              models.cache_dir() / "gguf" / models.file_sha256(source.path)[:24] if source.kind == "gguf" else None)
    if folder is not None and (folder / "config.json").is_file():
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    start = time.perf_counter()
    models.load_model(source, dtype=models.best_dtype("auto", "cpu"))
    return {"seconds": time.perf_counter() - start, "gguf": source.kind == "gguf"}


WORKERS = {
    "peak": worker_peak, "recipe": worker_recipe, "trl": worker_trl,
    "trl-packing": lambda spec: worker_trl(spec, packing=True), "habit": worker_habit,
    "trl-matched": lambda spec: worker_trl(spec, matched=True),
    "habit-compile": lambda spec: worker_habit(spec, compile="on"),
    "habit-plain": lambda spec: worker_habit(spec, plain=True),
    "habit-sysmalloc": worker_habit,
    "habit-fp32": lambda spec: worker_habit(spec, precision="fp32"),
    "habit-qlora": lambda spec: worker_habit(spec, qlora=True),
    "scale": worker_scale, "generation": worker_generation, "load": worker_load,
    "llamacpp": worker_llamacpp, "long": worker_long,
}


def _worker_main(kind: str, spec_path: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = WORKERS[kind](spec)
    except ModuleNotFoundError as e:
        result = {"error": f"{e.name} is not installed (pip install 'habit[bench]')"}
    except Exception as e:  # recorded in the row's note; the bench goes on with the next variant
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {models._one_line(e)}"}
    if "error" not in result:
        result["malloc"] = allocator.active() or "system"
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker" or sys.argv[2] not in WORKERS:
        raise SystemExit("usage: python -m habit.bench_workers --worker KIND SPEC.json (run by `habit bench`)")
    raise SystemExit(_worker_main(sys.argv[2], sys.argv[3]))
