"""habit bench: the tutorial's recipe, TRL and habit trained side by side, in one run.

Every variant trains the same model on the same training split for the same number of real
(non-pad) tokens, in its own subprocess, one after another: peak RSS is then each variant's own,
and no two compete for the cores. A first subprocess measures the machine's matmul peak (bf16 and
fp32), so MFU is against what this machine does, not a datasheet.

What is measured, and how:

- tokens/s: real tokens of steps 2..n over their wall time (step 1 is warm-up: lazy init, first
  allocations). Every variant is timed at the same point of its step, after the optimizer.
- MFU: tokens/s x FLOPS_FORMULA / the matmul peak of the dtype the variant computes in. Model
  FLOPs, not hardware FLOPs: gradient checkpointing's recomputation and padding earn nothing.
- held-out loss: after training, each variant's adapter is saved and loaded onto an fp32 base, and
  the response + EOS loss on the 10% held-out split is computed by habit's render + eval_loss, the
  same way for every row. The recipe never trains on EOS (pad = EOS is masked), which shows here.

Sub-benches behind flags: `--scale` (habit's tokens/s by sequence length, and time by data size)
and `--generation` (batched vs one-at-a-time generation; first vs cached model load). Each writes
its own section of the markdown file, between `<!-- bench:NAME -->` markers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from habit import data, models, render, training
from habit.errors import HabitError
from habit.settings import DEFAULT_MODEL, LoraSettings, TrainSettings

TEMPLATE = "<act>: {act}\n<prompt>: {prompt}"  # the tutorial's text; every row trains on it
VARIANTS = {
    "recipe": "the tutorial: fp32, HF Trainer + DataCollatorForLanguageModeling (pad = EOS, "
              "pad to longest), gradient checkpointing, batch 4, LoRA r16 q_proj,v_proj dropout 0.05, lr 2e-4",
    "trl": "TRL SFTTrainer, prompt/completion + EOS (completion-only loss), TRL defaults, "
           "LoRA as habit's, batch 4, lr 2e-4 (TRL's LoRA guide; its 2e-5 default is for full fine-tuning)",
    "trl-packing": "as trl, packing=True (BFD, padding-free)",
    "habit": "habit.train defaults: packed rows, bf16 where fast, fast paths (attention per example, "
             "merged LoRA, chunked head loss), passes of ≤1024 tokens",
    "habit-plain": "habit.train --plain-path: the same without the fast paths (sdpa over whole rows, "
                   "PEFT's LoRA forward, full logits at targets)",
    "habit-fp32": "habit.train --precision fp32",
    "habit-qlora": "habit.train on a 4-bit NF4 base (bitsandbytes; CUDA only)",
}
FLOPS_FORMULA = ("FLOPs/token = 4·N_frozen + 6·N_lora + 6·layers·d_attn·s̄  (N_frozen: every matmul weight "
                 "incl. lm_head, forward + input grads; N_lora: adapter weights, + weight grads; "
                 "causal attention over the mean example length s̄)")


def _opt(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help, "flag": None})  # as settings.py's


@dataclass(frozen=True)
class BenchOptions:
    """Every `habit bench` flag (the CLI builds them from these fields, as for training)."""

    model: str = _opt(DEFAULT_MODEL, "model every variant trains: alias, local HF dir, .gguf or hub id")
    data: str = _opt("../shared/data/prompts.csv", "an act,prompt table (the tutorial's columns)")
    tokens: int = _opt(20000, "real (non-pad) training tokens each variant consumes")
    only: str = _opt("all", "variants to run, a comma list or all: " + ", ".join(VARIANTS))
    max_len: int = _opt(TrainSettings.max_len, "longest example in tokens (the recipe and TRL truncate)")
    timeout: int = _opt(3600, "seconds one variant may run before it is stopped and recorded as such")
    peak_size: int = _opt(0, "side of the square matmul that measures the peak (0: 2048 on CPU, 8192 on CUDA)")
    train: bool = _opt(False, "run the training table too when --scale or --generation is given")
    scale: bool = _opt(False, "habit's tokens/s by sequence length and time by data size (section bench:scale)")
    scale_lengths: str = _opt("256,512,1024,2048,4096", "--scale: example lengths in tokens")
    scale_steps: int = _opt(3, "--scale: optimizer steps per length (the first is not timed)")
    scale_data: str = _opt("1,4,16", "--scale: multiples of the data to train one epoch on")
    scale_tokens: int = _opt(2048, "--scale: tokens of data at 1x")
    generation: bool = _opt(False, "batched vs one-at-a-time generation, first vs cached load (bench:generation)")
    gen_prompts: int = _opt(16, "--generation: prompts to answer")
    gen_tokens: int = _opt(32, "--generation: most new tokens per answer")

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise HabitError(message)

        check(self.tokens >= 1, "--tokens must be at least 1")
        check(self.timeout >= 1, "--timeout must be at least 1")
        check(self.max_len >= 8, "--max-len must be at least 8")
        check(self.peak_size >= 0, "--peak-size must not be negative")
        unknown = [n for n in self.variants() if n not in VARIANTS]
        check(not unknown, f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        check(bool(self.variants()) or not self.runs_train(), "--only names no variant")
        check(self.scale_steps >= 2, "--scale-steps must be at least 2 (the first step is not timed)")
        check(self.scale_tokens >= 1 and self.gen_prompts >= 1 and self.gen_tokens >= 1,
              "--scale-tokens, --gen-prompts and --gen-tokens must be at least 1")
        for flag, value in (("--scale-lengths", self.scale_lengths), ("--scale-data", self.scale_data)):
            check(all(x.strip().isdigit() and int(x) > 0 for x in value.split(",")),
                  f"{flag} must be a comma list of positive whole numbers (got {value!r})")
        check(all(n >= 32 for n in _ints(self.scale_lengths)), "--scale-lengths must each be at least 32")

    def variants(self) -> list[str]:
        if self.only.strip() == "all":
            return list(VARIANTS)
        return [n.strip() for n in self.only.split(",") if n.strip()]

    def runs_train(self) -> bool:
        return self.train or not (self.scale or self.generation)

    def command(self, out: str | None = None) -> str:
        """The `habit bench` command line that repeats this run (non-default flags only)."""
        parts = ["habit", "bench"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "data", "tokens") or value != f.default:
                flag = "--" + f.name.replace("_", "-")
                parts += [flag] if value is True else [] if value is False else [flag, str(value)]
        return shlex.join(parts + (["--out", out] if out else []))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------- pure helpers


def flops_per_token(n_frozen: int, n_lora: int, layers: int, attn_dim: int, seq: float) -> float:
    """Model FLOPs of one trained token (see FLOPS_FORMULA): a frozen weight does its forward
    matmul (2) and passes gradients to its input (2); a LoRA weight also gets its own gradient (2);
    causal attention (QK^T and AV) over a sequence of s tokens is 2·d·s per layer forward, x3."""
    return 4 * n_frozen + 6 * n_lora + 6 * layers * attn_dim * seq


def mfu(tokens_per_s: float | None, flops: float | None, peak_gflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured matmul peak."""
    if not tokens_per_s or not flops or not peak_gflops:
        return None
    return tokens_per_s * flops / (peak_gflops * 1e9)


def steady_rate(marks: list[tuple[float, int]]) -> tuple[float | None, float | None]:
    """(tokens/s, mean step seconds) over steps 2..n from (time, cumulative real tokens) taken
    at the end of each step; step 1 is warm-up and not counted."""
    if len(marks) < 2:
        return None, None
    (t1, k1), (tn, kn) = marks[0], marks[-1]
    if tn <= t1:
        return None, None
    return (kn - k1) / (tn - t1), (tn - t1) / (len(marks) - 1)


def replace_section(text: str, name: str, body: str) -> str:
    """Put body between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, keeping everything else;
    a missing section is appended."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        return text[:i] + block + text[j + len(end):]
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def write_sections(path: str | os.PathLike, sections: dict[str, str]) -> Path:
    """Replace (or add) the named sections of a markdown file atomically: temp file + rename."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    for name, body in sections.items():
        text = replace_section(text, name, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- the parent: runs workers


def run(options: BenchOptions = BenchOptions(), say: Callable[[str], None] = lambda s: None) -> dict:
    """Run the selected sub-benches; return one JSON-able object: machine, peak_gflops, and
    tokens + rows (the training table), scale, generation as selected."""
    models.resolve(options.model)  # a bad --model or --data fails in one line, before any worker
    data.load_examples(options.data, template=TEMPLATE)
    work = Path(tempfile.mkdtemp(prefix="habit-bench-"))
    try:
        say("measuring the matmul peak (bf16, fp32)")
        peak = spawn("peak", options, work, options.timeout)
        if "error" in peak:
            raise HabitError(f"matmul peak worker failed: {peak['error']}")
        result = {"machine": peak["machine"], "peak_gflops": peak["peak_gflops"],
                  "peak_size": peak["size"], "model": options.model, "data": options.data,
                  "date": datetime.date.today().isoformat(), "command": options.command()}
        if options.runs_train():
            result.update(tokens=options.tokens, flops_formula=FLOPS_FORMULA,
                          rows=train_rows(options, work, peak, say))
        if options.scale:
            say("scale: habit's tokens/s by length and time by data size")
            result["scale"] = spawn("scale", options, work, options.timeout)
        if options.generation:
            result["generation"] = generation_bench(options, work, say)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_rows(options: BenchOptions, work: Path, peak: dict, say: Callable[[str], None]) -> list[dict]:
    rows = []
    for name in options.variants():
        say(f"{name}: training {options.tokens} real tokens")
        skip = _skip_reason(name, peak)
        found = {"skipped": skip} if skip else spawn(name, options, work, options.timeout)
        rows.append(_row(name, found, peak["peak_gflops"]))
        r = rows[-1]
        say(f"{name}: " + (f"{r['tokens_per_s']:.1f} tokens/s, held-out loss {_fmt(r['heldout_loss'], 3)}"
                           if r["tokens_per_s"] else r["note"]))
    recipe = next((r["tokens_per_s"] for r in rows if r["name"] == "recipe"), None)
    for r in rows:
        r["ratio"] = round(r["tokens_per_s"] / recipe, 3) if recipe and r["tokens_per_s"] else None
    return rows


def _skip_reason(name: str, peak: dict) -> str | None:
    if name == "habit-fp32" and peak["auto_dtype"] == "fp32":
        return "skipped: habit already trains in fp32 on this machine"
    if name == "habit-qlora" and (peak["machine"]["device"] == "cpu"
                                  or importlib.util.find_spec("bitsandbytes") is None):
        return "skipped: needs CUDA and bitsandbytes"
    return None


def _row(name: str, found: dict, peaks: dict) -> dict:
    dtype = found.get("dtype")
    tps = found.get("tokens_per_s")
    note = found.get("error") or found.get("skipped") or VARIANTS[name]
    if found.get("error"):
        note = f"error: {note}"
    return {"name": name, "tokens_per_s": _round(tps, 2), "ratio": None,
            "step_s": _round(found.get("step_s"), 4), "peak_rss_mb": _round(found.get("peak_rss_mb"), 1),
            "mfu": _round(mfu(tps, found.get("flops_per_token"), peaks.get(_compute(dtype))), 5),
            "heldout_loss": _round(found.get("heldout_loss"), 5), "dtype": dtype, "note": note,
            "tokens_trained": found.get("tokens_trained"), "steps": found.get("steps"),
            "flops_per_token": found.get("flops_per_token"), "peak_gpu_mb": found.get("peak_gpu_mb"),
            "error": bool(found.get("error"))}


def _compute(dtype: str | None) -> str | None:
    return None if dtype is None else "bf16" if "bf16" in dtype else "fp32"


def _round(x, digits: int):
    return None if x is None else round(x, digits)


def spawn(kind: str, options: BenchOptions, work: Path, timeout: int, env: dict | None = None) -> dict:
    """Run one worker (`python -m habit.bench --worker KIND SPEC`) and return what it wrote.

    A worker that fails, dies or runs out of time becomes {"error": one line}, never an exception:
    one broken variant must not lose the others' rows."""
    folder = work / kind
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**dataclasses.asdict(options), "work": str(folder), "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    log = folder / "log.txt"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    try:
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, "-m", "habit.bench", "--worker", kind, str(folder / "spec.json")],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s (--timeout)"}
    result = folder / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"error": f"worker exited with code {proc.returncode}: {tail[-1][:300] if tail else 'no output'}"}


def generation_bench(options: BenchOptions, work: Path, say: Callable[[str], None]) -> dict:
    say("generation: batched vs one at a time")
    out = spawn("generation", options, work, options.timeout)
    cache = work / "empty-cache"
    cache.mkdir(exist_ok=True)
    say("generation: first load into an empty HABIT_CACHE, then the cached load")
    first = spawn("load", options, work / "first", options.timeout, env={"HABIT_CACHE": str(cache)})
    cached = spawn("load", options, work / "cached", options.timeout, env={"HABIT_CACHE": str(cache)})
    out["load"] = {"first_s": first.get("seconds"), "cached_s": cached.get("seconds"),
                   "gguf": first.get("gguf"), "error": first.get("error") or cached.get("error")}
    return out


# ---------------------------------------------------------------- output


def _fmt(x, digits: int = 1, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


COLUMNS = ("variant", "real tokens/s", "vs recipe", "step s", "peak RSS MB", "MFU", "held-out loss", "dtype")


def table_cells(row: dict) -> list[str]:
    return [row["name"], _fmt(row["tokens_per_s"]), _fmt(row["ratio"], 2, "x"), _fmt(row["step_s"], 2),
            _fmt(row["peak_rss_mb"], 0), _fmt(None if row["mfu"] is None else 100 * row["mfu"], 1, "%"),
            _fmt(row["heldout_loss"], 3), row["dtype"] or "–"]


def machine_line(result: dict) -> str:
    m = result["machine"]
    peak = result["peak_gflops"]
    return (f"{m['cpu']}, {m['cores']} cores, torch threads: {m['threads']}, device {m['device']}; "
            f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, trl {m['trl']}. "
            f"Matmul peak ({result['peak_size']}³, best of {m['reps']}): bf16 {peak['bf16']:.0f} GFLOP/s, "
            f"fp32 {peak['fp32']:.0f} GFLOP/s.")


def markdown(result: dict, out: str | None = None) -> dict[str, str]:
    """The markdown sections this result fills: {"train": ..., "scale": ..., "generation": ...}."""
    head = f"{machine_line(result)} {result['date']}."
    sections = {}
    if "rows" in result:
        lines = [f"## Training: the tutorial's recipe, TRL and habit ({result['tokens']} real tokens each)", "",
                 f"Model `{result['model']}`, data `{result['data']}` (90% train / 10% held out, seed 0). {head}", "",
                 "| " + " | ".join(COLUMNS) + " | note |", "|" + "---|" * (len(COLUMNS) + 1)]
        lines += ["| " + " | ".join(table_cells(r) + [r["note"].replace("|", "/")]) + " |" for r in result["rows"]]
        lines += ["", "Real tokens/s: non-pad tokens of steps 2..n over their wall time (step 1 is warm-up). "
                  f"MFU: tokens/s x model FLOPs per token / the matmul peak of the row's dtype; {FLOPS_FORMULA}. "
                  "Held-out loss: response + EOS tokens of the held-out split, each adapter on an fp32 base, "
                  "scored by habit's render + eval_loss.", ""]
        sections["train"] = "\n".join(lines + _reproduce(result, out))
    if "scale" in result:
        sections["scale"] = "\n".join(_scale_md(result["scale"], head) + _reproduce(result, out))
    if "generation" in result:
        sections["generation"] = "\n".join(_generation_md(result["generation"], head) + _reproduce(result, out))
    return sections


def _reproduce(result: dict, out: str | None) -> list[str]:
    command = result["command"] + (f" --out {shlex.quote(out)}" if out else "")
    return ["Reproduce:", "", "```bash", command, "```"]


def _bars(pairs: list[tuple[str, float | None]], width: int = 40) -> list[str]:
    top = max((v for _, v in pairs if v), default=0) or 1
    label = max(len(k) for k, _ in pairs)
    return [f"{k:>{label}} | {'#' * round(width * (v or 0) / top)} {_fmt(v)}" for k, v in pairs]


def _scale_md(scale: dict, head: str) -> list[str]:
    if "error" in scale:
        return ["## habit: scaling", "", head, "", f"error: {scale['error']}", ""]
    lines = ["## habit: tokens/s by example length, time by data size", "", head, "",
             "| example length (target / mean) | batch tokens | real tokens/s | step (s) |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['length']} / {_fmt(r['mean_length'], 0)} | {r['batch_tokens']} | {_fmt(r['tokens_per_s'])} | "
              f"{_fmt(r['step_s'], 2)} |" for r in scale["lengths"]]
    lines += ["", "```", "tokens/s by example length", *_bars([(str(r["length"]), r["tokens_per_s"])
                                                                 for r in scale["lengths"]]), "```", "",
              "| data | real tokens | steps | seconds | s per 1k tokens |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['multiple']}x | {r['tokens']} | {r['steps']} | {_fmt(r['seconds'], 2)} | "
              f"{_fmt(r['s_per_1k_tokens'], 3)} |" for r in scale["data"]]
    lines += ["", "```", "seconds by data size, one epoch each (linear: s per 1k tokens stays flat; "
              "each includes one warm-up step)",
              *_bars([(f"{r['multiple']}x", r["seconds"]) for r in scale["data"]]), "```", ""]
    return lines


def _generation_md(gen: dict, head: str) -> list[str]:
    lines = ["## Generation: batched vs one prompt at a time; model load", "", head, ""]
    if "error" in gen:
        return lines + [f"error: {gen['error']}", ""]
    lines += [f"{gen['prompts']} prompts, greedy, at most {gen['max_new_tokens']} new tokens each, "
              f"dtype {gen['dtype']}.", "", "| mode | generated tokens | seconds | tokens/s |", "|---|---:|---:|---:|"]
    for mode in ("batched", "single"):
        r = gen[mode]
        label = f"batch_size {gen['batch_size']}" if mode == "batched" else "one at a time"
        lines.append(f"| {label} | {r['tokens']} | {_fmt(r['seconds'], 2)} | {_fmt(r['tokens_per_s'])} |")
    load = gen.get("load", {})
    kind = "GGUF conversion into an empty HABIT_CACHE" if load.get("gguf") else "not a GGUF source: a plain folder load"
    lines += ["", f"Batched speed-up: {_fmt(gen.get('speedup'), 1, 'x')}.", "",
              "| model load | seconds |", "|---|---:|",
              f"| first ({kind}) | {_fmt(load.get('first_s'), 2)} |",
              f"| cached | {_fmt(load.get('cached_s'), 2)} |", ""]
    if load.get("error"):
        lines += [f"load error: {load['error']}", ""]
    return lines


def print_result(result: dict) -> None:
    """The result as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(machine_line(result))
    if "rows" in result:
        table = Table(title=f"habit bench: {result['model']}, {result['tokens']} real tokens per variant")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("variant", "dtype") else "right")
        for r in result["rows"]:
            table.add_row(*table_cells(r))
        console.print(table)
        for r in result["rows"]:
            style = "red" if r["error"] else "dim"
            console.print(f"[bold]{r['name']}[/]: [{style}]{r['note']}[/]", highlight=False)
        console.print(f"[dim]{FLOPS_FORMULA}[/]", highlight=False)
    sections = markdown(result)
    for name in ("scale", "generation"):
        if name in sections:
            console.print(sections[name].split("Reproduce:")[0], markup=False, highlight=False)


# ---------------------------------------------------------------- workers (run in subprocesses)


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
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    trl = importlib.util.find_spec("trl") and __import__("trl").__version__
    auto = models.best_dtype("auto", device)
    return {"size": n, "peak_gflops": peaks, "auto_dtype": "bf16" if auto == torch.bfloat16 else "fp32",
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "trl": trl or None, "python": platform.python_version(),
                        "reps": reps}}


def _model_flops(folder: str, adapter: Path, mean_len: float) -> float:
    """flops_per_token for a base (its matmul weights, counted on the meta device) + an adapter."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    n_frozen = sum(m.in_features * m.out_features for m in skeleton.modules() if isinstance(m, torch.nn.Linear))
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


def _finish(spec: dict, marks: list, folder: str, adapter: Path, dtype: str, mean_len: float, seconds: float) -> dict:
    """What every training worker reports: speed from marks, memory now, then the held-out loss."""
    import torch

    rate, step_s = steady_rate(marks)
    out = {"tokens_per_s": rate, "step_s": step_s, "steps": len(marks), "tokens_trained": marks[-1][1] if marks else 0,
           "peak_rss_mb": _peak_rss_mb(), "dtype": dtype, "seconds": round(seconds, 2),
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    gc.collect()
    out["flops_per_token"] = _model_flops(folder, adapter, mean_len)
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


def worker_trl(spec: dict, packing: bool = False) -> dict:
    """TRL's SFTTrainer as a peer: prompt/completion data, its defaults, LoRA as habit's."""
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
    config = SFTConfig(**_trainer_args(spec, "trl"), bf16=bf16, fp16=False, learning_rate=2e-4,
                       max_length=spec["max_len"], packing=packing, max_steps=2)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules(), task_type="CAUSAL_LM"))
    # the step count needs the tokenized (packed) dataset, which only the trainer builds
    sizes = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.args.max_steps = _max_steps(spec["tokens"], sum(sizes) / len(sizes) * min(4, len(sizes)))
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
    micro = settings.batch_tokens // settings.grad_accum
    seen = 0
    plan = training.schedule(encoded, width, micro, settings.seed, settings.grad_accum)
    for step, (_, _, batches, _) in enumerate(plan, start=1):
        seen += sum(b.tokens for b in batches)
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


def worker_habit(spec: dict, precision: str = "auto", qlora: bool = False, plain: bool = False) -> dict:
    import torch

    table, train_ex, _ = _split(spec)
    device = _device()
    source = models.resolve(spec["model"])
    folder = models.model_dir(source)
    if qlora and (device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        return {"skipped": "skipped: needs CUDA and bitsandbytes"}
    tokenizer = models.load_tokenizer(source)
    template = render.choose_template(table, tokenizer)
    enc, _ = render.encode_all(train_ex, template, tokenizer, models.stop_ids(tokenizer), spec["max_len"])
    steps = habit_steps(enc, spec["tokens"], spec["max_len"])
    settings = TrainSettings(steps=steps, val_frac=0.0, save_every=10**9, precision=precision,
                             max_len=spec["max_len"], plain_path=plain)
    run = Path(spec["work"]) / "run"
    with _base_in_4bit() if qlora else contextlib.nullcontext():
        rows = _train_habit(_only_train(table, train_ex), run, spec["model"], settings)
    dtype = models.best_dtype(precision, device)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return _finish(spec, _marks(rows), folder, run, f"nf4+{name}" if qlora else name,
                   sum(len(e) for e in enc) / len(enc), rows[-1]["elapsed_s"])


@contextlib.contextmanager
def _base_in_4bit():
    """habit-qlora: habit.train loads its base in 4-bit NF4 inside this block. train() has no
    hook for a quantized base, so this worker process (and only it) swaps models.load_model for
    the duration of training; the held-out loss after it loads the usual fp32 base."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load_4bit(source, dtype=None, device="cpu"):
        source = models.resolve(source) if isinstance(source, str) else source
        tokenizer = models.load_tokenizer(source)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_quant_type="nf4")
        model = AutoModelForCausalLM.from_pretrained(
            models.model_dir(source), quantization_config=quant, dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()})
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.eval()
        return model, tokenizer

    original, models.load_model = models.load_model, load_4bit
    try:
        yield
    finally:
        models.load_model = original


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
    table, train_ex, _ = _split(spec)
    source = models.resolve(spec["model"])
    tokenizer = models.load_tokenizer(source)
    template = render.choose_template(table, tokenizer)
    stop = models.stop_ids(tokenizer)
    lengths = []
    for length in _ints(spec["scale_lengths"]):
        batch = max(TrainSettings.batch_tokens, length)
        examples = _synthetic(train_ex, tokenizer, length, spec["scale_steps"] * max(1, batch // length))
        enc, _ = render.encode_all(examples, template, tokenizer, stop, length)
        settings = TrainSettings(steps=spec["scale_steps"], val_frac=0.0, save_every=10**9, max_len=length,
                                 batch_tokens=batch)
        rows = _train_habit(_only_train(table, examples), Path(spec["work"]) / f"len-{length}", spec["model"],
                            settings)
        rate, step_s = steady_rate(_marks(rows))
        lengths.append({"length": length, "mean_length": sum(map(len, enc)) / max(1, len(enc)),
                        "batch_tokens": batch, "tokens_per_s": rate, "step_s": step_s})
    base, total = [], 0
    for ex in train_ex:  # the first examples, up to --scale-tokens: the data at 1x
        n = len(render.encode(ex, template, tokenizer, stop))
        if n <= spec["max_len"] and total < spec["scale_tokens"]:
            base.append(ex)
            total += n
    sizes = []
    for k in _ints(spec["scale_data"]):
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

    table, train_ex, val_ex = _split(spec)
    device = _device()
    dtype = models.best_dtype("auto", device)
    model, tokenizer = models.load_model(spec["model"], dtype=dtype, device=device)
    template = render.choose_template(table, tokenizer)
    stop = models.stop_ids(tokenizer, model)
    prompts = [render.prompt_text(template, tokenizer, fields=ex.fields) for ex in (val_ex + train_ex)]
    prompts = (prompts * math.ceil(spec["gen_prompts"] / len(prompts)))[: spec["gen_prompts"]]
    settings = GenerationSettings(max_new_tokens=spec["gen_tokens"])
    generate(model, tokenizer, template, prompts[:2], stop, GenerationSettings(max_new_tokens=2))  # warm-up
    out = {"prompts": len(prompts), "max_new_tokens": spec["gen_tokens"], "batch_size": 16,
           "dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}
    for mode, size in (("batched", 16), ("single", 1)):
        _sync()
        start = time.perf_counter()
        gens = generate(model, tokenizer, template, prompts, stop, settings, batch_size=size)
        _sync()
        seconds = time.perf_counter() - start
        tokens = sum(g.tokens for g in gens)
        out[mode] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    out["speedup"] = out["batched"]["tokens_per_s"] / out["single"]["tokens_per_s"]
    return out


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
    "habit-plain": lambda spec: worker_habit(spec, plain=True),
    "habit-fp32": lambda spec: worker_habit(spec, precision="fp32"),
    "habit-qlora": lambda spec: worker_habit(spec, qlora=True),
    "scale": worker_scale, "generation": worker_generation, "load": worker_load,
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
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker" or sys.argv[2] not in WORKERS:
        raise SystemExit("usage: python -m habit.bench --worker KIND SPEC.json (run by `habit bench`)")
    raise SystemExit(_worker_main(sys.argv[2], sys.argv[3]))
