"""`habit eval` on a tiny trained run: shape of the metrics object, held-out data, eval.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from habit import adapters, evaluate, training
from habit.data import load_examples
from habit.errors import HabitError
from habit.settings import GenerationSettings, TrainSettings

KEYS = {"stop_rate", "expectation_rate", "loop_rate", "similarity", "rouge_l", "loss", "perplexity",
        "length"}


@pytest.fixture(scope="module")
def run(tiny_model, roles_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    training.train(load_examples(roles_csv), out, model=tiny_model,
                   settings=TrainSettings(steps=6, lr=5e-2, batch_tokens=512, max_len=256,
                                          val_frac=0.4, eval_every=3))
    return out


def test_metrics_object_has_both_sides_and_is_saved(run):
    loaded = adapters.load_run(run)
    result = evaluate.evaluate(loaded, n=5, expect_prefix="Speak as",
                               settings=GenerationSettings(max_new_tokens=8))
    for side in ("base", "tuned"):
        assert KEYS <= set(result[side]), side
        assert 0 <= result[side]["stop_rate"] <= 1 and 0 <= result[side]["expectation_rate"] <= 1
        assert result[side]["loss"] > 0 and result[side]["perplexity"] > 1
    # the adapter was trained hard: its held-out loss differs from the base's
    assert result["tuned"]["loss"] != pytest.approx(result["base"]["loss"])
    assert result["expectation"] == {"prefix": "Speak as", "regex": None, "origin": "given"}
    assert 1 <= result["n"] == len(result["examples"]) <= 5
    ex = result["examples"][0]
    assert {"input", "reference", "base", "tuned", "base_finish", "tuned_finish"} <= set(ex)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["tuned"] == json.loads(json.dumps(result["tuned"]))


def test_held_out_is_the_validation_split_not_training_rows(run):
    loaded = adapters.load_run(run)
    train, held, origin = evaluate.held_out(loaded)
    assert "validation split" in origin and held
    assert not {e.where for e in train} & {e.where for e in held}


def test_eval_on_another_file(run, tmp_path):
    data = tmp_path / "more.csv"
    data.write_text('act,prompt\nBaker,"I want you to act as a baker."\n'
                    'Pilot,"I want you to act as a pilot."\n')
    loaded = adapters.load_run(run)
    result = evaluate.evaluate(loaded, data=str(data), n=10, save=False,
                               settings=GenerationSettings(max_new_tokens=4))
    assert [e["input"] for e in result["examples"]] == ["Baker", "Pilot"]
    assert result["expectation"]["origin"] in ("inferred from the training responses", "none")


def test_bad_regex_is_a_user_error(run):
    loaded = adapters.load_run(run)
    with pytest.raises(HabitError, match="expect-regex"):
        evaluate.evaluate(loaded, n=1, expect_regex="(", save=False)


def test_eval_every_logs_generation_metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "gen_stop_rate" in r]
    assert [r["step"] for r in probes] == [3, 6]
    assert all(0 <= r["gen_stop_rate"] <= 1 and r["gen_n"] >= 1 for r in probes)


def test_eval_cli_json(run):
    done = subprocess.run([sys.executable, "-m", "habit", "eval", str(run), "--n", "2",
                           "--max-new-tokens", "4", "--expect-regex", "act", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert KEYS <= set(result["base"]) and KEYS <= set(result["tuned"])
    assert "examples" not in result
