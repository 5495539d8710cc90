"""RMSNorm with a hand-written backward: the same forward as the model's own norm (bit for bit),
its input gradient in a few fused operations instead of autograd's chain through the cast, pow,
mean, rsqrt and two products. What it buys is memory: the backward keeps the input and one
number a row, where autograd keeps an fp32 copy of the input and the normalized bf16 one (4
bytes an element less a norm: on SmolLM2 ~7% of what a pass keeps for its backward, ~1 GB a
1024-token pass on a 7B model). Speed is the same within noise (docs/speed.md).

transformers marks these norms for kernel replacement (`use_kernel_forward_from_hub`), but that
route needs the `kernels` package and a kernel repository per device; here a plain frozen norm's
forward is swapped on the instance, only inside `fused_norms`, as merged LoRA does."""

from __future__ import annotations

import contextlib

# norms whose forward is exactly: w · (x·rsqrt(mean(x²) + eps) in fp32, cast back to x's dtype).
# Gemma's (1 + w, multiplied in fp32 before the cast) is not among them.
NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})


def _norm_function():
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps: float):
            xf = x.float()
            r = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
            ctx.save_for_backward(x, weight, r)
            return weight * (xf * r).to(x.dtype)  # not in place: x.float() IS x in fp32

        @staticmethod
        def backward(ctx, dy):
            # y = w·z, z = x̂ = x·r: dx = r·(dz − x̂·mean(dz·x̂)), the cast to x's dtype taken as
            # the identity, as autograd takes it
            x, weight, r = ctx.saved_tensors
            dz = (dy * weight).float()
            xhat = x.float() * r
            m = (dz * xhat).mean(-1, keepdim=True)
            return dz.sub_(xhat.mul_(m)).mul_(r).to(x.dtype), None, None

    return RMSNorm


_RMS_NORM = None


def _fast_forward(self, x):
    import torch

    if torch.is_grad_enabled() and x.requires_grad and not self.weight.requires_grad:
        return _RMS_NORM.apply(x, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def norm_layers(model) -> tuple:
    """The model's RMSNorm layers that the fused norm may stand in for (frozen, a known class)."""
    return tuple(m for m in model.modules() if type(m).__name__ in NORM_CLASSES
                 and isinstance(getattr(m, "variance_epsilon", None), float)
                 and getattr(m, "weight", None) is not None and not m.weight.requires_grad)


@contextlib.contextmanager
def fused_norms(layers):
    """While inside, these norms take the fused backward when their input needs a gradient."""
    global _RMS_NORM
    import types

    if _RMS_NORM is None:
        _RMS_NORM = _norm_function()
    for layer in layers:
        layer.forward = types.MethodType(_fast_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
