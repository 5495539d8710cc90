"""The model behind `habit serve`: one base carrying every run's adapter, owned by one worker thread.

Switching adapters mutates the model, so one worker thread owns the model (and the tokenizer:
Rust tokenizers are not safe to share with `generate`, which flips padding_side). HTTP handler
threads submit Jobs and wait on each job's own queue. Non-streaming jobs that wait together for
the same model and sampling settings share one batched `generate` call: that is where the
throughput under concurrent load comes from. A job ends with a Done, or an ApiError carrying the
HTTP status its request should be answered with.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from habit import generation, render, rundir
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings

BATCH = 16  # most jobs answered by one generate call


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Served:
    name: str  # the id clients send as "model"
    adapter: str | None  # PEFT adapter name; None: the base with adapters off
    template: Template
    path: str = ""


# ---------------------------------------------------------------- the model and its one worker


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Job:
    model: Served
    prompt: str
    template: Template  # how the prompt text is tokenized (the run's, or RAW)
    settings: GenerationSettings
    seed: int | None = None
    stream: bool = False
    prompt_tokens: int = 0  # counted by the worker
    out: queue.Queue = field(default_factory=queue.Queue)  # str pieces (stream), then Done or an error

    def key(self) -> tuple:
        return (self.model.name, self.template, self.settings, self.seed)

    def items(self) -> Iterator[str | Done]:
        while True:
            item = self.out.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, Done):
                return

    def result(self) -> Done:
        return [item for item in self.items() if isinstance(item, Done)][0]


class Engine:
    """One base model carrying every run's adapter, used only by its worker thread."""

    def __init__(self, run, served: dict[str, Served]):
        self.run, self.served = run, served
        self.context = getattr(run.model.config, "max_position_embeddings", None)
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="habit-generate", daemon=True)
        self.thread.start()

    @property
    def first(self) -> Served:
        """The first run: "base" renders prompts with its template unless told otherwise."""
        return self.served[list(self.served)[1]]

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    @contextlib.contextmanager
    def _using(self, served: Served):
        if served.adapter is None:
            with self.run.model.disable_adapter():
                yield
        else:
            self.run.model.set_adapter(served.adapter)
            yield

    def _work(self) -> None:
        stop = False
        while not stop:
            pending = [self.jobs.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self.jobs.get_nowait())
            stop = None in pending
            pending = [j for j in pending if j is not None and self._measure(j)]
            while pending:
                job = pending[0]
                group = [job] if job.stream else [j for j in pending if not j.stream
                                                  and j.key() == job.key()][:BATCH]
                pending = [j for j in pending if all(j is not g for g in group)]
                try:
                    with self._using(job.model):
                        if job.seed is not None:
                            import torch

                            torch.manual_seed(job.seed)
                        self._stream(job) if job.stream else self._batch(group)
                except Exception as e:  # a failed generation fails its requests, not the server
                    print(f"habit serve: generation failed: {e!r}", file=sys.stderr, flush=True)
                    for j in group:
                        j.out.put(ApiError(500, f"generation failed: {e}", kind="server_error"))

    def _measure(self, job: Job) -> bool:
        """Count the prompt's tokens (here: the worker owns the tokenizer); refuse an overflow."""
        try:
            job.prompt_tokens = len(render.prompt_ids(job.prompt, job.template, self.run.tokenizer))
        except Exception as e:  # never let one odd prompt end the worker (every request would hang)
            job.out.put(ApiError(500, f"cannot tokenize the prompt: {e}", kind="server_error"))
            return False
        wanted = job.prompt_tokens + job.settings.max_new_tokens
        if self.context and wanted > self.context:
            job.out.put(ApiError(400, f"the prompt ({job.prompt_tokens} tokens) plus max_tokens "
                                      f"({job.settings.max_new_tokens}) exceed the model's context "
                                      f"of {self.context} tokens", "max_tokens",
                                 "context_length_exceeded"))
            return False
        return True

    def _batch(self, jobs: list[Job]) -> None:
        head = jobs[0]
        results = generation.generate(self.run.model, self.run.tokenizer, head.template,
                                      [j.prompt for j in jobs], self.run.stop, head.settings,
                                      batch_size=len(jobs))
        for job, g in zip(jobs, results):
            job.out.put(Done(g.text, g.finish_reason, job.prompt_tokens, g.tokens))

    def _stream(self, job: Job) -> None:
        pieces = []
        for item in generation.stream(self.run.model, self.run.tokenizer, job.template,
                                      job.prompt, self.run.stop, job.settings):
            if isinstance(item, dict):
                text, finish = "".join(pieces), item["finish_reason"]
                # the streamer gives text, not ids: a cut answer used the whole budget; one that
                # stopped is counted by re-encoding its text (+1 for the stop token)
                n = (job.settings.max_new_tokens if finish == "length" else
                     len(self.run.tokenizer(text, add_special_tokens=False).input_ids) + 1)
                job.out.put(Done(text, finish, job.prompt_tokens, n))
            elif item:
                pieces.append(item)
                job.out.put(item)


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Each run's id: its directory's name, with -2, -3... where two share one (or say "base")."""
    names: list[str] = []
    for run in runs:
        stem = Path(os.path.abspath(run)).name or "run"
        name, n = stem, 1
        while name in names or name == "base":
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def load(runs: Sequence[str | Path], device: str | None = None) -> Engine:
    """Load the first run with its base, the others as extra adapters on that same base."""
    from habit.adapters import load_run

    if not runs:
        raise HabitError("give at least one run directory")
    infos = [rundir.read_run(r) for r in runs]  # a wrong path fails before torch loads
    want = (infos[0]["base"]["source"], infos[0]["base"].get("sha256"))
    for run, info in zip(runs[1:], infos[1:]):
        got = (info["base"]["source"], info["base"].get("sha256"))
        if got != want:
            raise HabitError(f"{run}: trained on base '{got[0]}' (sha256 {str(got[1])[:12]}…), "
                             f"not on '{want[0]}' (sha256 {str(want[1])[:12]}…) like {runs[0]}; "
                             "runs served together must share one base")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (Path(run) / name).is_file():
                raise HabitError(f"{run}: no {name} in this run (training unfinished or failed?)")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    first = load_run(runs[0], device=device)
    names = run_names(runs)
    served = {"base": Served("base", None, first.template),
              names[0]: Served(names[0], "default", first.template, str(runs[0]))}
    for i, (name, run, info) in enumerate(zip(names[1:], runs[1:], infos[1:]), 1):
        adapter = f"run{i}"  # PEFT names become module keys: a directory name may hold a dot
        try:
            first.model.load_adapter(str(run), adapter_name=adapter)
        except Exception as e:
            raise HabitError(f"{run}: cannot load the adapter ({' '.join(str(e).split())[:300]})")
        served[name] = Served(name, adapter, Template.from_dict(info["template"]), str(run))
    first.model.eval()
    return Engine(first, served)
