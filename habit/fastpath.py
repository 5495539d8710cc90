"""Fast paths for a training step on packed rows. Each computes what the plain path computes,
and training checks that on the first batch before trusting it (training.check_fast).

- packed attention: the examples of a packed batch regrouped into a few length buckets, attention
  causal within each example. The plain path runs sdpa over whole rows with a block-diagonal
  mask, which computes every masked-out block as well (with ~4 examples a row, 3/4 of the work);
  on a CPU, sdpa's flash kernel also has a slow backward at these lengths: ~30% of a step. Here a
  bucket is two batched matmuls and a softmax; long buckets (over 1024 tokens) use sdpa.
  With it, a pass is laid out as one row (training.one_row: no room left at row ends), and a
  prefix every example shares (a chat template's system prompt: 23 of SmolLM2's ~130 tokens an
  example on the tutorial's table) is computed once a pass, every example attending to its keys
  and values: the same attention, ~20% fewer tokens through the layers.
- merged LoRA: y = x·(W + s·B·A)ᵀ in one matmul instead of x·Wᵀ + s·(x·Aᵀ)·Bᵀ. The rank-16
  matmuls are memory-bound and cost PEFT's layer ~50% over the frozen matmul on a CPU; the merge
  costs one small matmul per layer per step (FastPaths.fixed_weights keeps it for the step's
  passes; for big models the backward makes it again instead). The LoRA gradients are formed
  from x and dy directly. The merged weight rounds to the model dtype, exactly as a bf16
  merge_and_unload does.
- head loss: cross-entropy of the lm_head in chunks of rows, its input gradient computed on the
  way. The plain path keeps bf16 logits, an fp32 copy, log-softmax and its gradient for every
  target token at once (~1 GB for 2k targets with a 49k vocabulary); here one chunk at a time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Sequence

PACKED = "habit_packed"  # the attention implementation name registered with transformers
HEAD_CHUNK = 256  # rows of logits alive at once in the head loss (256-1024 measured alike on a CPU)


# --- packed attention ---------------------------------------------------------------------------

MAX_BUCKETS = 4  # attention calls per layer: examples are padded up to their bucket's longest
MATMUL_ATTENTION_MAX = 1024  # longer buckets go through sdpa (O(length) memory, not O(length²))


def buckets(lengths: Sequence[int], most: int = MAX_BUCKETS) -> list[list[int]]:
    """Split example indices, sorted by length, into at most `most` contiguous groups so that the
    padded attention area Σ count·longest² is smallest (a small dynamic programme)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = [lengths[i] for i in order]
    n = len(size)
    inf = float("inf")
    # best[k][j]: least cost of the first j examples in k groups; cut[k][j]: where the last group starts
    best = [[inf] * (n + 1) for _ in range(most + 1)]
    cut = [[0] * (n + 1) for _ in range(most + 1)]
    best[0][0] = 0.0
    for k in range(1, most + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (j - i) * size[j - 1] ** 2
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, most + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while j > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def causal(length: int, window: int | None, device=None, prefix: int = 0):
    """[length, prefix + length] bool: query i may see key j (j ≤ i, and within the sliding window
    if any). With a shared prefix, the keys are the prefix's (positions 0..prefix-1) then the
    example's own, and query i sits at position prefix + i."""
    import torch

    q = torch.arange(length, device=device) + prefix
    k = torch.cat([torch.arange(prefix, device=device), q])
    allowed = q[:, None] >= k[None, :]
    if window:
        allowed &= q[:, None] - k[None, :] < window
    return allowed


def shared_prefix(encoded) -> int:
    """How many leading tokens every example can share (0: none worth sharing). Those tokens'
    predictions must be the same everywhere and carry no loss: the prefix is the common leading
    ids minus one (the last common token predicts each example's own next token), cut before
    any example's first target. A chat template's system prompt is the usual case."""
    if len(encoded) < 2:
        return 0
    first = encoded[0].ids
    common = min(len(e) for e in encoded)
    for e in encoded[1:]:
        common = next((i for i in range(common) if e.ids[i] != first[i]), common)
    loss_free = min(next((i for i, x in enumerate(e.loss) if x), len(e)) for e in encoded)
    prefix = min(common - 1, loss_free - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


MIN_SHARED_PREFIX = 4  # shorter prefixes save less than the extra attention columns cost


class Packing:
    """Where each example of a packed batch sits, and how attention regroups them: examples in
    buckets, each padded at its end to the bucket's longest (a causal mask keeps real tokens away
    from the padding). Built once per batch, used by every layer.

    With `prefix` > 0 the batch holds a shared prefix once, as the first `prefix` tokens of row 0
    (the first length of rows[0]), and every other sequence is an example without it that attends
    to the prefix's keys and values before its own."""

    def __init__(self, rows: Sequence[Sequence[int]], width: int, device=None, prefix: int = 0):
        import torch

        starts, lengths = [], []
        for b, row in enumerate(rows):
            t = 0
            for n in row:
                starts.append(b * width + t)
                lengths.append(n)
                t += n
        self.prefix = prefix
        self.prefix_index = torch.arange(prefix, device=device)  # row 0 starts with the prefix
        self.groups = []  # (count, length, gather index, sees the prefix)
        scatter = torch.full((len(rows) * width,), -1, dtype=torch.long)  # -1 → the zero row
        offset = 0
        # the prefix (sequence 0) attends only to itself, in a bucket of its own
        examples = list(range(1 if prefix else 0, len(lengths)))
        grouped = [([0], False)] if prefix else []
        grouped += [([examples[i] for i in g], bool(prefix)) for g in buckets([lengths[i] for i in examples])]
        for group, sees in grouped:
            longest = max(lengths[i] for i in group)
            index = torch.zeros(len(group), longest, dtype=torch.long)
            for g, i in enumerate(group):
                span = torch.arange(starts[i], starts[i] + lengths[i])
                index[g, : lengths[i]] = span
                index[g, lengths[i] :] = starts[i]  # padding reads any real row; its output is dropped
                scatter[span] = offset + g * longest + torch.arange(lengths[i])
            self.groups.append((len(group), longest, index.flatten().to(device), sees))
            offset += len(group) * longest
        scatter[scatter < 0] = offset  # row-end padding: the zero row appended after the buckets
        self.scatter = scatter.to(device)
        self._masks = {}

    def mask(self, length: int, repeat: int, window: int | None, dtype, device, prefix: int = 0):
        """Additive causal mask (0 / -inf) for one bucket, rows repeated for grouped-query heads."""
        import torch

        key = (length, repeat, window, dtype, prefix)
        if key not in self._masks:
            allowed = causal(length, window, device, prefix)
            add = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            self._masks[key] = add.repeat(repeat, 1)
        return self._masks[key]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     habit_packing: Packing | None = None, **kwargs):
    """transformers attention interface. With `habit_packing` (passed through the model's
    forward): attention per example, bucketed, as two batched matmuls and a softmax (on a CPU
    ~4x faster than sdpa's flash kernel at these lengths, whose backward has a large fixed cost).
    Without it: plain sdpa with the model's mask (generation, caches, anything unusual)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if habit_packing is None or dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5

    def rows(x):  # [B, h, T, D] → [B·T, h, D]
        return x.transpose(1, 2).reshape(batch * width, x.shape[1], dim)

    q, k, v = rows(query), rows(key), rows(value)
    outs = []
    window = kwargs.get("sliding_window")
    shared = habit_packing.prefix
    k_pre = v_pre = None
    if shared:  # the prefix's keys and values, [kv, P, D], put before every example's own
        k_pre, v_pre = (x.index_select(0, habit_packing.prefix_index).transpose(0, 1) for x in (k, v))
    for count, length, index, sees in habit_packing.groups:
        pre = shared if sees else 0

        def take(x, h):  # [count, h, length, D]: one bucket's examples, padded at their ends
            return x.index_select(0, index).view(count, length, h, dim).transpose(1, 2)

        def keys(x, x_pre):  # [count, kv, pre + length, D]
            own = take(x, kv_heads)
            return torch.cat([x_pre.expand(count, -1, -1, -1), own], dim=2) if pre else own

        if length > MATMUL_ATTENTION_MAX:
            # long examples: scores for the whole bucket would take O(length²) memory per layer
            # (9 heads × 4096² in bf16 is 300 MB); sdpa's kernels keep it O(length)
            mask = causal(length, window, query.device, pre) if pre or (window and length > window) else None
            out = F.scaled_dot_product_attention(take(q, heads), keys(k, k_pre), keys(v, v_pre),
                                                 attn_mask=mask, is_causal=mask is None, scale=scale,
                                                 enable_gqa=rep > 1)
            outs.append(out.transpose(1, 2).reshape(count * length, heads, dim))
            continue
        # query heads sharing a key/value head stack along the rows: one matmul per kv head
        qb = take(q, heads).reshape(count * kv_heads, rep * length, dim)
        kb = keys(k, k_pre).reshape(count * kv_heads, pre + length, dim)
        vb = keys(v, v_pre).reshape(count * kv_heads, pre + length, dim)
        mask = habit_packing.mask(length, rep, window, query.dtype, query.device, pre)
        scores = torch.baddbmm(mask.expand(count * kv_heads, -1, -1), qb, kb.transpose(1, 2), alpha=scale)
        out = torch.bmm(torch.softmax(scores, dim=-1), vb)  # [count·kv, rep·len, D]
        outs.append(out.view(count, heads, length, dim).transpose(1, 2).reshape(count * length, heads, dim))
    outs.append(query.new_zeros(1, heads, dim))
    out = torch.cat(outs).index_select(0, habit_packing.scatter)
    return out.view(batch, width, heads, dim), None


def use_packed_attention(model) -> bool:
    """Switch a model on sdpa to PACKED (which falls back to sdpa when no Packing is passed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return config._attn_implementation == PACKED
    AttentionInterface.register(PACKED, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)  # masks as sdpa, for generation
    try:
        model.set_attn_implementation(PACKED)
    except (ValueError, AttributeError):
        return False
    return config._attn_implementation == PACKED


# --- merged LoRA --------------------------------------------------------------------------------

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


def _fast_forward(layer, kept: dict | None):
    """A forward for one PEFT LoRA Linear: merged in training when the layer is plain LoRA (one
    adapter, no dropout, no DoRA/variants, an nn.Linear base), PEFT's own forward otherwise.
    With `kept` (a dict), the merged weight is made once and reused from it."""
    import torch

    original = type(layer).forward.__get__(layer)

    def forward(x, *args, **kwargs):
        name = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
        plain = (layer.training and torch.is_grad_enabled() and name in layer.lora_A
                 and not layer.disable_adapters and not layer.merged and not args and not kwargs
                 and name not in layer.lora_variant
                 and isinstance(layer.lora_dropout[name], torch.nn.Identity)
                 and not getattr(layer, "fan_in_fan_out", False)
                 and type(layer.base_layer) is torch.nn.Linear and layer.lora_B[name].bias is None)
        base = layer.base_layer
        if not plain or x.dtype != base.weight.dtype or layer.lora_A[name].weight.dtype != x.dtype:
            return original(x, *args, **kwargs)
        a, b, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
        merged = None
        if kept is not None:
            if layer not in kept:
                with torch.no_grad():
                    kept[layer] = _merged(base.weight, a, b, scale)
            merged = kept[layer]
        return _MERGED_LORA.apply(x, base.weight, base.bias, a, b, scale, merged)

    return forward


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
    if _MERGED_LORA is None:
        _MERGED_LORA = _lora_function()
    for layer in layers:
        layer.forward = _fast_forward(layer, kept)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


# --- head loss ----------------------------------------------------------------------------------

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
    for s in range(0, hidden.shape[0], chunk):
        t = targets[s : s + chunk]
        logits = hidden[s : s + chunk] @ weight.t()
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


def _head_function():
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

    return HeadLoss


_HEAD_LOSS = None


@contextlib.contextmanager
def head_loss(head, targets, chunk: int = HEAD_CHUNK):
    """While inside, the model's lm_head returns the summed cross-entropy of its input rows
    against `targets` instead of logits: the model's `logits` output then IS the loss."""
    global _HEAD_LOSS
    import torch

    if _HEAD_LOSS is None:
        _HEAD_LOSS = _head_function()

    def forward(hidden):
        rows = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled() and rows.requires_grad:
            return _HEAD_LOSS.apply(rows, head.weight, targets, chunk)
        return head_loss_value(rows, head.weight, targets, chunk)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def plain_head(model):
    """The model's lm_head if the head loss can stand in for it: a bias-free, frozen nn.Linear."""
    import torch

    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return head


# --- choosing and checking ----------------------------------------------------------------------

@dataclass
class FastPaths:
    """Which fast paths a training run uses (decided once, by `setup` and the training check)."""

    attention: bool = False
    lora: tuple = ()  # the LoRA layers that train merged
    head: object = None  # the lm_head module when the head loss is on
    prefix: int = 0  # leading tokens every example shares, computed once a pass (needs attention)

    kept: dict | None = field(default=None, repr=False, compare=False)  # see fixed_weights

    def names(self) -> list[str]:
        return [n for n, on in (("packed attention", self.attention), ("merged LoRA", bool(self.lora)),
                                ("chunked head loss", self.head is not None),
                                (f"shared prefix ({self.prefix} tokens)", bool(self.prefix))) if on]

    @contextlib.contextmanager
    def fixed_weights(self):
        """While inside, the LoRA weights do not change (one optimizer step's passes): each
        merged weight is made once and kept for every forward and backward inside, instead of
        twice a pass. Only for models whose adapted weights fit MERGED_KEEP_MAX."""
        size = sum(layer.base_layer.weight.nbytes for layer in self.lora)
        self.kept = {} if self.lora and size <= MERGED_KEEP_MAX else None
        try:
            yield
        finally:
            self.kept = None

    @contextlib.contextmanager
    def step(self, targets):
        """The context of one forward (and its backward) through these paths."""
        with contextlib.ExitStack() as stack:
            if self.lora:
                stack.enter_context(merged_lora(self.lora, self.kept))
            if self.head is not None:
                stack.enter_context(head_loss(self.head, targets))
            yield


def setup(model) -> FastPaths:
    """Every fast path the model allows; training checks them against the plain path."""
    return FastPaths(attention=use_packed_attention(model), lora=lora_layers(model), head=plain_head(model))
