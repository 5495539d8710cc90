"""habit studio's HTTP API: every endpoint, every bad input, and the jobs it runs as `habit` processes.

Most tests need no model process: they check settings, data and run folders written here. One test
trains the tiny model through the API (stop, a queue, resume, eval, compare, export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import FIXTURES
from habit import cli, rundir
from habit.errors import HabitError
from habit.settings import GenerationSettings, LoraSettings, TrainSettings
from habit.studio import build_app
from habit.studio_runs import STALE, Studio

ROLES = FIXTURES / "data" / "roles.csv"
LOCAL = "http://127.0.0.1"  # the studio refuses Host names that are not loopback


@pytest.fixture
def studio(tmp_path):
    st = Studio(tmp_path / "runs")
    yield st
    st.close()


@pytest.fixture
def client(studio):
    return TestClient(build_app(studio), base_url=LOCAL)


def post_run(client, settings: dict, path: Path | None = ROLES, name: str | None = None):
    files = {"file": (name or path.name, path.read_bytes(), "text/csv")} if path else None
    return client.post("/api/runs", files=files, data={"settings": json.dumps(settings)})


def error(response) -> dict:
    return response.json()["error"]


def cli_error(capsys, argv: list[str]) -> str:
    """The one line `habit ARGV` prints on stderr when it refuses its input."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields:
            events.append({"id": fields.get("id"), "event": fields.get("event", "message"),
                           "data": json.loads(fields["data"])})
    return events


def fake_run(runs: Path, name: str, status: str, steps: int = 5, total: int = 10) -> Path:
    """A run folder as `habit train` leaves it (without weights): run.json and metrics.jsonl."""
    run = runs / name
    run.mkdir(parents=True)
    rundir.write_json(run / rundir.RUN_FILE, {
        "status": status, "base": {"source": "some-base", "kind": "dir", "sha256": "0"},
        "template": {"kind": "text", "prompt": "{act}\n", "response": "prompt"},
        "template_text": "text template", "data": {"source": "cli.csv", "train": 4, "val": 1},
        "settings": {"lora": {}, "train": {}}, "plan": {"steps": total}})
    for step in range(1, steps + 1):
        rundir.append_jsonl(run / rundir.METRICS_FILE, {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3,
                                                        "tokens_per_s": 100.0 + step, "elapsed_s": step,
                                                        "total_steps": total})
    return run


# ---------------------------------------------------------------- the page and the settings form


def test_page_and_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "habit studio" in page.text
    assert "__NEEDS_KEY__" not in page.text and "const NEEDS_KEY = false" in page.text
    js = client.get("/static/studio.js")
    assert js.status_code == 200 and "EventSource" in js.text
    # nothing is fetched from elsewhere: no absolute URL in the page or its script
    assert "http://" not in page.text + js.text and "https://" not in page.text + js.text
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/..%2Fstudio.py").status_code == 404


def test_the_page_ships_in_the_package():
    import fnmatch
    import tomllib

    import habit

    root = Path(habit.__file__).parent
    data = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    needed = [p.relative_to(root).as_posix() for p in [root / "studio.html", *(root / "studio_static").iterdir()]]
    assert all(any(fnmatch.fnmatch(n, pat) for pat in data["habit"]) for n in needed), needed


def test_options_are_habit_trains_flags(client):
    options = client.get("/api/options").json()
    fields = {f["name"]: f for f in options["settings"]}
    for cls in (LoraSettings, TrainSettings):
        for f in dataclasses.fields(cls):
            assert fields[f.name]["default"] == f.default
            assert fields[f.name]["help"] == f.metadata["help"]
            assert fields[f.name]["flag"] == "--" + f.name.replace("_", "-")
    assert fields["model"]["default"] == cli.build_parser().parse_args(["train", "x"]).model
    assert fields["precision"]["choices"] == ["auto", "bf16", "fp32"]
    assert fields["report_to"]["choices"] == ["none", "tensorboard", "mlflow", "wandb"]
    assert fields["train_on_prompt"]["type"] == "bool" and fields["lr"]["type"] == "float"
    assert not {"out", "force", "resume", "json", "data"} & set(fields)
    assert {a["name"] for a in options["aliases"]} == {"smollm2-135m", "gemma3-270m"}


# ---------------------------------------------------------------- data: check and preview


def test_upload_check_and_preview_match_the_cli(client, studio, tiny_model, capsys):
    r = client.post("/api/data", files={"file": ("roles.csv", ROLES.read_bytes())},
                    data={"settings": json.dumps({"model": tiny_model, "n": 2})})
    assert r.status_code == 200, r.text
    body = r.json()
    stored = Path(body["data"])
    assert stored.parent.parent == studio.uploads and stored.name == "roles.csv"
    assert stored.read_bytes() == ROLES.read_bytes()
    assert cli.main(["data", "check", str(ROLES), "--model", tiny_model, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert body["check"] == expected | {"source": "roles.csv"}
    assert body["warnings"] == []
    # the preview is habit data preview's rendering: loss pieces are the ⟦ ⟧ parts
    assert cli.main(["data", "preview", str(ROLES), "--model", tiny_model, "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert len(body["preview"]) == 2
    for ex in body["preview"]:
        text = "".join(f"⟦{t}⟧" if loss else t for t, loss in ex["pieces"])
        assert text in shown
        assert ex["where"].startswith("roles.csv:")
    # the same bytes again are kept once; a path on this machine works as well
    again = client.post("/api/data", files={"file": ("roles.csv", ROLES.read_bytes())},
                        data={"settings": json.dumps({"model": tiny_model})})
    assert again.json()["data"] == body["data"]
    by_path = client.post("/api/data", json={"settings": {"model": tiny_model, "data": str(ROLES)}})
    assert by_path.status_code == 200 and by_path.json()["check"]["examples"] == 5
    assert len(by_path.json()["preview"]) == 3


def test_data_check_warns(client, tiny_model, tmp_path):
    data = tmp_path / "dups.csv"
    data.write_text(ROLES.read_text() + ROLES.read_text().split("\n", 1)[1], encoding="utf-8")
    body = client.post("/api/data", json={"settings": {"model": tiny_model, "data": str(data),
                                                       "max_len": 150}}).json()
    assert body["check"]["duplicates_dropped"] == 5
    assert any("5 exact duplicate" in w for w in body["warnings"])
    assert any("longer than --max-len 150" in w for w in body["warnings"])


def test_column_roles_can_be_changed(client, tiny_model, tmp_path):
    data = tmp_path / "three.csv"
    data.write_text("act,prompt,note\nPoet,Write verse.,x\nCoach,Teach chess.,y\n", encoding="utf-8")
    r = client.post("/api/data", json={"settings": {"model": tiny_model, "data": str(data)}})
    assert r.status_code == 400
    assert error(r)["param"] == "response" and "cannot tell which column" in error(r)["message"]
    assert r.json()["columns"] == ["act", "prompt", "note"]  # offered to choose from
    r = client.post("/api/data", json={"settings": {"model": tiny_model, "data": str(data),
                                                    "response": "prompt"}})
    assert r.status_code == 200 and r.json()["check"]["shape"] == "columns"
    r = client.post("/api/data", json={"settings": {"model": tiny_model, "data": str(data),
                                                    "template": "Q: {act}\nA: {prompt}"}})
    assert r.status_code == 200 and r.json()["check"]["shape"] == "template"
    assert r.json()["preview"][0]["pieces"][0] == ["Q: Poet\nA: ", False]


def test_bad_data_names_the_uploaded_file(client, tiny_model):
    r = client.post("/api/data", files={"file": ("mine.csv", b"act,prompt\n")},
                    data={"settings": json.dumps({"model": tiny_model})})
    assert r.status_code == 400
    assert error(r) == {"message": "mine.csv: no rows (header only)", "type": "invalid_request_error",
                             "param": "data", "code": "invalid_data"}
    r = client.post("/api/data", json={"settings": {"model": tiny_model}})
    assert r.status_code == 400 and error(r)["param"] == "data"


def test_upload_size_limit(tmp_path, tiny_model):
    small = Studio(tmp_path / "runs", max_upload=1000)
    try:
        client = TestClient(build_app(small), base_url=LOCAL)
        big = b"act,prompt\n" + b"a,b\n" * 1000
        r = client.post("/api/data", files={"file": ("big.csv", big)},
                        data={"settings": json.dumps({"model": tiny_model})})
        assert r.status_code == 413 and error(r)["code"] == "request_too_large"
        assert not [p for p in small.uploads.rglob("*") if p.is_file()]  # nothing kept
        r = client.post("/api/runs", json={"settings": {"model": tiny_model}})
        assert r.status_code == 400 and error(r)["param"] == "data"  # under the limit, but no data
    finally:
        small.close()


# ---------------------------------------------------------------- settings: the CLI's checks and words


@pytest.mark.parametrize("settings, param", [
    ({"lr": "abc"}, "lr"),
    ({"lr": -1}, "lr"),
    ({"steps": 0}, "steps"),
    ({"steps": "2.5"}, "steps"),
    ({"batch_tokens": 64, "max_len": 128}, "batch_tokens"),
    ({"precision": "fp8"}, "precision"),
    ({"rank": 0}, "rank"),
    ({"model": "/no/such/model"}, "model"),
    ({"response": "nope"}, "response"),
    ({"template": "{act} and {nope}"}, "template"),
])
def test_bad_settings_get_the_clis_message(client, tiny_model, settings, param, tmp_path, capsys):
    settings = {"model": tiny_model} | settings
    r = client.post("/api/runs", json={"settings": settings | {"data": str(ROLES)}})
    assert r.status_code == 400, r.text
    assert error(r)["param"] == param
    argv = ["train", str(ROLES), "--out", str(tmp_path / "cli-run")]
    for key, value in settings.items():
        argv.append(f"--{key.replace('_', '-')}={value}")
    line = cli_error(capsys, argv)
    # argparse adds a pointer to --help after its own messages
    assert line in (f"habit: error: {error(r)['message']}",
                    f"habit: error: {error(r)['message']} (see 'habit train --help')")
    assert not (tmp_path / "cli-run").exists()


@pytest.mark.parametrize("settings, param, status, words", [
    ({"epoch": 3}, "epoch", 400, "unknown setting 'epoch'"),
    ({"out": "elsewhere"}, "out", 400, "unknown setting 'out'"),
    ({"train_on_prompt": "yes"}, "train_on_prompt", 400, "--train-on-prompt takes true or false"),
    ({"lr": [1, 2]}, "lr", 400, "--lr takes one value"),
    ({"name": "../escape"}, "name", 400, "run name '../escape'"),
    ({"name": "taken"}, "name", 409, "already exists"),
])
def test_bad_run_requests(client, studio, tiny_model, settings, param, status, words):
    (studio.runs / "taken").mkdir()
    (studio.runs / "taken" / "file").write_text("x")
    r = post_run(client, {"model": tiny_model} | settings)
    assert r.status_code == status and error(r)["param"] == param and words in error(r)["message"]
    assert client.get("/api/runs").json() == []


def test_bad_bodies(client):
    r = client.post("/api/runs", files={"file": ("r.csv", b"a,b\n1,2\n")}, data={"settings": "{oops"})
    assert r.status_code == 400 and error(r)["param"] == "settings"
    r = client.post("/api/runs", files={"file": ("r.csv", b"a,b\n1,2\n")}, data={"settings": "[1]"})
    assert r.status_code == 400 and error(r)["param"] == "settings"
    r = client.post("/api/runs", json={"settings": 3})
    assert r.status_code == 400 and error(r)["param"] == "settings"
    r = client.post("/api/runs", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"
    r = client.post("/api/data", json={"settings": {"n": 0}})
    assert r.status_code == 400 and error(r)["param"] == "n"
    r = client.get("/api/runs/x/nothing")
    assert r.status_code == 404 and error(r)["code"] == "not_found"
    r = client.delete("/api/runs")
    assert r.status_code == 405


# ---------------------------------------------------------------- estimate


def test_estimate_is_what_training_prints(client, studio, tiny_model):
    from habit import models
    from habit.training import memory_plan

    settings = {"model": tiny_model, "batch_tokens": 256, "max_len": 256, "epochs": 2}
    r = client.post("/api/estimate", json={"settings": settings | {"data": str(ROLES)}})
    assert r.status_code == 200, r.text
    e = r.json()
    need = memory_plan(models.check_arch(models.resolve(tiny_model)), LoraSettings(),
                       TrainSettings(batch_tokens=256, max_len=256, epochs=2),
                       models.best_dtype("auto", "cpu"), "cpu", say=False)
    assert e["memory"] == {"fits": True, "gb": round(need.total / 1e9, 2), "text": need.describe()}
    # 758 tokens, 4 of 5 examples in training: 3 steps of 256 tokens an epoch
    assert e["steps"] == 6 and e["seconds"] is None  # no run of this base has trained here
    run = fake_run(studio.runs, "earlier", "done")
    info = json.loads((run / "run.json").read_text())
    rundir.write_json(run / "run.json", info | {"base": {"source": tiny_model}})
    e = client.post("/api/estimate", json={"settings": settings | {"data": str(ROLES)}}).json()
    assert e["measured_by"] == "earlier" and e["tokens_per_s"] == 105.0
    assert e["seconds"] == round(6 * 256 / 105.0, 1)
    r = client.post("/api/estimate", json={"settings": {"model": tiny_model, "lr": 0}})
    assert r.status_code == 400 and error(r)["param"] == "lr"


def test_estimate_says_when_it_does_not_fit(client, tiny_model, monkeypatch):
    monkeypatch.setenv("HABIT_MEMORY_AVAILABLE", "1M")
    e = client.post("/api/estimate", json={"settings": {"model": tiny_model}}).json()
    assert e["memory"]["fits"] is False and "only 0.0 GB available" in e["memory"]["text"]


# ---------------------------------------------------------------- runs from the folder, events, report


def test_runs_started_from_the_cli_are_listed(client, studio):
    fake_run(studio.runs, "finished", "done", steps=10)
    fake_run(studio.runs, "interrupted", "interrupted", steps=3)
    fake_run(studio.runs, "live", "running", steps=2)
    dead = fake_run(studio.runs, "dead", "running", steps=2)
    old = time.time() - STALE - 60
    for p in dead.iterdir():
        os.utime(p, (old, old))
    (studio.runs / "not-a-run").mkdir()
    runs = {r["run"]: r for r in client.get("/api/runs").json()}
    assert set(runs) == {"finished", "interrupted", "live", "dead"}
    assert {k: r["status"] for k, r in runs.items()} == {
        "finished": "done", "interrupted": "stopped", "live": "running", "dead": "failed"}
    assert runs["finished"]["step"] == 10 and runs["finished"]["loss"] == 4.0
    assert runs["finished"]["total_steps"] == 10 and runs["finished"]["tokens_per_s"] == 110.0
    assert "no progress for 30 minutes" in runs["dead"]["error"]
    assert runs["live"]["started_here"] is False
    assert client.get("/api/runs/finished").json() == runs["finished"]
    # the studio did not start them: it cannot stop them, and a resume needs a checkpoint
    r = client.post("/api/runs/live/stop")
    assert r.status_code == 409 and error(r)["code"] == "not_ours"
    r = client.post("/api/runs/finished/stop")
    assert r.status_code == 409 and "is not running (status done)" in error(r)["message"]
    r = client.post("/api/runs/finished/resume")
    assert r.status_code == 409 and error(r)["code"] == "run_done"
    r = client.post("/api/runs/interrupted/resume")
    assert r.status_code == 409 and "no complete checkpoint to resume from" in error(r)["message"]
    for kind in ("eval", "compare", "export"):
        r = client.post(f"/api/runs/finished/{kind}", json={"inputs": ["x"]})
        assert r.status_code == 409 and error(r)["code"] == "not_done"


def test_unknown_runs_and_jobs(client):
    for method, path in [("get", "/api/runs/nope"), ("get", "/api/runs/nope/events"),
                         ("post", "/api/runs/nope/stop"), ("post", "/api/runs/nope/resume"),
                         ("get", "/api/runs/nope/report"), ("post", "/api/runs/nope/eval"),
                         ("post", "/api/runs/nope/compare"), ("post", "/api/runs/nope/export"),
                         ("get", "/api/runs/nope/files/x.gguf"), ("get", "/api/runs/.studio"),
                         ("get", "/api/jobs/nope")]:
        r = getattr(client, method)(path)
        assert r.status_code == 404, (path, r.text)


def test_events_resume_after_last_event_id(client, studio):
    fake_run(studio.runs, "done-run", "done", steps=5)
    events = sse(client.get("/api/runs/done-run/events").text)
    rows = [e for e in events if e["event"] == "message"]
    assert [e["id"] for e in rows] == ["0", "1", "2", "3", "4"]
    assert [e["data"] for e in rows] == rundir.read_jsonl(studio.runs / "done-run" / "metrics.jsonl")
    assert [e["event"] for e in events[5:]] == ["status", "log", "end"]
    assert events[5]["data"]["status"] == "done"
    later = sse(client.get("/api/runs/done-run/events", headers={"Last-Event-ID": "2"}).text)
    assert [e["id"] for e in later if e["event"] == "message"] == ["3", "4"]
    # an id past the end (the file was replaced by a shorter one): start over, said with `reset`
    past = sse(client.get("/api/runs/done-run/events", headers={"Last-Event-ID": "9"}).text)
    assert past[0]["event"] == "reset"
    assert [e["id"] for e in past if e["event"] == "message"] == ["0", "1", "2", "3", "4"]


def test_events_follow_a_run_as_it_writes(client, studio, monkeypatch):
    monkeypatch.setattr("habit.studio.POLL", 0.05)
    run = fake_run(studio.runs, "growing", "running", steps=1, total=4)

    def write() -> None:
        for step in (2, 3, 4):
            time.sleep(0.2)
            rundir.append_jsonl(run / "metrics.jsonl", {"step": step, "loss": 1.0, "total_steps": 4})
        time.sleep(0.2)
        info = json.loads((run / "run.json").read_text())
        rundir.write_json(run / "run.json", info | {"status": "done"})

    writer = threading.Thread(target=write)
    writer.start()
    events = sse(client.get("/api/runs/growing/events").text)
    writer.join()
    rows = [e for e in events if e["event"] == "message"]
    assert [(e["id"], e["data"]["step"]) for e in rows] == [("0", 1), ("1", 2), ("2", 3), ("3", 4)]
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses[0] == "running" and statuses[-1] == "done"
    assert events[-1]["event"] == "end"


def test_report_is_the_html_report(client, studio):
    from habit.report import run_report

    run = fake_run(studio.runs, "reported", "done")
    r = client.get("/api/runs/reported/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == run_report(run)


# ---------------------------------------------------------------- access


def test_api_key(tmp_path, tiny_model):
    keyed = Studio(tmp_path / "runs", api_key="sesame")
    try:
        client = TestClient(build_app(keyed), base_url=LOCAL)
        assert "const NEEDS_KEY = true" in client.get("/").text  # the page asks for the key
        for method, path in [("get", "/api/runs"), ("get", "/api/options"), ("post", "/api/runs"),
                             ("get", "/api/jobs"), ("post", "/api/data")]:
            r = getattr(client, method)(path)
            assert r.status_code == 401 and error(r)["code"] == "invalid_api_key", path
        assert client.get("/api/runs", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert client.get("/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = client.post("/api/session", json={"key": "nope"})
        assert r.status_code == 401 and error(r)["param"] == "key"
        r = client.post("/api/session", json={"key": "sesame"})
        assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
        assert "sesame" not in r.headers["set-cookie"]
        assert client.get("/api/runs").status_code == 200  # the cookie now passes
    finally:
        keyed.close()
    with pytest.raises(HabitError, match="--api-key must not be empty"):
        Studio(tmp_path / "runs", api_key=" ")


def test_other_sites_and_names_are_refused(client, studio):
    r = client.post("/api/runs", json={"settings": {}}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and error(r)["code"] == "cross_origin"
    r = client.get("/api/runs", headers={"Host": "evil.example"})  # DNS rebinding
    assert r.status_code == 403 and error(r)["code"] == "bad_host"
    r = client.post("/api/runs", json={"settings": {}}, headers={"Origin": LOCAL})
    assert r.status_code == 400  # same origin: on to the settings check
    open_studio = Studio(studio.runs, loopback_only=False)  # started with --host 0.0.0.0
    try:
        wide = TestClient(build_app(open_studio), base_url="http://studio.lan")
        assert wide.get("/api/runs").status_code == 200
    finally:
        open_studio.close()


# ---------------------------------------------------------------- the jobs: train, stop, queue, resume, ship


def wait(client, path: str, done, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.3)


def settled(state: str) -> bool:
    return state not in ("queued", "running")


def test_train_stop_queue_resume_and_ship(client, studio, tiny_model, tmp_path):
    from habit.adapters import load_run
    from habit.generation import compare

    steps = {"model": tiny_model, "steps": 150, "save_every": 1, "batch_tokens": 256, "max_len": 256}
    r = post_run(client, steps)
    assert r.status_code == 201 and r.json() == {"run": "roles"}
    # a second run waits in the queue; its data file goes missing before it starts
    doomed = tmp_path / "doomed.csv"
    shutil.copy(ROLES, doomed)
    assert client.post("/api/runs", json={"settings": steps | {"steps": 2, "data": str(doomed)}}).json() == {
        "run": "doomed"}
    # a third is stopped while it waits, and never runs
    assert post_run(client, steps, name="third.csv").json() == {"run": "third"}
    runs = {r["run"]: r for r in client.get("/api/runs").json()}
    assert runs["doomed"]["status"] == "queued" and runs["doomed"]["queue_position"] == 1
    assert runs["third"]["queue_position"] == 2
    assert client.post("/api/runs/third/stop").json()["status"] == "stopped"
    doomed.unlink()

    wait(client, "/api/runs/roles", lambda s: s["rows"] >= 2)
    assert client.post("/api/runs/roles/stop").status_code == 200
    stopped = wait(client, "/api/runs/roles", lambda s: settled(s["status"]))
    assert stopped["status"] == "stopped" and stopped["checkpoint"] and 2 <= stopped["step"] < 150
    assert json.loads((studio.runs / "roles" / "run.json").read_text())["status"] == "interrupted"
    r = client.post("/api/runs/roles/stop")
    assert r.status_code == 409

    failed = wait(client, "/api/runs/doomed", lambda s: settled(s["status"]))
    assert failed["status"] == "failed" and failed["error"] == f"{doomed}: no such file"
    assert not (studio.runs / "third").exists() and client.get("/api/runs/third").json()["status"] == "stopped"

    assert client.post("/api/runs/roles/resume").json()["status"] in ("queued", "running")
    assert client.post("/api/runs/roles/resume").status_code == 409  # already on its way
    done = wait(client, "/api/runs/roles", lambda s: settled(s["status"]))
    assert done["status"] == "done" and done["step"] == 150 and done["adapter"]
    rows = rundir.read_jsonl(studio.runs / "roles" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 151))
    events = sse(client.get("/api/runs/roles/events", headers={"Last-Event-ID": str(len(rows) - 3)}).text)
    assert [e["data"] for e in events if e["event"] == "message"] == rows[-2:]
    jobs = client.get("/api/jobs").json()
    assert [(j["kind"], j["run"], j["state"]) for j in jobs] == [
        ("train", "roles", "stopped"), ("train", "doomed", "failed"), ("train", "third", "stopped"),
        ("resume", "roles", "done")]

    # compare: the same answers as the library's compare; bad inputs first
    for body, param in [({"inputs": []}, "inputs"), ({"inputs": ["  "]}, "inputs"),
                        ({"inputs": ["x"], "max_new_tokens": 0}, "max_new_tokens"),
                        ({"inputs": ["x"], "temperature": -1}, "temperature"),
                        ({"inputs": ["x"], "max_new_tokens": "many"}, "max_new_tokens")]:
        r = client.post("/api/runs/roles/compare", json=body)
        assert r.status_code == 400 and error(r)["param"] == param, body
    job = client.post("/api/runs/roles/compare", json={"inputs": ["Poet"], "max_new_tokens": 12})
    assert job.status_code == 202
    compared = wait(client, f"/api/jobs/{job.json()['job']}", lambda j: settled(j["state"]))
    assert compared["state"] == "done", compared
    expected = compare(load_run(studio.runs / "roles"), ["Poet"], GenerationSettings(max_new_tokens=12))
    assert compared["result"][0]["base"]["text"] == expected[0]["base"].text
    assert compared["result"][0]["tuned"]["text"] == expected[0]["tuned"].text

    # eval: eval.json, and the report now holds its summary
    assert client.post("/api/runs/roles/eval", json={"n": 0}).status_code == 400
    job = client.post("/api/runs/roles/eval", json={"n": 2}).json()
    evaluated = wait(client, f"/api/jobs/{job['job']}", lambda j: settled(j["state"]))
    assert evaluated["state"] == "done" and evaluated["result"]["n"] == 1  # one validation example
    assert (studio.runs / "roles" / "eval.json").is_file()
    assert 'id="summary"' in client.get("/api/runs/roles/report").text

    # export: GGUF + Modelfile, and the merged folder as a zip, as downloads
    for body, param in [({"format": "zip"}, "format"), ({"dtype": "q4_k_m"}, "dtype")]:
        r = client.post("/api/runs/roles/export", json=body)
        assert r.status_code == 400 and error(r)["param"] == param
    for body in ({"format": "gguf", "dtype": "q8_0"}, {"format": "merged"}):
        job = client.post("/api/runs/roles/export", json=body).json()
        finished = wait(client, f"/api/jobs/{job['job']}", lambda j: settled(j["state"]))
        assert finished["state"] == "done", finished
    assert client.get("/api/runs/roles").json()["exports"] == ["Modelfile", "roles-merged.zip", "roles.gguf"]
    gguf = client.get("/api/runs/roles/files/roles.gguf")
    assert gguf.status_code == 200 and gguf.content[:4] == b"GGUF"
    assert 'filename="roles.gguf"' in gguf.headers["content-disposition"]
    assert client.get("/api/runs/roles/files/Modelfile").text.startswith("FROM ./roles.gguf")
    merged = zipfile.ZipFile(BytesIO(client.get("/api/runs/roles/files/roles-merged.zip").content))
    assert {"merged/config.json", "merged/model.safetensors", "merged/habit-merge.json"} <= set(merged.namelist())
    assert client.get("/api/runs/roles/files/..%2Frun.json").status_code == 404


def test_a_new_studio_keeps_the_queue_and_the_failures(tmp_path, tiny_model):
    first = Studio(tmp_path / "runs")
    first.close()  # no worker: what is submitted now stays queued on disk
    first.submit("train", "waiting", ["train", "--help"])
    failed = first.submit("train", "broken", ["train"])
    with first.lock:
        first.queue.remove(failed)
        failed.state, failed.error = "failed", "the error line"
        first._save(failed)
    second = Studio(tmp_path / "runs")
    try:
        client = TestClient(build_app(second), base_url=LOCAL)
        assert client.get("/api/runs/broken").json()["error"] == "the error line"
        # it ran (habit train --help exits 0 and writes no run): not a run that finished
        final = wait(client, "/api/runs/waiting", lambda s: settled(s["status"]), timeout=120)
        assert final["status"] == "failed" and final["started_here"]
        assert final["error"] == "the run finished without marking run.json done"
    finally:
        second.close()


# ---------------------------------------------------------------- the command


def test_studio_command_refuses_bad_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    assert cli_error(capsys, ["studio", "--port", "70000", "--no-browser"]) == (
        "habit: error: --port 70000: must be between 0 and 65535")
    assert cli_error(capsys, ["studio", "--max-upload-mb", "0", "--no-browser"]) == (
        "habit: error: --max-upload-mb must be positive")
    assert cli_error(capsys, ["studio", "--runs-dir", "a-file", "--no-browser"]) == (
        "habit: error: --runs-dir a-file: is a file, not a folder")
    assert cli_error(capsys, ["studio", "--api-key", "", "--no-browser"]) == (
        "habit: error: --api-key must not be empty")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_error(capsys, ["studio", "--port", str(port), "--no-browser"]) == (
            f"habit: error: cannot listen on 127.0.0.1:{port}: the port is in use")


def test_sigterm_stops_the_studio_and_its_training_with_a_checkpoint(tmp_path, tiny_model):
    import signal
    import subprocess
    import sys

    import httpx

    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "habit", "studio", "--port", "0", "--json",
                             "--no-browser", "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        url = ready["url"]
        assert url.startswith("http://127.0.0.1:") and ready["runs_dir"] == str(runs)
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/api/runs").json() == []
            settings = {"model": tiny_model, "steps": 150, "save_every": 1, "batch_tokens": 256,
                        "max_len": 256}
            r = http.post("/api/runs", files={"file": ("roles.csv", ROLES.read_bytes())},
                          data={"settings": json.dumps(settings)})
            assert r.status_code == 201
            wait(http, "/api/runs/roles", lambda s: s["rows"] >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr.read().startswith(f"habit studio on {url}")
    info = json.loads((runs / "roles" / "run.json").read_text())
    assert info["status"] == "interrupted" and 2 <= info["stopped_at"] < 150
    from habit.training import latest_checkpoint

    assert latest_checkpoint(runs / "roles").name == f"step-{info['stopped_at']:07d}"
