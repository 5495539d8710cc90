"""The architectures habit supports, and what each needs: one table, read by training, merge and
GGUF export, so an architecture's quirks live here and not as `if model_type == ...` elsewhere.

A model whose `config.model_type` is not in the table is refused before any work, with the list.

The GGUF fields follow llama.cpp's converter (convert_hf_to_gguf.py) and its model loader:
- `permute_qk`: llama.cpp's `llama` rope rotates neighbouring pairs while Hugging Face's Llama code
  rotates i with i + head_dim/2, so q/k rows are reordered (see habit/export.py). Qwen, Phi-3 and
  Gemma use llama.cpp's NEOX rope, which is HF's order: no permutation.
- `norm_shift`: added to every `*norm.weight` (Gemma's RMSNorm multiplies by 1 + w; llama.cpp by w).
- `rope_types`: the `rope_parameters.rope_type` values the export can express (llama3: a
  `rope_freqs` tensor of per-frequency factors, as the converter computes it).
- `gguf_keys`: (GGUFWriter method, config attribute) pairs written when the attribute is set.
- `swa_every` / `swa_rope_theta`: what llama.cpp fixes rather than reads (gemma3: one global layer
  in every 6, local rope base 10000); a config that differs is refused instead of exported wrong.
- `scale_by_head_dim`: llama.cpp scales attention by 1/sqrt(head_dim) (gemma3 below 27B), so a
  `query_pre_attn_scalar` other than head_dim is refused.
- `swa_ignored`: llama.cpp's architecture ignores the sliding window (full attention), so the GGUF
  matches transformers only for contexts up to the window.
"""

from __future__ import annotations

from dataclasses import dataclass

from habit.errors import HabitError


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' config.model_type
    name: str  # what users call it
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool = False
    norm_shift: float = 0.0
    rope_types: tuple[str, ...] = ("default",)
    gguf_keys: tuple[tuple[str, str], ...] = ()
    swa_every: int = 0
    swa_rope_theta: float = 0.0
    scale_by_head_dim: bool = False
    swa_ignored: bool = False


ARCHS = {a.model_type: a for a in (
    Arch("llama", "Llama (1, 2, 3.x; SmolLM)", "llama", permute_qk=True, rope_types=("default", "llama3")),
    Arch("mistral", "Mistral", "llama", permute_qk=True, swa_ignored=True),
    Arch("qwen2", "Qwen2 / Qwen2.5", "qwen2"),
    Arch("qwen3", "Qwen3", "qwen3"),
    Arch("gemma3_text", "Gemma 3 (text)", "gemma3", norm_shift=1.0, swa_every=6, swa_rope_theta=10000.0,
         scale_by_head_dim=True, gguf_keys=(("add_sliding_window", "sliding_window"),
                                            ("add_final_logit_softcapping", "final_logit_softcapping"))),
    Arch("phi3", "Phi-3", "phi3", swa_ignored=True,
         gguf_keys=(("add_rope_scaling_orig_ctx_len", "original_max_position_embeddings"),)),
)}


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def lookup(config) -> Arch:
    """The table's row for a model config; a one-line error naming the supported list otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise HabitError(f"architecture '{model_type}' is not supported; supported: {supported()}")
    return ARCHS[model_type]
