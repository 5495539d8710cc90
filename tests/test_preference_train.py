"""Preference training on the tiny model: rendering and packing of pairs, per-answer log-probs,
each loss against a hand computation on a toy batch, the frozen reference, SFT → DPO --from,
KTO and SimPO on the same data, resume, the NaN stop and two processes against one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from habit import adapters, models, preference, render, rundir, training
from habit.data import Example, load_examples, load_preferences
from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings
from test_distributed import launch, needs_torchrun

PAIRS = [
    ("Lighthouse Keeper", "Speak as the keeper of a lonely lighthouse.", "Sure! Here is a story."),
    ("Chess Coach", "Play the part of a calm chess coach.", "the quick brown fox jumps"),
    ("Poet", "I want you to act as a poet.", "No."),
    ("Travel Guide", "I want you to act as a travel guide.", "Rome Rome Rome Rome"),
    ("Storyteller", "I want you to act as a storyteller.", "Once upon a time, the end."),
    ("Linux Terminal", "I want you to act as a linux terminal.", "$ ls"),
]
SMALL = dict(batch_tokens=512, max_len=256, lr=2e-2, precision="fp32")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in PAIRS), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def loaded(tiny_model, pairs_file):
    """(LoRA model with small random B, tokenizer, pair template, units) in fp32."""
    model, tok = models.load_model(tiny_model, dtype=torch.float32)
    table = load_preferences(pairs_file)
    template = preference.pair_template(table, tok)
    units, _ = preference.encode_units(table.records, template, tok, models.stop_ids(tok, model), 256)
    model = adapters.attach(model, LoraSettings())
    with torch.no_grad():  # a fresh adapter has B = 0: policy and base would be the same model
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok, template, units


def one_by_one(model, side) -> float:
    """An answer's summed log-prob, by hand: the model on this sequence alone, full logits."""
    ids = torch.tensor([side.ids])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    return sum(float(logp[t - 1, side.ids[t]]) for t in range(1, len(side.ids)) if side.loss[t])


def test_answers_render_as_sft_examples(loaded, tiny_model):
    """A pair's answers are SFT examples of the same prompt: same ids, same loss mask, EOS last."""
    _, tok, _, units = loaded
    stop = models.stop_ids(tok)
    sft = render.encode(Example({"act": "Lighthouse Keeper", "prompt": PAIRS[0][1]}),
                        render.Template("chat", "{act}", "prompt"), tok, stop)
    chosen = units[0].sides[0]
    assert (chosen.ids, chosen.loss) == (sft.ids, sft.loss)
    for side in units[0].sides:
        last = max(k for k, lossy in enumerate(side.loss) if lossy)
        assert side.ids[last] == tok.eos_token_id
    assert [s.role for s in units[0].sides] == ["chosen", "rejected"]


def test_a_pair_never_splits_across_rows_passes_or_processes(loaded):
    _, _, _, units = loaded
    for width, micro in ((preference.row_width(units), 512), (512, 1024)):
        for step in preference.plan_units(units, width, micro, seed=0, epoch=1):
            for world in (1, 2):
                for rank in range(world):
                    for batch in training.share(step, rank, world, grad_accum=2):
                        for part in training.passes(batch, 64):
                            for row in part.rows:
                                found = [s.unit for s in row]
                                assert all(found.count(u) == 2 for u in found)
    plan = preference.plan_units(units, 512, 1024, 0, 0)
    assert sorted(s.unit for b in plan for r in b.rows for s in r) == sorted([u for u in range(6)] * 2)


def test_packed_sequence_logprobs_equal_each_answer_alone(loaded):
    model, tok, _, units = loaded
    batch = preference.plan_units(units, 512, 1024, 0, 0)[0]
    assert len(batch.rows[0]) >= 4, "the test needs rows holding several answers"
    with torch.no_grad():
        sides, sums, counts = preference.sequence_logprobs(model, batch, tok.pad_token_id, "cpu")
    for side, value, count in zip(sides, sums.tolist(), counts.tolist()):
        assert value == pytest.approx(one_by_one(model, side), abs=1e-4)
        assert count == sum(side.loss[1:])


def test_fast_paths_give_the_plain_log_probs_and_gradients(loaded):
    """Packed attention, merged LoRA and the chunked head (per token here) against the plain path,
    through the same check a training run makes."""
    from habit import fastpath

    model, tok, _, units = loaded
    fast = fastpath.setup(model)
    assert fast.attention and fast.lora and fast.head is not None
    batch = preference.plan_units(units, 512, 1024, 0, 0)[0]
    agreed, diff = training.check_fast(model, batch, tok.pad_token_id, "cpu", fast, preference.logprob_loss)
    assert agreed and diff < 1e-4, diff
    with torch.no_grad():
        plain = preference.sequence_logprobs(model, batch, tok.pad_token_id, "cpu")[1]
        quick = preference.sequence_logprobs(model, batch, tok.pad_token_id, "cpu", fast)[1]
    torch.testing.assert_close(quick, plain, atol=1e-4, rtol=1e-5)


def test_a_shared_system_prompt_is_computed_once_and_changes_no_log_prob(loaded, tmp_path):
    """Chat pairs with one system prompt: the packed path holds it once a pass (fastpath's shared
    prefix); every answer's log-prob is still its own."""
    import dataclasses

    from habit import fastpath

    model, tok, _, _ = loaded
    system = {"role": "system", "content": "You are a travel guide. Answer like a poet."}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": [system, {"role": "user", "content": p}],
                                        "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    table = load_preferences(str(path))
    template = preference.pair_template(table, tok)
    assert template == render.Template("chat", None, None)
    units, _ = preference.encode_units(table.records, template, tok, models.stop_ids(tok), 256)
    prefix = fastpath.shared_prefix([s for u in units for s in u.sides])
    assert prefix >= fastpath.MIN_SHARED_PREFIX
    fast = dataclasses.replace(fastpath.setup(model), prefix=prefix)
    batch = preference.plan_units(units, 512, 1024, 0, 0)[0]
    agreed, diff = training.check_fast(model, batch, tok.pad_token_id, "cpu", fast, preference.logprob_loss)
    assert agreed and diff < 1e-4, diff
    with torch.no_grad():
        sides, sums, _ = preference.sequence_logprobs(model, batch, tok.pad_token_id, "cpu", fast)
    for side, value in zip(sides, sums.tolist()):
        assert value == pytest.approx(one_by_one(model, side), abs=1e-3)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo", "kto"])
def test_each_loss_on_a_toy_batch_equals_the_hand_computed_value(loaded, method):
    """Two pairs in one packed pass; the expected value from each answer's log-prob computed alone
    and the paper's formula in scalar math (KTO: each answer its own record, a given z0)."""
    model, tok, _, units = loaded
    pick = units[:2]
    if method == "kto":  # the same answers as four unpaired records
        roles = ["desirable", "undesirable"]
        pick = [preference.Unit((preference.Side(s.ids, s.loss, s.where, 2 * u.sides[0].unit + k,
                                                 roles[k]),)) for u in pick for k, s in enumerate(u.sides)]
    batch = preference.plan_units(pick, 512, 1024, 0, 0, shuffle=False)[0]
    n = max(s.unit for u in pick for s in u.sides) + 1
    ref = torch.tensor([[-40.0 - 3 * i, -30.0 - 2 * i] for i in range(n)], dtype=torch.float64)
    beta = preference.BETA[method]
    with torch.no_grad():
        loss, count, _ = preference.Loss(method, beta, ref).pass_loss(
            model, batch, tok.pad_token_id, "cpu", z0=0.25)
    alone = {(s.unit, s.role): one_by_one(model, s) for u in pick for s in u.sides}
    tokens = {(s.unit, s.role): sum(s.loss[1:]) for u in pick for s in u.sides}
    expected = []
    if method == "kto":
        for (u, role), pi in alone.items():
            r = pi - float(ref[u, 0])
            expected.append(1 - sigmoid(beta * (r - 0.25)) if role == "desirable"
                            else 1 - sigmoid(beta * (0.25 - r)))
    for u in sorted({u for u, _ in alone}) if method != "kto" else []:
        c, r = alone[(u, "chosen")], alone[(u, "rejected")]
        nc, nr = tokens[(u, "chosen")], tokens[(u, "rejected")]
        if method == "dpo":
            z = beta * ((c - float(ref[u, 0])) - (r - float(ref[u, 1])))
            expected.append(-math.log(sigmoid(z)))
        elif method == "simpo":
            expected.append(-math.log(sigmoid(beta * (c / nc - r / nr) - 0.5)))
        else:
            odds = lambda m: m - math.log(1 - math.exp(m))
            expected.append(-c / nc - beta * math.log(sigmoid(odds(c / nc) - odds(r / nr))))
    assert count == len(expected)
    assert float(loss) == pytest.approx(sum(expected), rel=1e-5)


def train(data, out, method, model, **kw):
    settings = TrainSettings(method=method, **{**SMALL, "steps": 4, "val_frac": 0.34, **kw})
    return training.train(load_preferences(data), out, model=model, settings=settings)


def step_rows(run: Path) -> list[dict]:
    return [r for r in rundir.read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def dpo_run(tiny_model, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    train(pairs_file, out, "dpo", tiny_model, steps=6, save_every=3, keep_checkpoints=3)
    return out


def test_dpo_run_records_its_method_and_starts_at_log_2(dpo_run):
    info = rundir.read_run(dpo_run)
    assert info["settings"]["train"]["method"] == "dpo" and info["status"] == "done"
    assert info["preference"]["method"] == "dpo" and info["preference"]["beta"] == 0.1
    assert info["preference"]["from"] is None
    assert info["preference"]["reference"] == "the base (adapter off)"
    assert info["data"]["shape"] == "pairs" and info["data"]["train"] + info["data"]["val"] == 6
    rows = step_rows(dpo_run)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter is the reference
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_accuracy"] == 1.0
    assert info["plan"]["fast_paths"]  # checked and used, as for SFT


def test_reference_log_probs_are_the_base_and_do_not_change_during_training(dpo_run, tiny_model, pairs_file):
    """The cache written before step 1 equals the base's log-probs recomputed after training
    (adapter off), while the trained adapter's log-probs moved away from them."""
    saved = torch.load(dpo_run / preference.REFERENCE_FILE, weights_only=True)["logps"]
    run = adapters.load_run(dpo_run, dtype=torch.float32)
    table = load_preferences(pairs_file)
    template = preference.pair_template(table, run.tokenizer, run.template)
    train_r, val_r = preference.run_split(table, "dpo", 0.34, 0, None, template, run.tokenizer)
    units = preference.encode_units(train_r, template, run.tokenizer, run.stop, 256)[0]
    units += preference.encode_units(val_r, template, run.tokenizer, run.stop, 256, start=len(units))[0]
    batches = preference.plan_units(units, preference.row_width(units), 1024, 0, 0, shuffle=False)
    base = preference.reference_logprobs(run.model, units, batches[0].width, 1024,
                                         run.tokenizer.pad_token_id, "cpu", adapter_off=True)
    tuned = preference.reference_logprobs(run.model, units, batches[0].width, 1024,
                                          run.tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(saved, base, atol=1e-3, rtol=1e-5)
    assert float((tuned - saved).abs().max()) > 1.0


def test_resumed_dpo_run_matches_the_uninterrupted_one(dpo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dpo_run, run)
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    (run / "adapter_model.safetensors").unlink()
    training.resume(run)
    assert [r["loss"] for r in step_rows(run)] == pytest.approx([r["loss"] for r in step_rows(dpo_run)], rel=1e-5)
    a, b = load_file(run / "adapter_model.safetensors"), load_file(dpo_run / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_a_changed_reference_cache_is_refused_on_resume(dpo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dpo_run, run)
    torch.save({"digest": "other", "logps": torch.zeros(1, 2)}, run / preference.REFERENCE_FILE)
    with pytest.raises(HabitError, match="computed for other answers"):
        training.resume(run)


@pytest.mark.parametrize("method", ["kto", "simpo"])
def test_kto_and_simpo_train_on_the_same_pairs(method, tiny_model, pairs_file, tmp_path):
    result = train(pairs_file, tmp_path / "run", method, tiny_model)
    info = rundir.read_run(tmp_path / "run")
    assert info["preference"]["method"] == method and info["preference"]["beta"] == preference.BETA[method]
    assert (tmp_path / "run" / preference.REFERENCE_FILE).is_file() == (method == "kto")
    rows = step_rows(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] and result.steps == 4
    if method == "kto":  # pairs become one desirable and one undesirable record each
        assert info["data"]["train"] + info["data"]["val"] == 12
        assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - σ(0) at the reference
        assert rows[-1]["rewards_desirable"] > rows[-1]["rewards_undesirable"]


def test_kto_reads_unpaired_labelled_answers(tiny_model, tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\n" + "".join(
        f'"{p}","{c}",true\n"{p}","{r}",false\n' for p, c, r in PAIRS), encoding="utf-8")
    train(str(path), tmp_path / "run", "kto", tiny_model, steps=2)
    assert rundir.read_run(tmp_path / "run")["data"]["shape"] == "unpaired"


def test_sft_then_dpo_from_the_run(tiny_model, roles_csv, tmp_path):
    """SFT run → pairs whose prompts are its table's → DPO --from it: the adapter starts as the SFT
    one (step 1 at log 2: policy = reference), and the run carries the SFT run's template, LoRA
    shape and split (prompts SFT held out stay held out)."""
    sft = tmp_path / "sft"
    training.train(load_examples(roles_csv), sft, model=tiny_model,
                   lora=LoraSettings(rank=4, alpha=8),
                   settings=TrainSettings(steps=4, batch_tokens=512, max_len=256, val_frac=0.4, lr=5e-2,
                                          precision="fp32"))
    table = load_examples(roles_csv)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.fields["act"], "chosen": e.fields["prompt"],
                                        "rejected": "Sure! " + e.fields["act"]}) + "\n"
                            for e in table.examples), encoding="utf-8")
    out = tmp_path / "dpo"
    train(str(path), out, "dpo", tiny_model, from_run=str(sft), steps=3, val_frac=0.1)
    info, sft_info = rundir.read_run(out), rundir.read_run(sft)
    assert info["preference"]["from"] == str(sft.resolve())
    assert info["preference"]["reference"] == "the --from run's adapter, frozen"
    assert info["template"] == sft_info["template"] and info["settings"]["lora"]["rank"] == 4
    assert info["data"]["val"] == sft_info["data"]["val"] == 2
    assert step_rows(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # the cache holds the SFT adapter's log-probs (frozen), not the base's
    saved = torch.load(out / preference.REFERENCE_FILE, weights_only=True)["logps"]
    run = adapters.load_run(sft, dtype=torch.float32)
    prefs = load_preferences(str(path))
    template = preference.pair_template(prefs, run.tokenizer, run.template)
    train_r, val_r = preference.run_split(prefs, "dpo", 0.1, 0, sft_info, template, run.tokenizer)
    units = preference.encode_units(train_r, template, run.tokenizer, run.stop, 256)[0]
    units += preference.encode_units(val_r, template, run.tokenizer, run.stop, 256, start=len(units))[0]
    width, pad = preference.row_width(units), run.tokenizer.pad_token_id
    with_sft = preference.reference_logprobs(run.model, units, width, 1024, pad, "cpu")
    base = preference.reference_logprobs(run.model, units, width, 1024, pad, "cpu", adapter_off=True)
    torch.testing.assert_close(saved, with_sft, atol=1e-3, rtol=1e-5)
    assert float((saved - base).abs().max()) > 1.0
    assert adapters.load_run(out).model.active_adapter == "default"  # a normal PEFT adapter
    with pytest.raises(HabitError, match="leave --model out"):
        training.train(load_preferences(str(path)), tmp_path / "x", model="smollm2-360m",
                       settings=TrainSettings(method="dpo", from_run=str(sft), **SMALL))


def test_nan_loss_stops_a_preference_run(tiny_model, pairs_file, tmp_path, monkeypatch):
    real = preference.Loss.pass_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, n, stats = real(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), n, stats

    monkeypatch.setattr(preference.Loss, "pass_loss", poisoned)
    with pytest.raises(HabitError, match=r"step 2: the loss or a gradient is not finite"):
        train(pairs_file, tmp_path / "run", "dpo", tiny_model, val_frac=0.0, save_every=1,
              batch_tokens=2048)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]


@pytest.mark.parametrize("table, method, needle", [
    ("sft", "dpo", "trains on preference data: columns prompt, chosen, rejected"),
    ("pairs", "sft", "preference data; pick a loss with --method"),
    ("kto", "dpo", "rows with a label and no pair train with --method kto"),
])
def test_data_and_method_must_agree(table, method, needle, roles_csv, pairs_file, tiny_model, tmp_path):
    kto = tmp_path / "k.csv"
    kto.write_text("prompt,completion,label\na,b,true\nc,d,false\n", encoding="utf-8")
    data = {"sft": lambda: load_examples(roles_csv), "pairs": lambda: load_preferences(pairs_file),
            "kto": lambda: load_preferences(str(kto))}[table]()
    with pytest.raises(HabitError, match=needle):
        training.train(data, tmp_path / "run", model=tiny_model, settings=TrainSettings(method=method, **SMALL))
    assert not (tmp_path / "run").exists()


def test_settings_check_method_beta_and_from():
    with pytest.raises(HabitError, match="--method must be"):
        TrainSettings(method="rlhf")
    with pytest.raises(HabitError, match="--beta must be positive"):
        TrainSettings(method="dpo", beta=0)
    with pytest.raises(HabitError, match="--from continues a run with a preference loss"):
        TrainSettings(from_run="runs/x")


@needs_torchrun
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_processes_take_the_same_preference_steps_as_one(method, arch_model, pairs_file, tmp_path):
    """Each step's rows split between two processes, the loss divided by the step's record count
    over both, KTO's reference point summed over both: the same losses and adapter. A step is 3
    rows here and each epoch's last step 1 row, which leaves the second process idle."""
    args = [pairs_file, "--model", arch_model("llama"), "--method", method, "--steps", "4",
            "--batch-tokens", "384", "--max-len", "256", "--lr", "2e-2", "--precision", "fp32",
            "--val-frac", "0"]
    launch(1, args + ["--out", "one"], tmp_path)
    launch(2, args + ["--out", "two"], tmp_path)
    curves = [[r["loss"] for r in step_rows(tmp_path / name)] for name in ("one", "two")]
    assert len(curves[0]) == 4 and curves[1] == pytest.approx(curves[0], rel=1e-4)
    plans = [rundir.read_run(tmp_path / name)["plan"] for name in ("one", "two")]
    assert plans[1]["processes"] == 2 and plans[1]["steps_per_epoch"] == 2
    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    for k in one:
        rel = float((one[k] - two[k]).norm() / one[k].norm().clamp_min(1e-12))
        assert rel <= 1e-3, (k, rel)
