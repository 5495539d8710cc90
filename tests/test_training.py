"""Packing, loss targets, the learning-rate schedule and a tiny end-to-end training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from habit import adapters, render, rundir, training
from habit.data import load_examples
from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings


@pytest.fixture(scope="module")
def tiny(tiny_roles):
    return tiny_roles


def test_packed_logits_equal_per_example_logits(tiny):
    """Packed rows with restarting position ids must not let examples attend to each other."""
    model, tok, enc = tiny
    batch = training.plan_epoch(enc, 512, 512, seed=0, epoch=0)[0]
    assert len(batch.rows[0]) >= 2, "the test needs a row holding several examples"
    ids, pos, _, _, _ = training.tensors(batch, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        start = 0
        for ex in batch.rows[0]:
            alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[0, start : start + len(ex)], alone, atol=1e-4, rtol=1e-4)
            start += len(ex)


def test_packed_loss_equals_sum_of_per_example_losses(tiny):
    model, tok, enc = tiny
    batch = training.plan_epoch(enc, 512, 512, seed=0, epoch=0)[0]
    with torch.no_grad():
        packed, n = training.batch_loss(model, batch, tok.pad_token_id, "cpu")
        total, count = 0.0, 0
        for ex in (e for row in batch.rows for e in row):
            alone = training.Batch(((ex,),), len(ex))
            loss, k = training.batch_loss(model, alone, tok.pad_token_id, "cpu")
            total, count = total + float(loss), count + k
    assert n == count == batch.targets
    assert float(packed) == pytest.approx(total, rel=1e-4)


def test_targets_hold_eos(tiny):
    """The tutorial's bug: EOS masked out of the labels. Here every example's EOS is a target."""
    _, tok, enc = tiny
    batch = training.plan_epoch(enc, 512, 512, seed=0, epoch=0)[0]
    _, _, _, targets, _ = training.tensors(batch, tok.pad_token_id)
    n_examples = sum(len(row) for row in batch.rows)
    assert int((targets == tok.eos_token_id).sum()) == n_examples


def test_plan_is_deterministic_and_reshuffled_per_epoch(tiny):
    _, _, enc = tiny
    first = training.plan_epoch(enc, 512, 256, seed=3, epoch=0)
    again = training.plan_epoch(enc, 512, 256, seed=3, epoch=0)
    other = training.plan_epoch(enc, 512, 256, seed=3, epoch=1)
    flat = lambda plan: [e.where for b in plan for row in b.rows for e in row]  # noqa: E731
    assert flat(first) == flat(again)
    assert sorted(flat(first)) == sorted(flat(other)) == sorted(e.where for e in enc)
    assert all(len(e) <= 512 for b in first for row in b.rows for e in row)
    assert all(sum(len(e) for e in row) <= 512 for b in first for row in b.rows)


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    total = 100
    values = [training.lr_at(s, total, 0.1) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_tiny_training_writes_a_run_dir_and_loss_falls(tiny_model, roles_csv, tmp_path):
    table = load_examples(roles_csv)
    out = tmp_path / "run"
    result = training.train(table, out, model=tiny_model,
                            lora=LoraSettings(rank=8, alpha=16),
                            settings=TrainSettings(steps=30, lr=5e-2, batch_tokens=512, max_len=256,
                                                   val_frac=0.2, save_every=10, keep_checkpoints=2))
    assert result.steps == 30 and result.train_examples + result.val_examples == len(table.examples)
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done"
    assert info["base"]["source"] == tiny_model and len(info["base"]["sha256"]) == 64
    assert info["template"] == {"kind": "chat", "prompt": "{act}", "response": "prompt"}
    assert info["settings"]["train"]["steps"] == 30 and info["data"]["sha256"] == table.sha256
    rows = rundir.read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    assert any("val_loss" in r for r in rows)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000020", "step-0000030"]  # only the last 2 kept, no temp dirs left

    run = adapters.load_run(out)
    assert run.template == render.Template("chat", "{act}", "prompt")
    # the saved adapter changes the model: tuned and base logits differ
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = run.model(input_ids=ids).logits
        with run.model.disable_adapter():
            base = run.model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)


def test_existing_run_dir_is_refused_before_anything_loads(tmp_path, roles_csv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(HabitError, match="already exists"):
        training.train(load_examples(roles_csv), out, model="./no-such-model")
    assert (out / "run.json").read_text() == "{}"


def test_run_from_another_base_is_refused(tiny_model, roles_csv, tmp_path):
    out = tmp_path / "run"
    training.train(load_examples(roles_csv), out, model=tiny_model,
                   settings=TrainSettings(steps=1, batch_tokens=512, max_len=256))
    info = json.loads((out / "run.json").read_text())
    info["base"]["sha256"] = "0" * 64
    rundir.write_json(out / "run.json", info)
    with pytest.raises(HabitError, match="different"):
        adapters.load_run(out)
    assert Path(out / "adapter_model.safetensors").is_file()


def test_default_max_len_is_what_a_micro_batch_holds():
    """--max-len 0 (the default) keeps every example one micro-batch can hold, and is resolved in
    the settings, so run.json records the number and a resume reuses it."""
    from habit.settings import TrainSettings, as_dict

    assert TrainSettings().max_len == TrainSettings().batch_tokens
    assert TrainSettings(batch_tokens=8192, grad_accum=2).max_len == 4096
    assert TrainSettings(max_len=300).max_len == 300
    assert as_dict(TrainSettings(batch_tokens=4096))["max_len"] == 4096


def test_preference_methods_default_to_a_gentler_recipe():
    """--method dpo|simpo|orpo|kto default to --lr 1e-4 and 1 epoch (SFT: 1e-3, 3): at SFT's
    numbers DPO on the tutorial's table unlearned the stopping SFT taught (docs/preference.md).
    Resolved in the settings, so run.json records the numbers; a given value always wins."""
    from habit.settings import TrainSettings, as_dict

    assert (TrainSettings().lr, TrainSettings().epochs) == (1e-3, 3.0)
    for method in ("dpo", "simpo", "orpo", "kto"):
        assert (TrainSettings(method=method).lr, TrainSettings(method=method).epochs) == (1e-4, 1.0)
    assert TrainSettings(method="dpo", lr=5e-4, epochs=2).lr == 5e-4
    assert as_dict(TrainSettings(method="kto"))["lr"] == 1e-4
