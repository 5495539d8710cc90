"""`habit serve`: an OpenAI-compatible HTTP server for trained runs, and a base-vs-tuned page.

    GET  /                     the compare page (base and a run answer one input, streamed)
    GET  /health               {"status": "ok", "models": [...], "waiting": n, "cancelled": n}
    GET  /v1/models            "base" and every served run, by its directory's name
    POST /v1/chat/completions  messages → rendered by the run's own template → answer
    POST /v1/completions       `prompt` is raw text handed to the model as is (no template)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path": RUN}: serve another run from now on
    POST /v1/unload_lora_adapter  {"lora_name"}: stop serving it (both: --runtime-adapters, vLLM's names)

Both POST endpoints stream Server-Sent Events with `"stream": true`, ending in `data: [DONE]`.

How a chat request becomes a prompt (habit.generation.build_prompt, the path training used):
chat-kind runs put `messages` through the model's chat template; a text-kind run takes its input
field from the last user message, or every field from a `"fields": {"act": "..."}` map at the top
of the request (the openai client's `extra_body={"fields": ...}`). "base" renders with the first
run's template, or with the run named in `"render_as"`, so base and tuned see the same prompt.
Sampling follows OpenAI's API where the request says nothing, except that `temperature` defaults
to 0 (greedy, as everywhere in habit): no repetition penalty unless `repetition_penalty` asks.

Why it is built this way:
- FastAPI on uvicorn: HTTP/1.1 keep-alive, one event loop instead of a thread per connection,
  pydantic models that refuse fields habit cannot honour (400 naming the field), and uvicorn's
  graceful shutdown (SIGTERM: stop accepting, finish in-flight requests, exit 0).
- Streams are a plain StreamingResponse of `data:` lines: OpenAI's SSE needs nothing more, so
  sse-starlette (pings, event ids) would be a dependency for no gain. Starlette cancels the
  response when its client disconnects; the job is then cancelled and the worker drops it at
  its next token.
- Runs share ONE base in memory as PEFT named adapters, owned by one worker thread
  (habit.engine); jobs that wait together for one adapter share one batched `generate` call.
- A non-streamed request whose client disconnects is cancelled too: the handler waits for its
  answer and for the disconnect at once, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from habit import constrain, generation
from habit import serve_api as api
from habit.data import Message
from habit.engine import BATCH, QUEUE, ApiError, Done, Engine, Job, Served, Token, load
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings

TOP_LOGPROBS = 5  # most alternatives listed per token (OpenAI's completions limit)
MAX_BODY = 1 << 20  # bytes; larger bodies get 413
DEFAULT_MAX_TOKENS = 256  # when neither the request nor --max-tokens-cap says
RAW = Template("text", None, None)  # /v1/completions: the tokenizer's usual specials, no template
PAGE = Path(__file__).with_name("page.html")


# ---------------------------------------------------------------- requests and responses


@dataclass(frozen=True)
class Request:
    chat: bool
    model: Served
    prompts: list[str]
    template: Template
    settings: GenerationSettings
    seed: int | None
    stream: bool
    usage_in_stream: bool
    stops: tuple[str, ...]
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest
    echo: bool = False
    generate: bool = True  # False: max_tokens 0
    grammar: str | None = None  # response_format, as an llguidance grammar

    def jobs(self) -> list[Job]:
        return [Job(self.model, p, self.template, self.settings, self.seed, self.stream, self.stops,
                    self.logprobs, self.echo, self.generate, self.grammar) for p in self.prompts]


def parse(body: dict, chat: bool, engine: Engine, cap: int | None) -> Request:
    """Check a request body and render its prompt(s); every problem is an ApiError(400/404)."""
    r = api.validate(api.ChatRequest if chat else api.CompletionRequest, body)
    model = engine.served.get(r.model)
    if model is None:
        raise ApiError(404, f"model '{r.model}' is not served here (see /v1/models)", "model",
                       "model_not_found")
    max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    max_tokens = (cap or DEFAULT_MAX_TOKENS) if max_tokens is None else max_tokens
    if cap and max_tokens > cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {cap}",
                       "max_tokens", "max_tokens_over_cap")
    if max_tokens < 0 or (max_tokens == 0 and (chat or not r.echo)):
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo, to score a prompt)",
                       "max_tokens", "invalid_value")
    try:
        settings = GenerationSettings(max(max_tokens, 1), float(r.temperature if r.temperature is not None else 0),
                                      float(r.top_p if r.top_p is not None else 1.0),
                                      # not OpenAI's, but vLLM and llama.cpp servers take it too
                                      float(r.repetition_penalty or 1.0))
    except HabitError as e:  # the settings' own checks, in the request's words
        message = str(e).replace("--max-new-tokens", "max_tokens").replace("--top-p", "top_p")
        raise ApiError(400, message.replace("--", ""), code="invalid_value") from None
    stops = [r.stop] if isinstance(r.stop, str) else (r.stop or [])
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", "stop", "invalid_type")
    if chat:
        template = _template(r.render_as, model, engine)
        prompts = [_chat_prompt(r.messages, r.fields or {}, template, engine.run.tokenizer)]
    else:
        template = RAW
        # a string, strings, token ids, or lists of token ids
        one = isinstance(r.prompt, str) or (r.prompt and isinstance(r.prompt[0], int))
        prompts = [r.prompt] if one else r.prompt
        if not prompts or len(prompts) > BATCH:
            raise ApiError(400, f"'prompt' must be a string, token ids, or 1 to {BATCH} of either",
                           "prompt", "invalid_type")
    logprobs = _logprobs(r, chat)
    if r.stream and (logprobs is not None or (not chat and r.echo)):
        raise ApiError(400, "logprobs and echo are not supported with stream", "stream",
                       "unsupported_parameter")
    if r.stream and len(prompts) > 1:
        raise ApiError(400, "streaming takes one prompt", "prompt", "invalid_value")
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    return Request(chat, model, prompts, template, settings, r.seed, bool(r.stream), include_usage,
                   tuple(stops), logprobs, bool(not chat and r.echo), max_tokens > 0,
                   _grammar(r.response_format))


def _grammar(response_format: dict | None) -> str | None:
    try:
        return constrain.grammar(response_format)
    except ValueError as e:
        raise ApiError(400, str(e), "response_format", "invalid_value") from None


def _logprobs(r, chat: bool) -> int | None:
    """How many likeliest tokens to list per position (0: only the chosen one's logprob), or None."""
    k = (r.top_logprobs or 0) if chat and r.logprobs else (None if chat else r.logprobs)
    if chat and r.top_logprobs and not r.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    if k is not None and not 0 <= k <= TOP_LOGPROBS:
        name = "top_logprobs" if chat else "logprobs"
        raise ApiError(400, f"'{name}' must be between 0 and {TOP_LOGPROBS}", name, "invalid_value")
    return k


def _template(render_as: str | None, model: Served, engine: Engine) -> Template:
    if model.adapter is not None:
        return model.template
    if render_as is None:  # the first run served; with none left, the one base started with
        return (engine.first or model).template
    other = engine.served.get(render_as)
    if other is None or other.adapter is None:
        raise ApiError(400, "'render_as' must name a served run", "render_as", "invalid_value")
    return other.template


def _chat_prompt(raw: list, fields: dict, template: Template, tokenizer) -> str:
    messages = []
    for i, m in enumerate(raw):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]
            content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{role: system|user|assistant, content: text}}",
                           f"messages[{i}]", "invalid_type")
        messages.append(Message(role, content))
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
    try:
        if template.kind == "chat" and (not fields or template.prompt is None):
            return generation.build_prompt(template, tokenizer, messages=messages)
        missing = [n for n in template.input_fields() if n not in fields]
        users = [m.content for m in messages if m.role == "user"]
        text = users[-1] if missing and users else None
        return generation.build_prompt(template, tokenizer, text=text, fields=fields)
    except HabitError as e:
        raise ApiError(400, str(e).replace("--field NAME=VALUE", '"fields": {NAME: VALUE}'),
                       "fields", "invalid_value") from None


def _usage(results: Sequence[Done]) -> api.Usage:
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return api.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _chunk(req: Request, head: dict, text: str | None = None, finish: str | None = None,
           first: bool = False):
    """One streamed event's object: a piece of text, or (with `finish`) the end."""
    if not req.chat:
        return api.Completion(**head, choices=[api.CompletionChoice(
            index=0, text=text or "", logprobs=None, finish_reason=finish)], usage=None)
    delta = api.Delta(role="assistant", content="") if first else api.Delta(content=text)
    return api.ChatCompletionChunk(**head, choices=[api.ChunkChoice(
        index=0, delta=delta, logprobs=None, finish_reason=finish)])


def _answer(req: Request, i: int, done: Done):
    """A whole (not streamed) choice, with echo and logprobs where asked."""
    if req.chat:
        logprobs = None
        if done.tokens is not None:
            logprobs = api.ChatLogprobs(content=[api.TokenLogprob(
                **_chat_token(t), top_logprobs=[api.TopLogprob(**_chat_token(Token(text, lp)))
                                                for text, lp in t.top]) for t in done.tokens])
        return api.ChatChoice(index=i, message=api.AssistantMessage(content=done.text),
                              logprobs=logprobs, finish_reason=done.finish_reason)
    logprobs = None
    if done.tokens is not None:
        tokens = (done.prompt or []) + done.tokens
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        logprobs = api.CompletionLogprobs(
            tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
            # tokens that decode alike (partial characters) share a key: the likeliest wins
            top_logprobs=[None if t.logprob is None else dict(reversed(t.top)) for t in tokens],
            text_offset=offsets)
    return api.CompletionChoice(index=i, text=done.prompt_text + done.text, logprobs=logprobs,
                                finish_reason=done.finish_reason)


def _chat_token(t: Token) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}


def _event(obj) -> bytes:
    return b"data: " + obj.json_bytes() + b"\n\n"


# ---------------------------------------------------------------- HTTP


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(obj.json_bytes(), status, headers=headers, media_type="application/json")


def _error_response(e: ApiError) -> Response:
    headers = {**e.headers, **({"WWW-Authenticate": "Bearer"} if e.status == 401 else {})}
    return _json(api.ErrorResponse.model_validate(e.body()), e.status, headers)


async def _gone(request) -> None:
    """Returns once the client has disconnected. The body is read by now, so the next ASGI
    message is the disconnect (uvicorn sends it also once the response is out)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answered(request, jobs: Sequence[Job]) -> list[Done] | None:
    """The jobs' results, or None if the client left first (its jobs are then cancelled, and
    the worker drops them at their next token, as for a closed stream)."""
    results = asyncio.ensure_future(asyncio.gather(*(job.result() for job in jobs)))
    gone = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if results.done():
        return results.result()
    results.cancel()
    for job in jobs:
        job.cancel()
    return None


async def body_chunks(request, limit: int, read_at_most: int) -> AsyncIterator[bytes]:
    """The body's chunks; once past `limit` bytes, 413 — after reading (and dropping) up to
    `read_at_most` bytes: closing on unread data resets the connection and the client may never
    see the 413. Shared with habit studio's uploads."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            yield chunk
        elif size > read_at_most:
            break
    if size > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")


async def _read_json(request, limit: int = MAX_BODY) -> dict:
    """The body as a JSON object; over `limit` is 413 (read up to 16 times that first)."""
    data = bytearray()
    async for chunk in body_chunks(request, limit, 16 * limit):
        data += chunk
    try:
        body = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def check_api_key(request, api_key: str | None) -> None:
    """401 unless the request carries 'Authorization: Bearer KEY' (no key set: everything passes)."""
    if api_key is not None:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's {"error": {message, type, param, code}} body (habit studio too)."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # routing: unknown path, wrong method
        path = request.url.path
        if e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "another method")
            return _error_response(ApiError(405, f"{path} takes {allowed}, not {request.method}",
                                            code="method_not_allowed"))
        if e.status_code == 404:
            return _error_response(ApiError(404, f"no such endpoint: {path}", code="not_found"))
        return _error_response(ApiError(e.status_code, str(e.detail), code="http_error"))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return _error_response(ApiError(500, f"internal error: {e}", kind="server_error"))


def build_app(server: "Server"):
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    engine = server.engine
    add_error_handlers(app)

    def authorize(request) -> None:
        check_api_key(request, server.api_key)

    @app.get("/")
    async def page():
        return HTMLResponse(server.page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engine.served), "waiting": engine.waiting,
                "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        data = []
        for s in engine.served.values():
            template = _template(None, s, engine)
            data.append(api.ModelCard(
                id=s.name, created=server.started, root=s.path if s.adapter else server.base,
                parent=None if s.adapter is None else "base", path=s.path, template=template.kind,
                input_fields=template.input_fields()))
        return _json(api.ModelList(data=data))

    async def complete(request: HttpRequest, chat: bool):
        authorize(request)
        req = parse(await _read_json(request), chat, engine, server.max_tokens_cap)
        jobs = engine.submit(req.jobs())
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": req.model.name}
        try:
            if not req.stream:
                results = await _answered(request, jobs)
                if results is None:  # nobody is left to read an answer
                    return Response(status_code=204)
                choices = [_answer(req, i, r) for i, r in enumerate(results)]
                kind = api.ChatCompletion if chat else api.Completion
                return _json(kind(**head, choices=choices, usage=_usage(results)))
            items = jobs[0].items()
            first = await anext(items)  # a refused prompt is still an HTTP error, not an event
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return StreamingResponse(_events(req, jobs[0], first, items, head),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def runtime_adapters() -> None:
        if not server.runtime_adapters:
            raise ApiError(404, "loading adapters at run time is off (start habit serve with "
                                "--runtime-adapters)", code="not_found")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HttpRequest):
        authorize(request)
        runtime_adapters()
        r = api.validate(api.LoadAdapterRequest, await _read_json(request))
        await engine.add(r.lora_name, r.lora_path)
        # vLLM's answer, word for word: scripts written for vLLM may look for it
        return PlainTextResponse(f"Success: LoRA adapter '{r.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HttpRequest):
        authorize(request)
        runtime_adapters()
        r = api.validate(api.UnloadAdapterRequest, await _read_json(request))
        await engine.remove(r.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{r.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(request, True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, False)

    return app


async def _events(req: Request, job: Job, first, items: AsyncIterator, head: dict) -> AsyncIterator[bytes]:
    try:
        if req.chat:  # OpenAI's first chunk carries the role
            yield _event(_chunk(req, head, first=True))
        item = first
        while not isinstance(item, Done):
            yield _event(_chunk(req, head, item))
            item = await anext(items)
        yield _event(_chunk(req, head, finish=item.finish_reason))
        if req.usage_in_stream:
            kind = api.ChatCompletionChunk if req.chat else api.Completion
            yield _event(kind(**head, choices=[], usage=_usage([item])))
    except ApiError as e:  # headers are out: the error travels as an event
        yield _event(api.ErrorResponse.model_validate(e.body()))
    finally:
        job.cancel()  # the client left (or the job is done and this does nothing)
    yield b"data: [DONE]\n\n"


class Server:
    """uvicorn serving the app on a socket bound at construction: `serve_forever()` in any
    thread, `stop()` from anywhere (a signal handler too), then `close()`."""

    def __init__(self, engine: Engine, host: str, port: int, api_key: str | None = None,
                 max_tokens_cap: int | None = None, runtime_adapters: bool = False):
        self.engine, self.api_key, self.max_tokens_cap = engine, api_key, max_tokens_cap
        self.runtime_adapters = runtime_adapters
        self.model_ids = list(engine.served)  # at start; /health and /v1/models say what is now
        self.base = engine.run.info["base"]["source"]
        self.started = int(time.time())
        self.page = PAGE.read_text(encoding="utf-8").replace(
            "__NEEDS_KEY__", "true" if api_key else "false")
        self.socket = bind(host, port)
        self.server_address = self.socket.getsockname()
        self.uvicorn = uvicorn_server(build_app(self))
        self.finished = threading.Event()  # set when serve_forever has returned

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.finished.set()

    def stop(self) -> None:
        """Stop accepting and end once the requests in flight are answered."""
        if self.uvicorn.should_exit:
            self.uvicorn.force_exit = True
        self.uvicorn.should_exit = True

    def shutdown(self) -> None:
        """stop() and wait for serve_forever to return (http.server's name, kept for callers)."""
        self.stop()
        self.finished.wait()

    def close(self) -> None:
        self.socket.close()
        self.engine.close()

    server_close = close  # http.server's name, kept for callers


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError as socket.bind raises it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def listen_error(host: str, port: int, e: OSError) -> HabitError:
    reason = "the port is in use" if e.errno == 98 else (e.strerror or str(e))
    return HabitError(f"cannot listen on {host}:{port}: {reason}")


def uvicorn_server(app) -> "_Uvicorn":
    """uvicorn for `app` on a socket the caller binds: `.run(sockets=[sock])`, stop by setting
    `.should_exit` (habit studio serves this way too)."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=None)
    return _Uvicorn(config)


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server without its own signal handling: serve() installs ours, and uvicorn's would
    re-raise SIGTERM after the graceful stop, so the process would not exit 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def make_server(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, max_tokens_cap: int | None = None,
                device: str | None = None, max_queue: int = QUEUE,
                runtime_adapters: bool = False) -> Server:
    """Load the runs and bind host:port (port 0: a free one); serve with `.serve_forever()`.
    `runtime_adapters` opens /v1/load_lora_adapter and /v1/unload_lora_adapter: off by default,
    as in vLLM, since any client holding the key can then make the server read a directory."""
    if not 0 <= port <= 65535:
        raise HabitError(f"--port {port}: must be between 0 and 65535")
    if max_tokens_cap is not None and max_tokens_cap < 1:
        raise HabitError("--max-tokens-cap must be at least 1")
    if api_key is not None and not api_key.strip():
        raise HabitError("--api-key must not be empty")
    if max_queue < 1:
        raise HabitError("--max-queue must be at least 1")
    engine = load(runs, device, max_queue)
    try:
        return Server(engine, host, port, api_key, max_tokens_cap, runtime_adapters)
    except OSError as e:
        engine.close()
        raise listen_error(host, port, e) from None


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_tokens_cap: int | None = None,
          ready: Callable[[Server], None] | None = None, max_queue: int = QUEUE,
          runtime_adapters: bool = False) -> None:
    """Serve runs until SIGTERM / Ctrl-C; in-flight requests finish first. `ready(server)` is
    called once the port is bound and the models are loaded."""
    server = make_server(runs, host, port, api_key, max_tokens_cap, max_queue=max_queue,
                         runtime_adapters=runtime_adapters)
    until_signal(server, (lambda: ready(server)) if ready else None)


def until_signal(server, ready: Callable[[], None] | None = None) -> None:
    """`server.serve_forever()` until SIGTERM / Ctrl-C asks `server.stop()`, then `server.close()`
    (habit serve and habit studio). A second signal acts at once, without waiting for requests."""
    previous = {}

    def restore(*_) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def on_signal(*_) -> None:
        restore()
        server.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        if ready:
            ready()
        server.serve_forever()
    finally:
        server.close()
        restore()
