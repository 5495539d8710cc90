"""Regional torch.compile: every decoder layer compiled from one layer's code (PyTorch's
regional-compilation recipe), so the elementwise work between the matmuls (norms, rotary,
SwiGLU, residuals, casts) runs as a few fused loops instead of hundreds of small operators.

What stays eager: the packed attention (its buckets change shape with every pass; traced, each
new layout would recompile) and the head loss (outside the layers). The compiled code is used
only inside a training step (`active`): validation and generation keep eager layers, so no
second, no-grad variant is ever compiled. Inductor's caches live under habit's cache, so a later
run of the same model loads the compiled code instead of building it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil

# Compiling costs a fixed time up front, repaid a little every step (BENCHMARKS.md, "Regional
# torch.compile"); under this many planned steps `--compile auto` stays eager.
COMPILE_MIN_STEPS = 500


def decoder_layers(model) -> list:
    """The model's decoder layers: transformers' layers all derive GradientCheckpointingLayer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def unavailable(device_type: str) -> str | None:
    """Why compiling cannot run here, or None. Inductor builds C++ on a CPU and Triton on a GPU."""
    if device_type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++) on PATH"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
    return None


def _cache_in(folder) -> None:
    """Inductor's caches in `folder` unless the user chose a place (TORCHINDUCTOR_CACHE_DIR).
    Importing transformers already sets that variable to inductor's default (under /tmp, which
    a reboot empties), so a value equal to that default counts as not chosen."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = default_cache_dir()
    except ImportError:
        default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


class Compiled:
    """The decoder layers' compiled calls, attached only while `active`."""

    def __init__(self, model):
        import torch
        from transformers import AttentionInterface

        from habit.fastpath.attention import PACKED, packed_attention
        from habit.models import cache_dir

        _cache_in(cache_dir() / "inductor")
        # traced, each pass's bucket layout (Python ints in Packing) would be a new graph
        AttentionInterface.register(PACKED, torch.compiler.disable(packed_attention))
        self.layers = decoder_layers(model)
        self.calls = []
        for layer in self.layers:
            layer.compile(dynamic=True)  # dynamic: pass lengths vary, one graph serves them all
            self.calls.append(layer._compiled_call_impl)
            layer._compiled_call_impl = None  # nn.Module's own switch; set again inside `active`

    @contextlib.contextmanager
    def active(self):
        for layer, call in zip(self.layers, self.calls):
            layer._compiled_call_impl = call
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None

