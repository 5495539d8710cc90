"""Big bases on a CPU: a 4-bit base (--quantize nf4), activation checkpointing, and the memory
estimate that decides and refuses before any weights load. All on the tiny random model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from habit import adapters, export, fastpath, memory, models, training
from habit.data import load_examples
from habit.errors import HabitError
from habit.settings import LoraSettings, TrainSettings

pytest.importorskip("bitsandbytes")

SMALL = dict(steps=2, lr=5e-2, batch_tokens=512, max_len=256, val_frac=0.2)


@pytest.fixture(scope="module")
def nf4_run(tiny_model, roles_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "run"
    result = training.train(load_examples(roles_csv), out, model=tiny_model,
                            lora=LoraSettings(rank=8, alpha=16),
                            settings=TrainSettings(quantize="nf4", **SMALL))
    return out, result


def test_nf4_run_trains_through_4bit_layers(nf4_run):
    import bitsandbytes as bnb

    out, result = nf4_run
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["train"]["quantize"] == "nf4" and info["plan"]["quantize"] == "nf4"
    assert info["plan"]["fast_check"] is not None  # the fast paths were checked, not skipped
    assert result.train_loss == pytest.approx(result.train_loss) and abs(result.train_loss) < 1e3
    weights = load_file(str(out / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(float(v.abs().sum()) > 0 for v in b)  # B starts at 0: every layer trained
    run = adapters.load_run(out)  # eval sees the base the adapter trained on
    layers = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and len(layers) == len(b)


def test_merge_of_an_nf4_run_goes_onto_the_full_precision_base(nf4_run, tmp_path):
    import bitsandbytes as bnb

    out, _ = nf4_run
    merged_dir = export.merge(out, tmp_path / "merged")
    merged, tok = models.load_model(str(merged_dir), dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    full = adapters.load_run(out, dtype=torch.float32, quantize="none")
    four = adapters.load_run(out, dtype=torch.float32)
    ids = torch.tensor([tok("Act as a lighthouse keeper.")["input_ids"]])
    with torch.no_grad():
        mine = merged(input_ids=ids).logits
        expected = full.model(input_ids=ids).logits
        rounded = four.model(input_ids=ids).logits
    assert (mine - expected).abs().max() < 1e-4
    assert (mine - rounded).abs().max() > 1e-3  # a 4-bit base would have given other logits


def test_nf4_without_bitsandbytes_is_one_line(monkeypatch, tiny_model, roles_csv, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(HabitError, match="bitsandbytes") as e:
        training.train(load_examples(roles_csv), tmp_path / "run", model=tiny_model,
                       settings=TrainSettings(quantize="nf4", **SMALL))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_checkpointing_gives_the_same_loss_and_lora_gradients(tiny_model, tiny_roles):
    _, tok, enc = tiny_roles
    base, _ = models.load_model(tiny_model, dtype=torch.float32)
    model = adapters.attach(base, LoraSettings(rank=8))
    model.train()
    with torch.no_grad():  # nonzero B so the gradients of A are not all zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fast = fastpath.setup(model).recomputable()  # as training takes them under checkpointing
    batch = training.plan_epoch(enc, 512, 512, seed=0, epoch=0)[0]
    found = []
    for on in (False, True):
        if on:
            adapters.checkpoint_activations(model)
        loss, _ = training.batch_loss(model, batch, tok.pad_token_id, "cpu", fast)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        found.append((float(loss.detach()), grads))
    (loss_off, g_off), (loss_on, g_on) = found
    assert model.base_model.model.is_gradient_checkpointing
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert g_on.keys() == g_off.keys() and len(g_on) > 4
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for n, g in g_off.items() if "layers.0." in n)


# --- the estimate --------------------------------------------------------------------------------

SEVEN_B = memory.Shape(linear=6_979_321_856, other=262_410_240, largest_linear=58_720_256,
                       lora=41_943_040, adapted=6_979_321_856, hidden=4096, layers=32, vocab=32000)


def test_estimate_parts_follow_the_settings():
    base = TrainSettings()
    bf16 = memory.estimate(SEVEN_B, base, 2, checkpointing=False)
    nf4 = memory.estimate(SEVEN_B, dataclasses.replace(base, quantize="nf4"), 2, checkpointing=False)
    ck = memory.estimate(SEVEN_B, base, 2, checkpointing=True)
    small = memory.estimate(SEVEN_B, dataclasses.replace(base, micro_tokens=256), 2, False)
    assert 13e9 < bf16.weights < 15.5e9 and 3.5e9 < nf4.weights < 5e9
    assert nf4.adapter == bf16.adapter and ck.weights == bf16.weights
    assert ck.activations < bf16.activations / 4
    assert small.activations == pytest.approx(bf16.activations / 4)
    assert "GB" in bf16.describe() and "\n" not in bf16.describe()


def test_auto_checkpointing_turns_on_only_when_needed():
    s = TrainSettings()  # grad_checkpointing auto
    off = memory.estimate(SEVEN_B, s, 2, checkpointing=False).total
    on = memory.estimate(SEVEN_B, s, 2, checkpointing=True).total
    assert not memory.plan(SEVEN_B, s, 2, room=off + 1).checkpointing
    assert memory.plan(SEVEN_B, s, 2, room=(on + off) / 2).checkpointing
    assert not memory.plan(SEVEN_B, dataclasses.replace(s, grad_checkpointing="off"), 2,
                           room=None).checkpointing


def test_refusal_says_what_would_fit():
    s = TrainSettings(grad_checkpointing="off")
    on = memory.estimate(SEVEN_B, s, 2, checkpointing=True).total
    with pytest.raises(HabitError, match="Would fit: --grad-checkpointing on\\.$"):
        memory.plan(SEVEN_B, s, 2, room=on + 1)
    nf4 = memory.estimate(SEVEN_B, dataclasses.replace(s, quantize="nf4"), 2, True).total
    with pytest.raises(HabitError, match="--quantize nf4") as e:
        memory.plan(SEVEN_B, TrainSettings(), 2, room=nf4 + 1)
    assert "\n" not in str(e.value)
    with pytest.raises(HabitError, match="No setting"):
        memory.plan(SEVEN_B, TrainSettings(), 2, room=1e9)


def test_shape_counts_the_tiny_model(tiny_model):
    config = models.load_config(models.resolve(tiny_model))
    s = memory.shape(config, LoraSettings(rank=8))
    base, _ = models.load_model(tiny_model)
    linear = sum(m.weight.numel() for n, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    assert s.linear == linear
    assert s.linear + s.other == sum(p.numel() for p in base.parameters())
    peft = adapters.attach(base, LoraSettings(rank=8))
    assert s.lora == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_cli_refuses_a_base_that_cannot_fit(tiny_model, roles_csv, tmp_path):
    env = {"HABIT_MEMORY_AVAILABLE": "100M", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "habit", "train", roles_csv, "--model", tiny_model,
                           "--out", str(tmp_path / "run"), "--steps", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "100M" not in errors[0] and "0.1 GB available" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_shape_counts_every_architecture(arch_model, arch):
    folder = arch_model(arch)
    s = memory.shape(models.load_config(models.resolve(folder)), LoraSettings(rank=4))
    base, _ = models.load_model(folder)
    assert s.linear + s.other == sum(p.numel() for p in base.parameters())
    peft = adapters.attach(base, LoraSettings(rank=4))
    assert s.lora == sum(p.numel() for p in peft.parameters() if p.requires_grad)
