"""`habit studio`: prepare data, train, watch, compare and ship runs from one browser page.

    GET  /                            the page (studio.html, studio_static/: no CDN, nothing fetched)
    GET  /api/options                 the settings form: every `habit train` flag, model choices
    POST /api/session                 {"key"} → a cookie that passes --api-key (EventSource and
                                      download links cannot send an Authorization header)
    POST /api/data                    `file` (multipart) or settings.data → data check + preview
    POST /api/estimate                {"settings"} → memory estimate and, where measured, the time
    POST /api/runs                    `file` + `settings` (a JSON object of habit train options)
                                      → {"run": NAME}, queued
    GET  /api/runs                    [{"run", "status": queued|running|done|failed|stopped, ...}]
    GET  /api/runs/NAME               one of those
    GET  /api/runs/NAME/events        SSE: one metrics.jsonl row per event (id = its row index,
                                      Last-Event-ID resumes), `status` and `log` events, `end`
    POST /api/runs/NAME/stop          SIGTERM: training saves a checkpoint and stops
    POST /api/runs/NAME/resume        `habit train --resume`
    GET  /api/runs/NAME/report        the HTML report (habit.report)
    POST /api/runs/NAME/eval          {"n"} → {"job"}: `habit eval`
    POST /api/runs/NAME/compare       {"inputs", "max_new_tokens"} → {"job"}: `habit compare`
    POST /api/runs/NAME/export        {"format": gguf|merged, "dtype"} → {"job"}: export / merge
    GET  /api/runs/NAME/files/FILE    an export as a download
    GET  /api/jobs, /api/jobs/ID      the queue: waiting, running and finished jobs

Why it is built this way:
- The work is done by `habit` commands in their own processes, one at a time, through the queue
  in habit/studio_runs.py: this server loads no model.
- Settings are checked before anything is queued by parsing them with `habit train`'s own parser
  and settings classes, so a bad field gets the CLI's one-line message (400, naming the field).
- The page is plain HTML and JS with an inline SVG chart, on the same FastAPI stack, error
  bodies, body limit and key check as `habit serve` (Gradio would add a large dependency and its
  own server for a page this size, and could not share serve's app code).
- SSE is a plain StreamingResponse (sse-starlette is not a dependency): ids are row indices,
  so a reconnecting EventSource's Last-Event-ID picks up at the next row.
- With --api-key the page trades the key once for an HttpOnly SameSite=Strict cookie; POSTs
  from another origin, and Host names that are not loopback (DNS rebinding) are refused.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from habit import serve
from habit.engine import ApiError
from habit.errors import HabitError
from habit.studio_runs import MAX_UPLOAD, TERMINAL, Studio, loopback, tail

POLL = 0.5  # seconds between looks at a run's files while streaming its events
HEARTBEAT = 15.0  # seconds between SSE comments, so proxies keep an idle stream open
LOG_LINES = 40  # log tail lines in a `log` event
COOKIE = "habit_studio"
PAGE = Path(__file__).with_name("studio.html")
STATIC = Path(__file__).with_name("studio_static")


# ---------------------------------------------------------------- HTTP


async def _form(studio: Studio, request: Request) -> tuple[dict, tuple[Path, str] | None]:
    """(settings, the stored upload or None) from a multipart body (`file`, `settings`) or a JSON
    body {"settings": {...}}."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        body = await serve._read_json(request)
        settings = body.get("settings", {})
        if not isinstance(settings, dict):
            raise ApiError(400, "'settings' must be a JSON object of habit train options", "settings",
                           "invalid_type")
        return settings, None
    chunks = serve.body_chunks(request, studio.max_upload, studio.max_upload + (16 << 20))
    try:
        form = await MultiPartParser(request.headers, chunks, max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise ApiError(400, f"bad multipart body: {e.message}", "file", "invalid_body") from None
    try:
        raw = form.get("settings") or "{}"
        try:
            settings = json.loads(raw) if isinstance(raw, str) else None
        except ValueError as e:
            raise ApiError(400, f"'settings' is not valid JSON ({e})", "settings", "invalid_json") from None
        if not isinstance(settings, dict):
            raise ApiError(400, "'settings' must be a JSON object of habit train options", "settings",
                           "invalid_type")
        file = form.get("file")
        upload = None
        if file is not None and not isinstance(file, str):
            if not file.filename:
                raise ApiError(400, "the uploaded file has no name", "file", "invalid_value")
            upload = await run_in_threadpool(studio.store, file.file, file.filename)
        return settings, upload
    finally:
        await form.close()


def _sse(event: str | None, data: Any, ident: int | None = None) -> bytes:
    head = (f"id: {ident}\n" if ident is not None else "") + (f"event: {event}\n" if event else "")
    return (head + "data: " + json.dumps(data, ensure_ascii=False) + "\n\n").encode()


async def _events(studio: Studio, name: str, last: int | None, request: Request) -> AsyncIterator[bytes]:
    """metrics.jsonl rows from the one after `last`, then new ones as they are written; `status`
    when the summary changes, `log` when the log tail does, `reset` when the file was replaced by a
    shorter one (resume drops rows after its checkpoint), `end` when the run has settled."""
    yield b"retry: 1000\n\n"
    sent = 0 if last is None else last + 1
    status = log = None
    quiet = time.monotonic()
    while True:
        rows = await run_in_threadpool(studio.metrics, name)
        if len(rows) < sent:
            yield _sse("reset", {"rows": len(rows)})
            sent = 0
        for i in range(sent, len(rows)):
            yield _sse(None, rows[i], i)
        sent = len(rows)
        now = await run_in_threadpool(studio.summary, name)
        if now != status:
            status = now
            yield _sse("status", now)
        job = studio._job_of(name)
        lines = tail(Path(job.log), LOG_LINES) if job else []
        if lines != log:
            log = lines
            yield _sse("log", {"lines": lines})
        if now["status"] in TERMINAL and now["rows"] == sent:
            yield _sse("end", {"status": now["status"]})
            return
        if time.monotonic() - quiet > HEARTBEAT:
            quiet = time.monotonic()
            yield b": ping\n\n"
        if studio.draining or await request.is_disconnected():
            return
        await asyncio.sleep(POLL)


def _same_origin(request: Request) -> None:
    """Refuse a page on another site driving this one (the browser sends its Origin on every
    POST), and, on a loopback address, a Host that is not loopback (DNS rebinding)."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != host:
        raise ApiError(403, f"cross-origin request from {origin} refused", code="cross_origin")
    if origin == "null":
        raise ApiError(403, "cross-origin request refused", code="cross_origin")


def build_app(studio: Studio) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    serve.add_error_handlers(app)
    page = PAGE.read_text(encoding="utf-8").replace(
        "__NEEDS_KEY__", "true" if studio.api_key else "false")

    def guard_host(request: Request) -> None:
        host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        if studio.loopback_only and host not in ("127.0.0.1", "localhost", "::1"):
            raise ApiError(403, f"Host {host!r} refused: this studio listens on a loopback address "
                           "(start it with --host to serve other names)", code="bad_host")

    def guard(request: Request) -> None:
        guard_host(request)
        if request.method not in ("GET", "HEAD"):
            _same_origin(request)
        if studio.api_key is None:
            return
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), studio.cookie.encode()):
            return
        serve.check_api_key(request, studio.api_key)

    @app.get("/")
    async def index(request: Request):  # the page itself holds nothing secret: no key needed
        guard_host(request)
        return HTMLResponse(page)

    @app.get("/static/{name}")
    async def static(name: str, request: Request):
        guard_host(request)
        path = STATIC / name
        if name.startswith(".") or "/" in name or not path.is_file():
            raise ApiError(404, f"no such file: {name}", code="not_found")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.post("/api/session")
    async def session(request: Request):
        guard_host(request)
        _same_origin(request)
        body = await serve._read_json(request)
        key = body.get("key")
        if studio.api_key is None:
            return {"ok": True}
        if not isinstance(key, str) or not hmac.compare_digest(key.encode(), studio.api_key.encode()):
            raise ApiError(401, "wrong API key", "key", "invalid_api_key")
        response = JSONResponse({"ok": True})
        response.set_cookie(COOKIE, studio.cookie, httponly=True, samesite="strict")
        return response

    @app.get("/api/options")
    async def options(request: Request):
        guard(request)
        return await run_in_threadpool(studio.options)

    @app.post("/api/data")
    async def data(request: Request):
        guard(request)
        settings, upload = await _form(studio, request)
        n = settings.pop("n", 3)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 50:
            raise ApiError(400, "'n' must be a whole number from 1 to 50", "n", "invalid_value")
        return await run_in_threadpool(studio.inspect, settings, upload, n)

    @app.post("/api/estimate")
    async def estimate(request: Request):
        guard(request)
        settings, _ = await _form(studio, request)
        return await run_in_threadpool(studio.estimate, settings)

    @app.post("/api/runs")
    async def create(request: Request):
        guard(request)
        settings, upload = await _form(studio, request)
        name = await run_in_threadpool(studio.create, settings, upload)
        return JSONResponse({"run": name}, status_code=201)

    @app.get("/api/runs")
    async def runs(request: Request):
        guard(request)
        return await run_in_threadpool(lambda: [studio.summary(n) for n in studio.names()])

    @app.get("/api/runs/{name}")
    async def one(name: str, request: Request):
        guard(request)
        studio.run_dir(name)
        return await run_in_threadpool(studio.summary, name)

    @app.get("/api/runs/{name}/events")
    async def events(name: str, request: Request):
        guard(request)
        studio.run_dir(name)
        last = request.headers.get("last-event-id", "").strip()
        last = int(last) if last.isdigit() else None
        return StreamingResponse(_events(studio, name, last, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str, request: Request):
        guard(request)
        return await run_in_threadpool(studio.stop, name)

    @app.post("/api/runs/{name}/resume")
    async def resume(name: str, request: Request):
        guard(request)
        return await run_in_threadpool(studio.resume, name)

    @app.get("/api/runs/{name}/report")
    async def report(name: str, request: Request):
        from habit.report import run_report

        guard(request)
        run = studio.run_dir(name)
        try:
            html = await run_in_threadpool(run_report, run)
        except HabitError as e:
            raise ApiError(404, str(e), "run", "no_report") from None
        return HTMLResponse(html)

    async def job_of(request: Request, name: str, build) -> JSONResponse:
        guard(request)
        empty = request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers
        body = {} if empty else await serve._read_json(request)
        kind, argv = await run_in_threadpool(build, name, body)
        job = studio.submit(kind, name, argv)
        return JSONResponse(job.public(), status_code=202)

    @app.post("/api/runs/{name}/eval")
    async def evaluate(name: str, request: Request):
        return await job_of(request, name, lambda n, b: ("eval", studio.eval_argv(n, b)))

    @app.post("/api/runs/{name}/compare")
    async def compare(name: str, request: Request):
        return await job_of(request, name, lambda n, b: ("compare", studio.compare_argv(n, b)))

    @app.post("/api/runs/{name}/export")
    async def export(name: str, request: Request):
        return await job_of(request, name, studio.export_argv)

    @app.get("/api/runs/{name}/files/{file}")
    async def files(name: str, file: str, request: Request):
        guard(request)
        folder = studio.run_dir(name) / "export"
        if file.startswith(".") or "/" in file or not (folder / file).is_file():
            raise ApiError(404, f"{name} has no export named {file!r}", "file", "not_found")
        return FileResponse(folder / file, filename=file)

    @app.get("/api/jobs")
    async def jobs(request: Request):
        guard(request)
        with studio.lock:
            return [j.public() for j in studio.jobs.values()]

    @app.get("/api/jobs/{ident}")
    async def job(ident: str, request: Request):
        guard(request)
        with studio.lock:
            found = studio.jobs.get(ident)
            if found is None:
                raise ApiError(404, f"no job {ident!r}", "job", "not_found")
            return found.public() | {"queue_position": studio.queue.index(found) + 1
                                     if found in studio.queue else None}

    return app


# ---------------------------------------------------------------- the command


class StudioServer:
    """The studio on a socket bound at construction: `serve_forever()` in any thread, `stop()`
    from anywhere (a signal handler too), then `close()`, which stops a training in flight with a
    checkpoint."""

    def __init__(self, runs_dir: str | os.PathLike = "runs", host: str = "127.0.0.1", port: int = 7860,
                 api_key: str | None = None, max_upload: int = MAX_UPLOAD):
        if not 0 <= port <= 65535:
            raise HabitError(f"--port {port}: must be between 0 and 65535")
        self.studio = Studio(runs_dir, api_key, max_upload, loopback_only=loopback(host))
        try:
            self.socket = serve.bind(host, port)
        except OSError as e:
            self.studio.close()
            raise serve.listen_error(host, port, e) from None
        self.uvicorn = serve.uvicorn_server(build_app(self.studio))
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def stop(self) -> None:
        self.studio.draining = True  # event streams end, so uvicorn's graceful stop can finish
        self.uvicorn.should_exit = True

    def close(self) -> None:
        self.socket.close()
        self.studio.close()


def serve_studio(runs_dir: str = "runs", host: str = "127.0.0.1", port: int = 7860,
                 api_key: str | None = None, max_upload: int = MAX_UPLOAD, ready=None) -> None:
    """Serve the studio until SIGTERM / Ctrl-C; a training in flight then saves a checkpoint.
    `ready(url)` is called once the port is bound."""
    server = StudioServer(runs_dir, host, port, api_key, max_upload)
    serve.until_signal(server, (lambda: ready(server.url)) if ready else None)
