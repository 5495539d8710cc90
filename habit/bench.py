"""habit bench: the tutorial's recipe, TRL and habit trained side by side, in one run.

Every variant trains the same model on the same training split for the same number of real
(non-pad) tokens, in its own subprocess, one after another: peak RSS is then each variant's own,
and no two compete for the cores. A subprocess measures the machine's matmul peak (bf16 and fp32)
before the variants and again after them, so MFU is against what this machine does (the better
of the two: a shared machine has busy moments), not a datasheet.

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

This module is the parent: options, orchestration, tables. The workers are habit.bench_workers.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from habit import allocator, data, models
from habit.errors import HabitError
from habit.settings import DEFAULT_MODEL, TrainSettings

TEMPLATE = "<act>: {act}\n<prompt>: {prompt}"  # the tutorial's text; every row trains on it
VARIANTS = {
    "recipe": "the tutorial: fp32, HF Trainer + DataCollatorForLanguageModeling (pad = EOS, "
              "pad to longest), gradient checkpointing, batch 4, LoRA r16 q_proj,v_proj dropout 0.05, lr 2e-4",
    "trl": "TRL SFTTrainer, prompt/completion + EOS (completion-only loss), TRL defaults, "
           "LoRA as habit's, batch 4, lr 2e-4 (TRL's LoRA guide; its 2e-5 default is for full fine-tuning)",
    "trl-packing": "as trl, packing=True (BFD, padding-free)",
    "trl-matched": "TRL SFTTrainer with habit's hyperparameters: packed padding-free rows of --batch-tokens "
                   "(2048) a step, lr 1e-3, 5% warm-up then cosine to 10%, clip 1.0, no gradient "
                   "checkpointing, LoRA as habit's, bf16 where fast: the same work as the habit row",
    "habit": "habit.train defaults: packed rows, bf16 where fast, fast paths (attention per example, "
             "merged LoRA, chunked head loss, the shared system-prompt prefix computed once a pass), "
             "passes of ≤1024 tokens",
    "habit-compile": "habit.train --compile on: the defaults with the decoder layers compiled (regional "
                     "torch.compile, checked against eager on the first batch); its compile runs "
                     "before step 2, outside the tokens/s (cost: the Regional torch.compile table)",
    "habit-plain": "habit.train --plain-path: the same without the fast paths (sdpa over whole rows, "
                   "PEFT's LoRA forward, full logits at targets)",
    "habit-sysmalloc": "habit.train defaults on the system malloc (HABIT_MALLOC=system): what tcmalloc adds",
    "habit-fp32": "habit.train --precision fp32",
    "habit-qlora": "habit.train --quantize nf4: the base in 4-bit NF4 (bitsandbytes, CPU and CUDA)",
}
FLOPS_FORMULA = ("FLOPs/token = 4·N_frozen + 6·N_lora + 6·layers·d_attn·s̄  (N_frozen: every matmul weight "
                 "incl. lm_head, forward + input grads, the lm_head counted only on the tokens it runs on: "
                 "habit's at targets, the Trainer rows' at every token; N_lora: adapter weights, + weight grads; "
                 "causal attention over the mean example length s̄), times the fraction of real tokens "
                 "the model ran on (habit computes a prefix shared by all examples once a pass)")


def _opt(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help, "flag": None})  # as settings.py's


@dataclass(frozen=True)
class BenchOptions:
    """Every `habit bench` flag (the CLI builds them from these fields, as for training)."""

    model: str = _opt(DEFAULT_MODEL, "model every variant trains: alias, local HF dir, .gguf or hub id")
    data: str = _opt("../shared/data/prompts.csv", "an act,prompt table (the tutorial's columns)")
    tokens: int = _opt(20000, "real (non-pad) training tokens each variant consumes")
    only: str = _opt("all", "variants to run, a comma list or all: " + ", ".join(VARIANTS))
    max_len: int = _opt(TrainSettings().max_len, "longest example in tokens (the recipe and TRL truncate)")
    repeats: int = _opt(1, "runs of each training variant, interleaved (A B C A B C ...); the table "
                        "shows the median and the best tokens/s and the median held-out loss")
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
    long: bool = _opt(False, "one whole `habit train` epoch on a long-tailed table built from --data "
                             "(section bench:long)")
    long_rows: int = _opt(1500, "--long: rows of that table (answers ~240 tokens at the median, a tail past 4k)")

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise HabitError(message)

        check(self.tokens >= 1, "--tokens must be at least 1")
        check(self.repeats >= 1, "--repeats must be at least 1")
        check(self.timeout >= 1, "--timeout must be at least 1")
        check(self.max_len >= 8, "--max-len must be at least 8")
        check(self.peak_size >= 0, "--peak-size must not be negative")
        unknown = [n for n in self.variants() if n not in VARIANTS]
        check(not unknown, f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        check(bool(self.variants()) or not self.runs_train(), "--only names no variant")
        check(self.scale_steps >= 2, "--scale-steps must be at least 2 (the first step is not timed)")
        check(self.scale_tokens >= 1 and self.gen_prompts >= 1 and self.gen_tokens >= 1 and self.long_rows >= 20,
              "--scale-tokens, --gen-prompts and --gen-tokens must be at least 1, --long-rows at least 20")
        for flag, value in (("--scale-lengths", self.scale_lengths), ("--scale-data", self.scale_data)):
            check(all(x.strip().isdigit() and int(x) > 0 for x in value.split(",")),
                  f"{flag} must be a comma list of positive whole numbers (got {value!r})")
        check(all(n >= 32 for n in int_list(self.scale_lengths)), "--scale-lengths must each be at least 32")

    def variants(self) -> list[str]:
        if self.only.strip() == "all":
            return list(VARIANTS)
        return [n.strip() for n in self.only.split(",") if n.strip()]

    def runs_train(self) -> bool:
        return self.train or not (self.scale or self.generation or self.long)

    def command(self, out: str | None = None) -> str:
        """The `habit bench` command line that repeats this run (non-default flags only)."""
        parts = ["habit", "bench"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "data", "tokens") or value != f.default:
                flag = "--" + f.name.replace("_", "-")
                parts += [flag] if value is True else [] if value is False else [flag, str(value)]
        return shlex.join(parts + (["--out", out] if out else []))


def int_list(text: str) -> list[int]:
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


def best_peak(runs: list[dict]) -> dict:
    """The best GFLOP/s per dtype over several peak measurements."""
    return {k: max(run[k] for run in runs) for k in runs[0]}


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
            rows = train_rows(options, work, peak, say)
            # a busy moment on a shared machine lowers one measurement (seen: bf16 268 instead of
            # ~415 GFLOP/s, which would have put MFU near 100%): measure again after the table
            say("measuring the matmul peak again (MFU uses the best of before and after)")
            again = spawn("peak", options, work / "after", options.timeout)
            if "error" not in again:
                result["peak_runs"] = [peak["peak_gflops"], again["peak_gflops"]]
                result["peak_gflops"] = best_peak(result["peak_runs"])
                for r in rows:
                    r["mfu"] = _row_mfu(r["tokens_per_s"], r["flops_per_token"], r["dtype"], result["peak_gflops"])
            result.update(tokens=options.tokens, flops_formula=FLOPS_FORMULA, rows=rows)
        if options.scale:
            say("scale: habit's tokens/s by length and time by data size")
            result["scale"] = spawn("scale", options, work, options.timeout)
        if options.generation:
            result["generation"] = generation_bench(options, work, say)
        if options.long:
            say(f"long: one `habit train` epoch on a long-tailed table of {options.long_rows} rows")
            result["long"] = spawn("long", options, work / "long", options.timeout)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_rows(options: BenchOptions, work: Path, peak: dict, say: Callable[[str], None]) -> list[dict]:
    """Each variant's row; with --repeats N the variants run interleaved N times (a slow moment on
    the machine then lands on every variant alike) and a row is their median."""
    runs: dict[str, list[dict]] = {name: [] for name in options.variants()}
    for k in range(options.repeats):
        for name in options.variants():
            say(f"{name}: training {options.tokens} real tokens" + (f" (run {k + 1}/{options.repeats})"
                                                                     if options.repeats > 1 else ""))
            skip = _skip_reason(name, peak)
            found = {"skipped": skip} if skip else spawn(name, options, work / f"run-{k}", options.timeout)
            runs[name].append(_row(name, found, peak["peak_gflops"]))
            r = runs[name][-1]
            say(f"{name}: " + (f"{r['tokens_per_s']:.1f} tokens/s, held-out loss {_fmt(r['heldout_loss'], 3)}"
                               if r["tokens_per_s"] else r["note"]))
    rows = [median_row(found) for found in runs.values()]
    recipe = next((r["tokens_per_s"] for r in rows if r["name"] == "recipe"), None)
    for r in rows:
        r["ratio"] = round(r["tokens_per_s"] / recipe, 3) if recipe and r["tokens_per_s"] else None
    return rows


def median_row(runs: list[dict]) -> dict:
    """One row from several runs of a variant: the run with the median tokens/s (its other figures
    come with it), the lowest and the best tokens/s, the median held-out loss, and every run's tokens/s."""
    done = sorted((r for r in runs if r["tokens_per_s"]), key=lambda r: r["tokens_per_s"])
    if not done:
        return {**runs[0], "best_tokens_per_s": None, "min_tokens_per_s": None, "runs": len(runs),
                "run_tokens_per_s": []}
    mid = done[(len(done) - 1) // 2]
    losses = sorted(r["heldout_loss"] for r in done if r["heldout_loss"] is not None)
    return {**mid, "best_tokens_per_s": done[-1]["tokens_per_s"], "min_tokens_per_s": done[0]["tokens_per_s"],
            "runs": len(done),
            "heldout_loss": losses[(len(losses) - 1) // 2] if losses else None,
            "run_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def _skip_reason(name: str, peak: dict) -> str | None:
    if name == "habit-fp32" and peak["auto_dtype"] == "fp32":
        return "skipped: habit already trains in fp32 on this machine"
    if name == "habit-qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "skipped: needs bitsandbytes (pip install 'habit[nf4]')"
    return None


def _row(name: str, found: dict, peaks: dict) -> dict:
    dtype = found.get("dtype")
    tps = found.get("tokens_per_s")
    note = found.get("error") or found.get("skipped") or VARIANTS[name]
    if found.get("error"):
        note = f"error: {note}"
    return {"name": name, "tokens_per_s": _round(tps, 2), "ratio": None,
            "step_s": _round(found.get("step_s"), 4), "peak_rss_mb": _round(found.get("peak_rss_mb"), 1),
            "mfu": _row_mfu(tps, found.get("flops_per_token"), dtype, peaks),
            "heldout_loss": _round(found.get("heldout_loss"), 5), "dtype": dtype, "note": note,
            "tokens_trained": found.get("tokens_trained"), "steps": found.get("steps"),
            "flops_per_token": found.get("flops_per_token"), "peak_gpu_mb": found.get("peak_gpu_mb"),
            "malloc": found.get("malloc"), "error": bool(found.get("error"))}


def _row_mfu(tokens_per_s, flops, dtype: str | None, peaks: dict) -> float | None:
    """A row's MFU against the measured peak of the dtype it computes in."""
    return _round(mfu(tokens_per_s, flops, peaks.get(_compute(dtype))), 5)


def _compute(dtype: str | None) -> str | None:
    return None if dtype is None else "bf16" if "bf16" in dtype else "fp32"


def _round(x, digits: int):
    return None if x is None else round(x, digits)


# Rows that run on the system malloc: the tutorial's recipe and TRL as their users run them (plain
# python), and habit without the tcmalloc its command loads (see habit.allocator).
SYSTEM_MALLOC = ("recipe", "trl", "trl-packing", "trl-matched", "habit-sysmalloc")


def malloc_env(kind: str) -> dict:
    """The environment a worker starts in: habit's rows on the malloc the `habit` command would
    load, the SYSTEM_MALLOC rows on the system's."""
    if kind in SYSTEM_MALLOC:
        return allocator.without(os.environ)
    return allocator.preload_env(os.environ) or dict(os.environ)


def spawn(kind: str, options: BenchOptions, work: Path, timeout: int, env: dict | None = None) -> dict:
    """Run one worker (`python -m habit.bench_workers --worker KIND SPEC`) and return what it wrote.

    A worker that fails, dies or runs out of time becomes {"error": one line}, never an exception:
    one broken variant must not lose the others' rows."""
    folder = work / kind
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**dataclasses.asdict(options), "work": str(folder), "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    log = folder / "log.txt"
    env = {**malloc_env(kind), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    try:
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, "-m", "habit.bench_workers", "--worker", kind, str(folder / "spec.json")],
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
    say("generation: llama.cpp (xllamacpp) on the same GGUF and prompts")
    out["llamacpp"] = spawn("llamacpp", options, work / "llamacpp", options.timeout)
    return out


# ---------------------------------------------------------------- output


def _fmt(x, digits: int = 1, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


COLUMNS = ("variant", "real tokens/s", "min", "best", "runs", "vs recipe", "step s", "peak RSS MB", "MFU", "held-out loss", "dtype",
           "malloc")


def table_cells(row: dict) -> list[str]:
    return [row["name"], _fmt(row["tokens_per_s"]), _fmt(row.get("min_tokens_per_s")),
            _fmt(row.get("best_tokens_per_s")), str(row.get("runs", 1)),
            _fmt(row["ratio"], 2, "x"), _fmt(row["step_s"], 2),
            _fmt(row["peak_rss_mb"], 0), _fmt(None if row["mfu"] is None else 100 * row["mfu"], 1, "%"),
            _fmt(row["heldout_loss"], 3), row["dtype"] or "–", row.get("malloc") or "–"]


def machine_line(result: dict) -> str:
    m = result["machine"]
    peak = result["peak_gflops"]
    runs = ", before and after the table" if len(result.get("peak_runs", ())) > 1 else ""
    flags = " ".join(m.get("flags") or []) or "none of avx2/avx512/amx"
    return (f"{m['cpu']} (flags: {flags}), {m['cores']} cores, torch threads: {m['threads']}, device {m['device']}; "
            f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, trl {m['trl']}. "
            f"Matmul peak ({result['peak_size']}³, best of {m['reps']}{runs}): bf16 {peak['bf16']:.0f} GFLOP/s, "
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
        lines += ["", "Real tokens/s: non-pad tokens of steps 2..n over their wall time (step 1 is warm-up); "
                  "with several runs a row is the median run (its step time, memory, MFU come with it), min and "
                  "best are the slowest and the fastest run, held-out loss is the median. "
                  f"MFU: tokens/s x model FLOPs per token / the matmul peak of the row's dtype; {FLOPS_FORMULA}. "
                  "Held-out loss: response + EOS tokens of the held-out split, each adapter on an fp32 base, "
                  "scored by habit's render + eval_loss. Malloc: the recipe and TRL run on the system's, as "
                  "their users run them; habit's rows on the one the `habit` command loads (tcmalloc where "
                  "installed: `make malloc`), habit-sysmalloc on the system's.", ""]
        sections["train"] = "\n".join(lines + _reproduce(result, out))
    if "scale" in result:
        sections["scale"] = "\n".join(_scale_md(result["scale"], head, result.get("peak_gflops") or {})
                                      + _reproduce(result, out))
    if "generation" in result:
        sections["generation"] = "\n".join(_generation_md(result["generation"], head) + _reproduce(result, out))
    if "long" in result:
        sections["long"] = "\n".join(_long_md(result["long"], head) + _reproduce(result, out))
    return sections


def _reproduce(result: dict, out: str | None) -> list[str]:
    command = result["command"] + (f" --out {shlex.quote(out)}" if out else "")
    return ["Reproduce:", "", "```bash", command, "```"]


def _bars(pairs: list[tuple[str, float | None]], width: int = 40) -> list[str]:
    top = max((v for _, v in pairs if v), default=0) or 1
    label = max(len(k) for k, _ in pairs)
    return [f"{k:>{label}} | {'#' * round(width * (v or 0) / top)} {_fmt(v)}" for k, v in pairs]


def _scale_md(scale: dict, head: str, peaks: dict | None = None) -> list[str]:
    if "error" in scale:
        return ["## habit: scaling", "", head, "", f"error: {scale['error']}", ""]
    lines = ["## habit: tokens/s by example length, time by data size", "", head, "",
             "| example length (target / mean) | batch tokens | real tokens/s | step (s) | MFLOP per token | MFU |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in scale["lengths"]:
        flops = r.get("flops_per_token")
        share = _row_mfu(r["tokens_per_s"], flops, r.get("dtype"), peaks or {})
        lines.append(f"| {r['length']} / {_fmt(r['mean_length'], 0)} | {r['batch_tokens']} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['step_s'], 2)} | {_fmt(flops and flops / 1e6, 0)} | {_fmt(share and 100 * share, 1, '%')} |")
    lines += ["", "MFLOP per token as in the training table (attention over the mean length): it grows with the "
              "length, so tokens/s falls even where MFU holds."]
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
    comp = gen.get("compiled") or {}
    if "tokens_per_s" in comp:
        lines.append(f"| one at a time, static cache, decode step compiled | {comp['tokens']} | "
                     f"{_fmt(comp['seconds'], 2)} | {_fmt(comp['tokens_per_s'])} |")
    for mode in ("batched", "single"):
        r = (gen.get("fp16") or {}).get(mode)
        if r:
            label = f"batch_size {gen['batch_size']}" if mode == "batched" else "one at a time"
            lines.append(f"| {label}, the weights in fp16 | {r['tokens']} | {_fmt(r['seconds'], 2)} | "
                         f"{_fmt(r['tokens_per_s'])} |")
    lines += _anatomy_md(gen)
    lines += _llamacpp_md(gen)
    load = gen.get("load", {})
    kind = "GGUF conversion into an empty HABIT_CACHE" if load.get("gguf") else "not a GGUF source: a plain folder load"
    lines += ["", f"Batched speed-up: {_fmt(gen.get('speedup'), 1, 'x')}.", "",
              "| model load | seconds |", "|---|---:|",
              f"| first ({kind}) | {_fmt(load.get('first_s'), 2)} |",
              f"| cached | {_fmt(load.get('cached_s'), 2)} |", ""]
    if load.get("error"):
        lines += [f"load error: {load['error']}", ""]
    return lines


def _anatomy_md(gen: dict) -> list[str]:
    """What one prompt at a time spends its time on, and what compiling its decode step did."""
    lines = []
    comp, anat = gen.get("compiled") or {}, gen.get("anatomy")
    if "tokens_per_s" in comp:
        lines += ["", f"Compiled: {_fmt(comp['tokens_per_s'] / gen['single']['tokens_per_s'], 2, 'x')} one at a "
                  f"time, after {_fmt(comp['compile_s'], 0)} s of compiling (generate's decode step through "
                  "torch.compile with a static KV cache; not what habit's commands run)."]
    elif comp.get("error"):
        lines += ["", f"Compiled decode: {comp['error']}"]
    if anat:
        lines += ["", f"One prompt under torch.profiler: {_fmt(anat['ms_per_token'])} ms of CPU time per new token "
                  f"over {anat['ops_per_token']:.0f} operator calls, {_fmt(100 * anat['products_share'], 0)}% of "
                  "it in matrix products (every weight read once per token, batch or not)."]
    return lines


def _long_md(long: dict, head: str) -> list[str]:
    lines = ["## A long-tailed table: one whole epoch", "", head, ""]
    if "error" in long:
        return lines + [f"error: {long['error']}", ""]
    n = long["lengths"]
    return lines + [
        f"A stand-in for the 2026 edition of the prompts table (not reachable from here): {long['rows']} rows "
        f"built from `{long['data']}` (answers are its prompts joined to lengths drawn log-normally, median "
        f"{long['median_target']} tokens, σ {long['sigma']}), seed 0. Example tokens, template included: "
        f"median {n['median']}, p99 {n['p99']}, max {n['max']}.", "",
        "| rows | kept (train + held out) | dropped as too long | --max-len (default) | steps | real tokens "
        "| training s | whole process s | real tokens/s (training) | s per 1k tokens (whole process) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {long['rows']} | {long['kept']} | {long['dropped']} ({_fmt(100 * long['dropped'] / long['rows'], 1)}%) "
        f"| {long['max_len']} | {long['steps']} | {long['tokens']} | {_fmt(long['train_s'], 1)} "
        f"| {_fmt(long['wall_s'], 1)} | {_fmt(long['tokens_per_s'])} | {_fmt(1000 * long['wall_s'] / long['tokens'], 2)} |",
        "", f"`habit train TABLE --epochs 1` with every other setting at its default, timed from the command's "
        "start to its exit (start-up, loading, the data check, validation and the adapter's save included); "
        f"the old default --max-len 1024 would have dropped {long['dropped_at_1024']} rows "
        f"({_fmt(100 * long['dropped_at_1024'] / long['rows'], 1)}%).", ""]


def _llamacpp_md(gen: dict) -> list[str]:
    """llama.cpp's rows beside habit's, and habit's tokens/s as a ratio of llama.cpp's."""
    cpp = gen.get("llamacpp") or {}
    if "error" in cpp or "skipped" in cpp:
        return ["", f"llama.cpp: {cpp.get('error') or cpp.get('skipped')}"]
    if not cpp:
        return []
    quant = cpp["gguf"]
    lines = ["", f"The same prompt ids through llama.cpp (xllamacpp, in process, {cpp['threads']} threads), "
             f"greedy, the same limit: batched is one request of all prompts over as many parallel slots. "
             f"`{quant}` is the GGUF habit dequantizes to load the model; `f16` is that file with every "
             "weight dequantized to f16, so llama.cpp reads the weights habit computes with.", "",
             "| llama.cpp | weights | generated tokens | seconds | tokens/s | habit ÷ llama.cpp |",
             "|---|---|---:|---:|---:|---:|"]
    for weights in (quant, "f16"):
        for mode, label in (("batched", "batched"), ("single", "one at a time")):
            r = cpp[f"{weights}-{mode}"]
            ratio = gen[mode]["tokens_per_s"] / r["tokens_per_s"] if r["tokens_per_s"] else None
            lines.append(f"| {label} | {weights} | {r['tokens']} | {_fmt(r['seconds'], 2)} | "
                         f"{_fmt(r['tokens_per_s'])} | {_fmt(ratio, 2, 'x')} |")
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
    for name in ("scale", "generation", "long"):
        if name in sections:
            console.print(sections[name].split("Reproduce:")[0], markup=False, highlight=False)
