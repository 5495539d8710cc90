"""habit studio in a real browser (Debian's Chromium through Playwright), on the tiny model: upload
→ preview → start → the chart gains points → stop → resume → done → report → compare → GGUF.

Every step leaves a screenshot in a temporary folder, or in $STUDIO_SCREENSHOTS when set (the
docs' images come from `STUDIO_SCREENSHOTS=docs/img pytest tests/test_studio_browser.py`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import CHROMIUM_FLAGS, FIXTURES
from habit import rundir
from habit.studio import StudioServer
from habit.studio_runs import STALE

ROLES = FIXTURES / "data" / "roles.csv"
LONG = 240_000  # ms: a step that starts a `habit` process waits for torch to import on a busy CPU


@pytest.fixture
def studio(tmp_path, tiny_model, monkeypatch):
    # relative paths, as a user in a project folder types them (and the screenshots show them)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model)
    server = StudioServer("runs", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(30)
    server.close()


def test_the_whole_path(studio, chromium, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    responses = [row["prompt"] for row in csv.DictReader(ROLES.open(encoding="utf-8"))]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def shot(name: str, full: bool = False) -> None:
                page.screenshot(path=str(shots / f"studio-{name}.png"), full_page=full)

            page.goto(studio.url)
            page.wait_for_selector("body[data-ready='1']")

            # 1 data: the tiny model's tokenizer renders the preview of an uploaded file
            page.fill("#model", "models/tiny")
            page.press("#model", "Tab")
            page.set_input_files("#file", str(ROLES))
            page.wait_for_selector("#preview .example mark")
            marks = page.locator("#preview .example mark").all_inner_texts()
            assert len(marks) == 3 and marks[0].startswith(responses[0])  # the response carries loss
            assert "two_column" in page.inner_text("#shape-facts")
            assert page.locator("#response option").all_inner_texts() == ["detected", "act", "prompt"]
            shot("data", full=True)

            # 2 settings: a bad value is refused beside its field, in the CLI's words
            page.click("nav button[data-tab=settings]")
            page.fill("#set-lr", "-1")
            page.press("#set-lr", "Tab")
            page.wait_for_selector("[data-err=lr]:has-text('--lr must be positive')")
            for name, value in (("lr", "0.001"), ("steps", "150"), ("batch_tokens", "256"),
                                ("max_len", "256"), ("save_every", "1")):
                page.fill(f"#set-{name}", value)
            page.press("#set-save_every", "Tab")
            page.wait_for_selector("#estimate:has-text('memory estimate')")
            page.wait_for_selector("#estimate:has-text('150 optimizer steps')")
            assert page.inner_text("[data-err=lr]") == ""
            shot("settings", full=True)

            # 3 train: the chart gains points, stop saves, resume continues to the end
            page.click("#start")
            page.wait_for_selector("#run-title:has-text('roles')")
            points = "() => +(document.querySelector('#chart svg')?.dataset.points || 0)"
            page.wait_for_function(f"({points})() >= 2", timeout=LONG)
            shot("train")
            page.click("#stop")
            page.wait_for_selector("#run-status.stopped", timeout=LONG)
            at_stop = page.evaluate(points)
            assert 2 <= at_stop < 150
            assert not page.is_disabled("#resume") and page.is_disabled("#stop")
            shot("stopped")
            page.click("#resume")
            page.wait_for_selector("#run-status.done", timeout=2 * LONG)
            page.wait_for_function(f"({points})() === 150")
            assert "150 / 150" in page.inner_text("#progress-text")

            # the report, in its frame
            report = page.frame_locator("#report")
            report.locator("h1").wait_for()
            assert "habit report: roles" in report.locator("h1").inner_text()
            assert report.locator("svg.plot").count() >= 1  # its loss plot
            shot("done")

            # compare: base and tuned answer the same input
            page.fill("#compare-input", "Poet")
            page.fill("#compare-tokens", "12")
            page.click("#compare")
            page.wait_for_selector("#answers:not([hidden])", timeout=LONG)
            base, tuned = page.inner_text("#answer-base"), page.inner_text("#answer-tuned")
            assert base.strip() and tuned.strip() and base != tuned
            page.locator("#answers").scroll_into_view_if_needed()
            shot("compare")

            # export: GGUF + Modelfile, as downloads
            page.click("#export-gguf")
            link = page.locator("#downloads a[download='roles.gguf']")
            link.wait_for(timeout=LONG)
            assert page.locator("#downloads a[download='Modelfile']").count() == 1
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "roles.gguf"
            download.value.save_as(saved)
            assert saved.read_bytes()[:4] == b"GGUF"
            page.locator("#downloads").scroll_into_view_if_needed()
            shot("export")

            # 4 runs: the run, the queue's finished jobs, and a CLI run that died, with its error
            died = studio.studio.runs / "died"
            shutil.copytree(studio.studio.runs / "roles", died, ignore=shutil.ignore_patterns("export"))
            info = json.loads((died / "run.json").read_text())
            rundir.write_json(died / "run.json", info | {"status": "running"})
            (died / "adapter_model.safetensors").unlink()
            long_ago = time.time() - 2 * STALE
            for path in died.iterdir():
                os.utime(path, (long_ago, long_ago))
            page.click("nav button[data-tab=runs]")
            page.wait_for_selector("#runs-table tr[data-run=roles] .badge.done")
            page.wait_for_selector("#jobs-table tr:has(td:text-is('export')) .badge.done")
            shot("runs")
            page.click("#runs-table tr[data-run=died]")
            page.wait_for_selector("#run-status.failed")
            assert "no progress for 30 minutes" in page.inner_text("#run-error")
            assert page.is_hidden("#ship") and not page.is_disabled("#resume")
            assert not errors, errors
        finally:
            browser.close()
