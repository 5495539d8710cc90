"""Regional torch.compile, measured: each decoder layer compiled (`layer.compile()`, PyTorch's
regional-compilation recipe: one layer's code, reused by every layer) against eager, on habit's
fast path and on its plain path (--plain-path), each a fresh `habit.train` process of --steps.

Writes a bench:compile section: mean step seconds after the first two (compilation and the
first recompiles land there), the first step's seconds (what compiling costs), and how many
times dynamo hit its recompile limit (it then runs that frame eagerly).

    python bench/compile.py --steps 8 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r'''
import json, sys, time
from habit import training, data
from habit.settings import TrainSettings
compiled, plain, steps, out, csv = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4], sys.argv[5]
prepare, step = training.prepare, training.train_step
times = []

def compiling_prepare(*a, **k):
    t = prepare(*a, **k)
    if compiled:
        root = t.model
        while not hasattr(root, "layers"):
            root = getattr(root, "model", None) or root.base_model
        for layer in root.layers:
            layer.compile()
    return t

def timed_step(*a, **k):
    start = time.perf_counter()
    r = step(*a, **k)
    times.append(time.perf_counter() - start)
    return r

training.prepare, training.train_step = compiling_prepare, timed_step
training.train(data.load_examples(csv), out + "/run", settings=TrainSettings(steps=steps, plain_path=plain), force=True)
json.dump({"times": times}, open(out + "/times.json", "w"))
'''


def one(compiled: bool, plain: bool, steps: int, csv: str) -> dict:
    from habit import allocator

    with tempfile.TemporaryDirectory() as work:
        env = allocator.preload_env() or dict(os.environ)  # the malloc the habit command runs on
        done = subprocess.run([sys.executable, "-c", CHILD, str(int(compiled)), str(int(plain)), str(steps), work, csv],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:200]}
        times = json.loads(Path(work, "times.json").read_text())["times"]
    later = times[2:]
    return {"first_s": times[0], "step_s": sum(later) / len(later),
            "recompile_limit_hits": done.stderr.count("hit config.recompile_limit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "prompts.csv"))
    parser.add_argument("--out", help="markdown file whose bench:compile section is replaced")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (two are left out)")
    from habit import bench
    from habit.bench_workers import cpu_name_and_flags

    rows = []
    for plain in (False, True):
        for compiled in (False, True):
            name = ("plain path" if plain else "fast path (default)") + (", layers compiled" if compiled else ", eager")
            print(name, "...", flush=True)
            rows.append({"name": name, **one(compiled, plain, args.steps, args.data)})
            print(rows[-1], flush=True)
    cpu, flags = cpu_name_and_flags()
    base = rows[0].get("step_s")
    lines = ["## Regional torch.compile (one decoder layer's code, every layer)", "",
             f"{cpu} (flags: {' '.join(flags)}), {os.cpu_count()} cores; model smollm2-135m, the tutorial's table, "
             f"habit's defaults, {args.steps} steps each, every row its own process. {datetime.date.today()}.", "",
             "| path | mean step s (steps 3..n) | vs fast eager | first step s | recompile limit hit |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['step_s']:.2f} | {base / r['step_s']:.2f}x | {r['first_s']:.1f} "
                     f"| {r['recompile_limit_hits']} |")
    lines += ["", "Reproduce:", "", "```bash", f"python bench/compile.py --steps {args.steps} --out BENCHMARKS.md", "```"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        bench.write_sections(args.out, {"compile": text})


if __name__ == "__main__":
    main()
