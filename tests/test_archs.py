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
