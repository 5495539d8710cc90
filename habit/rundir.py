"""The run directory: the contract between training and everything after it.

    runs/NAME/
      adapter_config.json, adapter_model.safetensors   PEFT's own format, unchanged
      run.json        base source + hash, template, data source + hash, settings, versions, status
      metrics.jsonl   one JSON object per logged step / eval
      checkpoints/    resumable trainer state

Every file is written atomically (a temp file in the same folder, then os.replace), so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from habit.errors import HabitError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


def write_atomic(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    # One short line per write with O_APPEND: a crash can lose the last line, never garble others.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def check_new(out: str | Path, force: bool) -> Path:
    """Refuse to overwrite a run unless forced; check the folder can be written. No side effects."""
    out = Path(out)
    if out.exists() and not force:
        if not out.is_dir() or any(out.iterdir()):
            raise HabitError(f"{out}: already exists; pick another --out or pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HabitError(f"{out}: cannot write here ({probe} is a file, not a folder)")
    if not os.access(probe, os.W_OK):
        raise HabitError(f"{out}: cannot write here ({probe} is not writable)")
    return out


def create(out: str | Path, force: bool) -> Path:
    out = check_new(out, force)
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_run(run: str | Path) -> dict:
    path = Path(run) / RUN_FILE
    if not Path(run).is_dir():
        raise HabitError(f"{run}: no such run directory")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HabitError(f"{run}: not a habit run (no {RUN_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HabitError(f"{path}: corrupt run file ({e})") from None
    for key in ("base", "template", "settings"):
        if key not in info:
            raise HabitError(f"{path}: missing field '{key}'")
    return info
