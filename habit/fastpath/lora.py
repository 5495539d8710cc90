"""Merged LoRA: y = x·(W + s·B·A)ᵀ in one matmul, the LoRA gradients formed from x and dy.

PEFT offers no extension point that replaces the frozen matmul itself (its LoRA variants add to
the base layer's output), so a plain LoRA layer's forward is swapped on the instance, only inside
`merged_lora`, and put back on the way out."""

from __future__ import annotations

import contextlib

# Merged weights kept through a step cost one copy of every adapted weight (SmolLM2-135M: 212 MB
# in bf16) and save three of the four merges per layer a step with two passes; a 7B model's copy
# (13 GB) is not worth its memory, so above this the merge is made again where it is needed.
MERGED_KEEP_MAX = 1 << 30

def _merged(weight, lora_a, lora_b, scale: float):
    import torch

    return torch.addmm(weight, lora_b, lora_a, alpha=scale)


def _lora_function():
    import torch

    class MergedLoRA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scale, merged):
            # merged: W + s·B·A made once for the step (kept for the backward), or None: made
            # here and again in the backward, so nothing weight-sized stays alive in between
            ctx.keep = merged is not None
            ctx.save_for_backward(x, merged if ctx.keep else weight, lora_a, lora_b)
            ctx.scale = scale
            y = x @ (merged if ctx.keep else _merged(weight, lora_a, lora_b, scale)).t()
            return y if bias is None else y + bias

        @staticmethod
        def backward(ctx, dy):
            x, weight, lora_a, lora_b = ctx.saved_tensors
            s = ctx.scale
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            dx = None
            if ctx.needs_input_grad[0]:
                dx = dy @ (weight if ctx.keep else _merged(weight, lora_a, lora_b, s))
            g = dy2 @ lora_b  # [tokens, r]
            d_a = (g.t() @ x2).mul_(s)
            d_b = (dy2.t() @ (x2 @ lora_a.t())).mul_(s)
            return dx, None, None, d_a, d_b, None, None

    return MergedLoRA


_MERGED_LORA = None


def _fast_forward(self, x, *args, **kwargs):
    """The forward of a PEFT LoRA Linear inside `merged_lora`: merged in training when the layer
    is plain LoRA (one adapter, no dropout, no DoRA/variants, an nn.Linear base), PEFT's own
    forward otherwise. One function bound to every layer, its state on the layer (`_habit_kept`),
    so that torch.compile traces one layer's code for all of them (a closure per layer made it
    recompile per layer)."""
    import torch

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (self.training and torch.is_grad_enabled() and name in self.lora_A
             and not self.disable_adapters and not self.merged and not args and not kwargs
             and name not in self.lora_variant
             and isinstance(self.lora_dropout[name], torch.nn.Identity)
             and not getattr(self, "fan_in_fan_out", False)
             and type(self.base_layer) is torch.nn.Linear and self.lora_B[name].bias is None)
    base = self.base_layer
    if not plain or x.dtype != base.weight.dtype or self.lora_A[name].weight.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    kept = self.__dict__.get("_habit_kept")  # {"w": merged weight} while the LoRA weights hold
    merged = None
    if kept is not None:
        merged = kept.get("w")
        if merged is None:
            with torch.no_grad():
                merged = kept["w"] = _merged(base.weight, a, b, scale)
    return _MERGED_LORA.apply(x, base.weight, base.bias, a, b, scale, merged)


def lora_layers(model) -> tuple:
    """The PEFT LoRA Linear layers of a model."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return tuple(m for m in model.modules() if isinstance(m, LoraLinear))


@contextlib.contextmanager
def merged_lora(layers, kept: dict | None = None):
    """While inside, these LoRA layers train through the merged path (see the module docstring).
    `kept`: a dict that holds merged weights across calls while the LoRA weights stay the same
    (the caller empties it when they change)."""
    global _MERGED_LORA
    import types

    if _MERGED_LORA is None:
        _MERGED_LORA = _lora_function()
    for layer in layers:
        layer.forward = types.MethodType(_fast_forward, layer)
        if kept is not None:
            layer.__dict__["_habit_kept"] = kept.setdefault(layer, {})
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_habit_kept", None)
