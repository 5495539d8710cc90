"""Packed attention: the examples of a packed pass regrouped into a few length buckets, attention
causal within each example, registered with transformers as an attention implementation."""

from __future__ import annotations

from typing import Sequence

PACKED = "habit_packed"  # the attention implementation name registered with transformers
MAX_BUCKETS = 4  # attention calls per layer: examples are padded up to their bucket's longest
MATMUL_ATTENTION_MAX = 1024  # longer buckets: queries in chunks (O(length) memory, not O(length²))
QUERY_CHUNK = 512  # a long bucket's queries per chunk (BENCHMARKS.md, "Attention for long examples")


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


def causal(length: int, window: int | None, device=None, prefix: int = 0, start: int = 0, low: int = 0):
    """[length - start, prefix + length - low] bool: query i may see key j (j ≤ i, and within the
    sliding window if any). With a shared prefix, the keys are the prefix's (positions
    0..prefix-1) then the example's own, and query i sits at position prefix + i. `start` and
    `low`: only the queries from `start` and the example's own keys from `low` (one chunk)."""
    import torch

    q = torch.arange(start, length, device=device) + prefix
    k = torch.cat([torch.arange(prefix, device=device), torch.arange(low, length, device=device) + prefix])
    allowed = q[:, None] >= k[None, :]
    if window:
        allowed &= q[:, None] - k[None, :] < window
    return allowed


def additive(allowed, repeat: int, dtype):
    """A bool mask as an additive one (0 / -inf), rows repeated for grouped-query heads."""
    import torch

    add = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return add.repeat(repeat, 1)


def attend(q, k, v, mask, scale: float):
    """softmax(q·kᵀ·scale + mask)·v: queries [B, rows, D], keys and values [B, keys, D], the
    mask [rows, keys]. Two batched matmuls and a softmax."""
    import torch

    scores = torch.baddbmm(mask.expand(q.shape[0], -1, -1), q, k.transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v)


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
        key = (length, repeat, window, dtype, prefix)
        if key not in self._masks:
            self._masks[key] = additive(causal(length, window, device, prefix), repeat, dtype)
        return self._masks[key]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     habit_packing: Packing | None = None, **kwargs):
    """transformers attention interface. With `habit_packing` (passed through the model's
    forward): attention per example, bucketed, as two batched matmuls and a softmax (on a CPU
    ~4x faster than sdpa's flash kernel at these lengths, whose backward has a large fixed cost).
    Without it: plain sdpa with the model's mask (generation, caches, anything unusual)."""
    import torch
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
            out = chunked_attention(take(q, heads), keys(k, k_pre), keys(v, v_pre), pre, window, scale)
            outs.append(out.transpose(1, 2).reshape(count * length, heads, dim))
            continue
        # query heads sharing a key/value head stack along the rows: one matmul per kv head
        qb = take(q, heads).reshape(count * kv_heads, rep * length, dim)
        kb = keys(k, k_pre).reshape(count * kv_heads, pre + length, dim)
        vb = keys(v, v_pre).reshape(count * kv_heads, pre + length, dim)
        mask = habit_packing.mask(length, rep, window, query.dtype, query.device, pre)
        out = attend(qb, kb, vb, mask, scale)  # [count·kv, rep·len, D]
        outs.append(out.view(count, heads, length, dim).transpose(1, 2).reshape(count * length, heads, dim))
    outs.append(query.new_zeros(1, heads, dim))
    out = torch.cat(outs).index_select(0, habit_packing.scatter)
    return out.view(batch, width, heads, dim), None


def _chunk(q, k, v, start: int, stop: int, low: int, prefix: int, window: int | None, scale: float):
    """One chunk of queries [n, kv, rep, c, D] (own positions start..stop-1) against the keys they
    may see [n, kv, keys, D] (the prefix's, then the example's own from `low`)."""
    n, kv, rep, c, dim = q.shape
    mask = additive(causal(stop, window, q.device, prefix, start, low), rep, q.dtype)
    out = attend(q.reshape(n * kv, rep * c, dim), k.reshape(n * kv, -1, dim), v.reshape(n * kv, -1, dim), mask, scale)
    return out.view(n, kv, rep, c, dim)


def chunked_attention(query, key, value, prefix: int, window: int | None, scale: float):
    """Causal attention of long examples, [n, heads, L, D] queries against [n, kv, prefix + L, D]
    keys/values: queries in chunks of QUERY_CHUNK, each against only the keys it can see (the
    prefix, then its own causal or in-window span), its scores recomputed in the backward instead
    of kept. Memory O(chunk·L) per layer, not O(L²); about half the products of the full square
    and, with bmm's kernels, faster than sdpa's flash kernel on a CPU at these lengths
    (BENCHMARKS.md, "Attention for long examples")."""
    import torch
    from torch.utils.checkpoint import checkpoint

    n, heads, length, dim = query.shape
    kv = key.shape[1]
    q = query.view(n, kv, heads // kv, length, dim)
    keep = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    outs = []
    for start in range(0, length, QUERY_CHUNK):
        stop = min(length, start + QUERY_CHUNK)
        low = max(0, start - window + 1) if window else 0
        if prefix and low:
            k, v = (torch.cat([x[:, :, :prefix], x[:, :, prefix + low : prefix + stop]], dim=2) for x in (key, value))
        else:
            k, v = key[:, :, low : prefix + stop], value[:, :, low : prefix + stop]
        args = (q[:, :, :, start:stop], k, v, start, stop, low, prefix, window, scale)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if keep else _chunk(*args))
    return torch.cat(outs, dim=3).view(n, heads, length, dim)


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
