// habit studio's page: plain DOM code over the /api/ routes of habit/studio.py, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const COMMON = ["epochs", "steps", "lr", "rank", "alpha", "batch_tokens", "max_len", "val_frac",
                "save_every", "seed"];
const state = {options: null, file: null, dataPath: null, dataName: null, run: null, source: null,
               rows: [], summary: null, jobs: {}, drawPending: false};

// ------------------------------------------------------------------ requests and errors

class HttpError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.param = body && body.error ? body.error.param : null;
    this.body = body;
  }
}

async function api(path, {method = "GET", json, form} = {}) {
  const init = {method, headers: {}};
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  const res = await fetch(path, init);
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.text();
  if (res.status === 401 && NEEDS_KEY) {
    await askKey();
    return api(path, {method, json, form});
  }
  if (!res.ok) throw new HttpError(res.status, body);
  return body;
}

function askKey() {
  return new Promise((resolve) => {
    $("key-dialog").classList.add("on");
    $("key").focus();
    $("key-go").onclick = async () => {
      clearErrors(["key"]);
      try {
        await api("/api/session", {method: "POST", json: {key: $("key").value}});
        $("key-dialog").classList.remove("on");
        resolve();
      } catch (e) {
        showError(e, "key");
      }
    };
  });
}

// A 4xx names its field in error.param; its message goes beside that field, or beside `fallback`.
function showError(e, fallback) {
  const param = e.param && document.querySelector(`[data-err="${e.param}"]`) ? e.param : fallback;
  const el = document.querySelector(`[data-err="${param}"]`);
  if (el) el.textContent = e.message;
  else alert(e.message);
}

function clearErrors(names) {
  for (const el of document.querySelectorAll("[data-err]")) {
    if (!names || names.includes(el.dataset.err)) el.textContent = "";
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ------------------------------------------------------------------ tabs

function show(tab) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("on", b.dataset.tab === tab);
  for (const p of document.querySelectorAll("section.panel")) p.classList.toggle("on", p.id === `panel-${tab}`);
  $("model-bar").hidden = !(tab === "data" || tab === "settings");
  if (tab === "runs") refreshRuns();
  if (tab === "settings") estimateSoon();
}

// ------------------------------------------------------------------ settings

function fieldInput(f) {
  let input;
  if (f.type === "bool") {
    input = el("input", {type: "checkbox", id: `set-${f.name}`});
    input.checked = !!f.default;
  } else if (f.choices) {
    input = el("select", {id: `set-${f.name}`});
    for (const c of f.choices) input.append(el("option", {text: c}));
    input.value = f.default;
  } else {
    input = el("input", {id: `set-${f.name}`, spellcheck: "false"});
    if (f.type === "int" || f.type === "float") input.inputMode = "decimal";
    input.value = f.default === null ? "" : String(f.default);
    if (f.default === null) input.placeholder = "not set";
  }
  input.dataset.name = f.name;
  input.addEventListener("change", estimateSoon);
  const label = f.type === "bool"
    ? el("label", {class: "check"}, input, f.flag)
    : el("label", {}, f.flag, input);
  return el("div", {}, label, el("small", {class: "hint", text: f.help}),
            el("div", {class: "err", "data-err": f.name}));
}

function buildForm(options) {
  const byName = Object.fromEntries(options.settings.map((f) => [f.name, f]));
  for (const name of COMMON) if (byName[name]) $("common-fields").append(fieldInput(byName[name]));
  for (const f of options.settings) {
    if (COMMON.includes(f.name) || ["model", "template", "response"].includes(f.name)) continue;
    $("more-fields").append(fieldInput(f));
  }
  const model = byName.model;
  $("model").value = model.default;
  $("model").title = model.help;
  for (const a of options.aliases) {
    $("model-list").append(el("option", {value: a.name, label: a.installed ? "alias" : `alias (${a.install})`}));
  }
  for (const b of options.bases) {
    if (!options.aliases.some((a) => a.name === b)) $("model-list").append(el("option", {value: b, label: "used by a run here"}));
  }
}

// The settings object POST /api/runs takes: habit train's options, only those not at their default.
function settings() {
  const out = {model: $("model").value.trim()};
  for (const f of state.options.settings) {
    const input = $(`set-${f.name}`);
    if (!input) continue;
    if (f.type === "bool") {
      if (input.checked !== !!f.default) out[f.name] = input.checked;
      continue;
    }
    const value = input.value.trim();
    const fallback = f.default === null ? "" : String(f.default);
    if (value !== fallback) out[f.name] = value;
  }
  if ($("template").value.trim()) out.template = $("template").value;
  if ($("response").value) out.response = $("response").value;
  if ($("run-name").value.trim()) out.name = $("run-name").value.trim();
  return out;
}

function dataForm(extra = {}) {
  const form = new FormData();
  const s = Object.assign(settings(), extra);
  delete s.name;
  if (state.file && !s.data) form.append("file", state.file, state.file.name);
  else if (state.dataPath && !s.data) s.data = state.dataPath;
  form.append("settings", JSON.stringify(s));
  return form;
}

// ------------------------------------------------------------------ 1 data

async function checkData(extra = {}) {
  clearErrors(["data", "file", "response", "template", "model"]);
  try {
    // after the first upload the file is on the server: later checks name it instead of sending it
    const form = state.dataPath ? dataForm({data: state.dataPath, n: 3, ...extra}) : dataForm({n: 3, ...extra});
    const result = await api("/api/data", {method: "POST", form});
    state.dataPath = result.data;
    state.dataName = result.name;
    showData(result);
  } catch (e) {
    if (e.body && e.body.columns) fillColumns(e.body.columns);
    if (e.param === "response" || e.param === "template") $("data-result").hidden = false;
    showError(e, "data");
  }
}

function fillColumns(columns, chosen) {
  const select = $("response");
  const keep = chosen !== undefined ? chosen : select.value;
  select.replaceChildren(el("option", {value: "", text: "detected"}));
  for (const c of columns) select.append(el("option", {value: c, text: c}));
  select.value = columns.includes(keep) ? keep : "";
}

function showData(result) {
  const c = result.check;
  $("data-result").hidden = false;
  $("data-chosen").textContent = `data: ${result.name} (${c.examples} examples, shape ${c.shape})`;
  fillColumns(c.columns);
  if (!$("template").value) $("template").placeholder = c.prompt_format ? `detected: ${c.prompt_format}{${c.response}}` : "detected";
  const facts = [["file", c.source], ["shape", c.shape], ["columns", c.columns.join(", ")],
                 ["prompt", c.prompt_format === null ? "the chat turns" : c.prompt_format],
                 ["response", c.response === null ? "the assistant turns" : c.response],
                 ["rendered with", c.template]];
  $("shape-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: String(v)})]));
  $("warnings").replaceChildren(...result.warnings.map((w) => el("div", {class: "warn", text: w})));
  const rows = [["examples", c.examples], ["training / validation", `${c.train} / ${c.val}`],
                ["exact duplicates dropped", c.duplicates_dropped], ["tokens", c.tokens],
                ["tokens with loss", c.loss_tokens],
                ["example length (min / median / max)", `${c.length_min} / ${c.length_median} / ${c.length_max}`],
                ["longer than --max-len (dropped)", (c.too_long || []).length]];
  $("check-table").tBodies[0].replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", {text: k}), el("td", {class: "num", text: String(v)}))));
  $("preview").replaceChildren(...result.preview.map((ex) => {
    const pre = el("pre");
    for (const [text, loss] of ex.pieces) pre.append(loss ? el("mark", {text}) : document.createTextNode(text));
    return el("div", {class: "example"},
              el("div", {class: "head", text: `${ex.where} — ${ex.tokens} tokens, ${ex.loss_tokens} with loss`}), pre);
  }));
  estimateSoon();
}

// ------------------------------------------------------------------ 2 estimate and start

let estimateTimer = null;
function estimateSoon() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(estimate, 350);
}

async function estimate() {
  if (!state.options) return;
  const s = settings();
  delete s.name;
  if (state.dataPath) s.data = state.dataPath;
  clearErrors(state.options.settings.map((f) => f.name).concat(["settings", "model"]));
  try {
    const e = await api("/api/estimate", {method: "POST", json: {settings: s}});
    const parts = [el("div", {class: e.memory.fits ? "" : "err", text: (e.memory.fits ? "" : "does not fit: ") + e.memory.text})];
    if (e.steps) parts.push(el("div", {text: `${e.steps} optimizer steps on the ${e.device}`}));
    if (e.seconds !== null) {
      parts.push(el("div", {text: `about ${duration(e.seconds)} of training at ${Math.round(e.tokens_per_s)} tokens/s ` +
                                  `(measured by run ${e.measured_by} on this base), plus loading the model`}));
    } else if (state.dataPath) {
      parts.push(el("div", {class: "hint", text: "no time estimate yet: no run of this base has trained in this folder"}));
    }
    $("estimate").replaceChildren(...parts);
  } catch (e) {
    $("estimate").replaceChildren(el("span", {class: "hint", text: "no estimate: fix the field marked in red"}));
    showError(e, "settings");
  }
}

async function start() {
  clearErrors();
  if (!state.file && !state.dataPath) {
    show("data");
    document.querySelector('[data-err="data"]').textContent = "give a DATA file to train on: upload one or type its path";
    return;
  }
  const form = new FormData();
  const s = settings();
  if (state.file) form.append("file", state.file, state.file.name);
  else s.data = state.dataPath;
  form.append("settings", JSON.stringify(s));
  $("start").disabled = true;
  try {
    const {run} = await api("/api/runs", {method: "POST", form});
    $("run-name").value = "";
    openRun(run);
  } catch (e) {
    if (["data", "file", "template", "response"].includes(e.param)) show("data");
    showError(e, "general-settings");
  } finally {
    $("start").disabled = false;
  }
}

// ------------------------------------------------------------------ 3 train: one run, live

function openRun(name) {
  state.run = name;
  state.rows = [];
  $("no-run").hidden = true;
  $("run-view").hidden = false;
  $("run-title").textContent = name;
  $("answers").hidden = true;
  $("compare-state").textContent = "";
  $("ship-state").textContent = "";
  $("log").textContent = "";
  clearErrors(["run", "inputs", "n", "format"]);
  show("train");
  draw();
  watch(name);
}

function watch(name) {
  if (state.source) state.source.close();
  state.rows = [];
  // EventSource reconnects by itself and sends Last-Event-ID, the index of the last row it got
  const source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  state.source = source;
  source.onmessage = (e) => {
    state.rows[Number(e.lastEventId)] = JSON.parse(e.data);
    drawSoon();
  };
  source.addEventListener("reset", () => { state.rows = []; drawSoon(); });
  source.addEventListener("status", (e) => showSummary(JSON.parse(e.data)));
  source.addEventListener("log", (e) => {
    const log = $("log");
    log.textContent = JSON.parse(e.data).lines.join("\n");
    log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", () => { source.close(); if (state.source === source) state.source = null; });
}

function showSummary(s) {
  if (s.run !== state.run) return;
  state.summary = s;
  const badge = $("run-status");
  badge.textContent = s.status + (s.queue_position ? ` (${s.queue_position} in the queue)` : "");
  badge.className = `badge ${s.status}`;
  $("run-error").textContent = s.status === "failed" && s.error ? s.error : "";
  $("run-facts").textContent = [s.base && `base ${s.base}`, s.data && `data ${s.data}`, s.template].filter(Boolean).join(" · ");
  $("stop").disabled = !(s.status === "running" || s.status === "queued");
  $("resume").disabled = !(s.status === "stopped" || s.status === "failed");
  const done = s.status === "done" && s.adapter;
  const wasHidden = $("ship").hidden;
  $("ship").hidden = !done;
  if (done && (wasHidden || !$("report").src)) loadReport();
  showDownloads(s);
  progress();
}

function showDownloads(s) {
  const links = (s.exports || []).map((f) => el("a", {href: `/api/runs/${encodeURIComponent(s.run)}/files/${encodeURIComponent(f)}`,
                                                       download: f, text: `download ${f}`}));
  $("downloads").replaceChildren(...links);
}

function loadReport() {
  $("report").src = `/api/runs/${encodeURIComponent(state.run)}/report?t=${Date.now()}`;
}

function progress() {
  const s = state.summary;
  const steps = state.rows.filter((r) => r && "loss" in r);
  const last = steps[steps.length - 1];
  const total = (last && last.total_steps) || (s && s.total_steps) || 0;
  const step = last ? last.step : 0;
  $("bar").style.width = total ? `${Math.min(100, (100 * step) / total)}%` : "0";
  const parts = [`step ${step}${total ? " / " + total : ""}`];
  if (last) {
    parts.push(`train loss ${last.loss.toFixed(4)}`, `${Math.round(last.tokens_per_s)} tokens/s`);
    // this process's steps: elapsed_s starts again from 0 when a run resumes
    let k = steps.length - 1;
    while (k > 0 && steps[k - 1].elapsed_s <= steps[k].elapsed_s) k--;
    const perStep = last.elapsed_s / Math.max(1, last.step - steps[k].step + 1);
    if (s && s.status === "running" && total > step) parts.push(`ETA ${duration(perStep * (total - step))}`);
  }
  const vals = state.rows.filter((r) => r && "val_loss" in r);
  if (vals.length) parts.push(`val loss ${vals[vals.length - 1].val_loss.toFixed(4)}`);
  $("progress-text").replaceChildren(...parts.map((p) => el("span", {text: p})));
}

function duration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function drawSoon() {
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(() => { state.drawPending = false; draw(); progress(); });
}

// About n round tick values over [lo, hi]: 1, 2, 2.5 or 5 times a power of ten apart.
function ticks(lo, hi, n = 5, whole = false) {
  if (hi <= lo) return [lo];
  const raw = Math.max((hi - lo) / n, whole ? 1 : 0);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function label(v) {
  if (v !== 0 && Math.abs(v) < 0.01) return v.toExponential(0);
  return Math.abs(v) >= 100 || Number.isInteger(v) ? v.toFixed(0) : String(+v.toPrecision(3));
}

// Train loss (line), validation loss (dashed, points) on the left axis; learning rate on the right.
function draw() {
  const W = 860, H = 320, L = 58, R = W - 64, T = 46, B = H - 40;
  const rows = state.rows.filter(Boolean);
  const byStep = (key) => {
    const m = new Map();
    for (const r of rows) if (typeof r[key] === "number" && Number.isFinite(r[key])) m.set(r.step, r[key]);
    return [...m.entries()].sort((a, b) => a[0] - b[0]);
  };
  const train = byStep("loss"), val = byStep("val_loss"), lr = byStep("lr");
  const svg = [`<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="loss and learning rate by step" data-points="${train.length}" data-val-points="${val.length}">`,
               `<text x="12" y="22" class="t">Loss and learning rate by step</text>`];
  if (!train.length && !val.length) {
    svg.push(`<text x="${W / 2}" y="${H / 2}" text-anchor="middle" class="l">waiting for the first step…</text></svg>`);
    $("chart").innerHTML = svg.join("");
    return;
  }
  const total = (state.summary && state.summary.total_steps) || 0;
  const xs = [...train, ...val].map((p) => p[0]);
  const x0 = 0, x1 = Math.max(total, ...xs, 1);
  const ys = [...train, ...val].map((p) => p[1]);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 = Math.max(0, y0 - pad); y1 += pad;
  const lrMax = Math.max(...lr.map((p) => p[1]), 1e-12);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (R - L);
  const sy = (y) => B - ((y - y0) / (y1 - y0)) * (B - T);
  const sl = (y) => B - (y / (lrMax * 1.1)) * (B - T);
  for (const t of ticks(y0, y1)) {
    svg.push(`<line x1="${L}" x2="${R}" y1="${sy(t)}" y2="${sy(t)}" class="g"/><text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end" class="k">${label(t)}</text>`);
  }
  for (const t of ticks(x0, x1, 8, true)) {
    svg.push(`<line x1="${sx(t)}" x2="${sx(t)}" y1="${B}" y2="${B + 5}" class="a"/><text x="${sx(t)}" y="${B + 18}" text-anchor="middle" class="k">${label(t)}</text>`);
  }
  for (const t of ticks(0, lrMax * 1.1, 4)) {
    svg.push(`<text x="${R + 6}" y="${sl(t) + 4}" class="k">${label(t)}</text>`);
  }
  svg.push(`<polyline points="${L},${T} ${L},${B} ${R},${B} ${R},${T}" fill="none" class="a"/>`);
  svg.push(`<text x="${(L + R) / 2}" y="${H - 6}" text-anchor="middle" class="l">optimizer step</text>`);
  svg.push(`<text transform="translate(14 ${(T + B) / 2}) rotate(-90)" text-anchor="middle" class="l">loss per response token</text>`);
  svg.push(`<text transform="translate(${W - 8} ${(T + B) / 2}) rotate(90)" text-anchor="middle" class="l">learning rate</text>`);
  const line = (pts, scale, attrs) => pts.length > 1
    ? `<polyline points="${pts.map(([x, y]) => `${sx(x).toFixed(1)},${scale(y).toFixed(1)}`).join(" ")}" fill="none" ${attrs}/>` : "";
  svg.push(line(lr, sl, 'stroke="#9ca3af" stroke-width="1.5" stroke-dasharray="2 3"'));
  svg.push(line(train, sy, 'stroke="#2563eb" stroke-width="2" stroke-linejoin="round"'));
  if (train.length === 1) svg.push(`<circle cx="${sx(train[0][0])}" cy="${sy(train[0][1])}" r="3.5" fill="#2563eb"/>`);
  svg.push(line(val, sy, 'stroke="#ea580c" stroke-width="2" stroke-dasharray="5 4"'));
  for (const [x, y] of val) svg.push(`<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3.5" fill="#ea580c" stroke="#fff"/>`);
  const legend = [["train loss", "#2563eb"], ["val loss", "#ea580c"], ["learning rate", "#9ca3af"]];
  let lx = R - 330;
  for (const [name, color] of legend) {
    svg.push(`<rect x="${lx}" y="30" width="12" height="4" fill="${color}"/><text x="${lx + 17}" y="36" class="l">${name}</text>`);
    lx += 110;
  }
  svg.push("</svg>");
  $("chart").innerHTML = svg.join("");
}

async function stopRun() {
  clearErrors(["run"]);
  try {
    showSummary(await api(`/api/runs/${encodeURIComponent(state.run)}/stop`, {method: "POST"}));
    if (!state.source) watch(state.run);
  } catch (e) { showError(e, "run"); }
}

async function resumeRun() {
  clearErrors(["run"]);
  try {
    showSummary(await api(`/api/runs/${encodeURIComponent(state.run)}/resume`, {method: "POST"}));
    watch(state.run);
  } catch (e) { showError(e, "run"); }
}

// ------------------------------------------------------------------ ship: compare, eval, export

async function runJob(path, body, where, errorField) {
  clearErrors([errorField]);
  const run = state.run;
  let job;
  try {
    job = await api(`/api/runs/${encodeURIComponent(run)}/${path}`, {method: "POST", json: body});
  } catch (e) { showError(e, errorField); return null; }
  for (;;) {
    where.textContent = job.state === "queued" ? `${job.kind}: waiting in the queue…` : `${job.kind}: running…`;
    if (!["queued", "running"].includes(job.state)) break;
    await new Promise((r) => setTimeout(r, 700));
    job = await api(`/api/jobs/${job.job}`);
  }
  where.textContent = job.state === "done" ? `${job.kind}: done` : `${job.kind} ${job.state}: ${job.error || ""}`;
  if (job.state === "done" && run === state.run) {
    const s = await api(`/api/runs/${encodeURIComponent(run)}`);
    showSummary(s);
  }
  return job.state === "done" ? job : null;
}

async function compare() {
  const input = $("compare-input").value;
  const job = await runJob("compare", {inputs: [input], max_new_tokens: Number($("compare-tokens").value)},
                           $("compare-state"), "inputs");
  if (!job) return;
  const row = job.result[0];
  const text = (g) => g.text + (g.finish_reason === "stop" ? "" : " […]");
  $("answer-base").textContent = text(row.base);
  $("answer-tuned").textContent = text(row.tuned);
  $("answers").hidden = false;
}

async function evaluate() {
  if (await runJob("eval", {n: Number($("eval-n").value)}, $("ship-state"), "n")) loadReport();
}

async function exportRun(format) {
  await runJob("export", {format, dtype: $("export-dtype").value}, $("ship-state"), "format");
}

// ------------------------------------------------------------------ 4 runs and the queue

async function refreshRuns() {
  let runs;
  try { runs = await api("/api/runs"); } catch (e) { return; }
  const when = (t) => t ? new Date(t * 1000).toLocaleString() : "";
  const num = (x) => (typeof x === "number" ? x.toFixed(4) : "");
  $("runs-table").tBodies[0].replaceChildren(...runs.map((r) => {
    const status = el("span", {class: `badge ${r.status}`, text: r.status});
    const tr = el("tr", {"data-run": r.run}, el("td", {text: r.run}), el("td", {}, status),
                  el("td", {class: "num", text: `${r.step}${r.total_steps ? " / " + r.total_steps : ""}`}),
                  el("td", {class: "num", text: num(r.loss)}), el("td", {class: "num", text: num(r.val_loss)}),
                  el("td", {text: r.base || ""}), el("td", {text: r.data || ""}), el("td", {text: when(r.created)}));
    if (r.error) tr.title = r.error;
    tr.addEventListener("click", () => openRun(r.run));
    return tr;
  }));
}

async function refreshJobs() {
  let jobs;
  try { jobs = await api("/api/jobs"); } catch (e) { return; }
  const live = jobs.filter((j) => j.state === "queued" || j.state === "running");
  const running = live.filter((j) => j.state === "running").length;
  $("queue").textContent = live.length ? `queue: ${running} running, ${live.length - running} waiting` : "queue: idle";
  const recent = jobs.slice(-15).reverse();
  $("jobs-table").tBodies[0].replaceChildren(...recent.map((j) => el("tr", {},
    el("td", {text: j.kind}), el("td", {text: j.run}),
    el("td", {}, el("span", {class: `badge ${j.state}`, text: j.state})),
    el("td", {}, el("code", {text: j.command})))));
  if ($("panel-runs").classList.contains("on")) refreshRuns();
}

// ------------------------------------------------------------------ wiring

async function init() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("file").addEventListener("change", () => {
    state.file = $("file").files[0] || null;
    state.dataPath = null;
    $("data-path").value = "";
    $("response").value = "";
    $("template").value = "";
    if (state.file) checkData();
  });
  $("load-path").addEventListener("click", () => {
    state.file = null;
    $("file").value = "";
    state.dataPath = $("data-path").value.trim() || null;
    if (!state.dataPath) { document.querySelector('[data-err="data"]').textContent = "type a path first"; return; }
    checkData();
  });
  $("recheck").addEventListener("click", () => checkData());
  $("response").addEventListener("change", () => checkData());
  $("template").addEventListener("change", () => checkData());
  $("model").addEventListener("change", () => { if (state.dataPath) checkData(); else estimateSoon(); });
  $("to-settings").addEventListener("click", () => show("settings"));
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stopRun);
  $("resume").addEventListener("click", resumeRun);
  $("compare").addEventListener("click", compare);
  $("eval").addEventListener("click", evaluate);
  $("export-gguf").addEventListener("click", () => exportRun("gguf"));
  $("export-merged").addEventListener("click", () => exportRun("merged"));
  state.options = await api("/api/options");
  $("runs-dir").textContent = `runs folder: ${state.options.runs_dir}`;
  $("runs-dir-2").textContent = state.options.runs_dir;
  buildForm(state.options);
  refreshJobs();
  setInterval(refreshJobs, 2000);
  document.body.dataset.ready = "1";
}

init();
