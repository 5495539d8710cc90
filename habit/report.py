"""The HTML report: one self-contained page that shows what training changed.

It reads only the run directory (run.json, metrics.jsonl, eval.json) and writes one file with the
CSS inline and the plots drawn here as inline SVG: it opens offline, can be mailed or attached to
a ticket, and needs no plotting library. Every piece of model output goes through html.escape:
outputs are untrusted text and routinely contain <, >, & and quotes.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Sequence

from habit import rundir
from habit.errors import HabitError

REPORT_FILE = "report.html"

MAX_POINTS = 1500
BASE, TUNED = "#9aa3b2", "#2563eb"
PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626"]

# (label, key, kind, higher_is_better). kind picks the number format; None: no better/worse.
SUMMARY = [
    ("stop rate (ended by itself)", "stop_rate", "rate", True),
    ("expectation rate", "expectation_rate", "rate", True),
    ("loop rate", "loop_rate", "rate", False),
    ("similarity to reference", "similarity", "score", True),
    ("ROUGE-L vs reference", "rouge_l", "score", True),
    ("held-out response loss", "loss", "loss", False),
    ("perplexity", "perplexity", "ppl", False),
]
BAR_METRICS = [("stop", "stop_rate"), ("expectation", "expectation_rate"), ("loop", "loop_rate"),
               ("similarity", "similarity"), ("ROUGE-L", "rouge_l")]


def _num(x) -> float | None:
    """A finite float, or None for null / NaN / inf / anything not a number."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _fmt(x, kind: str) -> str:
    x = _num(x)
    if x is None:
        return "n/a"
    if kind == "rate":
        return f"{x * 100:.1f}%"
    if kind == "tokens":
        return f"{x:.0f}" if x == int(x) else f"{x:.1f}"
    return f"{x:.2f}" if kind == "ppl" else f"{x:.3f}"


def _delta(base, tuned, kind: str) -> str:
    d = tuned - base
    sign = "+" if d >= 0 else "−"  # a real minus sign, as wide as the plus
    return f"{sign}{abs(d) * 100:.1f} pp" if kind == "rate" else sign + _fmt(abs(d), kind)


def _ticks(lo: float, hi: float, n: int = 5, whole: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart);
    whole: never closer than 1 apart (optimizer steps have no halves)."""
    if hi <= lo:
        return [lo]
    raw = max((hi - lo) / n, 1.0 if whole else 0.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def _svg_open(width: int, height: int, label: str, title: str) -> list[str]:
    return [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{escape(label)}">',
            f"<title>{escape(label)}</title>",
            f'<text x="12" y="22" class="t">{escape(title)}</text>']


def _legend(names_colors: Sequence[tuple[str, str]], right: float, y: float = 42) -> list[str]:
    # Its own line under the title, right-aligned: it never covers the data or a long title.
    out, x = [], right
    for name, color in reversed(names_colors):
        x -= 7 * len(name) + 30
        out.append(f'<rect x="{x:.0f}" y="{y - 9}" width="12" height="12" rx="2" fill="{color}"/>'
                   f'<text x="{x + 17:.0f}" y="{y + 1}" class="l">{escape(name)}</text>')
    return out


def svg_line_chart(series: Sequence[dict], title: str, x_label: str, y_label: str,
                   y_range: tuple[float, float] | None = None, width: int = 640,
                   height: int = 340) -> str:
    """A line chart as an SVG string. Each series is {"name", "points": [(x, y), ...], "color"?,
    "style": "line" | "points" | "both"}; points with a None coordinate are dropped."""
    series = [dict(s, points=sorted((float(x), float(y)) for x, y in s["points"]
                                    if _num(x) is not None and _num(y) is not None))
              for s in series]
    series = [s for s in series if s["points"]]
    out = _svg_open(width, height, title, title)
    if not series:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="l">no data</text>')
        return "\n".join(out + ["</svg>"])
    colors = [s.get("color") or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    left, right, top, bottom = 62, width - 16, 62, height - 48
    xs = [x for s in series for x, _ in s["points"]]
    ys = [y for s in series for _, y in s["points"]]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y_range:
        y0, y1 = y_range
    else:
        pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.1 or 1.0
        y0, y1 = min(ys) - pad, max(ys) + pad
        if min(ys) >= 0:
            y0 = max(0.0, y0)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="g"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="k">'
                   f"{_tick_label(t)}</text>")
    for t in _ticks(x0, x1, 6, whole=all(x == int(x) for x in xs)):
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{bottom}" y2="{bottom + 5}" class="a"/>'
                   f'<text x="{sx(t):.1f}" y="{bottom + 18}" text-anchor="middle" class="k">'
                   f"{_tick_label(t)}</text>")
    out.append(f'<polyline points="{left},{top} {left},{bottom} {right},{bottom}" class="a" fill="none"/>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle" class="l">'
               f"{escape(x_label)}</text>")
    out.append(f'<text transform="translate(16 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle" '
               f'class="l">{escape(y_label)}</text>')
    for s, color in zip(series, colors):
        stride = math.ceil(len(s["points"]) / MAX_POINTS)  # a long run's every step adds only bytes
        kept = s["points"][::stride] + ([s["points"][-1]] if (len(s["points"]) - 1) % stride else [])
        pts = [(sx(x), sy(y)) for x, y in kept]
        style = s.get("style", "line")
        if style in ("line", "both") and len(pts) > 1:
            dash = ' stroke-dasharray="5 4"' if style == "both" else ""
            out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                       f'stroke="{color}" stroke-width="2"{dash} stroke-linejoin="round"/>')
        if style in ("points", "both") or len(pts) == 1:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}" stroke="#fff"/>'
                    for x, y in pts]
    out += _legend([(s["name"], c) for s, c in zip(series, colors)], right)
    return "\n".join(out + ["</svg>"])


def svg_bars(groups: Sequence[tuple[str, Sequence[float | None]]], names: Sequence[str],
             title: str, colors: Sequence[str] = (BASE, TUNED), width: int = 640,
             height: int = 340) -> str:
    """Grouped bars for values in [0, 1], as an SVG string: groups is [(label, [value per name])];
    a None value is written as "n/a" where its bar would be."""
    out = _svg_open(width, height, title, title)
    left, right, top, bottom = 50, width - 16, 66, height - 40
    sy = lambda y: bottom - y * (bottom - top)  # noqa: E731
    for t in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="g"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="k">{t:.0%}</text>')
    slot = (right - left) / max(1, len(groups))
    bar = min(44.0, slot * 0.8 / max(1, len(names)))
    for g, (label, values) in enumerate(groups):
        start = left + g * slot + (slot - bar * len(names)) / 2
        for i, v in enumerate(values):
            x, v = start + i * bar, _num(v)
            if v is None:
                out.append(f'<text x="{x + bar / 2:.1f}" y="{bottom - 6}" text-anchor="middle" '
                           f'class="k">n/a</text>')
                continue
            v = min(1.0, max(0.0, v))
            out.append(f'<rect x="{x + 1:.1f}" y="{sy(v):.1f}" width="{bar - 2:.1f}" '
                       f'height="{bottom - sy(v):.1f}" fill="{colors[i % len(colors)]}"/>'
                       f'<text x="{x + bar / 2:.1f}" y="{sy(v) - 4:.1f}" text-anchor="middle" '
                       f'class="k">{v:.0%}</text>')
        out.append(f'<text x="{left + (g + 0.5) * slot:.1f}" y="{bottom + 18}" text-anchor="middle" '
                   f'class="l">{escape(label)}</text>')
    out.append(f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" class="a"/>')
    out += _legend(list(zip(names, colors)), right)
    return "\n".join(out + ["</svg>"])


def _by_step(rows: Sequence[dict], key: str) -> list[tuple[float, float]]:
    # A resumed run logs some steps twice; the later row wins.
    found = {r["step"]: r[key] for r in rows if _num(r.get("step")) is not None and _num(r.get(key)) is not None}
    return sorted(found.items())


def _expectation_note(e: dict | None) -> str:
    e = e or {}
    if e.get("prefix"):
        what = f"starts with “{e['prefix']}”"
    elif e.get("regex"):
        what = f"matches /{e['regex']}/"
    else:
        return "no expectation (pass --expect-prefix or --expect-regex)"
    return f"{what} ({e.get('origin') or 'given'})"


def _summary(ev: dict) -> str:
    base, tuned = ev.get("base") or {}, ev.get("tuned") or {}
    notes = {"expectation_rate": _expectation_note(ev.get("expectation")),
             "similarity": f"cosine, {ev['similarity_model']}" if ev.get("similarity_model")
             else "embedding model not installed",
             "loss": "response tokens only; lower is better", "perplexity": "lower is better",
             "loop_rate": "repeated 4-grams; lower is better"}
    rows = []
    ref_median = _num(((ev.get("reference") or {}).get("length") or {}).get("median"))
    for label, key, kind, higher in SUMMARY + [("median length (tokens)", "length", "tokens", None)]:
        b, t = base.get(key), tuned.get(key)
        note = notes.get(key, "")
        if key == "length":
            b, t = (b or {}).get("median"), (t or {}).get("median")
            note = f"reference median {_fmt(ref_median, 'tokens')}"
        b, t = _num(b), _num(t)
        mark, delta = "", "n/a"
        if b is not None and t is not None:
            delta = _delta(b, t, kind)
            if key == "length":  # better = closer to the references' length
                gain = None if ref_median is None else abs(b - ref_median) - abs(t - ref_median)
            else:
                gain = t - b if higher else b - t
            if gain:
                mark = "better" if gain > 0 else "worse"
        tag = f' <span class="tag {mark}">{mark}</span>' if mark else ""
        rows.append(f"<tr><th>{escape(label)}</th><td>{_fmt(b, kind)}</td><td>{_fmt(t, kind)}</td>"
                    f'<td class="{mark}">{delta}{tag}</td><td class="note">{escape(note)}</td></tr>')
    rows += _capability_rows(ev.get("capability"))
    return ('<table id="summary"><thead><tr><th>metric</th><th>base</th><th>tuned</th><th>Δ</th>'
            f"<th>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _capability_rows(cap: dict | None) -> list[str]:
    """habit eval --tasks: each lm-eval task's score on both sides, then capability retained."""
    if not cap:
        return []
    rows = []
    for name, task in (cap.get("tasks") or {}).items():
        b, t, higher = _num(task.get("base")), _num(task.get("tuned")), task.get("higher_is_better", True)
        mark, delta = "", "n/a"
        if b is not None and t is not None:
            delta = _delta(b, t, "score")
            gain = t - b if higher else b - t
            mark = "better" if gain > 0 else "worse" if gain < 0 else ""
        tag = f' <span class="tag {mark}">{mark}</span>' if mark else ""
        note = (f"retained {_fmt(task.get('retained'), 'rate')} of the base's score; "
                f"{task.get('n')} documents, lm-evaluation-harness")
        label = f"{name}: {task.get('metric')}"
        rows.append(f"<tr><th>{escape(label)}</th><td>{_fmt(b, 'score')}</td>"
                    f'<td>{_fmt(t, "score")}</td><td class="{mark}">{delta}{tag}</td>'
                    f'<td class="note">{escape(note)}</td></tr>')
    rows.append(f'<tr><th>capability retained</th><td></td>'
                f'<td>{_fmt(cap.get("retained"), "rate")}</td><td></td><td class="note">tuned / base '
                "score, mean over the tasks above (100% = no general ability lost)</td></tr>")
    return rows


def _output_cell(text, finish) -> str:
    cut = '<span class="tag worse">cut at token limit</span>' if finish == "length" else ""
    return f'<td>{cut}<div class="out">{escape(str(text or ""))}</div></td>'


def _examples(examples: Sequence[dict]) -> str:
    rows = [f'<tr><td><div class="out">{escape(str(e.get("input", "")))}</div>'
            f'<div class="where">{escape(str(e.get("where", "")))}</div></td>'
            f'{_output_cell(e.get("base"), e.get("base_finish"))}'
            f'{_output_cell(e.get("tuned"), e.get("tuned_finish"))}'
            f'<td><div class="out">{escape(str(e.get("reference", "")))}</div></td></tr>'
            for e in examples]
    return ('<table id="examples"><thead><tr><th>input</th><th>base</th><th>tuned</th><th>reference</th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _facts(pairs: Sequence[tuple[str, object]]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs if v not in (None, ""))
    return f"<dl>{items}</dl>"


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2937;max-width:1180px;
margin:24px auto;padding:0 20px;background:#fff}
h1{font-size:24px;margin:0 0 12px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #e5e7eb;
padding-bottom:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}dt{color:#6b7280}
dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;padding:6px 10px;
border-bottom:1px solid #e5e7eb}thead th{background:#f3f4f6;font-weight:600}
#summary td{font-variant-numeric:tabular-nums;white-space:nowrap}#summary td.note{white-space:normal;
color:#6b7280;font-size:13px}#summary th{font-weight:500}
.better{color:#15803d}.worse{color:#b91c1c}
.tag{font-size:11px;border-radius:8px;padding:1px 7px;margin-left:6px;background:#f3f4f6;white-space:nowrap}
.tag.better{background:#dcfce7}.tag.worse{background:#fee2e2}td>.tag{margin:0 0 4px;display:inline-block}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
svg.plot{width:100%;height:auto;border:1px solid #e5e7eb;border-radius:6px;background:#fff}
svg .t{font:600 14px system-ui,sans-serif;fill:#1f2937}svg .l{font:12px system-ui,sans-serif;fill:#374151}
svg .k{font:11px system-ui,sans-serif;fill:#6b7280}svg .g{stroke:#eef0f3}svg .a{stroke:#9ca3af}
#examples td{width:25%}.out{white-space:pre-wrap;overflow-wrap:anywhere;max-height:18em;overflow:auto;
font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}.where{color:#9ca3af;font-size:12px;margin-top:4px}
.notice{background:#fef9c3;border:1px solid #fde68a;padding:10px 14px;border-radius:6px}
"""


def render_report(eval_obj: dict | None, metrics_rows: list[dict], run_info: dict,
                  title: str | None = None, *, run_dir: str | None = None) -> str:
    """The report as one self-contained HTML document (inline CSS and SVG, nothing fetched).
    eval_obj is eval.json (None before `habit eval`), metrics_rows is metrics.jsonl, run_info is
    run.json; any of their numbers may be null."""
    ev = eval_obj or {}
    where = run_dir or ev.get("run") or "RUN"
    base = run_info.get("base") or {}
    data = run_info.get("data") or {}
    versions = run_info.get("versions") or {}
    result = run_info.get("result") or {}
    title = title or f"habit report: {Path(str(where)).name or where}"
    facts = [("run", where), ("status", run_info.get("status")), ("base model", base.get("source")),
             ("data", data.get("source") or data.get("path")),
             ("examples", f"{data['train']} train, {data['val']} validation"
              if "train" in data and "val" in data else None),
             ("template", run_info.get("template_text")),
             ("steps", result.get("steps")),
             ("steps planned", None if result else (run_info.get("plan") or {}).get("steps")),
             ("when", run_info.get("finished") or run_info.get("created")),
             ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))]
    if eval_obj:
        gen = ev.get("generation") or {}
        facts += [("evaluated on", f"{ev.get('n')} examples from {ev.get('data')}"),
                  ("generation", ", ".join(f"{k} {v}" for k, v in gen.items()))]
    parts = [f"<h1>{escape(title)}</h1>", _facts(facts), "<h2>Base vs tuned</h2>"]
    if eval_obj:
        parts.append(_summary(ev))
    else:
        parts.append(f'<p class="notice">no evaluation yet — run <code>habit eval {escape(str(where))}'
                     "</code> to compare the base and tuned models</p>")

    plots = []
    train, val = _by_step(metrics_rows, "loss"), _by_step(metrics_rows, "val_loss")
    if train or val:
        plots.append(svg_line_chart([{"name": "train loss", "points": train, "color": PALETTE[0]},
                                     {"name": "val loss", "points": val, "color": PALETTE[1],
                                      "style": "both"}],
                                    "Loss by step", "optimizer step", "loss per response token"))
    if eval_obj:
        groups = [(label, [(ev.get(s) or {}).get(k) for s in ("base", "tuned")]) for label, k in BAR_METRICS]
        plots.append(svg_bars(groups, ["base", "tuned"], "Generation metrics (held-out)"))
    gen_series = [{"name": name, "points": _by_step(metrics_rows, key), "style": "both", "color": color}
                  for name, key, color in (("stop rate", "gen_stop_rate", PALETTE[2]),
                                           ("expectation rate", "gen_expectation_rate", PALETTE[3]),
                                           ("loop rate", "gen_loop_rate", PALETTE[4]))]
    if any(s["points"] for s in gen_series[:2]):
        plots.append(svg_line_chart(gen_series, "Generation probe during training", "optimizer step",
                                    "share of probe answers", y_range=(0.0, 1.0)))
    parts.append("<h2>Plots</h2>")
    parts.append(f'<div class="plots">{"".join(plots)}</div>' if plots
                 else '<p class="notice">no training metrics logged yet</p>')

    if ev.get("examples"):
        parts += [f"<h2>Examples ({len(ev['examples'])})</h2>", _examples(ev["examples"])]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def run_report(run_dir) -> str:
    """The report of a run directory as HTML, from what it holds now (habit studio serves this)."""
    run = Path(run_dir)
    try:
        info = json.loads((run / rundir.RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HabitError(f"{run}: not a habit run (no {rundir.RUN_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HabitError(f"{run / rundir.RUN_FILE}: corrupt run file ({e})") from None
    ev = None
    if (run / rundir.EVAL_FILE).is_file():
        try:
            ev = json.loads((run / rundir.EVAL_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HabitError(f"{run / rundir.EVAL_FILE}: corrupt eval file ({e}); run habit eval again") from None
    rows = rundir.read_jsonl(run / rundir.METRICS_FILE)
    return render_report(ev, rows, info, run_dir=str(run))


def write_report(run_dir, out=None) -> Path:
    """Write the report for a run directory to `out` (default RUN/report.html); returns the path."""
    html = run_report(run_dir)
    path = Path(out) if out else Path(run_dir) / REPORT_FILE
    if path.is_dir():
        path = path / REPORT_FILE
    rundir.write_atomic(path, html)
    return path
