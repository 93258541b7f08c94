"""The planner's trade of memory for passes over the inputs (plan/passes.py): fold and whole_band.

Whatever the passes, the merged bytes are the same; at a budget that holds the widest tensor in one
band, each input is read once; below it, TIES without rescale reads its inputs at most twice (the
histogram, then the map counting its ties in order)."""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import pytest

from streammerge import api, synth
from streammerge.plan.passes import reads, summary

from conftest import write_yaml


def _ties(tmp: Path, base: Path, experts: list[Path], rescale: bool = False) -> Path:
    return write_yaml(tmp / "ties.yml", {
        "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
        "parameters": {"rescale": rescale} if rescale else {},
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.4}} for e in experts]})


def _same_outputs(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in shards:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """An embedding and lm_head of 64 MB per input: wider than the 32 MiB band target, so several bands
    at 1 GiB; a few shards, as a 70B checkpoint has."""
    spec = dataclasses.replace(synth.PRESETS["tiny"], hidden=1024, intermediate=256, layers=1, vocab=32000,
                               heads=8, kv_heads=2)
    return synth.make_family(tmp_path_factory.mktemp("wide"), spec, 2, seed=3, shard_size=24 << 20)


def test_budget_trades_reads(wide_family, tmp_path, fresh_baseline):
    base, experts = wide_family
    cfg = _ties(tmp_path, base, experts)
    low = api.check(cfg, max_memory="1GiB").plan
    high = api.check(cfg, max_memory="4GiB").plan
    wide = [t for t in low.tensors if t.rows_per_chunk < t.rows]
    assert wide, "the embedding should span several bands at 1 GiB"
    assert all(t.folded and reads(t) == 2 for t in wide)         # histogram, then map + tie counts
    assert low.bytes_in <= 2 * sum(t.bytes_in for t in low.tensors)
    assert all(reads(t) == 1 for t in high.tensors)             # whole_band: every tensor one band
    assert high.bytes_in == sum(t.bytes_in for t in high.tensors)
    once = max(t.one_read_budget for t in wide)
    assert 1 << 30 < once <= 4 << 30
    assert summary(low).startswith("at 1 GiB, ") and f"at {once >> 20} MiB, 1" in summary(low)
    at_once = api.check(cfg, max_memory=f"{once >> 20}MiB").plan     # the budget check names does it
    assert all(reads(t) == 1 for t in at_once.tensors)
    assert all(p.peak_estimate <= p.budget for p in (low, high, at_once))   # one band still fits the budget


@pytest.mark.slow
def test_bytes_stay_whatever_the_reads(wide_family, tmp_path):
    """About 30 s on 2 cores: two merges of 390 MB of inputs."""
    base, experts = wide_family
    cfg = _ties(tmp_path, base, experts)
    api.run(cfg, tmp_path / "low", max_memory="1GiB")
    api.run(cfg, tmp_path / "high", max_memory="4GiB")
    _same_outputs(tmp_path / "low", tmp_path / "high")


@pytest.mark.parametrize("rescale", [False, True])
def test_folded_counts_match_a_separate_pass(tiny_family, tmp_path, rescale):
    """Bands of 48 rows (--chunk-rows): folded into the map without rescale, a pass of its own with
    rescale (its L1 factor needs every row first); both as the one-band merge."""
    base, experts = tiny_family
    cfg = _ties(tmp_path, base, experts, rescale)
    banded = api.check(cfg, chunk_rows=48).plan
    multi = [t for t in banded.tensors if not t.read_once and t.reduces]
    assert multi and all(t.folded is not rescale for t in multi)
    assert all(reads(t) == t.passes - (0 if rescale else 1) for t in multi)
    api.run(cfg, tmp_path / "banded", chunk_rows=48)
    api.run(cfg, tmp_path / "whole")
    _same_outputs(tmp_path / "banded", tmp_path / "whole")
