"""`habit eval --tasks`: lm-evaluation-harness tasks on base and tuned (habit/tasks.py).

The numbers are checked against an independent computation on the same tiny run: each
multiple-choice answer picked by summed log-probabilities from a plain forward pass, and each
generation task answer from habit's own greedy generation.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from pathlib import Path

import pytest

from habit import generation, render, tasks
from habit.adapters import load_run
from habit.cli import main
from habit.data import load_examples
from habit.errors import HabitError
from habit.report import render_report
from habit.serve import RAW
from habit.settings import GenerationSettings, TrainSettings
from habit.training import train

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def run_dir(tiny_model, roles_csv, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tasks") / "run"
    # fp32: the independent checks below score one prompt at a time, lm-eval in padded batches;
    # a large learning rate: the tuned side scores unlike the base
    train(load_examples(roles_csv), out, model=tiny_model,
          settings=TrainSettings(steps=3, lr=5e-2, batch_tokens=512, max_len=256, val_frac=0.4,
                                 precision="fp32"))
    return str(out)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def side(run, name: str):
    return run.model.disable_adapter() if name == "base" else contextlib.nullcontext()


def test_shipped_multiple_choice_equals_a_forward_pass(run):
    """habit_mc's accuracy on each side is the share of questions whose likeliest choice (summed
    log-probabilities of ' choice' after the prompt, one plain forward pass each) is the answer."""
    import torch

    docs = [json.loads(line) for line in (tasks.SHIPPED / "habit_mc.jsonl").read_text().splitlines()]
    assert len(docs) == 30
    docs = docs[:12]  # lm-eval's limit takes the first documents
    result = tasks.evaluate(run, tasks.load(["habit_mc"], limit=12))
    mc = result["tasks"]["habit_mc"]
    assert mc["metric"] == "acc" and mc["n"] == 12 and set(mc["metrics"]) == {"acc,none", "acc_norm,none"}
    want, logliks = {}, {}
    for name in ("base", "tuned"):
        hits, logliks[name] = 0, []
        for doc in docs:
            context = f"Question: {doc['question']}\nAnswer:"
            n = len(render.prompt_ids(context, RAW, run.tokenizer))
            scores = []
            for choice in doc["choices"]:
                ids = render.prompt_ids(f"{context} {choice}", RAW, run.tokenizer)
                with torch.no_grad(), side(run, name):
                    logits = run.model(input_ids=torch.tensor([ids])).logits[0].float()
                logprobs = torch.log_softmax(logits, -1)
                scores.append(sum(float(logprobs[p - 1, ids[p]]) for p in range(n, len(ids))))
            hits += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
            logliks[name] += scores
        want[name] = hits / len(docs)
    assert logliks["base"] != pytest.approx(logliks["tuned"], abs=1e-3)  # the adapter really was off
    assert (mc["base"], mc["tuned"]) == (pytest.approx(want["base"]), pytest.approx(want["tuned"]))
    ratio = None if want["base"] == 0 else want["tuned"] / want["base"]
    assert mc["retained"] == (None if ratio is None else pytest.approx(ratio))
    assert result["retained"] == mc["retained"] and result["limit"] == 12


def greedy(run, name: str, prompts: list[str], n: int) -> list[str]:
    settings = GenerationSettings(max_new_tokens=n, repetition_penalty=1.0)
    with side(run, name):
        out = generation.generate(run.model, run.tokenizer, RAW, prompts, run.stop, settings, batch_size=1)
    return [g.text.split("\n")[0].strip() for g in out]


def test_generation_task_from_a_task_folder(run, tmp_path, monkeypatch):
    """A user's task folder (--tasks-path) with a generation task whose targets are the base's own
    greedy answers: the base scores 1.0, the tuned model the share of answers it left unchanged.
    Its data file sits next to its YAML and is found from another working directory."""
    prompts = ["Poet", "Linux Terminal", "Chess Coach", "Travel Guide", "Storyteller", "the quick"]
    base = greedy(run, "base", prompts, 6)
    tuned = greedy(run, "tuned", prompts, 6)
    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "echo.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                               for p, a in zip(prompts, base)))
    (folder / "echo.yaml").write_text(
        "task: habit_test_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: echo.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n    regexes_to_ignore: ['^\\s+', '\\s+$']\n")
    monkeypatch.chdir(tmp_path)  # not the task folder
    result = tasks.evaluate(run, tasks.load(["habit_test_echo"], [str(folder)]))
    echo = result["tasks"]["habit_test_echo"]
    assert echo["base"] == 1.0 and echo["n"] == len(prompts)
    assert echo["tuned"] == pytest.approx(sum(b == t for b, t in zip(base, tuned)) / len(prompts))
    assert echo["tuned"] < 1  # the adapter changed some answer: the tuned side really ran tuned


def test_shipped_generation_task_scores_exact_match(run):
    """habit_gen: three fixed worked examples, then the question; the greedy answer's first line,
    compared with case, punctuation and surrounding spaces ignored."""
    shots = [json.loads(line) for line in (tasks.SHIPPED / "habit_gen_shots.jsonl").read_text().splitlines()]
    docs = [json.loads(line) for line in (tasks.SHIPPED / "habit_gen.jsonl").read_text().splitlines()]
    head = "".join(f"Q: {s['question']}\nA: {s['answer']}\n\n" for s in shots)
    prompts = [f"{head}Q: {d['question']}\nA:" for d in docs]
    norm = str.maketrans("", "", string.punctuation)
    result = tasks.evaluate(run, tasks.load(["habit_gen"], limit=6))
    gen = result["tasks"]["habit_gen"]
    assert gen["metric"] == "exact_match" and gen["n"] == 6 and result["limit"] == 6
    for name in ("base", "tuned"):
        answers = greedy(run, name, prompts[:6], 16)
        want = sum(a.lower().translate(norm) == d["answer"].lower().translate(norm)
                   for a, d in zip(answers, docs)) / 6
        assert gen[name] == pytest.approx(want)


def test_eval_cli_shows_base_vs_tuned_on_the_shipped_tasks(run_dir, capsys):
    assert main(["eval", run_dir, "--n", "2", "--max-new-tokens", "4", "--tasks", "habit_mc,habit_gen",
                 "--tasks-limit", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in out.splitlines() if line.count("│") == 4}
    saved = json.loads((Path(run_dir) / "eval.json").read_text())
    cap = saved["capability"]
    assert set(cap["tasks"]) == {"habit_mc", "habit_gen"} and cap["limit"] == 5
    mc = cap["tasks"]["habit_mc"]
    label = next(k for k in rows if k.startswith("habit_mc: acc (n=5"))
    assert rows[label] == [f"{mc['base']:.3f}", f"{mc['tuned']:.3f}"]
    assert any(k.startswith("habit_gen: exact_match (n=5") for k in rows)
    retained = rows["capability retained (tuned / base, mean over tasks)"]
    assert retained[0] == "" and retained[1] == ("n/a" if cap["retained"] is None else f"{cap['retained']:.1%}")
    html = render_report(saved, [], {})
    assert re.search(r"<th>habit_mc: acc</th><td>[0-9.]+</td><td>[0-9.]+</td>", html)
    assert "<th>capability retained</th>" in html and "lm-evaluation-harness" in html


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("habit: error: ") and "\n" not in err, err
    return err


def test_task_errors(run_dir, tmp_path, capsys):
    err = one_line_error(capsys, ["eval", run_dir, "--tasks", "habit_mc,no_such_task"])
    assert "unknown task 'no_such_task'" in err and "habit_gen, habit_mc" in err
    assert "--tasks-path" in one_line_error(capsys, ["eval", run_dir, "--tasks", "habit_mc",
                                                     "--tasks-path", str(tmp_path / "nope")])
    assert "need --tasks" in one_line_error(capsys, ["eval", run_dir, "--tasks-limit", "3"])
    assert "at least one task" in one_line_error(capsys, ["eval", run_dir, "--tasks", ","])
    assert "--tasks-limit" in one_line_error(capsys, ["eval", run_dir, "--tasks", "habit_mc",
                                                      "--tasks-limit", "0"])
    # a built-in lm-eval task whose data is not on this machine (tests run with the hub offline)
    with pytest.raises(HabitError, match="cannot load the task data"):
        tasks.load(["lambada_openai"])


def test_summarize_pairs_metrics_and_groups():
    """Hand-made lm-eval result objects: the headline is the first metric; a lower-is-better
    metric keeps base / tuned; a group's aggregate stands for its members in the mean."""
    base = {"results": {"g": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                        "g_a": {"acc,none": 0.4, "acc_stderr,none": "N/A"},
                        "wiki": {"word_perplexity,none": 20.0, "bits_per_byte,none": 1.0}},
            "higher_is_better": {"wiki": {"word_perplexity": False, "bits_per_byte": False}},
            "group_subtasks": {"g": ["g_a"]}, "n-samples": {"g_a": {"effective": 7}}}
    tuned = {"results": {"g": {"acc,none": 0.45}, "g_a": {"acc,none": 0.2},
                         "wiki": {"word_perplexity,none": 25.0, "bits_per_byte,none": 1.1}}}
    s = tasks.summarize(base, tuned)
    assert s["tasks"]["g"]["retained"] == pytest.approx(0.9) and s["tasks"]["g"]["base_stderr"] == 0.1
    assert s["tasks"]["g_a"]["base_stderr"] is None and s["tasks"]["g_a"]["n"] == 7
    wiki = s["tasks"]["wiki"]
    assert wiki["metric"] == "word_perplexity" and wiki["retained"] == pytest.approx(0.8)
    assert wiki["metrics"]["bits_per_byte,none"]["retained"] == pytest.approx(1 / 1.1)
    assert s["retained"] == pytest.approx((0.9 + 0.8) / 2)  # g_a counted in g
    assert tasks.retained(0.0, 0.0) is None and tasks.retained(None, 0.3) is None
    assert tasks.parse_names(" habit_mc, ,habit_gen,") == ["habit_mc", "habit_gen"]
