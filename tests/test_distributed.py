"""Two processes through torchrun (DDP over gloo on CPU): one run directory, written once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from habit import adapters, rundir


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this python")


def launch(processes: int, args: list, cwd) -> subprocess.CompletedProcess:
    """`habit train ARGS` on 1 process (plain python) or N (torchrun, gloo on CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "habit", "train", *map(str, args)]
    else:
        with socket.socket() as s:  # a free port: torchrun's static rendezvous hangs on port 0
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [TORCHRUN, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "habit", "train", *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@needs_torchrun
def test_torchrun_two_processes(tiny_model, roles_csv, tmp_path):
    done = launch(2, [roles_csv, "--model", tiny_model, "--out", "run", "--steps", "8",
                      "--batch-tokens", "256", "--max-len", "256", "--lr", "2e-2", "--json"], tmp_path)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, done.stdout  # rank 0 alone reports
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["plan"]["processes"] == 2 and info["status"] == "done"
    rows = rundir.read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))  # each step logged once, by rank 0
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    loaded = adapters.load_run(run)
    assert loaded.model.active_adapter == "default"


@needs_torchrun
def test_two_processes_take_the_same_steps_as_one(arch_model, roles_csv, tmp_path):
    """The same seed and data on 1 and on 2 processes: the same per-step losses and the same
    adapter. A step is --batch-tokens in total, split across processes, and each process divides
    by the step's global target count. Here a step is 2 rows of unequal length (one a process),
    and each epoch's last step is 1 row: the second process then has none and joins with a
    zero-weight pass."""
    from safetensors.torch import load_file

    args = [roles_csv, "--model", arch_model("llama"), "--steps", "6", "--batch-tokens", "512",
            "--max-len", "256", "--lr", "2e-2", "--precision", "fp32", "--val-frac", "0"]
    launch(1, args + ["--out", "one"], tmp_path)
    launch(2, args + ["--out", "two"], tmp_path)
    curves = [[r["loss"] for r in rundir.read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
              for name in ("one", "two")]
    assert len(curves[0]) == 6
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        rel = float((one[k] - two[k]).norm() / one[k].norm().clamp_min(1e-12))
        assert rel <= 1e-3, (k, rel)


@needs_torchrun
def test_fsdp2_two_processes_take_the_same_steps_as_one(arch_model, roles_csv, tmp_path):
    """--shard fsdp: FSDP2 over gloo shards the base and the fp32 LoRA weights across 2 processes;
    the per-step losses, the validation losses and the saved adapter equal one unsharded process.
    The odd row count gives the processes unequal shares (filler passes keep their forwards in
    step), and a checkpoint written from shards resumes into shards."""
    from safetensors.torch import load_file

    args = [roles_csv, "--model", arch_model("llama"), "--steps", "6", "--batch-tokens", "512",
            "--max-len", "256", "--lr", "2e-2", "--precision", "fp32", "--save-every", "3"]
    launch(1, args + ["--out", "one"], tmp_path)
    launch(2, args + ["--out", "two", "--shard", "fsdp"], tmp_path)
    rows = {name: rundir.read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("one", "two")}
    for key in ("loss", "val_loss"):
        one, two = ([r[key] for r in rows[name] if key in r] for name in ("one", "two"))
        assert len(one) >= 2 and two == pytest.approx(one, rel=1e-4), key
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["plan"]["processes"] == 2 and info["plan"]["sharded"]
    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        rel = float((one[k] - two[k]).norm() / one[k].norm().clamp_min(1e-12))
        assert rel <= 1e-3, (k, rel)
    loaded = adapters.load_run(tmp_path / "two")
    assert loaded.model.active_adapter == "default"

    # resume the sharded run from its step-3 checkpoint: the same steps 4-6 as uninterrupted
    checkpoints = tmp_path / "two" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000006")
    info["status"] = "interrupted"
    (tmp_path / "two" / "run.json").write_text(json.dumps(info))
    env_args = ["--resume", str(tmp_path / "two")]
    launch(2, env_args, tmp_path)
    again = [r["loss"] for r in rundir.read_jsonl(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert again == pytest.approx([r["loss"] for r in rows["one"] if "loss" in r], rel=1e-4)
