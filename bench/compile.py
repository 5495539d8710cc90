"""Regional torch.compile, measured: `habit.train --compile on` (each decoder layer compiled,
PyTorch's regional-compilation recipe: one layer's code, reused by every layer) against eager, on
habit's fast path and on its plain path (--plain-path), each a fresh process of --steps.

Compiled rows run twice: into an empty compile cache (a first run) and into the cache that
run left (every later run of the same model). Writes a bench:compile section: mean step seconds
after the first two, the whole process's seconds (start-up, loading, the check and compiling
included), and how often dynamo hit its recompile limit (it then runs that frame eagerly).
Variants alternate, --repeats times; a row shows the median run.

    python bench/compile.py --steps 10 --repeats 3 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r'''
import json, sys, time
from habit import training, data
from habit.settings import TrainSettings
compile_mode, plain, steps, out, csv = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4], sys.argv[5]
step = training.train_step
times = []

def timed_step(*a, **k):
    start = time.perf_counter()
    r = step(*a, **k)
    times.append(time.perf_counter() - start)
    return r

training.train_step = timed_step
training.train(data.load_examples(csv), out + "/run", settings=TrainSettings(steps=steps, plain_path=plain,
               compile=compile_mode), force=True)
plan = json.load(open(out + "/run/run.json"))["plan"]
json.dump({"times": times, "compiled": plan["compiled"], "note": plan["compile_note"]}, open(out + "/times.json", "w"))
'''


def one(compile_mode: str, plain: bool, steps: int, csv: str, cache: str) -> dict:
    from habit import allocator

    with tempfile.TemporaryDirectory() as work:
        env = dict(allocator.preload_env() or os.environ)  # the malloc the habit command runs on
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, compile_mode, str(int(plain)), str(steps), work, csv],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:200]}
        found = json.loads(Path(work, "times.json").read_text())
    later = found["times"][2:]
    return {"step_s": sum(later) / len(later), "process_s": wall, "compiled": found["compiled"],
            "note": found["note"], "recompile_limit_hits": done.stderr.count("hit config.recompile_limit")}


VARIANTS = [  # (name, --compile, plain path, cache)
    ("fast path (default), eager", "off", False, None),
    ("fast path, compiled, empty cache", "on", False, "empty"),
    ("fast path, compiled, cache warm", "on", False, "warm"),
    ("plain path, eager", "off", True, None),
    ("plain path, compiled, cache warm", "on", True, "warm"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "prompts.csv"))
    parser.add_argument("--out", help="markdown file whose bench:compile section is replaced")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (two are left out)")
    from habit import bench
    from habit.bench_workers import cpu_name_and_flags
    from habit.fastpath import COMPILE_MIN_STEPS

    runs = {name: [] for name, *_ in VARIANTS}
    with tempfile.TemporaryDirectory() as warm:
        for plain in (False, True):  # fill the warm cache: what a first run leaves behind
            print("warming the compile cache", one("on", plain, 4, args.data, warm), flush=True)
        for r in range(args.repeats):
            for name, mode, plain, cache in VARIANTS:
                with tempfile.TemporaryDirectory() as empty:
                    found = one(mode, plain, args.steps, args.data, warm if cache == "warm" else empty)
                print(name, r + 1, found, flush=True)
                runs[name].append(found)
    rows = []
    for name, *_ in VARIANTS:
        ok = sorted((x for x in runs[name] if "error" not in x), key=lambda x: x["step_s"])
        rows.append({"name": name, **(ok[len(ok) // 2] if ok else runs[name][0]), "runs": len(ok),
                     "min_step_s": ok[0]["step_s"] if ok else None,
                     "process_med_s": statistics.median(x["process_s"] for x in ok) if ok else None})
    cpu, flags = cpu_name_and_flags()
    base = rows[0].get("step_s")
    lines = ["## Regional torch.compile (one decoder layer's code, every layer)", "",
             f"{cpu} (flags: {' '.join(flags)}), {os.cpu_count()} cores; model smollm2-135m, the tutorial's table, "
             f"habit's defaults, {args.steps} steps each, every run its own process, variants alternating, "
             f"{args.repeats} runs each (the median run's figures; best: the fastest run's step). "
             f"{datetime.date.today()}.", "",
             "| path | mean step s (steps 3..n) | best | vs fast eager | whole process s | compiled | "
             "recompile limit hit |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['step_s']:.2f} | {r['min_step_s']:.2f} | {base / r['step_s']:.2f}x "
                     f"| {r['process_med_s']:.1f} | {'yes' if r['compiled'] else 'no'} "
                     f"| {r['recompile_limit_hits']} |")
    by = {r["name"]: r for r in rows if "error" not in r}
    eager, cold, warm = (by.get(n) for n, *_ in VARIANTS[:3])
    if eager and cold and warm:
        lines += ["", f"Compiled, a step takes {eager['step_s'] - warm['step_s']:.2f} s less than eager (median runs); "
                  f"the whole process takes {cold['process_med_s'] - eager['process_med_s']:.0f} s more into an "
                  f"empty compile cache and {warm['process_med_s'] - eager['process_med_s']:.0f} s more into a "
                  "warm one (loading, the check, compiling and every step included). `--compile auto` "
                  f"compiles CPU runs of at least {COMPILE_MIN_STEPS} steps."]
    lines += ["", "Reproduce:", "", "```bash", f"python bench/compile.py --steps {args.steps} --repeats {args.repeats} --out BENCHMARKS.md", "```"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        bench.write_sections(args.out, {"compile": text})


if __name__ == "__main__":
    main()
