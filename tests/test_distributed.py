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


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed beside this python")
def test_torchrun_two_processes(tiny_model, roles_csv, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as s:  # a free port: torchrun's static rendezvous hangs on port 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "habit", "train", roles_csv,
         "--model", tiny_model, "--out", "run", "--steps", "8", "--batch-tokens", "256",
         "--max-len", "256", "--lr", "2e-2", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
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
