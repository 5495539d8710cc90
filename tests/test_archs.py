"""The architecture table (habit/archs.py): what is not in it is refused in one line, before any
weights load, through the library and the real command line."""

from __future__ import annotations

import pytest

from conftest import build_tokenizer
from habit import archs, load_examples
from habit.errors import HabitError
from habit.training import train
from test_cli import habit


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


def test_lookup_names_the_supported_list():
    class Config:
        model_type = "gpt2"

    with pytest.raises(HabitError) as e:
        archs.lookup(Config())
    assert str(e.value) == f"architecture 'gpt2' is not supported; supported: {archs.supported()}"
    assert "llama" in archs.supported() and "phi3" in archs.supported()


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_every_tiny_checkpoint_is_in_the_table(arch_model, arch):
    from transformers import AutoConfig

    assert archs.lookup(AutoConfig.from_pretrained(arch_model(arch))).model_type in archs.ARCHS


def test_train_refuses_before_writing_anything(gpt2_dir, roles_csv, tmp_path):
    with pytest.raises(HabitError, match="architecture 'gpt2' is not supported"):
        train(load_examples(roles_csv), tmp_path / "run", model=str(gpt2_dir))
    assert not (tmp_path / "run").exists()


def test_cli_exits_2_with_one_line(gpt2_dir, roles_csv, tmp_path):
    proc = habit("train", roles_csv, "--model", gpt2_dir, "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # before it, train prints its progress lines (the table's shape, a malloc tip); the error is one
    errors = [line for line in proc.stderr.splitlines() if line.startswith("habit: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert "architecture 'gpt2' is not supported; supported: gemma3_text, llama" in errors[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- every architecture, end to end


ARCH_NAMES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def arch_runs(arch_model, roles_csv, tmp_path_factory):
    """One short fp32 run per architecture (2 steps, lr 5e-2 so the adapter moves), made on demand."""
    from habit.settings import TrainSettings

    done = {}

    def run(arch: str):
        if arch not in done:
            out = tmp_path_factory.mktemp(f"run-{arch}") / "run"
            result = train(load_examples(roles_csv), out, model=arch_model(arch),
                           settings=TrainSettings(steps=2, lr=5e-2, batch_tokens=512, max_len=256,
                                                  precision="fp32"))
            done[arch] = (out, result)
        return done[arch]

    return run


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_arch_trains_through_the_checked_fast_paths(arch_runs, arch):
    import json

    out, result = arch_runs(arch)
    # Gemma's norm ((1 + w) in fp32) is not the form the fused norm computes: it keeps its own
    fused_norm = [] if arch == "gemma3" else ["fused RMSNorm"]
    assert result.fast_paths == ["packed attention", "merged LoRA", "chunked head loss", *fused_norm], result.fast_check
    assert result.fast_check < 1e-3  # fp32: the fast paths compute the plain path's loss and gradients
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["fast_paths"] == result.fast_paths


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_arch_generates_evaluates_and_serves(arch_runs, arch):
    import json
    import threading
    import urllib.request

    from habit import compare, load_run
    from habit.evaluate import response_losses
    from habit.serve import make_server
    from habit.settings import GenerationSettings

    out, _ = arch_runs(arch)
    run = load_run(out)
    rows = compare(run, ["Linux Terminal"], GenerationSettings(max_new_tokens=6))
    assert rows[0]["base"].tokens >= 1 and rows[0]["tuned"].tokens >= 1  # both sides answered
    assert rows[0]["tuned"].finish_reason in ("stop", "length")
    train_ex = load_examples(run.info["data"]["path"]).examples[:2]
    losses = response_losses(run, list(train_ex))
    assert all(v is not None and v == v for v in losses.values()), losses  # base and tuned, finite
    assert losses["base"] != losses["tuned"]  # the adapter changes the model
    server = make_server([out], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = json.dumps({"model": "run", "messages": [{"role": "user", "content": "Poet"}],
                           "max_tokens": 4}).encode()
        req = urllib.request.Request(server.url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
        thread.join(timeout=10)
        server.close()
