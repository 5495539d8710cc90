"""Preference pairs from a plain table (`habit pairs`), and what `habit eval` reports on pairs.

`habit pairs MODEL_OR_RUN DATA --out pairs.jsonl`: chosen = the table's response, rejected = the
model's own greedy answer to the same input (batched). With the base as the model, DPO then moves
an SFT run away from exactly the base's habits (rambling, no stop, the wrong opening).

Each pair's prompt is written so that it renders as the table's example did: the user's message
for a chat template (or the earlier turns, for chat data), the literal prompt text for a text
template; preference.pair_template reads it back the same way, so the prompts DPO trains on are
byte for byte those SFT trained on and `habit serve` answers.

On pair data `habit eval` measures, for the base, the --from SFT run (when there is one) and the
tuned run, each answer's summed log-probability, and from them against the reference (the --from
run, else the base): reward accuracy (the share of pairs where the model prefers the chosen answer
over the rejected one by more than the reference does), the mean margin β·((πc − ρc) − (πr − ρr)),
and the mean log-probs of chosen and rejected answers; beside them the behaviour metrics of
evaluate.py on generations for the pairs' prompts, the chosen answers as references.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from habit import metrics, preference, render, rundir
from habit.data import PreferenceTable, load_examples, load_preferences
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings


def _is_run(source: str) -> bool:
    return Path(source, rundir.RUN_FILE).is_file()


def pair_prompt(example, template: Template, tokenizer):
    """The `prompt` cell that renders back to this example's prompt (see the module docstring)."""
    if template.kind == "text":
        return render.prompt_text(template, tokenizer, fields=example.fields)
    if example.messages:
        return [{"role": m.role, "content": m.content} for m in example.messages[:-1]]
    return render._user_message(template, example.fields, example.where)


def make_pairs(source: str, data: str, out: str | os.PathLike, template: str | None = None,
               response: str | None = None, settings: GenerationSettings = GenerationSettings(),
               n: int | None = None, batch_size: int = 16, force: bool = False,
               say: Callable[[str], None] | None = None) -> dict:
    """Write preference pairs for DATA's examples to `out` (JSONL); returns a summary."""
    from habit import adapters, models
    from habit.generation import generate

    out = Path(out)
    if out.suffix != ".jsonl":
        raise HabitError(f"{out}: pairs are written as JSON lines; name the file *.jsonl")
    if out.exists() and not force:
        raise HabitError(f"{out}: already exists; pick another --out or pass --force to replace it")
    if n is not None and n < 1:
        raise HabitError("--n must be at least 1")
    if _is_run(source):
        d = rundir.read_run(source)["data"]
        table = load_examples(data, template=template or d.get("template_arg"),
                              response=response or d.get("response_arg"))
        run = adapters.load_run(source)
        model, tokenizer, chosen_template, stop = run.model, run.tokenizer, run.template, run.stop
        what = f"run {source}"
    else:
        table = load_examples(data, template=template, response=response)
        resolved = models.resolve(source)
        model, tokenizer = models.load_model(resolved, dtype=models.best_dtype("auto", "cpu"))
        chosen_template = render.choose_template(table, tokenizer)
        stop = models.stop_ids(tokenizer, model)
        what = f"model {source}"
    examples = list(table.examples[:n] if n else table.examples)
    prompts = [render.example_prompt(e, chosen_template, tokenizer) for e in examples]
    if say:
        say(f"{len(examples)} greedy answers from the {what} ({chosen_template.describe()})")
    gens = generate(model, tokenizer, chosen_template, prompts, stop, settings, batch_size=batch_size)
    rows, same, empty, cut = [], 0, 0, 0
    for example, gen in zip(examples, gens):
        chosen = render.example_answer(example, chosen_template)
        if not gen.text.strip():
            empty += 1
            continue
        if gen.text.strip() == chosen.strip():
            same += 1  # the model already answers as the table does: nothing to prefer
            continue
        cut += gen.finish_reason == "length"
        rows.append({"prompt": pair_prompt(example, chosen_template, tokenizer), "chosen": chosen,
                     "rejected": gen.text, "rejected_finish": gen.finish_reason,
                     "source": example.where})
    if not rows:
        raise HabitError(f"{data}: no pairs: the {what} answered every input as the table does")
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"out": str(out), "pairs": len(rows), "same_as_chosen": same, "empty": empty,
            "rejected_cut_at_limit": cut, "rejected_from": what,
            "template": chosen_template.describe()}


# ---------------------------------------------------------------- eval on pairs


def pair_data(run, data: str | None) -> PreferenceTable | None:
    """The preference data `habit eval` should measure on, or None for a plain table: DATA when
    it has pair (or labelled answer) columns; without DATA, a preference run's own data."""
    from habit.data import _read

    if data:
        columns = set(_read(data).columns)
        if {"prompt", "chosen", "rejected"} <= columns or {"prompt", "completion", "label"} <= columns:
            return load_preferences(data)
        return None
    if not run.info.get("preference"):
        return None
    d = run.info["data"]
    path = d.get("path") or d.get("source")
    if not path or not os.path.exists(path):
        raise HabitError(f"{run.path}: training data {path!r} is gone; pass --data FILE")
    table = load_preferences(path)
    if table.sha256 != d.get("sha256"):
        raise HabitError(f"{path}: changed since training (sha256 differs); pass --data FILE")
    return table


@contextlib.contextmanager
def _side(model, side: str, reference_adapter: str | None):
    """The loaded run as `side`: base (adapter off), sft (the --from adapter) or tuned."""
    if side == "base":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(reference_adapter if side == "sft" else "default")
    try:
        yield
    finally:
        model.set_adapter("default")


def evaluate_pairs(run, table: PreferenceTable, data: str | None, n: int = 50,
                   expect_prefix: str | None = None, expect_regex: str | None = None,
                   settings: GenerationSettings = GenerationSettings(), save: bool = True) -> dict:
    """Base, SFT (the --from run, if any) and tuned on held-out preference records: pair metrics
    and behaviour metrics side by side. Saved as eval.json, a superset of evaluate.evaluate's."""
    import torch

    from habit import evaluate as ev
    from habit.generation import generate

    pref = run.info.get("preference") or {}
    s = run.info["settings"]["train"]
    method = s.get("method", "sft")
    from_run = pref.get("from")
    from_info = rundir.read_run(from_run) if from_run and _is_run(from_run) else None
    template = preference.pair_template(table, run.tokenizer, run.template)
    # pairs stay pairs here, whatever the method: a KTO run trained on each answer alone, but its
    # held-out answers are whole pairs (both answers of a prompt fall on one side of the split)
    shape = "dpo" if table.shape == "pairs" else "kto"
    if data:  # a file given: all of it is held out
        train_r, records = [], list(table.records)
    else:
        train_r, records = preference.run_split(table, shape, s["val_frac"], s["seed"], from_info,
                                                template, run.tokenizer)
        if not records:
            raise HabitError(f"{run.path}: the run has no validation records (--val-frac 0); "
                             "pass --data FILE")
    units, _ = preference.encode_units(records, template, run.tokenizer, run.stop, s["max_len"])
    if not units:
        raise HabitError(f"{data or run.path}: every held-out record is longer than --max-len {s['max_len']}")
    sides = ["base"] + (["sft"] if from_info else []) + ["tuned"]
    if from_info:
        run.model.load_adapter(from_run, adapter_name="sft", is_trainable=False)
    reference = "sft" if from_info else "base"
    width = preference.row_width(units)
    batches = preference.plan_units(units, width, s["batch_tokens"], 0, 0, shuffle=False)
    logps = {}
    run.model.eval()
    for side in sides:
        values = torch.zeros(len(units), 2, dtype=torch.float64)
        counts = torch.zeros(len(units), 2, dtype=torch.long)
        with _side(run.model, side, "sft"), torch.no_grad():
            for batch in batches:
                found, sums, n_tokens = preference.sequence_logprobs(
                    run.model, batch, run.tokenizer.pad_token_id, run.model.device)
                for x, v, k in zip(found, sums.double().cpu(), n_tokens.cpu()):
                    values[x.unit, x.column], counts[x.unit, x.column] = v, k
        logps[side] = values
    paired = table.shape == "pairs"
    beta = pref.get("beta") or preference.BETA["dpo"]
    roles = [u.sides[0].role for u in units]
    pair_rows = {side: _pair_metrics(logps[side], logps[reference], counts, roles, beta, paired,
                                     side != reference) for side in sides}

    chosen = [r for r in records if r.rejected is not None or r.label][:n]
    prompts = [preference.record_prompt(r, template, run.tokenizer) for r in chosen]
    refs = [render.example_answer(r.chosen, template) for r in chosen]
    labels = [_label(r) for r in chosen]
    known = [r.chosen for r in train_r if r.rejected is not None or r.label] or [r.chosen for r in chosen]
    guess = metrics.common_prefix([render.example_answer(e, template) for e in known],
                                  min_share=metrics.PREFIX_SHARE)
    expect = (ev.expectation([], run, expect_prefix, expect_regex) if expect_prefix or expect_regex
              else ev.Expectation(guess, None, "inferred from the chosen answers" if guess else "none"))
    outputs = {}
    for side in sides:
        with _side(run.model, side, "sft"):
            outputs[side] = generate(run.model, run.tokenizer, template, prompts, run.stop,
                                     settings, labels)
    vectors = ev.embed(refs + [g.text for side in sides for g in outputs[side]])
    ref_tokens = [len(run.tokenizer(r, add_special_tokens=False).input_ids) for r in refs]
    out: dict = {"run": str(run.path), "data": data or f"{run.info['data'].get('path')} (validation split)",
                 "n": len(chosen), "expectation": expect.__dict__, "generation": settings.__dict__,
                 "columns": sides}
    desirable = [k for k, role in enumerate(roles) if role in ("chosen", "desirable")]
    for k, side in enumerate(sides):
        gens = outputs[side]
        sims = None
        if vectors is not None:
            offset = len(refs) * (k + 1)
            sims = [metrics.cosine(vectors[offset + i], vectors[i]) for i in range(len(refs))]
        chosen_loss = (-float(logps[side][desirable, 0].sum()) / max(1, int(counts[desirable, 0].sum())))
        out[side] = ev.score([g.text for g in gens], [g.finish_reason for g in gens], refs, expect,
                             [g.tokens for g in gens], sims, chosen_loss)
    out["reference"] = {"length": metrics.spread(ref_tokens)}
    out["similarity_model"] = "all-MiniLM-L6-v2" if vectors is not None else None
    out["pairs"] = {"n": len(units), "reference": reference, "beta": beta, "method": method,
                    **{side: pair_rows[side] for side in sides}}
    out["examples"] = [
        {"input": labels[i], "reference": refs[i], "where": chosen[i].where,
         **{key: value for side in sides for key, value in
            ((side, outputs[side][i].text), (f"{side}_finish", outputs[side][i].finish_reason))}}
        for i in range(len(chosen))]
    if save:
        rundir.write_json(Path(run.path) / rundir.EVAL_FILE, out)
    return out


def _pair_metrics(policy, reference, counts, roles: Sequence[str], beta: float, paired: bool,
                  compared: bool) -> dict:
    """Pair metrics of one model's log-probs against the reference's ([units, 2] each)."""
    reward = (policy - reference) * beta  # the implicit reward of each answer
    if paired:
        margin = reward[:, 0] - reward[:, 1]
        row = {"reward_accuracy": float((margin > 0).double().mean()) if compared else None,
               "margin": float(margin.mean()) if compared else None,
               "logps_chosen": float(policy[:, 0].mean()), "logps_rejected": float(policy[:, 1].mean()),
               "logps_per_token_chosen": float(policy[:, 0].sum() / counts[:, 0].sum().clamp(min=1)),
               "logps_per_token_rejected": float(policy[:, 1].sum() / counts[:, 1].sum().clamp(min=1))}
        return row
    good = [k for k, role in enumerate(roles) if role == "desirable"]
    bad = [k for k, role in enumerate(roles) if role == "undesirable"]
    mean = lambda idx, x: float(x[idx].mean()) if idx else None
    return {"rewards_desirable": mean(good, reward[:, 0]) if compared else None,
            "rewards_undesirable": mean(bad, reward[:, 0]) if compared else None,
            "logps_desirable": mean(good, policy[:, 0]), "logps_undesirable": mean(bad, policy[:, 0])}


def _label(record) -> str:
    example = record.chosen
    if example.messages:
        user = [m.content for m in example.messages if m.role == "user"]
        return user[-1] if user else record.where
    return example.fields.get("prompt") or record.where
