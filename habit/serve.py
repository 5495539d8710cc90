"""`habit serve`: an OpenAI-compatible HTTP server for trained runs, and a base-vs-tuned page.

    GET  /                     the compare page (base and a run answer one input, streamed)
    GET  /health               {"status": "ok", "models": [...]}, no API key needed
    GET  /v1/models            "base" and every served run, by its directory's name
    POST /v1/chat/completions  messages → rendered by the run's own template → answer
    POST /v1/completions       `prompt` is raw text handed to the model as is (no template)

Both POST endpoints stream Server-Sent Events with `"stream": true`, ending in `data: [DONE]`.

How a chat request becomes a prompt (habit.generation.build_prompt, the path training used):
chat-kind runs put `messages` through the model's chat template; a text-kind run takes its input
field from the last user message, or every field from a `"fields": {"act": "..."}` map at the top
of the request (the openai client's `extra_body={"fields": ...}`). "base" renders with the first
run's template, or with the run named in `"render_as"`, so base and tuned see the same prompt.
`temperature` defaults to 0 (greedy, as everywhere in habit), not OpenAI's 1.

Why it is built this way:
- Runs share ONE base in memory as PEFT named adapters, owned by one worker thread
  (habit.engine); handler threads submit jobs to it, and jobs that wait together share one
  batched `generate` call.
- HTTP/1.0, one request per connection: no handler thread idles on a keep-alive socket, so a
  graceful stop can join them all (SIGTERM: stop accepting, finish in-flight requests, exit 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from habit import generation
from habit.data import Message
from habit.engine import BATCH, ApiError, Done, Engine, Job, Served, load
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings

MAX_BODY = 1 << 20  # bytes; larger bodies get 413
DEFAULT_MAX_TOKENS = 256  # when neither the request nor --max-tokens-cap says
RAW = Template("text", None, None)  # /v1/completions: the tokenizer's usual specials, no template
UNSUPPORTED = ("echo", "suffix", "logprobs", "tools", "functions", "best_of")
PAGE = Path(__file__).with_name("page.html")


# ---------------------------------------------------------------- requests and responses


def _get(body: dict, name: str, kinds: tuple, default=None, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                 list: "an array", dict: "an object"}
        what = " or ".join(names[k] for k in kinds if not (k is int and float in kinds))
        raise ApiError(400, f"'{name}' must be {what}", name, "invalid_type")
    return value


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


def parse(body: dict, chat: bool, engine: Engine, cap: int | None) -> Request:
    """Check a request body and render its prompt(s); every problem is an ApiError(400/404)."""
    name = _get(body, "model", (str,), required=True)
    if name not in engine.served:
        raise ApiError(404, f"model '{name}' is not served here (see /v1/models)", "model",
                       "model_not_found")
    for key in UNSUPPORTED:
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by habit serve", key, "unsupported_parameter")
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n", "unsupported_parameter")
    max_tokens = _get(body, "max_tokens", (int,))
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), cap or DEFAULT_MAX_TOKENS)
    if cap and max_tokens > cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {cap}",
                       "max_tokens", "max_tokens_over_cap")
    try:
        settings = GenerationSettings(max_tokens, float(_get(body, "temperature", (int, float), 0)),
                                      float(_get(body, "top_p", (int, float), 1.0)),
                                      # not OpenAI's, but vLLM and llama.cpp servers take it too
                                      float(_get(body, "repetition_penalty", (int, float),
                                                 GenerationSettings.repetition_penalty)))
    except HabitError as e:  # the settings' own checks, in the request's words
        message = str(e).replace("--max-new-tokens", "max_tokens").replace("--top-p", "top_p")
        raise ApiError(400, message.replace("--", ""), code="invalid_value") from None
    stops = _get(body, "stop", (str, list), [])
    stops = [stops] if isinstance(stops, str) else stops
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", "stop", "invalid_type")
    options = _get(body, "stream_options", (dict,), {})
    model = engine.served[name]
    if chat:
        template = _template(body, model, engine)
        prompts = [_chat_prompt(body, template, engine.run.tokenizer)]
    else:
        template = RAW
        prompt = _get(body, "prompt", (str, list), required=True)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or len(prompts) > BATCH or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, f"'prompt' must be a string or 1 to {BATCH} strings", "prompt", "invalid_type")
    stream = _get(body, "stream", (bool,), False)
    if stream and len(prompts) > 1:
        raise ApiError(400, "streaming takes one prompt", "prompt", "invalid_value")
    return Request(chat, model, prompts, template, settings, _get(body, "seed", (int,)), stream,
                   bool(options.get("include_usage")), tuple(stops))


def _template(body: dict, model: Served, engine: Engine) -> Template:
    if model.adapter is not None:
        return model.template
    other = engine.served.get(_get(body, "render_as", (str,), engine.first.name))
    if other is None or other.adapter is None:
        raise ApiError(400, "'render_as' must name a served run", "render_as", "invalid_value")
    return other.template


def _chat_prompt(body: dict, template: Template, tokenizer) -> str:
    raw = _get(body, "messages", (list,), required=True)
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
    fields = _get(body, "fields", (dict,), {})
    if not all(isinstance(v, str) for v in fields.values()):
        raise ApiError(400, "'fields' must map field names to strings", "fields", "invalid_type")
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


def _cut(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _until_stop(job: Job, stops: Sequence[str]) -> Iterator[str | Done]:
    """A streamed job's text pieces up to the first stop string, then its Done (none when a stop
    string ended it). A tail that could begin a stop string is held back until it cannot."""
    text, sent, hold = "", 0, max(map(len, stops), default=1) - 1
    for item in job.items():
        if isinstance(item, Done):
            if sent < len(text):
                yield text[sent:]
            yield item
            return
        text += item
        cut = _cut(text, stops)
        end = len(text) - hold if cut is None else cut
        if end > sent:
            yield text[sent:end]
            sent = end
        if cut is not None:
            return


def _apply_stops(done: Done, stops: Sequence[str]) -> Done:
    cut = _cut(done.text, stops)
    return done if cut is None else dataclasses.replace(done, text=done.text[:cut], finish_reason="stop")


def _usage(results: Sequence[Done]) -> dict:
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _choice(req: Request, i: int, text: str | None, finish: str | None, delta: bool) -> dict:
    if not req.chat:
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
    content = {} if text is None else {"content": text}
    if delta:
        return {"index": i, "delta": content, "logprobs": None, "finish_reason": finish}
    return {"index": i, "message": {"role": "assistant", **content}, "logprobs": None,
            "finish_reason": finish}


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "habit"
    timeout = 120  # seconds a client may take to send its request
    server: "Server"

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_OTHER(self) -> None:  # PUT, DELETE, ...: every path answers 404 or 405
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = do_OTHER

    def _route(self, method: str) -> None:
        routes = {"/": ("GET", self._page), "/health": ("GET", self._health),
                  "/v1/models": ("GET", self._models),
                  "/v1/chat/completions": ("POST", lambda: self._complete(True)),
                  "/v1/completions": ("POST", lambda: self._complete(False))}
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self.streaming = False
        try:
            if path not in routes:
                raise ApiError(404, f"no such endpoint: {path}", code="not_found")
            if method != routes[path][0]:
                raise ApiError(405, f"{path} takes {routes[path][0]}, not {method}",
                               code="method_not_allowed")
            self.body = self._read_body() if method == "POST" else b""
            if path.startswith("/v1/") and self.server.api_key is not None:
                given = self.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {self.server.api_key}".encode()):
                    raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                   code="invalid_api_key")
            routes[path][1]()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; its generation (if any) finishes unread
        except ApiError as e:
            self._error(e)
        except Exception as e:
            self.log_error("internal error on %s: %r", path, e)
            self._error(ApiError(500, f"internal error: {e}", kind="server_error"))

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required", code="length_required") from None
        if length > MAX_BODY:
            # read (and drop) a moderately large body first: closing on unread data resets the
            # connection and the client may never see this answer
            while 0 < length <= 16 * MAX_BODY:
                chunk = self.rfile.read(min(length, 1 << 16))
                length = length - len(chunk) if chunk else 0
            raise ApiError(413, f"request body over {MAX_BODY} bytes", code="request_too_large")
        return self.rfile.read(length)

    def _json(self) -> dict:
        try:
            body = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def _send(self, status: int, data: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": kind, "Content-Length": str(len(data)), **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", extra)

    def _error(self, e: ApiError) -> None:
        with contextlib.suppress(OSError):
            if self.streaming:  # headers are out: the error travels as an event
                self._event(e.body())
                self.wfile.write(b"data: [DONE]\n\n")
            else:
                self._send_json(e.status, e.body(), {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    def _page(self) -> None:
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "models": self.server.model_ids})

    def _models(self) -> None:
        data = []
        for s in self.server.engine.served.values():
            template = s.template if s.adapter else self.server.engine.first.template
            data.append({"id": s.name, "object": "model", "created": self.server.started,
                         "owned_by": "habit", "path": s.path, "template": template.kind,
                         "input_fields": template.input_fields()})
        self._send_json(200, {"object": "list", "data": data})

    def _complete(self, chat: bool) -> None:
        req = parse(self._json(), chat, self.server.engine, self.server.max_tokens_cap)
        jobs = [self.server.engine.submit(Job(req.model, p, req.template, req.settings, req.seed,
                                              req.stream)) for p in req.prompts]
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": req.model.name}
        if not req.stream:
            results = [_apply_stops(job.result(), req.stops) for job in jobs]
            choices = [_choice(req, i, r.text, r.finish_reason, False) for i, r in enumerate(results)]
            self._send_json(200, {**head, "choices": choices, "usage": _usage(results)})
            return
        head["object"] += ".chunk" if chat else ""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.streaming = True
        if chat:  # OpenAI's first chunk carries the role
            self._event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        done = None
        for item in _until_stop(jobs[0], req.stops):
            if isinstance(item, str):
                self._event({**head, "choices": [_choice(req, 0, item, None, True)]})
            else:
                done = item
        self._event({**head, "choices": [_choice(req, 0, None, done.finish_reason if done else "stop",
                                                 True)]})
        if req.usage_in_stream:
            done = done or jobs[0].result()  # ended by a stop string: wait for the token count
            self._event({**head, "choices": [], "usage": _usage([done])})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server; `serve_forever()` in any thread, `stop()` from anywhere, then `close()`."""

    daemon_threads = False  # server_close() joins the handler threads: in-flight requests finish
    block_on_close = True

    def __init__(self, engine: Engine, host: str, port: int, api_key: str | None = None,
                 max_tokens_cap: int | None = None):
        self.engine, self.api_key, self.max_tokens_cap = engine, api_key, max_tokens_cap
        self.model_ids = list(engine.served)
        self.started = int(time.time())
        self.page = PAGE.read_text(encoding="utf-8").replace(
            "__NEEDS_KEY__", "true" if api_key else "false").encode()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def stop(self) -> None:
        """Stop accepting; safe from a signal handler (shutdown() itself waits for the loop)."""
        threading.Thread(target=self.shutdown, daemon=True).start()

    def close(self) -> None:
        self.server_close()  # closes the socket, then waits for in-flight requests
        self.engine.close()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


def make_server(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, max_tokens_cap: int | None = None,
                device: str | None = None) -> Server:
    """Load the runs and bind host:port (port 0: a free one); serve with `.serve_forever()`."""
    if not 0 <= port <= 65535:
        raise HabitError(f"--port {port}: must be between 0 and 65535")
    if max_tokens_cap is not None and max_tokens_cap < 1:
        raise HabitError("--max-tokens-cap must be at least 1")
    if api_key is not None and not api_key.strip():
        raise HabitError("--api-key must not be empty")
    engine = load(runs, device)
    try:
        return Server(engine, host, port, api_key, max_tokens_cap)
    except OSError as e:
        engine.close()
        reason = "the port is in use" if e.errno == 98 else (e.strerror or str(e))
        raise HabitError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_tokens_cap: int | None = None,
          ready: Callable[[Server], None] | None = None) -> None:
    """Serve runs until SIGTERM / Ctrl-C; in-flight requests finish first. `ready(server)` is
    called once the port is bound and the models are loaded."""
    server = make_server(runs, host, port, api_key, max_tokens_cap)
    previous = {}

    def restore(*_) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def on_signal(*_) -> None:
        restore()  # a second Ctrl-C / SIGTERM acts at once, without waiting for requests
        server.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        if ready:
            ready(server)
        server.serve_forever()
    finally:
        server.close()
        restore()
