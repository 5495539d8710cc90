"""The GPU path, on a CUDA device: skipped without one (bench/gpu.sh runs these first).

On CPU, tests/test_fastpath.py checks the selection logic; here the chosen paths run for real."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = dict(steps=4, batch_tokens=1024, max_len=256, lr=2e-2)


def _train(tiny_model, roles_csv, out, **extra):
    from habit import training
    from habit.data import load_examples
    from habit.settings import TrainSettings

    result = training.train(load_examples(roles_csv), out, model=tiny_model,
                            settings=TrainSettings(**SMALL, **extra))
    return result, json.loads((out / "run.json").read_text())


def test_training_on_cuda_uses_the_gpu_paths(tiny_model, roles_csv, tmp_path):
    result, info = _train(tiny_model, roles_csv, tmp_path / "run")
    assert info["plan"]["fast_paths"] == ["chunked head loss"]  # no CPU-only path on a GPU
    assert info["plan"]["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert result.fast_check is not None and result.train_loss < 10


def test_qlora_on_cuda(tiny_model, roles_csv, tmp_path):
    pytest.importorskip("bitsandbytes")
    result, info = _train(tiny_model, roles_csv, tmp_path / "run", quantize="nf4")
    assert info["plan"]["quantize"] == "nf4" and result.train_loss < 10


def test_checkpointing_on_cuda(tiny_model, roles_csv, tmp_path):
    result, info = _train(tiny_model, roles_csv, tmp_path / "run", grad_checkpointing="on")
    assert info["plan"]["grad_checkpointing"] and result.train_loss < 10
