"""habit serve: the real CLI in a subprocess, spoken to with the official openai client and raw HTTP.

Three tiny runs share one base: two chat-template runs (same directory name, so the second is
served as "roles-2") and one text-template run. Answers are greedy, so each must equal what the
library gives for the same run in this process: that checks rendering and adapter switching.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from habit import generation, render
from habit.adapters import load_run
from habit.cli import main
from habit.data import load_examples
from habit.engine import run_names
from habit.serve import RAW, make_server
from habit.settings import GenerationSettings, TrainSettings
from habit.training import train

openai = pytest.importorskip("openai")

KEY = "k"
CAP = 64
ROLES = ["Poet", "Linux Terminal", "Chess Coach", "Travel Guide"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def runs(tiny_model, roles_csv, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-runs")
    table = load_examples(roles_csv)
    # fp32: tests compare batched answers with one-at-a-time ones; in bf16, padding changes the
    # rounding enough to flip near-tied greedy choices of a random tiny model
    settings = TrainSettings(steps=2, batch_tokens=512, max_len=256, precision="fp32")
    train(table, root / "roles", model=tiny_model, settings=settings)
    # a different seed and a large learning rate: this adapter answers unlike the base
    train(table, root / "other" / "roles", model=tiny_model,
          settings=TrainSettings(steps=2, batch_tokens=512, max_len=256, seed=1, lr=5e-2,
                                 precision="fp32"))
    text = load_examples(roles_csv, template="<act>: {act}\n<prompt>: {prompt}")
    train(text, root / "text", model=tiny_model, settings=settings)
    return {"roles": str(root / "roles"), "roles-2": str(root / "other" / "roles"),
            "text": str(root / "text")}


@pytest.fixture(scope="module")
def reference(runs):
    """What the library answers in this process: {(model, role, max_tokens): Generation}."""
    loaded = {name: load_run(path) for name, path in runs.items()}

    def answer(model: str, role: str, max_tokens: int, raw: bool = False, render_as: str = "roles"):
        run = loaded[render_as if model == "base" else model]
        template = RAW if raw else run.template
        prompt = role if raw else generation.build_prompt(run.template, run.tokenizer, role)
        # the API's sampling is OpenAI's: no repetition penalty unless the request asks
        settings = GenerationSettings(max_new_tokens=max_tokens, repetition_penalty=1.0)
        if model == "base":
            with run.model.disable_adapter():
                g = generation.generate(run.model, run.tokenizer, template, [prompt], run.stop, settings)[0]
        else:
            g = generation.generate(run.model, run.tokenizer, template, [prompt], run.stop, settings)[0]
        return g, len(render.prompt_ids(prompt, template, run.tokenizer))

    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, args: list[str], tmp: Path):
        self.port = free_port()
        self.log = open(tmp / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "habit", "serve", *args, "--port", str(self.port), "--json"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=ENV)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, self.stderr()
                time.sleep(0.2)
        self.ready = json.loads(self.proc.stdout.readline())

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self, signal_it: bool = True) -> tuple[int, str]:
        """SIGTERM (once: a second one would end the server at once), wait: (exit code, stderr)."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        err = self.stderr()
        self.log.close()
        return code, err


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None) -> tuple[int, object, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    kind = r.getheader("Content-Type", "")
    # r.headers: header names are case-insensitive (uvicorn sends them in lower case)
    return r.status, json.loads(raw) if "json" in kind else raw.decode(), r.headers


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    s = Served([runs["roles"], runs["roles-2"], runs["text"], "--api-key", KEY,
                "--max-tokens-cap", str(CAP), "--runtime-adapters"], tmp_path_factory.mktemp("serve-log"))
    yield s
    code, err = s.stop()
    assert code == 0, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)


# ---------------------------------------------------------------- the OpenAI surface


def test_models(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "roles", "roles-2", "text"]
    assert server.ready == {"url": f"http://127.0.0.1:{server.port}", "models": ids}
    assert f"serving roles, roles-2, text (and base) on http://127.0.0.1:{server.port}" in server.stderr()


@pytest.mark.parametrize("model", ["base", "roles", "roles-2", "text"])
def test_chat_completion_equals_the_library(client, reference, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Poet"}],
                                       max_tokens=12, temperature=0)
    want, prompt_tokens = reference(model, "Poet", 12)
    assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
    assert isinstance(r.created, int) and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, want.tokens)
    assert r.usage.total_tokens == prompt_tokens + want.tokens


def test_adapters_really_switch(reference):
    """The reference answers differ, so test_chat_completion_equals_the_library sees a wrong
    adapter (not only a wrong template)."""
    assert reference("roles-2", "Poet", 12)[0].text != reference("base", "Poet", 12)[0].text


def test_text_run_takes_fields(client, reference):
    want = reference("text", "Chess Coach", 10)[0].text
    by_message = client.chat.completions.create(
        model="text", messages=[{"role": "user", "content": "Chess Coach"}], max_tokens=10)
    by_fields = client.chat.completions.create(
        model="text", messages=[{"role": "system", "content": "ignored by a text template"}],
        max_tokens=10, extra_body={"fields": {"act": "Chess Coach"}})
    assert by_message.choices[0].message.content == by_fields.choices[0].message.content == want
    with pytest.raises(openai.BadRequestError, match="act"):
        client.chat.completions.create(model="text", messages=[{"role": "system", "content": "x"}])


def test_base_renders_like_the_run_it_is_compared_with(client, reference):
    want, prompt_tokens = reference("base", "Poet", 10, render_as="text")
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Poet"}],
                                       max_tokens=10, extra_body={"render_as": "text"})
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == prompt_tokens
    with pytest.raises(openai.BadRequestError, match="render_as"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Poet"}],
                                       extra_body={"render_as": "base"})


def test_stream(client, reference):
    want, prompt_tokens = reference("roles-2", "Linux Terminal", 16)
    chunks = list(client.chat.completions.create(
        model="roles-2", messages=[{"role": "user", "content": "Linux Terminal"}], max_tokens=16,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "roles-2" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    if want.finish_reason == "length":
        assert chunks[-1].usage.completion_tokens == 16


def test_stream_ends_with_done(server):
    status, body, headers = request(server.port, "POST", "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "user", "content": "Poet"}], "max_tokens": 4,
        "stream": True}, AUTH)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    # OpenAI's shapes, field for field: the role opens, the last delta is empty, nulls are sent
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"]
    assert all(set(c) == {"id", "object", "created", "model", "choices", "usage"} for c in chunks)


def test_response_shapes(server):
    """Non-streamed answers as OpenAI writes them (habit.serve_api's response models)."""
    status, chat, _ = request(server.port, "POST", "/v1/chat/completions", CHAT, AUTH)
    assert status == 200 and set(chat) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(chat["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert chat["choices"][0]["logprobs"] is None and chat["choices"][0]["message"]["role"] == "assistant"
    status, text, _ = request(server.port, "POST", "/v1/completions",
                              {"model": "base", "prompt": "Poet", "max_tokens": 2}, AUTH)
    assert status == 200 and text["object"] == "text_completion"
    assert set(text["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    status, models, _ = request(server.port, "GET", "/v1/models", None, AUTH)
    base = models["data"][0]
    assert base["id"] == "base" and base["parent"] is None and base["path"] == ""
    assert all(m["parent"] == "base" and m["root"] == m["path"] for m in models["data"][1:])


def test_completions_take_raw_text(client, reference):
    want, prompt_tokens = reference("base", "Linux Terminal", 8, raw=True)
    r = client.completions.create(model="base", prompt="Linux Terminal", max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == prompt_tokens
    streamed = list(client.completions.create(model="base", prompt="Linux Terminal", max_tokens=8,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == want.finish_reason
    two = client.completions.create(model="roles", prompt=["Poet", "Linux Terminal"], max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1]


def test_stop_strings(client, reference):
    full = reference("roles-2", "Poet", 24)[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    want = text[: text.find(stop)]
    kwargs = dict(model="roles-2", messages=[{"role": "user", "content": "Poet"}], max_tokens=24, stop=[stop])
    r = client.chat.completions.create(**kwargs)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    # generation ended where the stop string appeared, and the count says so
    assert 0 < r.usage.completion_tokens < full.tokens
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wrong_key(server):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}])
    status, body, headers = request(server.port, "GET", "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers.get("WWW-Authenticate") == "Bearer"
    assert request(server.port, "GET", "/health")[0] == 200  # no key needed to check liveness


CHAT = {"model": "roles", "messages": [{"role": "user", "content": "Poet"}], "max_tokens": 4}
BAD = [
    ("invalid JSON", "POST", "/v1/chat/completions", b'{"model": "roles",', 400, "invalid_json"),
    ("JSON not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model_not_found"),
    ("max_tokens over cap", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": CAP + 1}, 400,
     "max_tokens_over_cap"),
    ("max_tokens zero", "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 0},
     400, "invalid_value"),
    ("body over 1 MiB", "POST", "/v1/chat/completions", b"x" * (3 << 19), 413, "request_too_large"),
    ("messages not a list", "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "invalid_type"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "roles"}, 400, "missing_required_parameter"),
    ("bad role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "x", "content": "y"}]},
     400, "invalid_type"),
    ("temperature a string", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400,
     "invalid_type"),
    ("negative temperature", "POST", "/v1/chat/completions", {**CHAT, "temperature": -1}, 400,
     "invalid_value"),
    ("stream not a boolean", "POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "invalid_type"),
    ("prompt a number", "POST", "/v1/completions", {"model": "base", "prompt": 3}, 400, "invalid_type"),
    ("n=2", "POST", "/v1/completions", {"model": "base", "prompt": "x", "n": 2}, 400, "unsupported_parameter"),
    ("over the context", "POST", "/v1/completions", {"model": "base", "prompt": "Poet " * 600,
                                                     "max_tokens": 4}, 400, "context_length_exceeded"),
    ("unknown field", "POST", "/v1/chat/completions", {**CHAT, "mirostat": 2}, 400,
     "unsupported_parameter"),
    ("tools", "POST", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter"),
    ("a penalty", "POST", "/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400,
     "unsupported_parameter"),
    ("unknown path", "GET", "/v1/nothing", None, 404, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("wrong method on models", "DELETE", "/v1/models", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,body,status,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests(server, method, path, body, status, code):
    got, answer, _ = request(server.port, method, path, body, AUTH)
    assert got == status, answer
    if code == "unsupported_parameter":  # the answer names the field
        field = list(body)[-1]
        assert answer["error"]["param"] == field and field in answer["error"]["message"]
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == code and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    assert request(server.port, "GET", "/health")[0] == 200  # still serving


# ---------------------------------------------------------------- adapters at run time


@pytest.fixture(scope="module")
def late_run(tiny_model, roles_csv, tmp_path_factory) -> str:
    """A run the server does not start with, unlike every other run here (its own seed)."""
    out = tmp_path_factory.mktemp("late") / "late"
    train(load_examples(roles_csv), out, model=tiny_model,
          settings=TrainSettings(steps=2, batch_tokens=512, max_len=256, seed=2, lr=5e-2,
                                 precision="fp32"))
    return str(out)


def adapter(port: int, action: str, body: dict) -> tuple[int, object]:
    status, answer, _ = request(port, "POST", f"/v1/{action}_lora_adapter", body, AUTH)
    return status, answer


def generate_cli(capsys, run: str, inputs: list[str], max_tokens: int) -> list[str]:
    """`habit generate RUN INPUT... --json` with the API's sampling (greedy, no penalty)."""
    assert main(["generate", run, *inputs, "--json", "--max-new-tokens", str(max_tokens),
                 "--repetition-penalty", "1.0"]) == 0
    return [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]


def test_load_and_unload_an_adapter_at_run_time(server, client, reference, late_run, runs, tmp_path, capsys):
    """vLLM's endpoints: a run loaded into the live server answers as `habit generate` does on it,
    in batches of its own beside the other runs' requests; unloaded, it is gone (404)."""
    before = [m.id for m in client.models.list().data]
    status, text = adapter(server.port, "load", {"lora_name": "late", "lora_path": late_run})
    assert (status, text) == (200, "Success: LoRA adapter 'late' added successfully.")
    cards = {m["id"]: m for m in request(server.port, "GET", "/v1/models", None, AUTH)[1]["data"]}
    assert list(cards) == before + ["late"]
    assert cards["late"]["parent"] == "base" and cards["late"]["root"] == late_run
    assert "late" in health(server.port)["models"]
    want = generate_cli(capsys, late_run, ROLES, 12)
    assert want != [reference("base", role, 12)[0].text for role in ROLES]  # an adapter of its own
    jobs = [(role, model) for role in ROLES for model in ("late", "roles")]

    def ask(job):
        role, model = job
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": role}],
                                              max_tokens=12).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # concurrent requests for two adapters
        got = dict(zip(jobs, pool.map(ask, jobs)))
    assert [got[(role, "late")] for role in ROLES] == want
    assert [got[(role, "roles")] for role in ROLES] == [reference("roles", r, 12)[0].text for r in ROLES]

    # refused, each with one line naming the problem
    other = tmp_path / "other-base"
    shutil.copytree(late_run, other)
    info = json.loads((other / "run.json").read_text())
    info["base"]["sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(info))
    for body, words in [({"lora_name": "late", "lora_path": late_run}, "already served"),
                        ({"lora_name": "base", "lora_path": late_run}, "reserved"),
                        ({"lora_name": "x", "lora_path": str(tmp_path / "nope")}, "no such run directory"),
                        ({"lora_name": "x", "lora_path": str(tmp_path)}, "not a habit run"),
                        ({"lora_name": "x", "lora_path": str(other)}, "must share one base"),
                        ({"lora_name": "x"}, "'lora_path' is required")]:
        status, answer = adapter(server.port, "load", body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
        assert "\n" not in answer["error"]["message"]

    status, text = adapter(server.port, "unload", {"lora_name": "late"})
    assert (status, text) == (200, "Success: LoRA adapter 'late' removed successfully.")
    assert [m.id for m in client.models.list().data] == before
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="late", messages=[{"role": "user", "content": "Poet"}])
    status, answer = adapter(server.port, "unload", {"lora_name": "late"})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert adapter(server.port, "unload", {"lora_name": "base"})[0] == 400
    # the name is free again, and the run answers as before under it
    assert adapter(server.port, "load", {"lora_name": "late", "lora_path": late_run})[0] == 200
    assert ask(("Poet", "late")) == want[0]
    assert adapter(server.port, "unload", {"lora_name": "late"})[0] == 200


def test_unload_every_run(runs, reference):
    """With no run left, the base still answers (rendered with the template it started with), and
    a run loaded afterwards answers as its library counterpart does."""
    server = make_server([runs["roles"]], port=0, runtime_adapters=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    ask = {"messages": [{"role": "user", "content": "Poet"}], "max_tokens": 10}
    try:
        status, text, _ = request(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "roles"})
        assert status == 200, text
        status, models, _ = request(port, "GET", "/v1/models")
        assert [m["id"] for m in models["data"]] == ["base"] and models["data"][0]["template"] == "chat"
        status, body, _ = request(port, "POST", "/v1/chat/completions", {"model": "base", **ask})
        assert status == 200 and body["choices"][0]["message"]["content"] == reference("base", "Poet", 10)[0].text
        status, _, _ = request(port, "POST", "/v1/load_lora_adapter",
                               {"lora_name": "again", "lora_path": runs["roles-2"]})
        assert status == 200
        status, body, _ = request(port, "POST", "/v1/chat/completions", {"model": "again", **ask})
        assert body["choices"][0]["message"]["content"] == reference("roles-2", "Poet", 10)[0].text
        status, body, _ = request(port, "POST", "/v1/chat/completions", {"model": "base", **ask})
        assert body["choices"][0]["message"]["content"] == reference("base", "Poet", 10)[0].text
    finally:
        server.stop()
        thread.join(timeout=30)
        server.close()


def test_run_directory_is_an_adapter_folder_vllm_reads(runs):
    """`vllm serve BASE --enable-lora --lora-modules NAME=RUN` (docs/ship.md) reads the run
    directory itself: PEFT's two files at its top, LoRA tensors under PEFT's standard names, and
    none of what vLLM's loader refuses (extra trained modules, biases, DoRA). vLLM cannot be
    installed here (no GPU build), so its loader's documented requirements are checked instead."""
    from safetensors import safe_open

    run = Path(runs["roles"])
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] <= 16  # vLLM's default --max-lora-rank
    assert not config["modules_to_save"] and config["bias"] == "none" and not config["use_dora"]
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    parts = [re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", k) for k in keys]
    assert keys and all(parts), keys
    modules = {p.group(1) for p in parts}
    assert {m.rsplit(".", 1)[1] for m in modules} <= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"}
    assert len(keys) == 2 * len(modules)  # an A and a B for each


# ---------------------------------------------------------------- load, shutdown, page


def test_load(server, client, reference):
    """64 requests from 16 threads; all answered, each equal to the library's greedy answer."""
    jobs = [(ROLES[i % len(ROLES)], ("roles", "roles-2", "base")[i % 3]) for i in range(64)]
    want = {(role, model): reference(model, role, 8)[0].text for role, model in set(jobs)}

    def ask(job):
        role, model = job
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": role}],
                                           max_tokens=8)
        return job, r, time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(ask, jobs))
    wall = time.perf_counter() - start
    assert len(done) == 64
    for job, r, _ in done:
        assert r.choices[0].message.content == want[job] and r.usage.completion_tokens <= 8
    latency = sorted(d for _, _, d in done)
    print(f"\nserve load: 64 requests, 16 clients, max_tokens 8: {64 / wall:.1f} requests/s, "
          f"p50 {statistics.median(latency) * 1000:.0f} ms, "
          f"p95 {latency[int(0.95 * len(latency)) - 1] * 1000:.0f} ms")


def test_keep_alive(server):
    """HTTP/1.1: one connection carries several requests."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT), headers=AUTH)
            r = conn.getresponse()
            assert r.status == 200 and r.version == 11 and json.loads(r.read())["choices"]
            assert (r.getheader("Connection") or "").lower() != "close"
    finally:
        conn.close()


def test_streams_batch_with_the_others(client, reference):
    """Streamed and plain requests at once: every answer is the library's greedy one."""
    roles = ROLES * 2
    want = {role: reference("roles", role, 12)[0].text for role in ROLES}

    def ask(i):
        kwargs = dict(model="roles", messages=[{"role": "user", "content": roles[i]}], max_tokens=12)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kwargs, stream=True) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(len(roles))))
    assert got == [want[r] for r in roles]


def health(port: int) -> dict:
    return request(port, "GET", "/health")[1]


def test_closed_stream_frees_the_worker(server):
    """A client that leaves mid-stream: its generation ends at the next token, not at max_tokens."""
    before = health(server.port)["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", headers=AUTH, body=json.dumps(
        {"model": "base", "prompt": "Poet", "max_tokens": CAP, "stream": True, "stop": ["\x00"]}))
    r = conn.getresponse()
    assert r.status == 200 and r.read(6) == b"data: "  # generation has begun
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while (h := health(server.port))["waiting"] or h["cancelled"] == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


def test_closed_request_frees_the_worker(runs):
    """A non-streamed request whose client leaves is cancelled too, not generated to the end.
    Under a JSON grammar a random tiny model never closes its string, so unless cancelled the
    answer would run all 400 tokens."""
    server = make_server([runs["roles"]], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "base", "prompt": "Poet", "max_tokens": 400,
                                      "response_format": {"type": "json_object"}}))
        deadline = time.monotonic() + 30
        while not health(port)["waiting"]:  # the job is in
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        while (h := health(port))["waiting"] or not h["cancelled"]:
            assert time.monotonic() < deadline, h  # it ran to the end: nobody cancelled it
            time.sleep(0.05)
        assert h["cancelled"] == 1
    finally:
        server.stop()
        thread.join(timeout=30)
        server.close()


def test_full_queue_answers_503(runs):
    server = make_server([runs["roles"]], port=0, max_queue=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "base", "prompt": "Poet", "max_tokens": 400,
                                      "stream": True}))
        r = conn.getresponse()
        assert r.status == 200 and r.read(6) == b"data: "
        status, body, headers = request(port, "POST", "/v1/chat/completions", CHAT)
        assert status == 503 and headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "server_busy" and body["error"]["type"] == "server_error"
    finally:
        conn.close()
        server.stop()
        thread.join(timeout=30)
        server.close()


def test_sigterm_finishes_the_request_in_flight(runs, tmp_path):
    s = Served([runs["roles"]], tmp_path)
    body = json.dumps(CHAT).encode()
    conn = socket.create_connection(("127.0.0.1", s.port), timeout=60)
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    time.sleep(1)  # the server accepts at once and now waits for the rest of the body
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # it stops accepting new connections...
        try:
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.1)
    assert s.proc.poll() is None  # ...but waits for the request it has
    conn.sendall(body[10:])
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(payload)["choices"][0]["message"]["content"] is not None
    code, err = s.stop(signal_it=False)  # the SIGTERM above is enough
    assert code == 0, err
    assert "Traceback" not in err


def test_page(server, tmp_path):
    status, html, headers = request(server.port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert not re.search(r"https?://|<link|<img|@import", html)  # self-contained: no CDN
    assert "const NEEDS_KEY = true;" in html and 'id="key"' in html
    assert 'fetch("/v1/chat/completions"' in html and "getReader()" in html and "stream: true" in html
    assert 'fetch("/v1/models"' in html and 'id="run"' in html
    chromium = "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip("chromium is not installed at /usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              f"--user-data-dir={tmp_path / 'profile'}", f"http://127.0.0.1:{server.port}/"],
                             capture_output=True, timeout=120).stdout.decode()
        assert 'id="base-answer"' in dom and 'id="tuned-answer"' in dom and 'id="key-label"' in dom
        return
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"http://127.0.0.1:{server.port}/")
        assert page.is_visible("#key")
        page.fill("#key", KEY)
        page.press("#key", "Tab")  # change → the page loads /v1/models with the key
        page.wait_for_selector("#run option[value='roles-2']", state="attached")
        page.select_option("#run", "roles-2")
        page.fill("textarea[name=act]", "Linux Terminal")
        page.fill("#max-tokens", "24")
        page.click("#go")
        page.wait_for_selector("#base-answer[data-finish]", state="attached", timeout=60_000)
        page.wait_for_selector("#tuned-answer[data-finish]", state="attached", timeout=60_000)
        base, tuned = page.inner_text("#base-answer"), page.inner_text("#tuned-answer")
        assert base.strip() and tuned.strip() and base != tuned
        assert page.inner_text("#tuned-name") == "roles-2"
        assert "s" in page.inner_text("#tuned-info")
        shot = Path(os.environ.get("HABIT_SCREENSHOT_DIR", tmp_path)) / "serve-page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


# ---------------------------------------------------------------- library and CLI errors


def test_server_in_a_thread(runs):
    server = make_server([runs["roles"]], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.model_ids == ["base", "roles"]
        status, body, _ = request(server.server_address[1], "POST", "/v1/chat/completions", CHAT)
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
        status, html, _ = request(server.server_address[1], "GET", "/")
        assert "const NEEDS_KEY = false;" in html
        status, body, _ = request(server.server_address[1], "POST", "/v1/load_lora_adapter",
                                  {"lora_name": "x", "lora_path": runs["roles"]})
        assert status == 404 and "--runtime-adapters" in body["error"]["message"]
    finally:
        server.shutdown()  # returns once serve_forever has
        thread.join(timeout=10)
        assert not thread.is_alive()
        server.close()


def test_run_names():
    assert run_names(["a/roles", "b/roles", "c/base", "d/roles/"]) == ["roles", "roles-2", "base-2", "roles-3"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("habit: error: ") and "\n" not in err, err
    return err


def test_cli_errors(runs, server, tmp_path, capsys):
    assert "not a habit run" in one_line_error(capsys, ["serve", str(tmp_path)])
    assert "no such run directory" in one_line_error(capsys, ["serve", str(tmp_path / "nope")])
    assert "between 0 and 65535" in one_line_error(capsys, ["serve", runs["roles"], "--port", "70000"])
    assert "--max-queue" in one_line_error(capsys, ["serve", runs["roles"], "--max-queue", "0"])
    assert "port is in use" in one_line_error(capsys, ["serve", runs["roles"], "--port", str(server.port)])
    other = tmp_path / "other-base"
    shutil.copytree(runs["roles"], other)
    info = json.loads((other / "run.json").read_text())
    info["base"]["sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(info))
    assert "must share one base" in one_line_error(capsys, ["serve", runs["roles"], str(other)])
