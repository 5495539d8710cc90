"""LoRA adapters: attach to a base, save into a run directory, load a run back onto its base."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from habit import models, rundir
from habit.errors import HabitError
from habit.render import Template
from habit.settings import LoraSettings


def attach(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules(),
        task_type="CAUSAL_LM",
    )
    try:
        # LoRA weights take the base's dtype (bf16 on most hardware): fp32 LoRA weights make peft
        # cast every layer input to fp32 and back, ~25% of a CPU step. Training keeps fp32 master
        # copies for the optimizer (training.MasterWeights), so updates stay precise.
        return get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise HabitError(f"--targets {lora.targets!r}: {models._one_line(e)}") from None


def checkpoint_activations(model) -> None:
    """Keep only each decoder layer's input for the backward and recompute the rest there.
    Non-reentrant: the reentrant kind needs an input that requires grad, which a frozen
    embedding does not give, and would silently train no LoRA weight below the first layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def save(model, folder: Path, state_dict: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) atomically.

    `state_dict` (full parameter names → tensors) overrides the model's own LoRA weights; training
    passes its fp32 master copies, so the file holds full-precision weights without touching the
    model (swapping a DDP-wrapped parameter's storage makes DDP rebuild its buckets on one rank only).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".adapter-"))
    weights = get_peft_model_state_dict(model, state_dict=state_dict)
    save_file({k: v.detach().contiguous() for k, v in weights.items()},
              str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"]
    config.base_model_name_or_path = None  # habit's run.json names the base; no stale local path
    config.save_pretrained(str(tmp))
    for name in os.listdir(tmp):
        os.replace(tmp / name, folder / name)
    os.rmdir(tmp)


def adapter_off(model, off: bool = True):
    """`with adapter_off(run.model, base):` answers as the base model when `off`, else as tuned:
    base and tuned side by side from one model load."""
    return model.disable_adapter() if off else contextlib.nullcontext()


@dataclass
class LoadedRun:
    path: Path
    info: dict  # run.json
    model: object  # PeftModel; `with model.disable_adapter():` gives the base
    tokenizer: object
    template: Template
    stop: list[int]


def load_run(run: str | Path, device: str = "cpu", dtype=None, check_hash: bool = True,
             quantize: str | None = None) -> LoadedRun:
    """Load a run's base model (as run.json names it) with the run's adapter on top.

    `quantize` (none | nf4) defaults to what the run trained on, so eval sees the base the adapter
    learned against; merging passes "none": a merge into a 4-bit base rounds the merged weights."""
    run = Path(run)
    info = rundir.read_run(run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (run / name).is_file():
            raise HabitError(f"{run}: no {name} in this run (training unfinished or failed?)")
    from peft import PeftModel  # after the checks: a wrong path should fail fast, not after torch loads
    source = models.resolve(info["base"]["source"])
    if check_hash and info["base"].get("sha256") and source.kind != "hub":
        found = models.content_hash(source)
        if found != info["base"]["sha256"]:
            raise HabitError(
                f"{run}: trained on a different '{info['base']['source']}' "
                f"(sha256 {info['base']['sha256'][:12]}…, found {found[:12]}…)"
            )
    if dtype is None:
        dtype = models.best_dtype(info["settings"]["train"].get("precision", "auto"), device)
    if quantize is None:
        quantize = info["settings"]["train"].get("quantize", "none")
    model, tokenizer = models.load_model(source, dtype=dtype, device=device, quantize=quantize)
    try:
        model = PeftModel.from_pretrained(model, str(run), is_trainable=False)
    except Exception as e:
        raise HabitError(f"{run}: cannot load the adapter ({models._one_line(e)})") from None
    model.eval()
    return LoadedRun(run, info, model, tokenizer, Template.from_dict(info["template"]),
                     models.stop_ids(tokenizer, model))
