"""Where a default training step's time goes, under torch.profiler: habit.train on the tutorial's
table with its defaults, the steps after the first two profiled, each operator's own CPU time
summed into a few kinds. Splits the gap to the matmul peak into the matrix products' own speed
and the time outside them. Writes the bench:profile section of BENCHMARKS.md.

    python bench/step_profile.py --steps 8 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "prompts.csv"
WARM_STEPS = 2  # not profiled: the first step also runs the fast-path check, the second warms caches

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
SOFTMAX = {"aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
           "aten::_log_softmax_backward_data"}
COPIES = {"aten::copy_", "aten::clone", "aten::cat", "aten::index", "aten::index_select", "aten::gather",
          "aten::scatter", "aten::scatter_add_", "aten::index_put_", "aten::index_add_",
          "aten::embedding_dense_backward", "aten::_index_put_impl_", "aten::masked_fill", "aten::masked_fill_"}
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros", "aten::zeros_like",
               "aten::ones_like", "aten::full", "aten::resize_", "aten::new_empty", "aten::new_zeros",
               "aten::new_empty_strided", "aten::fill_", "aten::zero_"}
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute",
         "aten::as_strided", "aten::slice", "aten::select", "aten::expand", "aten::unsqueeze", "aten::squeeze",
         "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::unflatten", "aten::flatten",
         "aten::alias", "aten::detach", "aten::detach_", "aten::_unsafe_view", "aten::unbind",
         "aten::lift_fresh", "aten::numpy_T", "aten::contiguous", "aten::to", "aten::_to_copy",
         "aten::matmul", "aten::linear", "aten::softmax", "aten::chunk"}
# aten::to/_to_copy, matmul, linear, softmax, contiguous: wrappers whose work shows up in the
# copy_/mm/_softmax they call, so their own time is dispatch, as a view's is

KINDS = [("matrix products (mm, addmm, bmm, baddbmm)", MATMUL), ("softmax", SOFTMAX),
         ("copies and casts (copy_, cat, clone, index…)", COPIES),
         ("allocation and fill", ALLOCATIONS), ("views and wrappers (dispatch only)", VIEWS)]
OTHER = "elementwise and reductions (mul, add, silu, rsqrt, mean, the optimizer's _foreach…)"


def kind_of(name: str) -> str | None:
    if not name.startswith("aten::"):
        return None  # autograd-engine and profiler markers: their time is the ops inside them
    for label, names in KINDS:
        if name in names:
            return label
    return OTHER


def role_of(key: str, a, b) -> str:
    """What a matrix product of these shapes is in a LoRA step (by its sizes)."""
    dims = (a[-2], a[-1], b[-1])
    if key == "aten::bmm":
        return "attention (per-bucket bmm)"
    if max(dims) >= 16384:
        return "lm_head (at targets, forward and input gradient)"
    if min(dims) <= 64:
        return "LoRA rank-sized (gradients of A and B)"
    return "frozen and merged weights (forward, input gradients)"


def profiled_train(steps: int, work: Path):
    """habit.train with its defaults for `steps` steps, every step after WARM_STEPS under the
    profiler. Returns (profiler, wall seconds of the profiled steps, log rows, run dir, the table,
    its training examples)."""
    from torch.profiler import ProfilerActivity, profile

    from habit import bench_workers, data, training
    from habit.settings import TrainSettings

    table = data.load_examples(str(DATA), template=bench_workers.TEMPLATE)
    train_ex, _ = data.split(table, TrainSettings.val_frac, TrainSettings.seed)
    run = work / "run"
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    done, wall = [0], [0.0]
    step = training.train_step

    def timed_step(*args, **kwargs):  # training calls train_step by its module name
        done[0] += 1
        if done[0] <= WARM_STEPS:
            return step(*args, **kwargs)
        if done[0] == WARM_STEPS + 1:
            prof.__enter__()
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            wall[0] += time.perf_counter() - start
            if done[0] == steps:
                prof.__exit__(None, None, None)

    settings = TrainSettings(steps=steps, val_frac=0.0, save_every=10**9)
    rows = []
    training.train_step = timed_step
    try:
        training.train(bench_workers._only_train(table, train_ex), run, settings=settings,
                       on_log=lambda r: rows.append(r) if "loss" in r else None)
    finally:
        training.train_step = step
    return prof, wall[0], rows, run, table, train_ex


def summarize(prof, steps: int) -> dict:
    own, calls = {}, {}
    for event in prof.key_averages():
        label = kind_of(event.key)
        if label is None:
            continue
        own[label] = own.get(label, 0.0) + event.self_cpu_time_total / 1e6
        calls[label] = calls.get(label, 0) + event.count
    top = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: -e.self_cpu_time_total)[:12]
    shapes = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::bmm") and len(e.input_shapes) >= 2 and all(e.input_shapes[:2]):
            a, b = e.input_shapes[:2]
            flops = 2 * a[-2] * a[-1] * b[-1] * (a[0] if e.key == "aten::bmm" else 1)
            shapes.append((e.key, a, b, e.self_cpu_time_total / 1e6, e.count, flops))
    shapes.sort(key=lambda r: -r[3])
    roles = {}
    for key, a, b, seconds, count, flops in shapes:
        role = roles.setdefault(role_of(key, a, b), [0.0, 0, 0.0])
        role[0] += seconds
        role[1] += count
        role[2] += flops * count
    return {"own_s": own, "calls": calls, "steps": steps, "shapes": shapes[:10], "roles": roles,
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top]}


def markdown(summary: dict, wall: float, flops_step: float, peak: float, head: str, command: str) -> str:
    n = summary["steps"]
    own, calls = summary["own_s"], summary["calls"]
    in_ops = sum(own.values())
    order = [label for label, _ in KINDS] + [OTHER]
    mm = own.get(order[0], 0.0)
    lines = ["## Where a training step's time goes (torch.profiler)", "", head, "",
             f"{n} default steps of `habit.train` on the tutorial's table (after {WARM_STEPS} warm-up steps), "
             "each operator's own CPU time (its children's excluded) summed by kind; calls count every "
             "operator entered, nested ones too. The profiler's own cost inflates the many small "
             "operators, so the shares of the small kinds are upper bounds.", "",
             "| kind | ms per step | share of the step | calls per step |", "|---|---:|---:|---:|"]
    for label in order:
        if label in own:
            lines.append(f"| {label} | {own[label] / n * 1e3:.0f} | {own[label] / wall:.1%} | {calls[label] / n:,.0f} |")
    rest = wall - in_ops
    lines.append(f"| outside operators (Python, autograd engine, profiler) | {rest / n * 1e3:.0f} | {rest / wall:.1%} | – |")
    lines.append(f"| **step (wall)** | **{wall / n * 1e3:.0f}** | 100% | {sum(calls.values()) / n:,.0f} |")
    mfu = flops_step / (wall / n) / peak
    mm_rate = flops_step / (mm / n) if mm else 0.0
    lines += ["", f"The step's model FLOPs ({flops_step / 1e9:.0f} GFLOP, as the training table counts them) "
              f"over its wall time: {mfu:.1%} of the bf16 matmul peak ({peak / 1e9:.0f} GFLOP/s) under the "
              f"profiler. Over the matrix products' own time alone they run at {mm_rate / 1e9:.0f} GFLOP/s, "
              f"{mm_rate / peak:.0%} of that peak; so of the gap to the peak, the products' shapes cost "
              f"{1 - mm_rate / peak:.0%} of the matrix time and everything else {1 - mm / wall:.0%} of the step.",
              "", "The operators with the most own time:", "", "| operator | ms per step | calls per step |",
              "|---|---:|---:|"]
    for key, seconds, count in summary["top"]:
        lines.append(f"| `{key}` | {seconds / n * 1e3:.1f} | {count / n:,.0f} |")
    lines += ["", "The matrix products (mm, bmm) by role, told apart by their sizes:", "",
              "| role | ms per step | share of the step | calls per step | GFLOP/s |", "|---|---:|---:|---:|---:|"]
    for role, (seconds, count, flops) in sorted(summary["roles"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {role} | {seconds / n * 1e3:.0f} | {seconds / wall:.1%} | {count / n:,.0f} | "
                     f"{flops / seconds / 1e9:.0f} |")
    lines += ["", "The matrix products with the most own time, by shape (GFLOP/s: the product's own FLOPs over "
              "its own time):", "", "| operator | shapes | ms per step | calls per step | GFLOP/s |",
              "|---|---|---:|---:|---:|"]
    for key, a, b, seconds, count, flops in summary["shapes"]:
        lines.append(f"| `{key}` | {'×'.join(map(str, a))} · {'×'.join(map(str, b))} | {seconds / n * 1e3:.1f} | "
                     f"{count / n:,.0f} | {flops * count / seconds / 1e9:.0f} |")
    lines += ["", "Reproduce (alone on the machine):", "", "```bash", command, "```"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help=f"training steps (the first {WARM_STEPS} not profiled)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    if args.steps <= WARM_STEPS:
        p.error(f"--steps must be over {WARM_STEPS}")
    from habit import allocator

    if argv is None:  # on the malloc habit's command runs on
        allocator.reexec(sys.argv[1:], script=sys.argv[0])
    import torch

    from habit import bench, bench_workers, models, render
    from habit.settings import TrainSettings

    torch.set_num_threads(min(2, torch.get_num_threads()))
    peak = bench_workers.worker_peak({"peak_size": None})["peak_gflops"]["bf16"] * 1e9
    with tempfile.TemporaryDirectory(prefix="habit-bench-profile-") as work:
        prof, wall, rows, run, table, train_ex = profiled_train(args.steps, Path(work))
        source = models.resolve("smollm2-135m")
        tokenizer = models.load_tokenizer(source)
        template = render.choose_template(table, tokenizer)
        enc, _ = render.encode_all(train_ex, template, tokenizer, models.stop_ids(tokenizer), TrainSettings().max_len)
        mean, head_share = bench_workers._lengths_and_targets(enc)
        computed = rows[-1]["tokens_computed"] / rows[-1]["tokens"]
        per_token = bench_workers._model_flops(models.model_dir(source), run, mean, head_share) * computed
    profiled = args.steps - WARM_STEPS
    tokens = rows[-1]["tokens"] - rows[WARM_STEPS - 1]["tokens"]
    summary = summarize(prof, profiled)
    head = bench_workers.machine_line()
    command = "python bench/step_profile.py --steps 8 --out BENCHMARKS.md"
    text = markdown(summary, wall, per_token * tokens / profiled, peak, head, command)
    print(text)
    bench.write_sections(args.out, {"profile": text})


if __name__ == "__main__":
    main()
