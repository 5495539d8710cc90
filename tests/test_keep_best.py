"""--keep best (the default): the run's adapter is the validated one with the lowest validation
loss, run.json says which step, and a resumed run keeps the same choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from habit import load_examples, rundir
from habit.settings import TrainSettings
from habit.training import resume, train

SETTINGS = dict(steps=12, lr=5e-2, batch_tokens=512, max_len=256, val_frac=0.4,
                val_every=1, save_every=1, keep_checkpoints=20, precision="fp32")
# A 4-example table does not overfit on cue, so validation follows a script by step: it falls to
# step 3 and rises after. The step is the count of validations the run has logged so far + 1
# (metrics.jsonl, which a resume cuts back to its checkpoint), so a resumed run sees the same curve.
CURVE = [5.0, 4.0, 3.0, 3.5, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]


@pytest.fixture
def scripted_validation(monkeypatch):
    from habit import training

    def fake(accelerator, model, batches, pad_id, device, fast=None, filler=None, loss_fn=None):
        run = Path(accelerator.project_dir)
        done = sum(1 for r in rundir.read_jsonl(run / "metrics.jsonl") if "val_loss" in r)
        return CURVE[done]

    monkeypatch.setattr(training, "_eval_across", fake)


def val_curve(run):
    return {r["step"]: r["val_loss"] for r in rundir.read_jsonl(run / "metrics.jsonl") if "val_loss" in r}


@pytest.fixture
def overfit(tiny_model, roles_csv, tmp_path, scripted_validation):
    out = tmp_path / "best"
    result = train(load_examples(roles_csv), out, model=tiny_model, settings=TrainSettings(**SETTINGS))
    return out, result


def test_the_kept_adapter_is_the_lowest_validation_loss(overfit):
    out, result = overfit
    curve = val_curve(out)
    assert len(curve) == 12
    best_step = min(curve, key=curve.get)
    assert best_step == 3 and curve[3] == 3.0
    assert result.kept_step == best_step and result.kept_val_loss == pytest.approx(curve[best_step], abs=1e-5)
    info = json.loads((out / "run.json").read_text())
    assert info["result"]["kept_step"] == best_step
    kept = load_file(out / "adapter_model.safetensors")
    at_step = load_file(out / "checkpoints" / f"step-{best_step:07d}" / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "step-0000012" / "adapter_model.safetensors")
    assert all((kept[k] == at_step[k]).all() for k in kept)
    assert any((kept[k] != last[k]).any() for k in kept)


def test_keep_last_saves_the_final_adapter(tiny_model, roles_csv, tmp_path, scripted_validation):
    out = tmp_path / "last"
    result = train(load_examples(roles_csv), out, model=tiny_model,
                   settings=TrainSettings(**SETTINGS | {"steps": 4, "keep": "last"}))
    assert result.kept_step == 4
    kept = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "step-0000004" / "adapter_model.safetensors")
    assert all((kept[k] == last[k]).all() for k in kept)


def test_a_resumed_run_keeps_the_same_best(overfit, tmp_path):
    import shutil

    out, result = overfit
    best_step = result.kept_step
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    # pretend the run stopped after the step following the best one: later checkpoints vanish
    for ck in (cut / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) > best_step + 1:
            shutil.rmtree(ck)
    again = resume(cut)
    assert again.kept_step == best_step and val_curve(cut) == val_curve(out)
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(cut / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
