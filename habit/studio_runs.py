"""The studio's side of a runs folder: the job queue that runs `habit` commands one at a time, the
status of every run in the folder, and the checks of a page's settings and data (habit studio's
HTTP routes are in habit/studio.py).

Every piece of work is the `habit` command itself, run as a child process (`python -m habit
train ...`): the server never loads a model, a crash or an out-of-memory kill takes down one job
and not the page, and a run started here is the run the CLI would have written. One job runs at a
time (training, eval, compare and export compete for the same cores and memory); the others wait
in the queue. Trainings are recorded in RUNS/.studio/runs/NAME.json, so a new studio on the folder
still knows a run that failed before it wrote run.json, and starts the ones left queued.

Stop is SIGTERM, which training answers by saving a checkpoint and marking run.json
"interrupted"; Resume is `habit train --resume`. Status comes from run.json and the job's exit,
so runs started from the CLI in the same folder show up too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from habit import flags, rundir
from habit.engine import ApiError
from habit.errors import HabitError

MAX_UPLOAD = 100 << 20  # bytes; larger uploads get 413 (--max-upload-mb)
STALE = 30 * 60  # a run.json left "running" with no file touched for this long has died
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# habit train flags the page does not set: the studio names the run directory, never replaces
# one, always wants the JSON result, and resumes by its own button
NOT_SETTINGS = {"help", "data", "resume", "out", "force", "json"}
TERMINAL = ("done", "failed", "stopped")

class _Refuse(argparse.ArgumentParser):
    """habit train's parser, raising argparse's one-line message instead of exiting."""

    def error(self, message: str):
        raise HabitError(message)


def _train_parser() -> argparse.ArgumentParser:
    return flags.train_parser(_Refuse)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse keeps its actions in _actions; there is no public accessor
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS}


def _param(message: str, known) -> str | None:
    """The settings field a one-line message is about: its first --flag habit train has."""
    for flag in re.findall(r"--([a-z][a-z-]*)", message):
        if flag.replace("-", "_") in known:
            return flag.replace("-", "_")
    return None


def _data_param(message: str) -> str:
    if "cannot tell which column is the response" in message:
        return "response"
    if "template" in message:
        return "template"
    return "response" if "response field" in message else "data"


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    """One `habit` command the studio runs, in its own process."""

    id: str
    kind: str  # train | resume | eval | compare | merge | export
    run: str
    argv: list[str]  # after `python -m habit`
    log: str  # its stderr (habit's progress and its one-line error)
    state: str = "queued"  # queued | running | done | failed | stopped
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    returncode: int | None = None
    error: str | None = None
    result: Any = None  # the command's --json output
    stop_requested: bool = False
    pid: int | None = None
    proc: Any = field(default=None, repr=False)

    def public(self) -> dict:
        return {"job": self.id, "kind": self.kind, "run": self.run, "state": self.state,
                "created": self.created, "started": self.started, "finished": self.finished,
                "returncode": self.returncode, "error": self.error, "result": self.result,
                "command": "habit " + " ".join(self.argv)}

    def record(self) -> dict:
        keep = ("id", "kind", "run", "argv", "log", "state", "created", "started", "finished",
                "returncode", "error", "stop_requested", "pid")
        return {k: getattr(self, k) for k in keep}


def _error_line(log: Path, returncode: int) -> str:
    """The one line that says why a command failed: habit's own error line, which it prints last,
    or the last line of a traceback, or the signal that killed it."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("habit: error: "):
            return line[len("habit: error: "):]
    return lines[-1] if lines else f"exited with code {returncode}"


def tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    # rich redraws progress with carriage returns; a pipe gets plain lines, but be safe
    return [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip()][-n:]


class _Rows:
    """metrics.jsonl rows of one run, re-read only as far as the file grew (a resume replaces the
    file, which starts the read over)."""

    def __init__(self, path: Path):
        self.path, self.key, self.offset, self.rows, self.rest = path, None, 0, [], b""
        self.lock = threading.Lock()

    def get(self) -> list[dict]:
        with self.lock:
            try:
                st = self.path.stat()
            except OSError:
                self.key, self.offset, self.rows, self.rest = None, 0, [], b""
                return self.rows
            if self.key != st.st_ino or st.st_size < self.offset:
                self.key, self.offset, self.rows, self.rest = st.st_ino, 0, [], b""
            if st.st_size > self.offset:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = self.rest + f.read()
                self.offset += len(data) - len(self.rest)
                *lines, self.rest = data.split(b"\n")
                rows = list(self.rows)  # a new list: streams compare it with the one they sent from
                for line in lines:
                    try:
                        rows.append(json.loads(line))
                    except (ValueError, UnicodeDecodeError):
                        continue  # a line cut by a crash: rundir.read_jsonl skips it too
                self.rows = rows
            return self.rows


class Studio:
    """The runs folder, the job queue and its one worker thread; the HTTP app is `build_app`."""

    def __init__(self, runs_dir: str | os.PathLike = "runs", api_key: str | None = None,
                 max_upload: int = MAX_UPLOAD, loopback_only: bool = True):
        if api_key is not None and not api_key.strip():
            raise HabitError("--api-key must not be empty")
        if max_upload < 1:
            raise HabitError("--max-upload-mb must be positive")
        self.runs = Path(runs_dir)
        if self.runs.exists() and not self.runs.is_dir():
            raise HabitError(f"--runs-dir {self.runs}: is a file, not a folder")
        self.uploads, self.state = self.runs / ".uploads", self.runs / ".studio"
        for folder in (self.uploads, self.state / "runs", self.state / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        self.api_key, self.max_upload, self.loopback_only = api_key, max_upload, loopback_only
        self.cookie = hashlib.sha256(f"habit studio {api_key}".encode()).hexdigest() if api_key else None
        self.lock = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.queue: list[Job] = []
        self.records: dict[str, dict] = {}  # run → {"train_argv", "job"}: runs this studio trains
        self.rows: dict[str, _Rows] = {}
        self.closing = False
        self.draining = False  # the server is stopping: event streams end so it can
        self._load_records()
        self.worker = threading.Thread(target=self._work, name="habit-studio-jobs", daemon=True)
        self.worker.start()

    # ------------------------------------------------------------ records

    def _load_records(self) -> None:
        for path in sorted((self.state / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                job = Job(**rec["job"])
            except (ValueError, TypeError, KeyError):
                continue  # not ours, or from another version: the run.json still tells
            if job.state == "running":  # the studio that ran it is gone, and so its process
                job.state = "lost"
            self.records[job.run] = rec
            self.jobs[job.id] = job
            if job.state == "queued":
                self.queue.append(job)

    def _save(self, job: Job) -> None:
        if job.kind in ("train", "resume"):
            rec = self.records.setdefault(job.run, {"train_argv": job.argv})
            rec["job"] = job.record()
            rundir.write_json(self.state / "runs" / f"{job.run}.json", rec)

    # ------------------------------------------------------------ the worker

    def submit(self, kind: str, run: str, argv: list[str]) -> Job:
        ident = uuid.uuid4().hex[:12]
        job = Job(ident, kind, run, argv, str(self.state / "logs" / f"{run}-{kind}-{ident}.log"))
        with self.lock:
            self.jobs[job.id] = job
            self.queue.append(job)
            self._save(job)
            self.lock.notify_all()
        return job

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.closing:
                    self.lock.wait()
                if self.closing:
                    return
                job = self.queue.pop(0)
                job.state, job.started = "running", time.time()
                self._save(job)
            try:
                self._run(job)
            except Exception as e:  # a bug or an OS error: the job fails, the queue goes on
                with self.lock:
                    job.state, job.error, job.finished = "failed", f"studio: {e}", time.time()
                    self._save(job)

    def _run(self, job: Job) -> None:
        # COLUMNS: rich wraps a pipe's lines at 80, and the page shows the log as it is
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="160")
        # the child runs this very habit, wherever it was imported from
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        out = Path(job.log).with_suffix(".out")
        with open(job.log, "wb") as err, open(out, "wb") as stdout:
            # its own session: a Ctrl-C meant for the studio reaches it as the studio's SIGTERM
            proc = subprocess.Popen([sys.executable, "-m", "habit", *job.argv], stdout=stdout,
                                    stderr=err, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            with self.lock:
                job.proc, job.pid = proc, proc.pid
                self._save(job)
                if job.stop_requested:
                    proc.send_signal(signal.SIGTERM)
            rc = proc.wait()
        result, lines = None, [ln for ln in out.read_text(errors="replace").splitlines() if ln.strip()]
        if rc == 0:
            try:
                parsed = [json.loads(ln) for ln in lines]
                result = parsed if job.kind == "compare" else (parsed[-1] if parsed else None)
            except ValueError:
                result = None
            if job.kind == "merge":
                self._zip(Path(result["path"]), self._exports(job.run) / f"{job.run}-merged.zip")
        with self.lock:
            job.returncode, job.finished, job.proc, job.result = rc, time.time(), None, result
            if rc == 0:
                job.state = "done"
            elif job.stop_requested and rc in (130, -signal.SIGTERM, -signal.SIGINT):
                job.state = "stopped"
            else:
                job.state, job.error = "failed", _error_line(Path(job.log), rc)
            self._save(job)

    @staticmethod
    def _zip(folder: Path, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            # stored, not deflated: safetensors weights barely compress and would take minutes
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        z.write(path, Path(folder.name) / path.relative_to(folder))
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def close(self, wait: float = 120.0) -> None:
        """Stop the worker; a training in flight gets SIGTERM and saves a checkpoint first. Queued
        trainings stay queued on disk and start with the next studio on this folder."""
        with self.lock:
            self.closing = True
            running = [j for j in self.jobs.values() if j.state == "running"]
            for job in running:
                job.stop_requested = True
                if job.proc is not None:
                    job.proc.send_signal(signal.SIGTERM)
            self.lock.notify_all()
        self.worker.join(wait)

    # ------------------------------------------------------------ runs

    def _job_of(self, run: str) -> Job | None:
        """The newest train/resume job of a run, in this studio or recorded by an earlier one."""
        rec = self.records.get(run)
        return self.jobs.get(rec["job"]["id"]) if rec else None

    def run_dir(self, name: str) -> Path:
        if not NAME.fullmatch(name or ""):
            raise ApiError(404, f"{name!r} is not a run name", "run", "not_found")
        path = self.runs / name
        if not (path / rundir.RUN_FILE).is_file() and name not in self.records:
            raise ApiError(404, f"no run named {name!r} in {self.runs}", "run", "not_found")
        return path

    def names(self) -> list[str]:
        found = {p.name for p in self.runs.iterdir()
                 if not p.name.startswith(".") and (p / rundir.RUN_FILE).is_file()}
        return sorted(found | set(self.records), key=self._created, reverse=True)

    def _created(self, name: str) -> float:
        job = self._job_of(name)
        if job:
            return job.created
        try:
            return (self.runs / name / rundir.RUN_FILE).stat().st_mtime
        except OSError:
            return 0.0

    def metrics(self, name: str) -> list[dict]:
        if name not in self.rows:
            self.rows[name] = _Rows(self.runs / name / rundir.METRICS_FILE)
        return self.rows[name].get()

    def status(self, name: str, info: dict | None, job: Job | None) -> tuple[str, str | None]:
        if job and job.state in ("queued", "running"):
            return job.state, None
        state = (info or {}).get("status")
        if state == "done":
            return "done", None
        if state == "interrupted":
            return "stopped", None
        if job and job.state in ("stopped", "failed"):
            return job.state, job.error
        if state == "running":  # a CLI run, or one whose studio went away with its process
            run = self.runs / name
            newest = max((p.stat().st_mtime for p in [run / rundir.RUN_FILE, run / rundir.METRICS_FILE]
                          if p.exists()), default=0)
            if time.time() - newest < STALE:
                return "running", None
            return "failed", (f"no progress for {STALE // 60} minutes and no process here trains "
                              "it; Resume continues from its last checkpoint")
        if job and job.state == "lost":
            return "failed", "the studio that ran it stopped before it finished"
        return "failed", "the run finished without marking run.json done"

    def summary(self, name: str) -> dict:
        run = self.runs / name
        try:
            info = json.loads((run / rundir.RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        with self.lock:
            job = self._job_of(name)
            status, error = self.status(name, info, job)
            position = self.queue.index(job) + 1 if job in self.queue else None
        rows = self.metrics(name)
        steps = [r for r in rows if "loss" in r]
        vals = [r for r in rows if "val_loss" in r]
        last = steps[-1] if steps else {}
        info = info or {}
        exports = self._exports(name, create=False)
        return {
            "run": name, "status": status, "error": error, "path": str(run),
            "queue_position": position,
            "step": last.get("step", 0),
            "total_steps": last.get("total_steps") or (info.get("plan") or {}).get("steps"),
            "loss": last.get("loss"), "val_loss": vals[-1]["val_loss"] if vals else None,
            "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": last.get("elapsed_s"),
            "rows": len(rows),
            "base": (info.get("base") or {}).get("source"),
            "data": self._shown((info.get("data") or {}).get("source")),
            "template": info.get("template_text"),
            "created": self._created(name),
            "started_here": name in self.records,
            "checkpoint": _has_checkpoint(run),
            "adapter": (run / "adapter_model.safetensors").is_file(),
            "evaluated": (run / rundir.EVAL_FILE).is_file(),
            "exports": sorted(p.name for p in exports.iterdir() if p.is_file()
                              and not p.name.startswith(".")) if exports.is_dir() else [],
        }

    def _shown(self, source: str | None) -> str | None:
        """A data source as the user knows it: an upload by its file name."""
        if source and Path(source).resolve().is_relative_to(self.uploads.resolve()):
            return f"{Path(source).name} (uploaded)"
        return source

    def _exports(self, name: str, create: bool = True) -> Path:
        folder = self.runs / name / "export"
        if create:
            folder.mkdir(exist_ok=True)
        return folder

    def new_name(self, stem: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-_")[:80] or "run"
        name, n = stem, 1
        while (self.runs / name).exists() or name in self.records:
            n += 1
            name = f"{stem}-{n}"
        return name

    def stop(self, name: str) -> dict:
        self.run_dir(name)
        with self.lock:
            job = self._job_of(name)
            if job and job.state == "queued":
                self.queue.remove(job)
                job.state, job.finished, job.stop_requested = "stopped", time.time(), True
                self._save(job)
            elif job and job.state == "running":
                job.stop_requested = True
                if job.proc is not None:  # else _run sends it as soon as the process exists
                    job.proc.send_signal(signal.SIGTERM)
            else:
                status = self.summary(name)["status"]
                if status == "running":
                    raise ApiError(409, f"{name} was not started by this studio: stop it where it "
                                   "runs (Ctrl-C)", "run", "not_ours")
                raise ApiError(409, f"{name} is not running (status {status})", "run", "not_running")
        return self.summary(name)

    def resume(self, name: str) -> dict:
        run = self.run_dir(name)
        status = self.summary(name)["status"]
        if status in ("queued", "running", "done"):
            raise ApiError(409, f"{name} is {status}; nothing to resume", "run", f"run_{status}")
        rec = self.records.get(name)
        if _has_checkpoint(run):
            self.submit("resume", name, ["train", "--resume", str(run), "--json"])
        elif rec:  # stopped before its first checkpoint: start over, replacing what it began
            self.submit("train", name, [a for a in rec["train_argv"] if a != "--force"] + ["--force"])
        else:
            raise ApiError(409, f"{run}: no complete checkpoint to resume from", "run", "no_checkpoint")
        return self.summary(name)

    def need_adapter(self, name: str) -> Path:
        run = self.run_dir(name)
        if not (run / "adapter_model.safetensors").is_file():
            status = self.summary(name)["status"]
            raise ApiError(409, f"{name} has no adapter yet (status {status}): train it to the end "
                           "first", "run", "not_done")
        return run

    # ------------------------------------------------------------ settings and data

    def train_argv(self, settings: dict) -> tuple[list[str], argparse.Namespace]:
        """habit train's flags for a settings object, checked by habit train's parser and
        settings classes; every problem is a 400 naming the field."""
        from habit.settings import LoraSettings, TrainSettings

        parser = _train_parser()
        known = _flags(parser)
        argv = []
        for key, value in settings.items():
            dest = key.replace("-", "_")
            action = known.get(dest)
            if action is None:
                raise ApiError(400, f"unknown setting {key!r} (habit train has no "
                               f"--{dest.replace('_', '-')})", key, "unknown_setting")
            flag = action.option_strings[0]
            if action.nargs == 0:
                if not isinstance(value, bool):
                    raise ApiError(400, f"{flag} takes true or false, not {value!r}", dest, "invalid_type")
                argv += [flag] if value else []
            elif value is not None and value != "":
                if isinstance(value, (dict, list)):
                    raise ApiError(400, f"{flag} takes one value, not {json.dumps(value)}", dest,
                                   "invalid_type")
                value = json.dumps(value) if isinstance(value, bool) else str(value)
                argv.append(f"{flag}={value}")  # = keeps a value that starts with '-' a value
        try:
            args = parser.parse_args(argv)
            flags.settings_from(args, LoraSettings), flags.settings_from(args, TrainSettings)
        except HabitError as e:
            raise ApiError(400, str(e), _param(str(e), known), "invalid_value") from None
        return argv, args

    def check_model(self, given: str) -> None:
        from habit import models

        try:
            models.resolve(given)
        except HabitError as e:
            raise ApiError(400, str(e), "model", "invalid_model") from None

    def load_table(self, path: str, args, shown: str | None):
        """The examples, or a 400 whose message names the file as the user knows it."""
        from habit import data

        try:
            return data.load_examples(path, template=args.template, response=args.response)
        except HabitError as e:
            message = str(e).replace(path, shown) if shown else str(e)
            columns = None
            try:
                columns = list(data._read(path).columns)
            except Exception:  # the file itself is unreadable: no columns to offer
                pass
            raise _DataError(message, _data_param(message), columns) from None

    def inspect(self, settings: dict, upload: tuple[Path, str] | None, n: int) -> dict:
        """habit data check, and habit data preview as structured pieces (the same render.encode
        training uses, the loss-carrying pieces marked)."""
        from habit import render

        settings = dict(settings)
        path, shown = self._data(settings, upload)
        settings.pop("name", None)
        _, args = self.train_argv(settings)
        self.check_model(args.model)
        table = self.load_table(path, args, shown)
        tokenizer = _tokenizer(args.model)
        args.data = path
        report = flags.data_report(args, table=table, tokenizer=tokenizer)
        template = render.choose_template(table, tokenizer)
        stop = [tokenizer.eos_token_id]  # from the tokenizer alone, as habit data preview does
        preview = []
        for ex in table.examples[:n]:
            enc = render.encode(ex, template, tokenizer, stop, args.train_on_prompt)
            preview.append({"where": ex.where.replace(path, shown) if shown else ex.where,
                            "tokens": len(enc), "loss_tokens": sum(enc.loss),
                            "pieces": render.pieces(enc, tokenizer)})
        report["source"] = shown or report["source"]
        report["too_long"] = [[w.replace(path, shown) if shown else w, k] for w, k in report["too_long"]]
        return {"data": path, "name": shown or Path(path).name, "check": report,
                "warnings": _warnings(report, args), "preview": preview}

    def _data(self, settings: dict, upload: tuple[Path, str] | None) -> tuple[str, str | None]:
        """(path to load, the name to show for it): an upload, else settings.data."""
        given = settings.pop("data", None)
        if upload:
            return str(upload[0]), upload[1]
        if not given or not isinstance(given, str):
            raise ApiError(400, "give a DATA file to train on: upload one or type its path", "data",
                           "missing_data")
        stored = self.uploads.resolve()
        if Path(given).resolve().is_relative_to(stored):  # an earlier upload: show its own name
            return given, Path(given).name
        return given, None

    def estimate(self, settings: dict) -> dict:
        """The memory estimate habit train will print (and refuse by), the steps it will run, and
        a time from the speed a run of the same base measured here, where there is one."""
        import torch

        from habit import models
        from habit.settings import LoraSettings, TrainSettings
        from habit.training import memory_plan

        settings = dict(settings)
        settings.pop("name", None)
        given = settings.get("data")
        _, args = self.train_argv({k: v for k, v in settings.items() if k != "data"})
        self.check_model(args.model)
        lora, train = flags.settings_from(args, LoraSettings), flags.settings_from(args, TrainSettings)
        source = models.resolve(args.model)
        try:
            config = models.check_arch(source)
        except HabitError as e:
            raise ApiError(400, str(e), "model", "invalid_model") from None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = models.best_dtype(train.precision, device)
        try:
            need = memory_plan(config, lora, train, dtype, device, say=False)
            memory = {"fits": True, "gb": round(need.total / 1e9, 2), "text": need.describe()}
        except HabitError as e:
            memory = {"fits": False, "gb": None, "text": str(e)}
        out = {"device": device, "memory": memory, "steps": train.steps, "seconds": None,
               "tokens_per_s": None, "measured_by": None}
        if isinstance(given, str) and given:
            path, shown = self._data({"data": given}, None)
            table = self.load_table(path, args, shown)
            args.data = path
            report = flags.data_report(args, table=table, tokenizer=_tokenizer(args.model))
            per_step = min(train.batch_tokens, max(1, report["tokens"]))
            share = report["train"] / max(1, report["train"] + report["val"])
            epoch_steps = max(1, -(-int(report["tokens"] * share) // train.batch_tokens))
            out["steps"] = train.steps or max(1, math.ceil(train.epochs * epoch_steps))
            speed = self._speed(args.model)
            if speed:
                out["tokens_per_s"], out["measured_by"] = speed
                out["seconds"] = round(out["steps"] * per_step / speed[0], 1)
        return out

    def _speed(self, model: str) -> tuple[float, str] | None:
        """Tokens/s of the newest run of this base in the runs folder, from its metrics."""
        best = None
        for name in self.names():
            run = self.runs / name
            try:
                info = json.loads((run / rundir.RUN_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (info.get("base") or {}).get("source") != model:
                continue
            rows = [r for r in self.metrics(name) if r.get("tokens_per_s")]
            when = (run / rundir.RUN_FILE).stat().st_mtime
            if rows and (best is None or when > best[0]):
                best = (when, float(rows[-1]["tokens_per_s"]), name)
        return (best[1], best[2]) if best else None

    def options(self) -> dict:
        from habit import models
        from habit.settings import LoraSettings, TrainSettings

        groups = {f.name: "LoRA" for f in dataclasses.fields(LoraSettings)}
        groups |= {f.name: "training" for f in dataclasses.fields(TrainSettings)}
        fields = []
        for dest, a in _flags(_train_parser()).items():
            kind = "bool" if a.nargs == 0 else getattr(a.type, "__name__", "str")
            text = (a.help or "").replace("%%", "%")
            choices = re.match(r"([\w-]+(?: \| [\w-]+)+)(?=:| \(|$)", text)
            fields.append({"name": dest, "flag": a.option_strings[0], "type": kind,
                           "default": a.default, "help": text,
                           "choices": choices.group(1).split(" | ") if choices else None,
                           "group": groups.get(dest, "data" if dest in ("template", "response")
                                               else "model")})
        bases = []
        for name in self.names():
            try:
                info = json.loads((self.runs / name / rundir.RUN_FILE).read_text(encoding="utf-8"))
                bases.append(info["base"]["source"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        aliases = []
        for alias, (_, _, install) in models.ALIASES.items():
            try:
                models.resolve(alias)
                aliases.append({"name": alias, "installed": True, "install": install})
            except HabitError:
                aliases.append({"name": alias, "installed": False, "install": install})
        return {"settings": fields, "aliases": aliases, "bases": list(dict.fromkeys(bases)),
                "runs_dir": str(self.runs), "max_upload": self.max_upload,
                "needs_key": self.api_key is not None}

    def create(self, settings: dict, upload: tuple[Path, str] | None) -> str:
        settings = dict(settings)
        path, shown = self._data(settings, upload)
        name = settings.pop("name", None)
        argv, args = self.train_argv(settings)
        if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
            raise ApiError(400, f"run name {name!r}: use letters, digits, '.', '-' and '_' "
                           "(up to 100, starting with a letter or digit)", "name", "invalid_name")
        self.check_model(args.model)
        self.load_table(path, args, shown)  # a bad file fails here, not in the queue
        with self.lock:
            name = name or self.new_name(Path(shown or path).stem)
            out = self.runs / name
            if name in self.records:
                raise ApiError(409, f"{out}: already exists; pick another name", "name", "exists")
            try:
                rundir.check_new(out, force=False)
            except HabitError as e:
                raise ApiError(409, str(e).replace("--out", "name").replace(
                    " or pass --force to replace it", ""), "name", "exists") from None
            # DATA after "--": a path that starts with '-' stays a path
            self.submit("train", name, ["train", *argv, f"--out={out}", "--json", "--", path])
        return name

    def store(self, upload, name: str) -> tuple[Path, str]:
        """Keep an upload under RUNS/.uploads/<sha256>/<its name>, written atomically: run.json
        points at it (resume re-reads the data) and the same file uploaded twice is kept once."""
        shown = Path(name or "data").name
        safe = re.sub(r"[^\w.-]+", "_", shown).lstrip(".") or "data"
        fd, tmp = tempfile.mkstemp(dir=self.uploads, prefix=".upload-")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := upload.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            folder = self.uploads / digest.hexdigest()[:16]
            folder.mkdir(exist_ok=True)
            target = folder / safe
            if target.is_file():
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return target, shown

    def compare_argv(self, name: str, body: dict) -> list[str]:
        run = self.need_adapter(name)
        inputs = body.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(i, str) and i.strip() for i in inputs):
            raise ApiError(400, "'inputs' must be one or more non-empty texts", "inputs", "invalid_value")
        gen = _generation(body)
        return ["compare", *gen, "--json", "--", str(run), *inputs]

    def eval_argv(self, name: str, body: dict) -> list[str]:
        run = self.need_adapter(name)
        n = body.get("n", 20)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ApiError(400, "'n' must be a whole number of at least 1", "n", "invalid_value")
        return ["eval", str(run), f"--n={n}", *_generation(body), "--json"]

    def export_argv(self, name: str, body: dict) -> tuple[str, list[str]]:
        from habit.export import DTYPES

        run = self.need_adapter(name)
        kind, dtype = body.get("format", "gguf"), body.get("dtype", "f16")
        if kind not in ("gguf", "merged"):
            raise ApiError(400, f"'format' {kind!r}: choose gguf or merged", "format", "invalid_value")
        if dtype not in DTYPES:
            raise ApiError(400, f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}", "dtype",
                           "invalid_value")
        folder = self._exports(name)
        if kind == "merged":
            return "merge", ["merge", str(run), f"--out={folder / 'merged'}", "--force", "--json"]
        return "export", ["export", str(run), f"--gguf={folder / (name + '.gguf')}", f"--dtype={dtype}",
                          "--ollama", "--force", "--json"]


class _DataError(ApiError):
    """A data problem: the 400 also lists the file's columns, so the page can offer them as the
    response column even when the shape could not be told."""

    def __init__(self, message: str, param: str, columns: list[str] | None):
        super().__init__(400, message, param, "invalid_data")
        self.columns = columns

    def body(self) -> dict:
        return super().body() | {"columns": self.columns}


def loopback(host: str) -> bool:
    """Whether an address is reachable from this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")


def _has_checkpoint(run: Path) -> bool:
    return any((p / "state.pt").is_file() for p in (run / "checkpoints").glob("step-*"))


def _generation(body: dict) -> list[str]:
    """habit's generation flags from a request body, converted as argparse would and checked by
    GenerationSettings, in the CLI's words."""
    from habit.settings import GenerationSettings

    values = {}
    for f in dataclasses.fields(GenerationSettings):
        if f.name not in body:
            continue
        kind, value, flag = {"int": int, "float": float}[str(f.type)], body[f.name], "--" + f.name.replace("_", "-")
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            values[f.name] = kind(value)
        except ValueError:
            raise ApiError(400, f"argument {flag}: invalid {kind.__name__} value: {value!r}", f.name,
                           "invalid_type") from None
    try:
        GenerationSettings(**values)
    except HabitError as e:
        raise ApiError(400, str(e), _param(str(e), values), "invalid_value") from None
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _warnings(report: dict, args) -> list[str]:
    out = []
    if report.get("duplicates_dropped"):
        out.append(f"{report['duplicates_dropped']} exact duplicate examples dropped (the first of each kept)")
    too_long = report.get("too_long") or []
    if too_long:
        where, n = too_long[0]
        out.append(f"{len(too_long)} examples longer than --max-len {report.get('max_len', args.max_len)} tokens are dropped "
                   f"in training (first: {where}, {n} tokens)")
    if report.get("val") == 0:
        out.append(f"no validation examples at --val-frac {args.val_frac}: no validation loss, and "
                   "--keep best keeps the last adapter")
    if report.get("train") == 0:
        out.append("no training examples left after the validation split")
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str, stamp: float):
    from habit import models

    return models.load_tokenizer(models.resolve(path))


def _tokenizer(given: str):
    from habit import models

    source = models.resolve(given)
    try:
        stamp = os.stat(source.path).st_mtime
    except OSError:
        stamp = 0.0
    try:
        return _tokenizer_at(given, stamp)
    except HabitError as e:
        raise ApiError(400, str(e), "model", "invalid_model") from None


