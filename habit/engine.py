"""The model behind `habit serve`: one base carrying every run's adapter, owned by one worker thread.

Switching adapters mutates the model, so one worker thread owns the model (and the tokenizer:
Rust tokenizers are not safe to share with `generate`, which flips padding_side). Requests (on
the server's event loop) submit Jobs and await each job's own asyncio queue. Jobs that wait
together for the same model and sampling settings, streamed or not, share one batched `generate`
call: that is where the throughput under concurrent load comes from. Inside that call a stopping
criterion (Rows) ends each answer on its own: at its end token, its first stop string, or when its
client has gone. A job ends with a Done, or an ApiError carrying the HTTP status its request should
be answered with. The queue is bounded: past QUEUE jobs a request gets 503 with Retry-After.

Adapters come and go at run time (`add`, `remove`: vLLM's load/unload_lora_adapter) as Controls
on the same queue: the worker runs one only after the jobs queued before it, so no batch sees the
model change under it, and a job whose adapter went away meanwhile is answered 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from habit import constrain, generation, render, rundir
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings

BATCH = 16  # most jobs answered by one generate call
QUEUE = 256  # most jobs waiting or running; more get 503 with Retry-After


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}

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
    finish_reason: str  # "stop" (end token or stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    # with Job.logprobs: one Token per answer token (and per prompt token with Job.echo)
    tokens: list[Token] | None = None
    prompt: list[Token] | None = None
    prompt_text: str = ""  # with Job.echo: the prompt as text


@dataclass(frozen=True)
class Token:
    text: str  # this token alone, decoded
    logprob: float | None  # None: the first prompt token (nothing before it predicts it)
    top: tuple[tuple[str, float], ...] = ()  # the k likeliest tokens at this position


@dataclass(eq=False)
class Job:
    """One prompt's generation. The worker thread `put`s into it; the request's event loop reads
    `items()` (text pieces when streaming, then a Done or an ApiError)."""

    model: Served
    prompt: str | list[int]  # text, or token ids taken as they are
    template: Template  # how the prompt text is tokenized (the run's, or RAW)
    settings: GenerationSettings
    seed: int | None = None
    stream: bool = False
    stops: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest
    echo: bool = False  # the prompt's tokens (and logprobs) too
    generate: bool = True  # False: max_tokens 0, only the prompt is scored
    grammar: str | None = None  # llguidance grammar the answer must follow (response_format)
    prompt_tokens: int = 0  # counted by the worker
    ids: list[int] = field(default_factory=list)
    scored: list[Token] | None = None  # with echo: the prompt's tokens, scored by the worker
    echoed: str = ""  # with echo: the prompt as text
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue | None = None
    finished: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        self.out = asyncio.Queue()

    def key(self) -> tuple:
        """Jobs with equal keys can share one generate call (one adapter, one sampling setup)."""
        return (self.model.name, self.settings, self.seed, self.generate)

    def put(self, item) -> None:
        """From the worker thread: a text piece, or the job's end (a Done or an exception)."""
        if isinstance(item, (Done, Exception)):
            self.finished()
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def cancel(self) -> None:
        """The client left: the worker ends this job at its next token."""
        self.cancelled.set()

    async def items(self) -> AsyncIterator[str | Done]:
        while True:
            item = await self.out.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, Done):
                return

    async def result(self) -> Done:
        async for item in self.items():
            if isinstance(item, Done):
                return item
        raise AssertionError("unreachable: items() ends with a Done")


@dataclass(eq=False)
class Control:
    """Work on the model itself (load or delete an adapter), run by the worker between batches;
    the request awaits `done`."""

    action: Callable[[], object]
    loop: asyncio.AbstractEventLoop | None = None
    done: asyncio.Future | None = None

    def __post_init__(self) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        self.done = self.loop.create_future()

    def run(self) -> None:
        try:
            result, error = self.action(), None
        except Exception as e:  # handed to the request; the worker carries on
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result, error) -> None:
        if not self.done.done():  # the request may have been cancelled (its client left)
            if error is None:
                self.done.set_result(result)
            else:
                self.done.set_exception(error)


class Scores(LogitsProcessor):
    """Keeps each step's scores for Rows (a stopping criterion is not given them): the model's
    distribution after any penalty, before temperature and top_p, as OpenAI's logprobs are."""

    last = None

    def __call__(self, input_ids, scores):
        self.last = scores
        return scores


class Rows(StoppingCriteria):
    """Per answer in a batch: ends it at its end token, at its first stop string, or when its
    client has gone, and feeds a streamed job its text as tokens arrive. A stopping criterion is
    transformers' per-step hook that sees every row's tokens and may end rows one by one."""

    def __init__(self, jobs: Sequence[Job], tokenizer, width: int, stop: Sequence[int]):
        self.jobs, self.tokenizer, self.width, self.stop = list(jobs), tokenizer, width, set(stop)
        self.done = [False] * len(jobs)
        self.cancelled = 0  # answers ended early because their client left
        self.sent = [0] * len(jobs)  # characters of each streamed answer already sent
        self.tokens: list[list[Token]] = [[] for _ in jobs]  # with logprobs: each row's so far
        self.scores = Scores()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        rows = input_ids[:, self.width:].tolist()
        for i, new in enumerate(rows):
            if not self.done[i]:
                if self.jobs[i].logprobs is not None:
                    self.tokens[i].append(token(self.tokenizer, self.scores.last[i], new[-1],
                                                self.jobs[i].logprobs))
                self._step(i, new)
        return torch.tensor(self.done, device=input_ids.device)

    def _step(self, i: int, new: list[int]) -> None:
        job = self.jobs[i]
        if job.cancelled.is_set():
            self.cancelled += 1
            return self._end(i, "", "cancelled", len(new))
        if new and new[-1] in self.stop:
            del self.tokens[i][len(new) - 1:]  # the end token is not part of the answer
            return self._end(i, self._text(new[:-1]), "stop", len(new))
        text = self._text(new)
        cut = _cut(text, job.stops)
        if cut is not None:
            return self._end(i, text[:cut], "stop", len(new))
        if job.stream:
            # hold back a tail that could begin a stop string, and a half-decoded character
            hold = max(map(len, job.stops), default=1) - 1
            safe = len(text.rstrip("\ufffd")) - hold
            if safe > self.sent[i]:
                job.put(text[self.sent[i]:safe])
                self.sent[i] = safe

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _end(self, i: int, text: str, finish: str, tokens: int) -> None:
        job = self.jobs[i]
        self.done[i] = True
        if job.stream and finish != "cancelled" and len(text) > self.sent[i]:
            job.put(text[self.sent[i]:])
        job.put(Done(text, finish, job.prompt_tokens, tokens,
                     self.tokens[i] if job.logprobs is not None else None, job.scored, job.echoed))

    def finish(self, out) -> None:
        """After generate: the answers no criterion ended ran out of tokens."""
        for i, new in enumerate(out[:, self.width:].tolist()):
            if not self.done[i]:
                self._end(i, self._text(new), "length", len(new))


def token(tokenizer, scores, token_id: int, k: int) -> Token:
    """A token with its logprob under `scores` (one row of logits) and the k likeliest."""
    import torch

    logprobs = torch.log_softmax(scores.float(), -1)
    top = ()
    if k:
        values, ids = logprobs.topk(k)
        top = tuple((tokenizer.decode([t]), float(v)) for v, t in zip(values.tolist(), ids.tolist()))
    return Token(tokenizer.decode([token_id]), float(logprobs[token_id]), top)


def _cut(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class Engine:
    """One base model carrying every run's adapter, used only by its worker thread."""

    def __init__(self, run, served: dict[str, Served], max_queue: int = QUEUE):
        self.run, self.max_queue = run, max_queue
        # name -> Served. Replaced, never changed in place: the event loop reads it while the
        # worker adds to it, and a reader holding the old dict never sees it change under it
        self.served = dict(served)
        self.adapters = len(served)  # numbers new PEFT adapter names (runN) past load()'s
        self.adding: set[str] = set()  # names being loaded, not yet served
        self.parked: str | None = None  # an unloaded adapter PEFT still holds (see _delete)
        self.context = getattr(run.model.config, "max_position_embeddings", None)
        self.vocab = run.model.get_input_embeddings().weight.shape[0]
        self.grammar_tokenizer = constrain.Tokenizers(run.tokenizer, self.vocab, run.stop)
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0  # jobs submitted and not finished
        self.cancelled = 0  # answers ended early because their client left
        self.thread = threading.Thread(target=self._work, name="habit-generate", daemon=True)
        self.thread.start()

    @property
    def first(self) -> Served | None:
        """The first run served: "base" renders prompts with its template unless told otherwise."""
        return next((s for s in self.served.values() if s.adapter is not None), None)

    async def add(self, name: str, path: str) -> Served:
        """Serve the run at `path` as `name` from now on; ApiError(400) if it cannot be."""
        if not name or name == "base" or name in self.served or name in self.adding:
            what = "is reserved" if name == "base" else "must not be empty" if not name else "is already served"
            raise ApiError(400, f"lora_name '{name}' {what}", "lora_name", "invalid_value")
        try:
            info = check_run(path, self.run.info)
        except HabitError as e:
            raise ApiError(400, str(e), "lora_path", "invalid_value") from None
        self.adding.add(name)
        try:
            self.adapters += 1
            adapter = f"run{self.adapters}"

            def load() -> Served:
                try:
                    self.run.model.load_adapter(str(path), adapter_name=adapter)
                except Exception as e:
                    if adapter in self.run.model.peft_config:  # half loaded: take it out again
                        self._delete(adapter)
                    raise ApiError(400, f"{path}: cannot load the adapter ({_one_line(e)})",
                                   "lora_path", "invalid_value") from None
                if self.parked:
                    self._delete(self.parked)
                served = Served(name, adapter, Template.from_dict(info["template"]), str(path))
                self.served = {**self.served, name: served}  # see `served` in __init__
                return served

            control = Control(load)
            self.jobs.put(control)
            return await control.done
        finally:
            self.adding.discard(name)

    async def remove(self, name: str) -> None:
        """Stop serving `name` at once; its adapter leaves the model after the jobs before it."""
        served = self.served.get(name)
        if served is None or served.adapter is None:
            if name == "base":
                raise ApiError(400, "'base' is the model itself and cannot be unloaded", "lora_name",
                               "invalid_value")
            raise ApiError(404, f"no adapter '{name}' is loaded (see /v1/models)", "lora_name",
                           "model_not_found")
        self.served = {k: v for k, v in self.served.items() if k != name}
        control = Control(lambda: self._delete(served.adapter))
        self.jobs.put(control)
        await control.done

    def _delete(self, adapter: str) -> None:
        """On the worker: drop an adapter from the model. PEFT cannot run a model left with no
        adapter at all (not even with adapters disabled), so the last one is parked instead, and
        deleted when another is loaded."""
        model = self.run.model
        others = [a for a in model.peft_config if a != adapter]
        if not others:
            self.parked = adapter
            return
        if adapter in model.active_adapters:
            model.set_adapter(others[0])  # PEFT warns when the active adapter is deleted
        model.delete_adapter(adapter)
        if adapter == self.parked:
            self.parked = None

    def submit(self, jobs: Sequence[Job]) -> list[Job]:
        """Queue a request's jobs, all or none: a full queue is a 503 the client may retry."""
        with self.lock:
            if self.waiting + len(jobs) > self.max_queue:
                raise ApiError(503, f"the server is busy ({self.waiting} answers waiting); retry "
                                    "shortly", code="server_busy", kind="server_error",
                               headers={"Retry-After": "1"})
            self.waiting += len(jobs)
        for job in jobs:
            job.finished = self._finished
            self.jobs.put(job)
        return list(jobs)

    def _finished(self) -> None:
        with self.lock:
            self.waiting -= 1

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
                while pending[-1] is not None and not isinstance(pending[-1], Control):
                    pending.append(self.jobs.get_nowait())
            control = pending.pop() if isinstance(pending[-1], Control) else None
            stop = None in pending
            pending = [j for j in pending if j is not None and self._ready(j)]
            while pending:
                job = pending[0]
                group = [j for j in pending if j.key() == job.key()][:BATCH]
                pending = [j for j in pending if all(j is not g for g in group)]
                try:
                    with self._using(job.model):
                        self._generate(group)
                except Exception as e:  # a failed generation fails its requests, not the server
                    print(f"habit serve: generation failed: {e!r}", file=sys.stderr, flush=True)
                    for j in group:
                        j.put(ApiError(500, f"generation failed: {e}", kind="server_error"))
            if control is not None:  # after every job queued before it
                control.run()

    def _ready(self, job: Job) -> bool:
        """Tokenize the prompt (here: the worker owns the tokenizer); refuse an overflow."""
        if job.cancelled.is_set():
            with self.lock:
                self.cancelled += 1
            job.put(Done("", "cancelled", 0, 0))
            return False
        if self.served.get(job.model.name) is not job.model:
            job.put(ApiError(404, f"model '{job.model.name}' was unloaded", "model", "model_not_found"))
            return False
        try:
            if isinstance(job.prompt, str):
                job.ids = render.prompt_ids(job.prompt, job.template, self.run.tokenizer)
            else:
                job.ids = list(job.prompt)
                if not job.ids or not all(0 <= t < self.vocab for t in job.ids):
                    job.put(ApiError(400, f"a token-id prompt must be 1 or more ids in 0..{self.vocab - 1}",
                                     "prompt", "invalid_value"))
                    return False
            job.prompt_tokens = len(job.ids)
            if job.echo:
                job.echoed = job.prompt if isinstance(job.prompt, str) else self.run.tokenizer.decode(job.ids)
        except Exception as e:  # never let one odd prompt end the worker (every request would hang)
            job.put(ApiError(500, f"cannot tokenize the prompt: {e}", kind="server_error"))
            return False
        wanted = job.prompt_tokens + job.settings.max_new_tokens * job.generate
        if self.context and wanted > self.context:
            job.put(ApiError(400, f"the prompt ({job.prompt_tokens} tokens) plus max_tokens "
                                  f"({job.settings.max_new_tokens}) exceed the model's context "
                                  f"of {self.context} tokens", "max_tokens",
                             "context_length_exceeded"))
            return False
        return True

    def _generate(self, jobs: list[Job]) -> None:
        import torch

        head, tokenizer = jobs[0], self.run.tokenizer
        for job in jobs:
            if job.echo and job.logprobs is not None:
                job.scored = self._score(job)
        if not head.generate:  # max_tokens 0: the prompt alone
            for job in jobs:
                job.put(Done("", "length", job.prompt_tokens, 0, [] if job.logprobs is not None
                             else None, job.scored, job.echoed))
            return
        width, pad = max(len(j.ids) for j in jobs), tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        rows = Rows(jobs, tokenizer, width, self.run.stop)
        processors = [rows.scores]
        if any(j.grammar for j in jobs):  # masks first: logprobs are of what was drawn from
            processors.insert(0, constrain.Constrain([j.grammar for j in jobs],
                                                     self.grammar_tokenizer.get(), width,
                                                     self.run.stop))
        if head.seed is not None:
            torch.manual_seed(head.seed)
        with torch.no_grad():
            out = self.run.model.generate(
                input_ids=ids.to(self.run.model.device), attention_mask=mask.to(self.run.model.device),
                max_new_tokens=head.settings.max_new_tokens, eos_token_id=list(self.run.stop),
                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([rows]),
                logits_processor=LogitsProcessorList(processors),
                **generation.sampling(head.settings))
        rows.finish(out)
        with self.lock:
            self.cancelled += rows.cancelled


    def _score(self, job: Job) -> list[Token]:
        """The prompt's tokens with their logprobs: one forward pass (echo; log-likelihoods)."""
        import torch

        with torch.no_grad():
            ids = torch.tensor([job.ids], device=self.run.model.device)
            logits = self.run.model(input_ids=ids).logits[0]
        tokenizer = self.run.tokenizer
        first = Token(tokenizer.decode([job.ids[0]]), None)
        return [first] + [token(tokenizer, logits[p - 1], job.ids[p], job.logprobs)
                          for p in range(1, len(job.ids))]


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


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def check_run(run: str | Path, first: dict) -> dict:
    """run.json of a run that can join `first` (a run.json) on its base; HabitError if it cannot."""
    info = rundir.read_run(run)
    want = (first["base"]["source"], first["base"].get("sha256"))
    got = (info["base"]["source"], info["base"].get("sha256"))
    if got != want:
        raise HabitError(f"{run}: trained on base '{got[0]}' (sha256 {str(got[1])[:12]}…), "
                         f"not on '{want[0]}' (sha256 {str(want[1])[:12]}…) like the first run; "
                         "runs served together must share one base")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (Path(run) / name).is_file():
            raise HabitError(f"{run}: no {name} in this run (training unfinished or failed?)")
    return info


def load(runs: Sequence[str | Path], device: str | None = None, max_queue: int = QUEUE) -> Engine:
    """Load the first run with its base, the others as extra adapters on that same base."""
    from habit.adapters import load_run

    if not runs:
        raise HabitError("give at least one run directory")
    first_info = rundir.read_run(runs[0])  # a wrong path fails before torch loads
    infos = [first_info] + [check_run(r, first_info) for r in runs[1:]]
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
            raise HabitError(f"{run}: cannot load the adapter ({_one_line(e)})") from None
        served[name] = Served(name, adapter, Template.from_dict(info["template"]), str(run))
    first.model.eval()
    return Engine(first, served, max_queue)
