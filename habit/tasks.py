"""`habit eval RUN --tasks NAME[,NAME]`: did tuning cost general ability?

lm-evaluation-harness tasks run in this process on the base (adapter off) and on the tuned model,
and each task's score is reported for both with "capability retained" = tuned / base (base / tuned
for a lower-is-better metric such as perplexity).

Tasks are found, in order, among habit's own (habit/tasks/: `habit_mc`, 30 general-knowledge and
grammar questions scored by log-likelihood; `habit_gen`, 24 short questions answered by greedy
generation and scored by exact match), in the `--tasks-path` folders, then among lm-eval's built-in
tasks, which run when their data is on this machine (or, online, can be downloaded). A task's
`data_files` given relative to its YAML are looked up next to that YAML, where lm_eval itself would
look in the working directory: a task folder works from anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from habit.adapters import LoadedRun, adapter_off
from habit.errors import HabitError

SHIPPED = Path(__file__).with_name("tasks")
BATCH = 8  # lm-eval requests per forward pass
FEWSHOT_SEED = 1234  # lm-eval's default: few-shot examples drawn at random are the same for both sides


@dataclass
class Suite:
    names: list[str]  # as asked for
    loaded: dict  # TaskManager.load's {"tasks", "groups", "group_map"}
    limit: int | None = None  # at most this many documents per task


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def parse_names(text: str | Sequence[str] | None) -> list[str]:
    """`--tasks a,b` (or a list) as names; empty pieces are dropped."""
    if not text:
        return []
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    return [p.strip() for p in parts if p.strip()]


@contextlib.contextmanager
def _quiet():
    """lm-eval warns on every run about things habit chose (a model object, not a name; default
    aggregations) and datasets draws a bar per tiny split: neither helps a `habit eval` reader."""
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def load(names: Sequence[str], paths: Sequence[str | Path] = (), limit: int | None = None) -> Suite:
    """Find and build the tasks (their data is read here): every problem is a HabitError, raised
    before any model work. Built-in tasks are indexed only when a name is not habit's or the user's."""
    names = list(dict.fromkeys(names))
    if limit is not None and limit < 1:
        raise HabitError("--tasks-limit must be at least 1")
    if not names:
        raise HabitError("--tasks: give at least one task name (shipped: " + ", ".join(shipped()) + ")")
    for p in paths:
        if not Path(p).is_dir():
            raise HabitError(f"--tasks-path {p}: not a directory")
    with _quiet():
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's: `include:` and `!function`

        folders = tuple(str(f) for f in (SHIPPED, *paths))
        manager = TaskManager(include_path=list(folders), include_defaults=False)
        if any(n not in manager.task_index for n in names):
            manager = _with_builtins(folders)
        unknown = [n for n in names if n not in manager.task_index]
        if unknown:
            raise HabitError(f"--tasks: unknown task {unknown[0]!r} (shipped: {', '.join(shipped())}; "
                             "or a task in --tasks-path DIR, or an lm-eval task whose data is local)")
        specs = []
        for name in names:
            entry = manager.task_index[name]
            if entry.kind.name == "TASK" and entry.yaml_path:
                cfg = load_yaml(entry.yaml_path, resolve_func=True)
                specs.append(_local_data(cfg, Path(entry.yaml_path).parent))
            else:  # a group or tag: lm-eval builds its members as it always does
                specs.append(name)
        try:
            loaded = manager.load(specs)
        except Exception as e:  # the data is missing (offline, no cache) or the YAML is wrong
            raise HabitError(f"--tasks {','.join(names)}: cannot load the task data "
                             f"({' '.join(str(e).split())[:300]})") from None
    for task in loaded["tasks"].values():  # as lm_eval's simple_evaluate does
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return Suite(names, loaded, limit)


@functools.lru_cache(maxsize=4)
def _with_builtins(folders: tuple[str, ...]):
    """lm-eval's index of its ~15,000 built-in tasks (slow to build) with habit's and the user's."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders))


def _local_data(cfg: dict, folder: Path) -> dict:
    """The task's config with relative data files that exist next to its YAML made absolute."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return cfg

    def fix(f):
        return str(folder / f) if isinstance(f, str) and not Path(f).is_absolute() and (folder / f).exists() else f

    if isinstance(files, dict):
        files = {k: [fix(f) for f in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    else:
        files = [fix(f) for f in files] if isinstance(files, list) else fix(files)
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": files}}


def evaluate(run: LoadedRun, suite: Suite) -> dict:
    """Both sides' scores: {"tasks": {name: {metric, n, base, tuned, retained, ...}}, "retained":
    the mean ratio over tasks, "limit"}."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    # ONE code path for both sides: lm-eval's own HFLM wraps the run's PeftModel object, and the
    # only difference between base and tuned is `disable_adapter()` around the same call. HFLM
    # (not a habit-written LM class) because its log-likelihood, rolling log-likelihood and
    # generate_until are the ones lm-eval's published numbers come from, and none of it is ours
    # to get subtly wrong; the prompts are the task's raw text, as with any lm-eval model.
    results = {}
    with _quiet():
        lm = HFLM(pretrained=run.model, tokenizer=run.tokenizer, batch_size=BATCH)
        for side in ("base", "tuned"):
            for task in suite.loaded["tasks"].values():
                task.set_fewshot_seed(FEWSHOT_SEED)
            with adapter_off(run.model, side == "base"):
                results[side] = lm_eval.evaluator.evaluate(
                    lm=lm, task_dict=suite.loaded, limit=suite.limit, bootstrap_iters=100,
                    log_samples=False)
    return {**summarize(results["base"], results["tuned"]), "limit": suite.limit}


def summarize(base: dict, tuned: dict) -> dict:
    """Pair two lm-eval result objects task by task. A task's headline metric is the first its
    config lists; every metric is kept under "metrics"."""
    tasks = {}
    for name, row in base["results"].items():
        other = tuned["results"].get(name, {})
        keys = [k for k, v in row.items() if "," in k and "_stderr," not in k and _number(v) is not None]
        if not keys:
            continue
        metrics = {}
        for key in keys:
            metric = key.split(",")[0]
            higher = (base.get("higher_is_better", {}).get(name) or {}).get(metric, True)
            b, t = _number(row[key]), _number(other.get(key))
            metrics[key] = {"base": b, "tuned": t, "retained": retained(b, t, higher),
                            "higher_is_better": higher,
                            "base_stderr": _number(row.get(key.replace(",", "_stderr,", 1))),
                            "tuned_stderr": _number(other.get(key.replace(",", "_stderr,", 1)))}
        head = keys[0]
        n = (base.get("n-samples", {}).get(name) or {}).get("effective")
        n = None if n is None else int(n)  # lm-eval may count in numpy ints, which JSON refuses
        label = head.removesuffix(",none").replace(",", " ")  # "acc", or "exact_match strict"
        tasks[name] = {"metric": label, "n": n, **metrics[head], "metrics": metrics}
    # a group's aggregate stands for its members; count each task once
    members = {m for g, ms in (base.get("group_subtasks") or {}).items() if g in tasks for m in ms}
    ratios = [t["retained"] for name, t in tasks.items() if name not in members and t["retained"] is not None]
    return {"tasks": tasks, "retained": sum(ratios) / len(ratios) if ratios else None}


def retained(base: float | None, tuned: float | None, higher_is_better: bool = True) -> float | None:
    """tuned / base for a score (base / tuned for a loss); None where the ratio means nothing."""
    if base is None or tuned is None:
        return None
    num, den = (tuned, base) if higher_is_better else (base, tuned)
    return num / den if den > 0 else None


def _number(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
