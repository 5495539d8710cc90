"""Fast paths for a training step on packed rows. Each computes what the plain path computes,
and training checks that on the first batch before trusting it (training.check_fast).

- packed attention: the examples of a packed batch regrouped into a few length buckets, attention
  causal within each example. The plain path runs sdpa over whole rows with a block-diagonal
  mask, which computes every masked-out block as well (with ~4 examples a row, 3/4 of the work);
  on a CPU, sdpa's flash kernel also has a slow backward at these lengths: ~30% of a step. Here a
  bucket is two batched matmuls and a softmax. Long buckets (over 1024 tokens) attend in chunks
  of queries, each against only the keys it can see, their scores recomputed in the backward:
  memory grows with the length, not its square, and it beats sdpa's CPU kernel there too.
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
- fused RMSNorm (norm.py): the model's own norm forward, its input gradient written out, so
  the backward keeps the bf16 input instead of an fp32 copy and the normalized one (memory; the
  same speed within noise).
- head loss: cross-entropy of the lm_head in chunks of rows, its input gradient computed on the
  way. The plain path keeps bf16 logits, an fp32 copy, log-softmax and its gradient for every
  target token at once (~1 GB for 2k targets with a 49k vocabulary); here one chunk at a time.
- compiled layers (--compile, compiled.py): the decoder layers through regional torch.compile
  inside the training step, checked against these eager paths on the first batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

from habit.fastpath.attention import (MATMUL_ATTENTION_MAX, MAX_BUCKETS, MIN_SHARED_PREFIX, PACKED,
                                      Packing, buckets, causal, packed_attention, shared_prefix,
                                      use_packed_attention)
from habit.fastpath.compiled import COMPILE_MIN_STEPS, Compiled, decoder_layers
from habit.fastpath.compiled import unavailable as compile_unavailable
from habit.fastpath.head import HEAD_CHUNK, head_logprobs, head_loss, head_loss_value, plain_head
from habit.fastpath.lora import MERGED_KEEP_MAX, lora_layers, merged_lora
from habit.fastpath.norm import NORM_CLASSES, fused_norms, norm_layers

__all__ = ["FastPaths", "setup", "PACKED", "Packing", "buckets", "causal", "packed_attention",
           "shared_prefix", "use_packed_attention", "head_logprobs", "head_loss", "head_loss_value",
           "plain_head",
           "lora_layers", "merged_lora", "HEAD_CHUNK", "MATMUL_ATTENTION_MAX", "MAX_BUCKETS",
           "MERGED_KEEP_MAX", "MIN_SHARED_PREFIX", "COMPILE_MIN_STEPS", "Compiled", "decoder_layers",
           "compile_unavailable", "NORM_CLASSES", "fused_norms", "norm_layers"]


@dataclass
class FastPaths:
    """Which fast paths a training run uses (decided once, by `setup` and the training check)."""

    attention: bool = False
    lora: tuple = ()  # the LoRA layers that train merged
    head: object = None  # the lm_head module when the head loss is on
    prefix: int = 0  # leading tokens every example shares, computed once a pass (needs attention)
    norms: tuple = ()  # the RMSNorm layers that train through the fused backward

    kept: dict | None = field(default=None, repr=False, compare=False)  # see fixed_weights

    def names(self) -> list[str]:
        return [n for n, on in (("packed attention", self.attention), ("merged LoRA", bool(self.lora)),
                                ("chunked head loss", self.head is not None),
                                (f"shared prefix ({self.prefix} tokens)", bool(self.prefix)),
                                ("fused RMSNorm", bool(self.norms))) if on]

    def recomputable(self) -> "FastPaths":
        """These paths less those that swap a layer's forward only inside a pass (merged LoRA,
        fused norms): activation checkpointing recomputes the forward inside the backward,
        outside the pass's context, and would build another graph than the one it replaces."""
        return dataclasses.replace(self, lora=(), norms=())

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
    def step(self, targets, per_token: bool = False):
        """The context of one forward (and its backward) through these paths. `per_token`: the
        head returns each target's log-probability (preference losses) instead of the summed loss."""
        with contextlib.ExitStack() as stack:
            if self.lora:
                stack.enter_context(merged_lora(self.lora, self.kept))
            if self.head is not None:
                stack.enter_context((head_logprobs if per_token else head_loss)(self.head, targets))
            if self.norms:
                stack.enter_context(fused_norms(self.norms))
            yield


def setup(model, device_type: str = "cpu") -> FastPaths:
    """Every fast path the model allows on this device; training checks them against the plain path.

    Packed attention and merged LoRA were measured faster on CPUs only, so on a GPU they stay off:
    the model's own attention takes the packed rows there (flash-attention's varlen kernel where
    it is installed, models.attention_for; else sdpa with the block mask transformers builds from
    the restarting position ids), and PEFT's LoRA layers run as they are. The chunked head loss
    stays on everywhere: it is a memory saving first (no logits for every target at once)."""
    if device_type != "cpu":
        return FastPaths(head=plain_head(model))
    return FastPaths(attention=use_packed_attention(model), lora=lora_layers(model), head=plain_head(model),
                     norms=norm_layers(model))
