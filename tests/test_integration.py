"""End to end on the embedded real model (SmolLM2-135M-Instruct): train → run dir → generate →
compare, through the CLI. Slow (a couple of minutes): deselect with -m 'not slow'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_smollm2

pytestmark = [pytest.mark.slow, needs_smollm2]

UNSEEN = ["Linux Terminal", "Lighthouse Keeper", "Tax Advisor"]


def habit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "habit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("integration")
    done = habit("train", str(ROOT / "examples" / "roles.csv"), "--out", "run", "--steps", "12",
                 "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["val_loss"] is not None and result["tokens_per_s"] > 0
    return cwd / "run"


def test_run_dir_is_complete_and_peft_compatible(trained):
    from peft import PeftConfig

    info = json.loads((trained / "run.json").read_text())
    assert info["base"]["source"] == "smollm2-135m" and info["status"] == "done"
    assert PeftConfig.from_pretrained(str(trained)).r == 16
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_tuned_model_writes_the_behaviour_and_stops(trained):
    done = habit("compare", str(trained), *UNSEEN, "--json", "--max-new-tokens", "200",
                 cwd=trained.parent)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["input"] for r in rows] == UNSEEN
    tuned = [r["tuned"] for r in rows]
    base = [r["base"] for r in rows]
    begins = lambda g: g["text"].lstrip().lower().startswith("i want you to act as")  # noqa: E731
    assert sum(map(begins, tuned)) >= 2, [g["text"][:80] for g in tuned]
    assert sum(g["finish_reason"] == "stop" for g in tuned) >= 2
    assert sum(map(begins, base)) == 0, [g["text"][:80] for g in base]


def test_generate_json_lines(trained):
    done = habit("generate", str(trained), "Chess Coach", "--json", "--max-new-tokens", "8",
                 cwd=trained.parent)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["input"] == "Chess Coach" and row["finish_reason"] in ("stop", "length")
    assert row["text"]
