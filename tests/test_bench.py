"""habit bench: the FLOPs/MFU arithmetic, the markdown sections, the JSON shape through the real
entry point on the tiny model, and failing variants that become rows instead of crashes.

Speeds are never asserted (tests measure no wall-clock time): only that they were measured.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, SHARED_PROMPTS
from habit import bench, bench_workers, cli, models, render
from habit.data import load_examples
from habit.errors import HabitError

ROLES = FIXTURES / "data" / "roles.csv"
ROW_KEYS = {"name", "tokens_per_s", "ratio", "step_s", "peak_rss_mb", "mfu", "heldout_loss", "dtype", "note"}


# ---------------------------------------------------------------- arithmetic


def test_flops_per_token_and_mfu_on_known_numbers():
    # 4·100 frozen + 6·10 LoRA + 6·2 layers·8 dims·4 tokens of attention
    assert bench.flops_per_token(100, 10, 2, 8, 4) == 400 + 60 + 384
    # SmolLM2-135M with habit's LoRA (all-linear r16), 108-token examples: about 0.58 GFLOP per token
    smol = bench.flops_per_token(134_479_872, 4_884_480, 30, 576, 108)
    assert smol == pytest.approx(4 * 134_479_872 + 6 * 4_884_480 + 6 * 30 * 576 * 108)
    # 200 tokens/s at that cost on a 400 GFLOP/s peak
    assert bench.mfu(200, smol, 400) == pytest.approx(200 * smol / 400e9)
    assert bench.mfu(None, smol, 400) is None and bench.mfu(200, smol, None) is None


def test_model_flops_counts_every_matmul_weight_and_the_adapter(tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    save_file({"a": torch.zeros(16, 32), "b": torch.zeros(64, 16)}, tmp_path / "adapter_model.safetensors")
    config = AutoConfig.from_pretrained(tiny_model)
    # per layer q 32x32, k and v 32x16 (2 of 4 heads), o 32x32, gate/up/down 32x64; lm_head 32xV
    frozen = 2 * (1024 + 512 + 512 + 1024 + 3 * 2048) + 32 * config.vocab_size
    expected = bench.flops_per_token(frozen, 16 * 32 + 64 * 16, 2, 32, 50.0)
    assert bench_workers._model_flops(tiny_model, tmp_path, 50.0) == pytest.approx(expected)


def test_the_best_peak_of_several_measurements_counts():
    runs = [{"bf16": 268.0, "fp32": 174.0}, {"bf16": 415.0, "fp32": 170.0}]
    assert bench.best_peak(runs) == {"bf16": 415.0, "fp32": 174.0}


def test_steady_rate_leaves_out_the_first_step():
    # (time at the end of each step, real tokens so far): step 1 took 10 s (warm-up), then 1 s each
    marks = [(10.0, 100), (11.0, 300), (12.0, 500)]
    assert bench.steady_rate(marks) == (200.0, 1.0)
    assert bench.steady_rate(marks[:1]) == (None, None)


def test_habit_steps_consume_the_requested_tokens(tiny_model):
    from habit import training

    table = load_examples(ROLES, template=bench.TEMPLATE)
    tokenizer = models.load_tokenizer(models.resolve(tiny_model))
    template = render.choose_template(table, tokenizer)
    enc, _ = render.encode_all(table.examples, template, tokenizer, models.stop_ids(tokenizer), 512)
    assert bench_workers.habit_steps(enc, 1, 512) == 2  # never fewer than 2: the first step is not timed
    target = 5 * sum(len(e) for e in enc)
    steps = bench_workers.habit_steps(enc, target, 512)
    plan = itertools.islice(training.schedule(enc, training.row_width(enc, 512), 2048, 0), steps)
    per_step = [batch.tokens for _, _, batch, _ in plan]
    assert sum(per_step) >= target > sum(per_step[:-1])


# ---------------------------------------------------------------- options and markdown


def test_options_check_variants_and_repeat_as_a_command():
    with pytest.raises(HabitError, match="unknown variant"):
        bench.BenchOptions(only="recipe,nope")
    with pytest.raises(HabitError, match="--scale-lengths"):
        bench.BenchOptions(scale_lengths="256,abc")
    assert bench.BenchOptions().variants() == list(bench.VARIANTS)  # --only all, the default
    options = bench.BenchOptions(tokens=300, only="recipe,habit")
    assert options.variants() == ["recipe", "habit"] and options.runs_train()
    assert options.command("B.md") == ("habit bench --model smollm2-135m --data ../shared/data/prompts.csv "
                                       "--tokens 300 --only recipe,habit --out B.md")
    assert not bench.BenchOptions(scale=True).runs_train()
    assert bench.BenchOptions(scale=True, train=True).runs_train()


def test_cli_refuses_an_unknown_variant_in_one_line(capsys):
    assert cli.main(["bench", "--only", "recipe,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("habit: error: --only: unknown variant(s) nope")


def test_section_replacement_keeps_the_other_sections():
    text = ("# Benchmarks\n\nprose stays\n\n<!-- bench:train -->\nold train\n<!-- /bench:train -->\n\n"
            "<!-- bench:serve -->\nserve table\n<!-- /bench:serve -->\ntail\n")
    new = bench.replace_section(text, "train", "new train")
    assert "old train" not in new and "<!-- bench:train -->\nnew train\n<!-- /bench:train -->" in new
    assert "prose stays" in new and "serve table" in new and new.endswith("tail\n")
    added = bench.replace_section(new, "scale", "scale table")
    assert added.startswith(new.rstrip()) and added.endswith("<!-- /bench:scale -->\n")
    assert bench.replace_section(added, "scale", "scale table") == added  # idempotent


def test_write_sections_replaces_atomically(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Mine\n\n<!-- bench:other -->\nkeep me\n<!-- /bench:other -->\n")
    bench.write_sections(path, {"train": "| a |\n|---|"})
    bench.write_sections(path, {"train": "| b |\n|---|"})
    text = path.read_text()
    assert "keep me" in text and "| b |" in text and "| a |" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]  # no temp file left


# ---------------------------------------------------------------- the real thing, tiny


def test_bench_json_through_the_cli(tiny_model, tmp_path):
    """recipe + habit on the tiny model, each in its own worker, through `python -m habit bench`."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:serve -->\nserve rows\n<!-- /bench:serve -->\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HABIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "habit", "bench", "--model", tiny_model, "--data", str(ROLES),
                           "--tokens", "300", "--only", "recipe,habit", "--peak-size", "256", "--json",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"cpu", "flags", "cores", "torch"} <= set(result["machine"])
    assert set(result["peak_gflops"]) == {"bf16", "fp32"} and all(v > 0 for v in result["peak_gflops"].values())
    assert len(result["peak_runs"]) == 2 and result["peak_gflops"] == bench.best_peak(result["peak_runs"])
    assert result["tokens"] == 300
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["recipe", "habit"]
    for row in rows.values():
        assert ROW_KEYS <= set(row), row
        assert not row["error"], row["note"]
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["peak_rss_mb"] > 0 and row["mfu"] > 0
        assert math.isfinite(row["heldout_loss"])
        assert row["tokens_trained"] >= 300 and row["steps"] >= 2
    assert rows["recipe"]["ratio"] == 1.0 and rows["recipe"]["dtype"] == "fp32"
    assert rows["habit"]["ratio"] == pytest.approx(rows["habit"]["tokens_per_s"] / rows["recipe"]["tokens_per_s"],
                                                   rel=1e-2)
    text = out.read_text()
    assert "serve rows" in text and "<!-- bench:train -->" in text and "| recipe |" in text
    assert "--tokens 300 --only recipe,habit" in text


def _options(tiny_model: str, **kw) -> bench.BenchOptions:
    return bench.BenchOptions(model=tiny_model, data=str(ROLES), tokens=300, **kw)


PEAK = {"peak_gflops": {"bf16": 100.0, "fp32": 50.0}, "auto_dtype": "bf16",
        "machine": {"device": "cpu"}}


def test_a_failing_variant_is_a_row_with_a_note(tiny_model, tmp_path):
    # every example is longer than --max-len 8: the habit worker fails, the bench carries on
    fp32_machine = {**PEAK, "auto_dtype": "fp32"}  # habit-fp32 is then skipped as a repeat of habit
    rows = bench.train_rows(_options(tiny_model, only="habit,habit-fp32", max_len=8), tmp_path, fp32_machine, print)
    failed, skipped = rows
    assert failed["name"] == "habit" and failed["error"] and failed["note"].startswith("error: ")
    assert failed["tokens_per_s"] is None and failed["ratio"] is None and failed["mfu"] is None
    assert skipped["note"].startswith("skipped") and not skipped["error"]


def test_a_worker_out_of_time_is_an_error_not_an_exception(tiny_model, tmp_path):
    found = bench.spawn("habit", _options(tiny_model), tmp_path, timeout=1)
    assert found == {"error": "timed out after 1 s (--timeout)"}
    row = bench._row("habit", found, PEAK["peak_gflops"])
    assert row["error"] and row["note"] == "error: timed out after 1 s (--timeout)"


def test_repeated_runs_make_one_median_row():
    def run(tps, loss):
        return {"name": "habit", "tokens_per_s": tps, "heldout_loss": loss, "step_s": 1.0 / tps if tps else None}

    row = bench.median_row([run(300.0, 2.9), run(100.0, 3.1), run(200.0, 3.0)])
    assert row["tokens_per_s"] == 200.0 and row["best_tokens_per_s"] == 300.0 and row["runs"] == 3
    assert row["min_tokens_per_s"] == 100.0
    assert row["heldout_loss"] == 3.0 and row["step_s"] == 1.0 / 200.0  # the median run's own figures
    assert row["run_tokens_per_s"] == [300.0, 100.0, 200.0]
    failed = bench.median_row([run(None, None), run(150.0, 3.2)])  # a failed run is left out
    assert failed["tokens_per_s"] == 150.0 and failed["runs"] == 1
    assert bench.median_row([run(None, None)])["tokens_per_s"] is None
    with pytest.raises(HabitError, match="--repeats"):
        bench.BenchOptions(repeats=0)


def test_the_f16_copy_of_a_gguf_holds_the_same_weights_and_metadata(tmp_path):
    """llama.cpp's f16 row reads this copy: every quantized tensor dequantized, every key kept."""
    import gguf
    import numpy as np

    from habit import bench_workers

    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    norm = np.ones(64, dtype=np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), arch="llama")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_context_length(128)
    q = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    copy = gguf.GGUFReader(str(bench_workers._f16_copy(str(tmp_path / "q.gguf"), tmp_path / "f16.gguf")))
    tensors = {t.name: t for t in copy.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float16)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), expected)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), norm)
    assert copy.fields[gguf.Keys.General.FILE_TYPE].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    assert copy.fields[gguf.Keys.Tokenizer.LIST].contents() == ["<s>", "a", "b"]
    assert copy.fields["llama.context_length"].contents() == 128


def test_llama_cpp_rows_sit_beside_habits_as_ratios(tiny_model, tmp_path):
    found = bench.spawn("llamacpp", _options(tiny_model, gen_prompts=2, gen_tokens=2), tmp_path, timeout=120)
    assert found["skipped"] == f"{tiny_model} is not a GGUF file (llama.cpp reads GGUF)"

    def rate(tokens, seconds):
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    gen = {"prompts": 4, "max_new_tokens": 8, "batch_size": 16, "dtype": "bf16", "speedup": 2.0,
           "batched": rate(32, 1.0), "single": rate(32, 2.0), "load": {},
           "llamacpp": {"gguf": "q4_1", "threads": 2, "q4_1-batched": rate(32, 0.5), "q4_1-single": rate(32, 1.0),
                        "f16-batched": rate(32, 2.0), "f16-single": rate(32, 4.0)}}
    text = "\n".join(bench._generation_md(gen, "head"))
    assert "| batched | q4_1 | 32 | 0.50 | 64.0 | 0.50x |" in text
    assert "| one at a time | f16 | 32 | 4.00 | 8.0 | 2.00x |" in text
    skipped = "\n".join(bench._generation_md({**gen, "llamacpp": found}, "head"))
    assert "llama.cpp: " + found["skipped"] in skipped
    extra = {"compiled": {**rate(32, 1.0), "compile_s": 30.0},
             "fp16": {"batched": rate(32, 4.0), "single": rate(32, 1.6)},
             "anatomy": {"tokens": 8, "ms_per_token": 40.0, "products_share": 0.7, "ops_per_token": 900.0}}
    text = "\n".join(bench._generation_md({**gen, **extra}, "head"))
    assert "| one at a time, static cache, decode step compiled | 32 | 1.00 | 32.0 |" in text
    assert "Compiled: 2.00x one at a time, after 30 s of compiling" in text
    assert "| batch_size 16, the weights in fp16 | 32 | 4.00 | 8.0 |" in text
    assert "| one at a time, the weights in fp16 | 32 | 1.60 | 20.0 |" in text
    assert "40.0 ms of CPU time per new token over 900 operator calls, 70% of it in matrix products" in text
    failed = "\n".join(bench._generation_md({**gen, "compiled": {"error": "no C++ compiler"}}, "head"))
    assert "Compiled decode: no C++ compiler" in failed


def test_decode_anatomy_counts_the_profiled_time(tiny_model):
    import torch

    from habit.settings import GenerationSettings

    model, tokenizer = models.load_model(tiny_model, dtype=torch.float32, device="cpu")
    table = load_examples(str(ROLES), template=bench_workers.TEMPLATE)
    template = render.choose_template(table, tokenizer)
    prompt = render.prompt_text(template, tokenizer, fields=table.examples[0].fields)
    found = bench_workers._decode_anatomy(model, tokenizer, template, prompt, models.stop_ids(tokenizer, model),
                                          GenerationSettings(max_new_tokens=4))
    assert 1 <= found["tokens"] <= 4 and found["ms_per_token"] > 0 and found["ops_per_token"] > 10
    assert 0 < found["products_share"] < 1


def test_the_long_table_is_long_tailed_with_unique_acts(tiny_model):
    from habit import bench_workers, models

    tokenizer = models.load_tokenizer(models.resolve(tiny_model))
    spec = {"data": str(SHARED_PROMPTS if SHARED_PROMPTS.is_file() else ROLES)}
    rows = bench_workers.long_table(spec, tokenizer, 300)
    assert rows == bench_workers.long_table(spec, tokenizer, 300)  # seeded: the same table every run
    assert len({r["act"] for r in rows}) == 300 and all(r["prompt"].strip() for r in rows)
    lengths = sorted(len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rows)
    median = lengths[len(lengths) // 2]
    assert 0.6 * bench_workers.LONG_MEDIAN < median < 1.5 * bench_workers.LONG_MEDIAN
    assert lengths[-1] > 5 * median  # the tail a --max-len default has to cover


def test_the_long_section_reads_its_numbers():
    long = {"rows": 100, "data": "t.csv", "median_target": 240, "sigma": 1.0,
            "lengths": {"median": 260, "p99": 2400, "max": 5000}, "kept": 98, "dropped": 2, "max_len": 2048,
            "dropped_at_1024": 9, "steps": 20, "tokens": 30000, "train_s": 60.0, "wall_s": 75.0, "tokens_per_s": 500.0}
    text = "\n".join(bench._long_md(long, "head"))
    assert "| 100 | 98 | 2 (2.0%) | 2048 | 20 | 30000 | 60.0 | 75.0 | 500.0 | 2.50 |" in text
    assert "median 260, p99 2400, max 5000" in text and "dropped 9 rows (9.0%)" in text
    assert "error: boom" in "\n".join(bench._long_md({"error": "boom"}, "head"))


def test_bench_progress_lines_print_brackets_as_they_are(monkeypatch, capsys):
    """rich reads "[bench]" as markup: the install hint for a missing TRL lost its extra's name."""
    def fake_run(options, say):
        say("trl: error: trl is not installed (pip install 'habit[bench]')")
        return {}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "print_result", lambda result: None)
    assert cli.main(["bench", "--only", "habit"]) == 0
    assert "pip install 'habit[bench]'" in capsys.readouterr().err


def test_the_scale_rows_carry_flops_per_token_and_mfu(tiny_model, tmp_path):
    """Longer examples cost more FLOPs per token (attention), so the table shows MFU beside tokens/s."""
    opts = _options(tiny_model, scale_lengths="32,64", scale_steps=2, scale_data="1", scale_tokens=100)
    found = bench.spawn("scale", opts, tmp_path, timeout=300)
    short, long = found["lengths"]
    assert long["flops_per_token"] > short["flops_per_token"] > 0
    text = "\n".join(bench._scale_md(found, "head", {"bf16": 100.0, "fp32": 50.0}))
    want = 100 * long["tokens_per_s"] * long["flops_per_token"] / (100.0 if long["dtype"] == "bf16" else 50.0) / 1e9
    assert f"| {long['flops_per_token'] / 1e6:.0f} | {want:.1f}% |" in text
