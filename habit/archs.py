"""The architectures habit supports, and what each needs: one table, read by training, merge and
GGUF export, so an architecture's quirks live here and not as `if model_type == ...` elsewhere.

A model whose `config.model_type` is not in the table is refused before any work, with the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from habit.errors import HabitError


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' config.model_type
    name: str  # what users call it
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES value)


ARCHS = {a.model_type: a for a in (
    Arch("llama", "Llama (1, 2, 3.x; SmolLM)", "llama"),
    Arch("mistral", "Mistral", "llama"),
    Arch("qwen2", "Qwen2 / Qwen2.5", "qwen2"),
    Arch("qwen3", "Qwen3", "qwen3"),
    Arch("gemma3_text", "Gemma 3 (text)", "gemma3"),
    Arch("phi3", "Phi-3", "phi3"),
)}


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def lookup(config) -> Arch:
    """The table's row for a model config; a one-line error naming the supported list otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise HabitError(f"architecture '{model_type}' is not supported; supported: {supported()}")
    return ARCHS[model_type]
