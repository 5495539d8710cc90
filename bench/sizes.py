"""Training by model size: real tokens/s, peak RSS and MFU of `habit train` for SmolLM2-135M (the
real embedded model) and random-weight checkpoints of real configs (Llama-3.2-1B, Mistral-7B-v0.1),
bf16 and nf4 bases. Writes the `sizes` section of BENCHMARKS.md.

    python bench/sizes.py --sizes 135m 1b 7b --out BENCHMARKS.md

Each checkpoint is written once into --cache as bf16 safetensors shards, one tensor at a time
(the 7B shape is 14.5 GB: it never exists in memory as a whole). Each run is its own subprocess,
so each peak RSS is that run's alone. Results are kept in --cache/results.json, so sizes can be
run one at a time (the 7B shape needs the machine alone) and the table shows them all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The real configs (from each model's config.json), so shapes, memory and FLOPs are the real ones.
CONFIGS = {
    "1b": ("Llama-3.2-1B", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}),
    "7b": ("Mistral-7B-v0.1", {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
        "sliding_window": 4096, "hidden_act": "silu"}),
}
# flags per size beyond the defaults: the 7B shape's activations would take its bf16 peak over the
# 20 GB target, so it checkpoints them whatever the machine has free
FLAGS = {"7b": ["--grad-checkpointing", "on"]}
SHARD_BYTES = 2 << 30
DATA = ROOT.parent / "shared" / "data" / "prompts.csv"


# ---------------------------------------------------------------- checkpoints


def build(size: str, cache: Path) -> Path:
    """Write the random-weight checkpoint of `size` into cache (once) and return its folder."""
    name, config_dict = CONFIGS[size]
    folder = cache / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(config_dict["vocab_size"])
    tokenizer.save_pretrained(tmp)
    config = AutoConfig.for_model(**config_dict, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(tmp)
    with torch.device("meta"):  # the shapes alone: no memory
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    del meta
    torch.manual_seed(0)
    index, shard, shard_bytes, files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            files.append(fname)
            index.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    for key, shp in shapes.items():
        if len(shp) == 1:  # norms: ones, as a trained model's are near
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.randn(shp, dtype=torch.bfloat16) * 0.02
        if shard_bytes + t.nbytes > SHARD_BYTES:
            flush()
        shard[key] = t
        shard_bytes += t.nbytes
    flush()
    total = sum((tmp / f).stat().st_size for f in files)
    # shard names are final once all are written: model-0000k-of-0000n
    n = len(files)
    renames = {f: f.replace(".safetensors", f"-of-{n:05d}.safetensors") for f in files}
    for old, new in renames.items():
        os.replace(tmp / old, tmp / new)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renames[v] for k, v in index.items()}},
        indent=1))
    os.replace(tmp, folder)
    return folder


def _tokenizer(vocab: int):
    """SmolLM2's tokenizer (a real BPE with ChatML), cut to the first `vocab` ids where the config
    has fewer (Mistral's 32000): its merges are in id order, so the cut is itself a working BPE."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from habit import models

    folder = models.model_dir(models.resolve("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) <= vocab:
        return tok
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {t: i for t, i in spec["model"]["vocab"].items() if i < vocab}
    spec["model"]["vocab"] = keep
    merges = spec["model"]["merges"]
    joined = (lambda m: "".join(m)) if merges and isinstance(merges[0], list) else (
        lambda m: m.replace(" ", "", 1))
    spec["model"]["merges"] = [m for m in merges if joined(m) in keep]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < vocab]
    from tokenizers import Tokenizer

    cut = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  **{k: getattr(tok, k) for k in ("bos_token", "eos_token",
                                                                  "unk_token", "pad_token")
                                     if getattr(tok, k) is not None})
    cut.chat_template = tok.chat_template
    return cut


# ---------------------------------------------------------------- runs


def run_one(size: str, quant: str, cache: Path, data: Path, steps: int, extra: list[str]) -> dict:
    model = "smollm2-135m" if size == "135m" else str(build_in_child(size, cache))
    out = cache / "runs" / f"{size}-{quant}"
    flags = ["--steps", str(steps)] + FLAGS.get(size, []) + extra
    if quant == "nf4":
        flags += ["--quantize", "nf4"]
    cmd = [sys.executable, "-m", "habit", "train", str(data), "--model", model, "--out", str(out),
           "--force", *flags]
    # a wrapper process per run: RUSAGE_CHILDREN is the peak of the one child it waited for
    wrap = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.time()
    done = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t
    _, kb, rc = done.stdout.strip().splitlines()[-1].split()
    row = {"size": size, "quant": quant, "flags": " ".join(flags[2:]),
           "peak_rss_gb": round(int(kb) * 1024 / 1e9, 2), "rc": int(rc), "wall_s": round(wall, 1),
           "date": datetime.date.today().isoformat()}
    estimate = [ln for ln in done.stderr.splitlines() if "memory estimate" in ln]
    row["estimate"] = estimate[-1].split("habit: ", 1)[-1] if estimate else None
    if int(rc) != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    info = json.loads((out / "run.json").read_text())
    steps_rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r and "tokens" in r]
    a, b = steps_rows[0], steps_rows[-1]
    rate = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]) if len(steps_rows) > 1 \
        else b["tokens_per_s"]  # step 1 is warm-up: the rate of the later steps
    per_step = b["tokens"] / len(steps_rows)
    plan = info["plan"]
    row.update(tokens_per_s=round(rate, 1), loss=b["loss"], steps_per_epoch=plan["steps_per_epoch"],
               epoch_s=plan["steps_per_epoch"] * per_step / rate,
               train_examples=info["data"]["train"], dtype=plan["dtype"],
               grad_checkpointing=plan.get("grad_checkpointing"), fast_paths=plan["fast_paths"],
               per_step_tokens=per_step, model=model)
    row["mfu"] = _mfu(model, rate, per_step * plan["steps_per_epoch"] / max(1, info["data"]["train"]),
                      info["settings"]["lora"])
    return row


def build_in_child(size: str, cache: Path) -> Path:
    """Build in a subprocess so the parent never holds torch tensors of the checkpoint."""
    folder = cache / CONFIGS[size][0]
    if not (folder / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, __file__, "--build", size, "--cache", str(cache)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return folder


def _mfu(model: str, rate: float, mean_len: float, lora: dict) -> float | None:
    from habit import bench, memory, models
    from habit.settings import LoraSettings

    config = models.load_config(models.resolve(model))
    s = memory.shape(config, LoraSettings(**lora))
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    flops = bench.flops_per_token(s.linear + s.vocab * s.hidden, s.lora, s.layers,
                                  text.num_attention_heads * head_dim, mean_len)
    return bench.mfu(rate, flops, PEAK["bf16"])


PEAK: dict = {}


def matmul_peak(n: int = 2048) -> dict:
    """bf16 and fp32 GFLOP/s of an n² matmul, best of 3 (in a subprocess: the parent stays small)."""
    code = ("import torch, time, json\nr = {}\nfor k, d in (('bf16', torch.bfloat16), ('fp32', torch.float32)):\n"
            f"    a = torch.randn({n}, {n}).to(d); b = torch.randn({n}, {n}).to(d); best = 1e9\n"
            "    for i in range(4):\n        t = time.perf_counter(); a @ b; dt = time.perf_counter() - t\n"
            "        best = min(best, dt) if i else best\n"
            f"    r[k] = round(2 * {n}**3 / best / 1e9, 1)\nprint(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    from habit.bench_workers import cpu_name_and_flags

    cpu, flags = cpu_name_and_flags()
    return f"{cpu}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'no avx2'}"


# ---------------------------------------------------------------- the table


def markdown(rows: list[dict], peak: dict, command: str) -> str:
    names = {"135m": "SmolLM2-135M (real weights)", "1b": "Llama-3.2-1B shape (random weights)",
             "7b": "Mistral-7B-v0.1 shape (random weights)"}
    lines = ["## Training by model size: 135M, 1B and 7B bases, bf16 and nf4", "",
             f"{cpu_line()}; matmul peak (2048², best of 3): bf16 {peak.get('bf16', 0):.0f} GFLOP/s, "
             f"fp32 {peak.get('fp32', 0):.0f} GFLOP/s. `habit train ../shared/data/prompts.csv "
             "--steps 2` on each base, each run its own process. The 1B and 7B rows are random "
             "weights in the real configs (shapes, memory and speed are the real ones; the loss is "
             "not). Their tokenizer is SmolLM2's (cut to Mistral's 32000 ids for the 7B shape), so "
             "token counts are close to, not equal to, the real models'.", "",
             "| base | weights | flags | real tokens/s | peak RSS GB | estimate GB | MFU | one epoch | date |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    order = {k: i for i, k in enumerate(("135m", "1b", "7b"))}
    for r in sorted(rows, key=lambda r: (order.get(r["size"], 9), r["quant"])):
        est = r.get("estimate") or ""
        est_gb = est.split("memory estimate ", 1)[-1].split(" GB", 1)[0] if est else "–"
        if r.get("error"):
            lines.append(f"| {names[r['size']]} | {r['quant']} | {r['flags'] or '–'} | failed: "
                         f"{r['error']} | {r['peak_rss_gb']:.2f} | {est_gb} | – | – | {r['date']} |")
            continue
        ck = " (checkpointing on)" if r.get("grad_checkpointing") and "grad-check" not in r["flags"] else ""
        lines.append(f"| {names[r['size']]} | {'nf4' if r['quant'] == 'nf4' else r['dtype']} | "
                     f"{r['flags'] or '–'}{ck} | {r['tokens_per_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{est_gb} | {100 * (r['mfu'] or 0):.1f}% | {_duration(r['epoch_s'])} | {r['date']} |")
    lines += ["", "Real tokens/s: non-pad tokens of step 2 over its wall time (step 1 is warm-up). "
              "Peak RSS: the run's process (getrusage of its wrapper). Estimate: what `habit train` "
              "printed before loading (habit/memory.py). MFU: as in the training table, against the "
              "bf16 peak. One epoch: the tutorial's table (training split) at that rate.", "",
              "Reproduce (the 7B shape needs ~20 GB free; run it alone):", "", "```bash", command,
              "```"]
    return "\n".join(lines)


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["135m", "1b", "7b"], choices=["135m", "1b", "7b"])
    p.add_argument("--quant", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--train-args", default="", help="more habit train flags, e.g. '--batch-tokens 1024'")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/habit/bench-sizes"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cache = Path(args.cache)
    if args.build:
        print(build(args.build, cache))
        return
    from habit import bench

    PEAK.update(matmul_peak())
    results_file = cache / "results.json"
    kept = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for size in args.sizes:
        for quant in args.quant:
            print(f"{size} {quant} ...", file=sys.stderr, flush=True)
            row = run_one(size, quant, cache, Path(args.data), args.steps, args.train_args.split())
            print(json.dumps(row), file=sys.stderr, flush=True)
            kept[f"{size}-{quant}"] = row
            cache.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(kept, indent=1))
    command = "python bench/sizes.py --sizes 135m 1b 7b --quant bf16 nf4 --out BENCHMARKS.md"
    bench.write_sections(args.out, {"sizes": markdown(list(kept.values()), PEAK, command)})


if __name__ == "__main__":
    main()
