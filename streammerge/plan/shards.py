"""Output shards planned up front from known sizes, so every shard's header is written before its data."""

from __future__ import annotations

from .ir import ShardPlan


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
