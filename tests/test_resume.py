"""Faults during training: SIGKILL mid-run and mid-checkpoint, Ctrl-C, a NaN loss.

The promise: a resumed run ends with the same adapter weights and the same data order as one that
was never interrupted, and no fault leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from habit import rundir, training
from habit.data import load_examples
from habit.errors import HabitError
from habit.settings import TrainSettings

STEPS = ["--steps", "12", "--save-every", "4", "--keep-checkpoints", "5", "--batch-tokens", "256",
         "--max-len", "256", "--lr", "2e-2", "--val-frac", "0.2"]


def habit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "habit", *args]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def weights(run: Path) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_jsonl(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(tiny_model, roles_csv, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one is compared with."""
    cwd = tmp_path_factory.mktemp("reference")
    done = subprocess.run(habit_cmd("train", roles_csv, "--model", tiny_model, "--out", "run", *STEPS),
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    # same data order: every step's loss matches the uninterrupted run's
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-4)
    assert json.loads((resumed / "run.json").read_text())["status"] == "done"


def wait_for(path_glob, run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(run.glob(path_glob)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path_glob} appeared: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"{path_glob} never appeared")


def start_until_first_checkpoint(tiny_model, roles_csv, cwd: Path) -> subprocess.Popen:
    """A training process that has written checkpoints/step-0000004 and is still running."""
    proc = subprocess.Popen(habit_cmd("train", roles_csv, "--model", tiny_model, "--out", "run", *STEPS),
                            cwd=cwd, env=env(), stderr=subprocess.PIPE, text=True)
    wait_for("checkpoints/step-0000004", cwd / "run", proc)
    return proc


def resume(cwd: Path) -> None:
    done = subprocess.run(habit_cmd("train", "--resume", "run"), cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_sigkill_mid_run_then_resume_matches(tiny_model, roles_csv, reference, tmp_path):
    proc = start_until_first_checkpoint(tiny_model, roles_csv, tmp_path)
    run = tmp_path / "run"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "adapter_model.safetensors").exists()  # killed before the end
    resume(tmp_path)
    assert json.loads((run / "run.json").read_text())["resumed_from"] >= 4
    assert_same_run(run, reference)


KILL_IN_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys, torch
    from habit.cli import main
    real_save = torch.save
    def save(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 8:
            real_save(obj, path, *a, **k)          # state written into the temp folder ...
            os.kill(os.getpid(), signal.SIGKILL)   # ... and killed before the rename
        return real_save(obj, path, *a, **k)
    torch.save = save
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_checkpoint_write_leaves_last_good_one(tiny_model, roles_csv, reference, tmp_path):
    done = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, "train", roles_csv, "--model",
                           tiny_model, "--out", "run", *STEPS], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".tmp-step-0000008", "step-0000004"]  # the cut write never became a checkpoint
    assert training.latest_checkpoint(run).name == "step-0000004"
    resume(tmp_path)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert_same_run(run, reference)


def test_ctrl_c_saves_then_stops_cleanly(tiny_model, roles_csv, reference, tmp_path):
    proc = start_until_first_checkpoint(tiny_model, roles_csv, tmp_path)
    run = tmp_path / "run"
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert training.latest_checkpoint(run).name == f"step-{info['stopped_at']:07d}"
    resume(tmp_path)
    assert_same_run(run, reference)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_model, roles_csv, tmp_path,
                                                                    monkeypatch):
    real = training.batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, pad_id, device, fast=None):
        loss, n = real(model, batch, pad_id, device, fast)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    monkeypatch.setattr(training, "batch_loss", poisoned)
    monkeypatch.setattr(training, "check_fast", lambda *a: (True, 0.0))  # count training passes only
    out = tmp_path / "run"
    with pytest.raises(HabitError, match=r"step 3: the loss or a gradient is not finite"):
        training.train(load_examples(roles_csv), out, model=tiny_model,
                       settings=TrainSettings(steps=6, save_every=1, batch_tokens=256, max_len=256,
                                              val_frac=0.0))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000001", "step-0000002"]
    state = torch.load(out / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)
    assert all(torch.isfinite(m).all() for m in state["master"])


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    rundir.write_json(run / "run.json", {"base": {}, "template": {}, "settings": {}, "data": {}})
    with pytest.raises(HabitError, match="no complete checkpoint"):
        training.resume(run)
