"""The HTML report: content, escaping, offline-ness, and a real browser rendering it."""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import CHROMIUM_FLAGS as FLAGS
from habit import rundir
from habit.errors import HabitError
from habit.report import render_report, svg_bars, svg_line_chart, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "report"
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def sample():
    ev = json.loads((FIXTURE / "eval.json").read_text())
    rows = rundir.read_jsonl(FIXTURE / "metrics.jsonl")
    info = json.loads((FIXTURE / "run.json").read_text())
    return ev, rows, info


@pytest.fixture(scope="module")
def html(sample):
    return render_report(*sample)


def summary_rows(html: str) -> dict[str, list[str]]:
    table = re.search(r'<table id="summary">(.*?)</table>', html, re.S).group(1)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr, re.S)]
        rows[cells[0]] = cells[1:]
    return rows


def test_summary_table_has_base_and_tuned_numbers(html):
    rows = summary_rows(html)
    assert rows["stop rate (ended by itself)"][:2] == ["25.0%", "100.0%"]
    assert rows["expectation rate"][:2] == ["0.0%", "75.0%"]
    assert "I want you to act as" in rows["expectation rate"][3]
    assert "inferred from the training responses" in rows["expectation rate"][3]
    assert rows["loop rate"][:2] == ["50.0%", "0.0%"]
    assert rows["similarity to reference"][:2] == ["0.412", "0.786"]
    assert "all-MiniLM-L6-v2" in rows["similarity to reference"][3]
    assert rows["ROUGE-L vs reference"][:2] == ["0.118", "0.437"]
    assert rows["held-out response loss"][:2] == ["2.934", "1.462"]
    assert rows["perplexity"][:2] == ["18.80", "4.32"]
    assert rows["median length (tokens)"][:2] == ["256", "71.5"]
    assert "reference median 78" in rows["median length (tokens)"][3]


def test_changes_are_marked_better_or_worse(sample):
    ev, rows, info = sample
    html = render_report(ev, rows, info)
    got = summary_rows(html)
    assert got["stop rate (ended by itself)"][2].startswith("+75.0 pp") and "better" in got["stop rate (ended by itself)"][2]
    assert "better" in got["loop rate"][2]  # lower is better for loops, loss and perplexity
    assert "better" in got["held-out response loss"][2] and "better" in got["perplexity"][2]
    assert "better" in got["median length (tokens)"][2]  # closer to the references' median
    worse = copy.deepcopy(ev)
    worse["tuned"].update(loss=3.5, loop_rate=0.75, stop_rate=0.0)
    got = summary_rows(render_report(worse, rows, info))
    assert "worse" in got["held-out response loss"][2] and "worse" in got["loop rate"][2]
    assert "worse" in got["stop rate (ended by itself)"][2]


def test_outputs_are_escaped(html):
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;xss &amp; &quot;quotes&quot;&#x27;)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "1 &lt; 2 &amp;&amp; 3 &gt; 2" in html
    assert "white-space:pre-wrap" in html


def test_plots_and_header(html):
    assert html.count('<svg class="plot"') >= 3  # loss, metric bars, generation probe
    labels = re.findall(r'<svg class="plot"[^>]*aria-label="([^"]+)"', html)
    assert len(labels) == html.count('<svg class="plot"') and all(labels)
    for text in ("smollm2-135m", "prompts.csv", "the model&#x27;s chat template", "transformers 4.47.0"):
        assert text in html
    assert html.count("cut at token limit") == 3


def test_no_external_resources(html):
    urls = re.findall(r"https?://[^\s\"'<>)]+", html)
    assert set(urls) <= {SVG_NS}
    assert not re.search(r"<(script|link|img|iframe)\b", html)
    assert "@import" not in html and "url(" not in html


def test_without_eval(sample):
    _, rows, info = sample
    html = render_report(None, rows, info, run_dir="runs/act")
    assert "no evaluation yet — run <code>habit eval runs/act</code>" in html
    assert 'id="summary"' not in html
    assert html.count('<svg class="plot"') == 2  # loss and generation probe, no metric bars


def test_without_metrics(sample):
    ev, _, info = sample
    html = render_report(ev, [], info)
    assert 'id="summary"' in html and html.count('<svg class="plot"') == 1  # the metric bars
    html = render_report(None, [], {})
    assert "no evaluation yet" in html and "no training metrics logged yet" in html


def test_null_metrics(sample):
    ev, rows, info = sample
    ev = copy.deepcopy(ev)
    for side in ("base", "tuned"):
        ev[side] = {k: None for k in ev[side]} | {"length": dict.fromkeys(ev[side]["length"])}
    ev["reference"]["length"]["median"] = None
    ev.update(similarity_model=None, expectation={"prefix": None, "regex": None, "origin": "none"})
    ev["examples"][0]["base"] = None
    rows = rows + [{"step": 31, "loss": None}, {"step": 31, "loss": float("nan")}]
    html = render_report(ev, rows, info)
    got = summary_rows(html)
    assert all(v[:3] == ["n/a", "n/a", "n/a"] for v in got.values())
    assert "embedding model not installed" in got["similarity to reference"][3]
    assert "no expectation" in got["expectation rate"][3]
    assert not re.search(r"\bnan\b", html, re.I)


def test_charts_alone():
    svg = svg_line_chart([{"name": "a<b", "points": [(1, 2.0)]}, {"name": "empty", "points": []}],
                         "one point", "x", "y")
    assert "a&lt;b" in svg and "<circle" in svg and "empty" not in svg
    assert "no data" in svg_line_chart([], "nothing", "x", "y")
    long = svg_line_chart([{"name": "l", "points": [(i, i % 7) for i in range(10_000)]}], "many", "x", "y")
    assert len(long) < 60_000
    bars = svg_bars([("stop", [0.2, None])], ["base", "tuned"], "bars")
    assert bars.count("<rect") == 1 + 2 and "n/a" in bars  # one bar + two legend swatches


def test_write_report(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    path = write_report(run)
    assert path == run / "report.html" and 'id="summary"' in path.read_text()
    (run / "eval.json").unlink()
    (run / "metrics.jsonl").unlink()
    out = write_report(run, tmp_path / "elsewhere.html")
    assert out == tmp_path / "elsewhere.html" and "no evaluation yet" in out.read_text()
    assert not list(tmp_path.glob(".elsewhere.html.*"))  # the atomic write left no temp file


def test_write_report_without_run_json(tmp_path):
    with pytest.raises(HabitError, match=re.escape(str(tmp_path))) as e:
        write_report(tmp_path)
    assert "\n" not in str(e.value)


# --- a real browser --------------------------------------------------------------------------

def browse(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, timeout=120, cwd=tmp)


def test_screenshot(chromium, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    page = write_report(run)
    png = tmp_path / "report.png"
    done = browse(chromium, tmp_path, "--window-size=1280,2400", f"--screenshot={png}", page.as_uri())
    assert png.is_file(), done.stderr.decode(errors="replace")[-2000:]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1280, 2400)
    assert png.stat().st_size > 20_000  # a blank page compresses to a few KB
    dom = browse(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout.decode()
    assert 'id="summary"' in dom and re.search(r'<svg class="plot"', dom)
    assert "&lt;script&gt;alert" in dom and "<script>alert" not in dom
