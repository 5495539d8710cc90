"""Chunked head loss: the lm_head's cross-entropy a chunk of rows at a time, its input gradient
formed on the way, so no logits tensor for every target is ever alive.

The lm_head's forward is swapped, only inside `head_loss`: transformers' causal-LM forward calls
it on the last hidden states, and this keeps that forward (and every model's own pre-head code)
as it is."""

from __future__ import annotations

import contextlib
import math

HEAD_CHUNK = 256  # rows of logits alive at once in the head loss (256-1024 measured alike on a CPU)


def head_loss_value(hidden, weight, targets, chunk: int = HEAD_CHUNK, grad=None, per_token=None):
    """The summed cross-entropy of hidden @ weightᵀ against targets, chunk by chunk. With a `grad`
    buffer (hidden's shape) it also fills in d loss / d hidden: (softmax − one-hot) @ weight, and
    with a `per_token` buffer (fp32, one a target) each token's own cross-entropy (preference
    losses need the sums per sequence, habit/preference.py).

    The softmax runs in the logits' dtype, in place, with its row sums accumulated in fp32, and
    the target column (p − 1, where p ≈ 1 needs the precision) in fp32. A bf16 logits tensor is
    then never copied to fp32: on a CPU that copy, an fp32 log-softmax and its exp took 40% of the
    head's time. The loss agrees with an fp32 log-softmax of the same logits to ~1e-5."""
    import torch

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    part = math.gcd(weight.shape[0], 128)  # row sums in slices of this many columns, then in fp32
    # one logits buffer for every chunk: a fresh chunk-sized tensor each time (tens of MB) is
    # handed back to the kernel and faulted in again, which slowed the head's forward matmul to
    # about half the speed of its backward on a CPU (BENCHMARKS.md, "Where a training step's time goes")
    buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
    for s in range(0, hidden.shape[0], chunk):
        t = targets[s : s + chunk]
        logits = torch.mm(hidden[s : s + chunk], weight.t(), out=buffer[: t.numel()])
        picked = logits.gather(1, t[:, None]).float()
        top = logits.amax(-1, keepdim=True)
        e = logits.sub_(top).exp_()  # every entry ≤ 1, the largest exactly 1
        sums = e.view(e.shape[0], -1, part).sum(-1).float().sum(-1, keepdim=True)
        lse = top.float() + sums.log()
        total += (lse - picked).sum()
        if per_token is not None:
            per_token[s : s + chunk] = (lse - picked)[:, 0]
        if grad is not None:
            probs = e.div_(sums.to(e.dtype))
            rows = torch.arange(t.numel(), device=t.device)
            probs[rows, t] = ((picked - lse).exp() - 1).to(probs.dtype)[:, 0]
            grad[s : s + chunk] = probs @ weight
    return total


def _head_functions():
    import torch

    class HeadLoss(torch.autograd.Function):
        """head_loss_value with autograd: the gradient w.r.t. hidden is formed in the forward."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            grad = torch.empty_like(hidden)
            total = head_loss_value(hidden, weight, targets, chunk, grad)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, d_total):
            (grad,) = ctx.saved_tensors
            return grad * d_total.to(grad.dtype), None, None, None

    class HeadLogprobs(torch.autograd.Function):
        """Each target's log-probability, the same way: a row's gradient depends on its own
        token alone, so the backward scales each row of the one formed in the forward."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            grad = torch.empty_like(hidden)
            nll = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
            head_loss_value(hidden, weight, targets, chunk, grad, per_token=nll)
            ctx.save_for_backward(grad)
            return -nll

        @staticmethod
        def backward(ctx, d_logp):
            (grad,) = ctx.saved_tensors
            return grad * -d_logp.to(grad.dtype)[:, None], None, None, None

    return HeadLoss, HeadLogprobs


_FUNCTIONS = None


def _logprobs_value(hidden, weight, targets, chunk: int):
    import torch

    nll = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
    head_loss_value(hidden, weight, targets, chunk, per_token=nll)
    return -nll


@contextlib.contextmanager
def _swapped_head(head, targets, chunk: int, per_token: bool):
    """While inside, the lm_head returns the summed cross-entropy of its input rows against
    `targets` (or, `per_token`, each target's log-probability) instead of logits."""
    global _FUNCTIONS
    import torch

    if _FUNCTIONS is None:
        _FUNCTIONS = _head_functions()
    function = _FUNCTIONS[1 if per_token else 0]
    value = _logprobs_value if per_token else head_loss_value

    def forward(hidden):
        rows = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled() and rows.requires_grad:
            return function.apply(rows, head.weight, targets, chunk)
        return value(rows, head.weight, targets, chunk)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def head_loss(head, targets, chunk: int = HEAD_CHUNK):
    """While inside, the model's lm_head returns the summed cross-entropy of its input rows
    against `targets` instead of logits: the model's `logits` output then IS the loss."""
    return _swapped_head(head, targets, chunk, per_token=False)


def head_logprobs(head, targets, chunk: int = HEAD_CHUNK):
    """While inside, the lm_head returns each target token's log-probability instead of logits
    (the preference losses sum them per answer, habit/preference.py)."""
    return _swapped_head(head, targets, chunk, per_token=True)


def plain_head(model):
    """The model's lm_head if the head loss can stand in for it: a bias-free, frozen nn.Linear."""
    import torch

    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return head
