"""`habit pairs` (pairs from a plain table) and `habit eval` on pair data, on the tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from habit import adapters, evaluate, models, pairs, preference, render, rundir, training
from habit.data import load_examples, load_preferences
from habit.errors import HabitError
from habit.settings import GenerationSettings, TrainSettings

SHORT = GenerationSettings(max_new_tokens=12)


def habit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "habit", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def sft_run(tiny_model, roles_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    training.train(load_examples(roles_csv), out, model=tiny_model,
                   settings=TrainSettings(steps=6, lr=5e-2, batch_tokens=512, max_len=256,
                                          val_frac=0.4, precision="fp32"))
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_plain_model"])
def test_pairs_from_the_base_render_as_the_table_did(model_fixture, roles_csv, tmp_path, request):
    """chosen is the table's answer, rejected the base's greedy one; the written prompt renders
    back to exactly the prompt SFT trained on (a chat user message, or the literal text)."""
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "pairs.jsonl"
    summary = pairs.make_pairs(model_dir, roles_csv, out, settings=SHORT)
    prefs = load_preferences(out)
    table = load_examples(roles_csv)
    assert summary["pairs"] == len(prefs.records) == len(table.examples)
    tok = models.load_tokenizer(models.resolve(model_dir))
    sft_template = render.choose_template(table, tok)
    template = preference.pair_template(prefs, tok, sft_template)
    assert template.kind == ("chat" if model_fixture == "tiny_model" else "text")
    model, _ = models.load_model(model_dir, dtype=models.best_dtype("auto", "cpu"))  # as make_pairs
    from habit.generation import generate

    greedy = generate(model, tok, sft_template, [render.example_prompt(e, sft_template, tok)
                                                 for e in table.examples], models.stop_ids(tok, model), SHORT)
    for record, example, gen in zip(prefs.records, table.examples, greedy):
        assert preference.record_prompt(record, template, tok) == render.example_prompt(example, sft_template, tok)
        assert render.example_answer(record.chosen, template) == example.fields["prompt"]
        assert render.example_answer(record.rejected, template) == gen.text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["source"].endswith("roles.csv:2") and rows[0]["rejected_finish"] in ("stop", "length")


def test_pairs_from_a_run_use_its_adapter_and_template(sft_run, roles_csv, tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = pairs.make_pairs(str(sft_run), roles_csv, out, settings=SHORT, n=3)
    assert summary["pairs"] + summary["same_as_chosen"] + summary["empty"] == 3
    assert summary["rejected_from"] == f"run {sft_run}"
    run = adapters.load_run(sft_run)
    prompts = [render.example_prompt(e, run.template, run.tokenizer)
               for e in load_examples(roles_csv).examples[:3]]
    from habit.generation import generate

    tuned = generate(run.model, run.tokenizer, run.template, prompts, run.stop, SHORT)
    assert [r.rejected.messages[-1].content if r.rejected.messages else r.rejected.fields["completion"]
            for r in load_preferences(out).records] == [g.text for g in tuned][: summary["pairs"]]


def test_pairs_refuse_a_bad_out(tiny_model, roles_csv, tmp_path):
    with pytest.raises(HabitError, match=r"name the file \*\.jsonl"):
        pairs.make_pairs(tiny_model, roles_csv, tmp_path / "pairs.csv")
    (tmp_path / "p.jsonl").write_text("keep\n")
    with pytest.raises(HabitError, match="already exists"):
        pairs.make_pairs(tiny_model, roles_csv, tmp_path / "p.jsonl")
    assert (tmp_path / "p.jsonl").read_text() == "keep\n"


def test_pairs_cli_json_then_dpo_from_the_sft_run_then_eval_three_columns(sft_run, roles_csv,
                                                                          tiny_model, tmp_path):
    """The tutorial's flow on the tiny model, through the CLI: pairs from the base, DPO --from the
    SFT run, eval with base, SFT and SFT+DPO side by side; the run merges like any run."""
    done = habit("pairs", tiny_model, roles_csv, "--out", "pairs.jsonl", "--max-new-tokens", "12",
                 "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pairs"] == 5
    done = habit("train", "pairs.jsonl", "--method", "dpo", "--from", sft_run, "--out", "dpo",
                 "--steps", "3", "--batch-tokens", "1024", "--max-len", "256", "--lr", "2e-2",
                 "--precision", "fp32", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = rundir.read_run(tmp_path / "dpo")
    assert info["settings"]["train"]["method"] == "dpo" and info["settings"]["train"]["from_run"] == str(sft_run)
    done = habit("eval", "dpo", "--max-new-tokens", "12", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["columns"] == ["base", "sft", "tuned"] and result["pairs"]["reference"] == "sft"
    assert result["pairs"]["n"] == 2  # the two acts the SFT run held out
    assert result["pairs"]["sft"]["reward_accuracy"] is None  # the reference against itself
    for side in ("base", "tuned"):
        assert 0 <= result["pairs"][side]["reward_accuracy"] <= 1
    for side in ("base", "sft", "tuned"):
        assert {"stop_rate", "expectation_rate", "loop_rate", "loss"} <= set(result[side])
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text())["pairs"] == result["pairs"]
    shown = habit("eval", "dpo", "--max-new-tokens", "4", cwd=tmp_path)
    assert shown.returncode == 0 and "reward accuracy" in shown.stdout and "sft" in shown.stdout
    merged = habit("merge", "dpo", "--out", "merged", "--json", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_eval_of_an_sft_run_on_pairs_uses_the_base_as_reference(sft_run, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": act, "chosen": f"I want you to act as a {act}.",
                                        "rejected": "No."}) + "\n" for act in ("Poet", "Chess Coach")))
    run = adapters.load_run(sft_run)
    result = evaluate.evaluate(run, data=str(path), n=2, settings=SHORT, save=False)
    assert result["columns"] == ["base", "tuned"] and result["pairs"]["reference"] == "base"
    assert result["pairs"]["n"] == 2 and result["pairs"]["base"]["reward_accuracy"] is None
    assert result["pairs"]["tuned"]["logps_chosen"] < 0


def test_pair_data_tells_pairs_from_plain_tables(sft_run, roles_csv, tmp_path):
    run = adapters.load_run(sft_run)
    assert pairs.pair_data(run, roles_csv) is None  # an SFT run's own table: the usual eval
    assert pairs.pair_data(run, None) is None
    path = tmp_path / "k.csv"
    path.write_text("prompt,completion,label\na,b,true\n")
    assert pairs.pair_data(run, str(path)).shape == "unpaired"
