"""Attention for long examples, measured: habit's chunked path (queries in chunks, each against
the keys it can see, scores recomputed in the backward) against sdpa (torch's flash kernel on a
CPU, what buckets over MATMUL_ATTENTION_MAX took before), side by side in one run.

Two tables: the attention call alone (forward + backward of one example, two model shapes) and
habit.train steps of SmolLM2 on one long example per step. Variants alternate, --repeats times;
rows show the min and median. Writes the bench:attention section of BENCHMARKS.md.

    python bench/attention.py --repeats 3 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "prompts.csv"

# (name, query heads, key/value heads, head dim, lengths)
SHAPES = [("SmolLM2-135M", 9, 3, 64, (512, 1024, 2048, 4096, 8192)), ("Llama-3-8B", 32, 8, 128, (1024, 2048))]


def sdpa(query, key, value, prefix: int, window, scale: float):
    """The path long buckets took before: one sdpa call per bucket (flash kernel on a CPU)."""
    import torch.nn.functional as F

    from habit.fastpath.attention import causal

    length = query.shape[2]
    mask = causal(length, window, query.device, prefix) if prefix or (window and length > window) else None
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=query.shape[1] > key.shape[1])


def square(query, key, value, prefix: int, window, scale: float):
    """The path of buckets up to MATMUL_ATTENTION_MAX: the whole causal square as two batched
    matmuls and a softmax, scores kept for the backward."""
    from habit.fastpath.attention import additive, attend, causal

    n, heads, length, dim = query.shape
    kv = key.shape[1]
    mask = additive(causal(length, window, query.device, prefix), heads // kv, query.dtype)
    out = attend(query.reshape(n * kv, -1, dim), key.reshape(n * kv, -1, dim), value.reshape(n * kv, -1, dim), mask, scale)
    return out.view(n, heads, length, dim)


SQUARE_MAX = 2048  # the square's scores grow as length²: not timed past this


def op_time(fn, heads: int, kv: int, dim: int, length: int) -> tuple[float, float]:
    """Seconds of one forward + backward, and MB the backward keeps (saved tensors)."""
    import torch

    torch.manual_seed(0)
    q = torch.randn(1, heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, heads, length, dim, dtype=torch.bfloat16)
    saved = {}  # storage → bytes: a view of q, k or v counts its storage once

    def pack(t):
        if t.layout == torch.strided:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v, 0, None, dim**-0.5)
    out.backward(grad)
    return time.perf_counter() - start, sum(saved.values()) / 2**20


def op_rows(repeats: int) -> list[dict]:
    from habit.fastpath import attention

    rows = []
    for name, heads, kv, dim, lengths in SHAPES:
        for length in lengths:
            variants = {"sdpa": sdpa, "chunked": attention.chunked_attention}
            if length <= SQUARE_MAX:
                variants["square"] = square
            found, memory = {v: [] for v in variants}, {}
            for fn in variants.values():  # warm-up
                op_time(fn, heads, kv, dim, length)
            for _ in range(repeats):
                for variant, fn in variants.items():
                    seconds, memory[variant] = op_time(fn, heads, kv, dim, length)
                    found[variant].append(seconds)
            flops = 3 * 4 * heads * dim * length * length / 2  # causal QK^T and AV, forward + backward
            rows.append({"shape": name, "length": length, "flops": flops, "times": found, "saved_mb": memory})
            print(name, length, {k: round(min(v), 3) for k, v in found.items()}, file=sys.stderr, flush=True)
    return rows


def train_rate(length: int, steps: int, work: Path) -> float:
    """Real tokens/s of habit.train on SmolLM2, one example of `length` tokens per step."""
    from habit import bench, bench_workers, data, models
    from habit.settings import TrainSettings

    table = data.load_examples(str(DATA), template=bench_workers.TEMPLATE)
    tokenizer = models.load_tokenizer(models.resolve("smollm2-135m"))
    examples = bench_workers._synthetic(list(table.examples), tokenizer, length, steps)
    settings = TrainSettings(steps=steps, val_frac=0.0, save_every=10**9, max_len=length, batch_tokens=length)
    rows = bench_workers._train_habit(bench_workers._only_train(table, examples), work, "smollm2-135m", settings)
    rate, _ = bench.steady_rate(bench_workers._marks(rows))
    return rate


def train_rows(lengths: list[int], steps: int, repeats: int, work: Path) -> list[dict]:
    from habit.fastpath import attention

    chunked = attention.chunked_attention
    rows = []
    for length in lengths:
        found = {"sdpa": [], "chunked": []}
        for r in range(repeats):
            for variant, fn in (("sdpa", sdpa), ("chunked", chunked)):
                attention.chunked_attention = fn  # what packed_attention calls for a long bucket
                try:
                    found[variant].append(train_rate(length, steps, work / f"{variant}-{length}-{r}"))
                finally:
                    attention.chunked_attention = chunked
        rows.append({"length": length, "rates": found})
        print("train", length, {k: round(max(v), 1) for k, v in found.items()}, file=sys.stderr, flush=True)
    return rows


def markdown(ops: list[dict], trains: list[dict], head: str, repeats: int, steps: int, command: str) -> str:
    from habit.fastpath.attention import MATMUL_ATTENTION_MAX

    med, lo = statistics.median, min
    lines = ["## Attention for long examples: chunked vs sdpa", "", head, "",
             f"Buckets up to {MATMUL_ATTENTION_MAX} tokens take the square (two batched matmuls over the whole causal "
             f"square, scores kept); longer ones the chunked path (sdpa before). Each variant {repeats} times, "
             "alternating; bf16. The attention call alone, one example, forward + backward, seconds (GFLOP/s "
             "counts the causal half of QK^T and AV; saved: what the backward keeps, besides one chunk's "
             "scores at a time in the chunked path):", "",
             "| shape | length | sdpa s (min / median) | square s | chunked s | chunked ÷ sdpa speed | "
             "chunked ÷ square speed | GFLOP/s sdpa / square / chunked | saved MB sdpa / square / chunked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(times):
        return f"{lo(times):.3f} / {med(times):.3f}" if times else "–"

    for r in ops:
        t, m = r["times"], r["saved_mb"]
        rate = " / ".join(f"{r['flops'] / med(t[v]) / 1e9:.0f}" if v in t else "–" for v in ("sdpa", "square", "chunked"))
        kept = " / ".join(f"{m[v]:.0f}" if v in m else "–" for v in ("sdpa", "square", "chunked"))
        vs_square = f"{med(t['square']) / med(t['chunked']):.2f}x" if "square" in t else "–"
        lines.append(f"| {r['shape']} | {r['length']} | {cell(t['sdpa'])} | {cell(t.get('square'))} | "
                     f"{cell(t['chunked'])} | {med(t['sdpa']) / med(t['chunked']):.2f}x | {vs_square} | {rate} | {kept} |")
    lines += ["", f"habit.train on SmolLM2-135M, one synthetic example of each length per step, {steps} steps "
              "a run (the first not timed), each run its own training:", "",
              "| length | sdpa real tokens/s (max / median) | chunked real tokens/s (max / median) | "
              "chunked ÷ sdpa (median) |", "|---:|---:|---:|---:|"]
    for r in trains:
        s, c = r["rates"]["sdpa"], r["rates"]["chunked"]
        lines.append(f"| {r['length']} | {max(s):.1f} / {med(s):.1f} | {max(c):.1f} / {med(c):.1f} | "
                     f"{med(c) / med(s):.2f}x |")
    lines += ["", "Reproduce (alone on the machine):", "", "```bash", command, "```"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not timed)")
    p.add_argument("--train-lengths", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    from habit import allocator

    if argv is None:  # on the malloc habit's command runs on
        allocator.reexec(sys.argv[1:], script=sys.argv[0])
    import torch

    from habit import bench, bench_workers
    from habit.fastpath import attention

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ops = op_rows(args.repeats)
    with tempfile.TemporaryDirectory(prefix="habit-bench-attention-") as work:
        trains = train_rows(args.train_lengths, args.steps, args.repeats, Path(work))
    head = bench_workers.machine_line(f", query chunk {attention.QUERY_CHUNK}")
    command = "python bench/attention.py --repeats 3 --out BENCHMARKS.md"
    bench.write_sections(args.out, {"attention": markdown(ops, trains, head, args.repeats, args.steps, command)})


if __name__ == "__main__":
    main()
