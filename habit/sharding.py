"""FSDP2 (torch.distributed.fsdp.fully_shard) for `--shard fsdp`: the base and the adapter split
across processes, each decoder layer gathered only while it computes.

Why habit's own wrapping and not accelerate's FSDP plugin: accelerate enables the plugin only for
accelerator devices (never for CPU processes), while these few lines run on gloo (CPU) and NCCL
alike, so the sharded path is the one CI tests.
The design FSDP expects replaces the DDP path's bf16 weights + fp32 masters: the LoRA weights are
fp32 parameters (each process holds a shard; AdamW steps the shards), cast to the compute dtype
for every forward by FSDP's mixed-precision policy, and gradients are reduced in fp32.
"""

from __future__ import annotations


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t):
    """The whole tensor of a shard (a collective: every process must call it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


def decoder_layers(model):
    """The repeated blocks of a (PEFT-wrapped) causal LM: the units FSDP gathers one at a time."""
    from torch import nn

    found = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1]
    return max(found, key=len) if found else []


def shard(model, dtype):
    """Shard `model` in place: each decoder layer, then the rest. Returns the model."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gathered(state: dict) -> dict:
    """An optimizer state_dict with every shard made whole (for a checkpoint any world can read)."""
    return {"state": {k: {n: full(v) for n, v in s.items()} for k, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def like(value, param):
    """`value` (a whole tensor from a checkpoint) as the shard `param` holds, when it is sharded
    (a collective); as it is otherwise."""
    if not is_sharded(param) or getattr(value, "shape", None) != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
