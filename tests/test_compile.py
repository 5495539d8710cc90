"""--compile: the decoder layers compiled for the training step (regional torch.compile), checked
against eager on the first batch, used only inside a step, and eager wherever it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from habit import adapters, fastpath, models, training
from habit.data import load_examples
from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings

SHORT = dict(steps=3, batch_tokens=512, max_len=256, micro_tokens=256, precision="fp32", val_frac=0.2)


def plan(run) -> dict:
    return json.loads((run / "run.json").read_text())["plan"]


def test_compiled_training_matches_eager(tiny_model, roles_csv, tmp_path):
    table = load_examples(roles_csv)
    compiled = training.train(table, tmp_path / "on", model=tiny_model, settings=TrainSettings(**SHORT, compile="on"))
    eager = training.train(table, tmp_path / "off", model=tiny_model, settings=TrainSettings(**SHORT, compile="off"))
    on, off = plan(tmp_path / "on"), plan(tmp_path / "off")
    assert on["compiled"] and on["compile_note"].startswith("agrees with eager")
    assert not off["compiled"] and off["compile_note"] is None
    assert on["fast_paths"] == off["fast_paths"]  # compiling sits on top of the same fast paths
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-3)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-3)


def test_auto_stays_eager_for_a_run_too_short_to_repay_compiling(tiny_model, roles_csv, tmp_path):
    assert SHORT["steps"] < fastpath.COMPILE_MIN_STEPS
    training.train(load_examples(roles_csv), tmp_path / "run", model=tiny_model, settings=TrainSettings(**SHORT))
    assert plan(tmp_path / "run")["compiled"] is False


def test_compile_on_without_a_cxx_compiler_trains_eager_and_says_why(tiny_model, roles_csv, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(fastpath.compiled.shutil, "which", lambda name: None)
    result = training.train(load_examples(roles_csv), tmp_path / "run", model=tiny_model,
                            settings=TrainSettings(**SHORT, compile="on"))
    p = plan(tmp_path / "run")
    assert p["compiled"] is False and "C++ compiler" in p["compile_note"]
    assert "C++ compiler" in capsys.readouterr().err
    assert result.train_loss is not None


def test_a_compile_that_fails_trains_eager_and_says_why(tiny_model, roles_csv, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor could not build\nsecond line")

    monkeypatch.setattr(training, "check_compiled", broken)
    training.train(load_examples(roles_csv), tmp_path / "run", model=tiny_model,
                   settings=TrainSettings(**SHORT, compile="on"))
    p = plan(tmp_path / "run")
    assert p["compiled"] is False and p["compile_note"].startswith("compiling failed: inductor could not build")
    assert "training eager" in capsys.readouterr().err


def test_compiled_layers_are_attached_only_inside_a_step(tiny_model):
    base, _ = models.load_model(tiny_model, dtype=torch.float32)
    model = adapters.attach(base, LoraSettings())
    compiled = fastpath.Compiled(model)
    layers = fastpath.decoder_layers(model)
    assert len(layers) == base.config.num_hidden_layers and compiled.layers == layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # validation, generation: eager
    with compiled.active():
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compile_takes_auto_on_or_off():
    with pytest.raises(HabitError, match="--compile must be auto, on or off"):
        TrainSettings(compile="yes")


def test_the_compile_cache_goes_under_habits_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing transformers sets
    fastpath.compiled._cache_in(tmp_path / "ours")
    assert fastpath.compiled.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ours")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    fastpath.compiled._cache_in(tmp_path / "ours")
    assert fastpath.compiled.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs")
