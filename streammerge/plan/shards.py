"""Output shards planned up front from known sizes, so every shard's header is written before its data."""

from __future__ import annotations

from dataclasses import replace

from ..io.writer import OutTensor, build_header
from .ir import ShardPlan, TensorPlan

METADATA = {"format": "pt"}  # what transformers' safetensors loader looks for


def assign_shards(names_sizes: list[tuple[str, int]], max_shard: int) -> list[list[str]]:
    """Greedy in order: a shard closes when the next tensor would push it past `max_shard`
    (a tensor larger than `max_shard` gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in names_sizes:
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards if shards[0] else []


def shard_filename(i: int, n: int) -> str:
    """Hugging Face's names: one shard is `model.safetensors`, several are numbered and indexed."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_plans(groups: list[list[str]], sizes: dict[str, int]) -> list[ShardPlan]:
    n = len(groups)
    return [ShardPlan(shard_filename(i, n), tuple(g), sum(sizes[t] for t in g)) for i, g in enumerate(groups)]


def with_layout(shard: ShardPlan, tensors: dict[str, TensorPlan]) -> ShardPlan:
    """The shard's header and each tensor's absolute data offset, fixed in the plan: the writer writes
    this header and these offsets as they stand, so a process that executes one shard of a plan file
    writes exactly what the planner laid out."""
    outs = [OutTensor(n, tensors[n].out_dtype, tensors[n].shape) for n in shard.tensors]
    header, offsets = build_header(outs, METADATA)
    return replace(shard, header=header[8:].decode("utf-8"), offsets=tuple(offsets[n] for n in shard.tensors))
