"""The plan's shape, in the spirit of dask's blockwise tests: what each tensor's plan says (its passes by
name, whether it is read once, its blocks, the model sweeps), asserted on the plan, not on the output.
The executor acts on these fields only: a plan that says otherwise is run otherwise, or refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import shard_bytes, write_yaml
from streammerge import RunOptions
from streammerge.merge import check
from streammerge.errors import StreammergeError

TV = {"weight": 0.5, "density": 0.4}


def _cfg(tmp_path, family, method: str, params: dict = TV, **extra):
    base, experts = family
    doc = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "parameters": params} for e in experts], **extra}
    return write_yaml(tmp_path / f"{method}.yml", doc)


def _plan(tmp_path, family, method: str, params: dict = TV, options: dict | None = None, **extra):
    return check(_cfg(tmp_path, family, method, params, **extra), RunOptions(**{"max_memory": 2 << 30, **(options or {})}))


def _shapes(plan) -> set:
    return {(t.reduces, t.passes) for t in plan.tensors}


def test_ties_bf16_is_one_histogram_a_tie_count_and_the_map(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties")
    assert {t.compute_dtype for t in plan.tensors} == {"BF16"}
    assert _shapes(plan) == {(("histogram", "tie_counts"), 3)}
    assert plan.model_sweeps == 0


def test_ties_fp32_refines_the_histogram_once_more(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties", dtype="float32")
    assert {t.compute_dtype for t in plan.tensors} == {"F32"}
    assert _shapes(plan) == {(("histogram", "histogram_refine1", "tie_counts"), 4)}


def test_dare_ties_is_the_rescale_sums_and_the_map(tiny_family, tmp_path):
    assert _shapes(_plan(tmp_path, tiny_family, "dare_ties")) == {(("rescale_sums",), 2)}


def test_della_is_the_rescale_sums_and_the_map(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "della", {**TV, "epsilon": 0.1})
    assert _shapes(plan) == {(("rescale_sums",), 2)}


def test_linear_is_the_map_alone(tiny_family, tmp_path):
    base, experts = tiny_family
    doc = {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}
    plan = check(write_yaml(tmp_path / "l.yml", doc), RunOptions(max_memory=2 << 30))
    assert _shapes(plan) == {((), 1)} and plan.model_sweeps == 0


def test_ties_scope_model_sweeps_the_model_then_maps_each_tensor(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties", parameters={"scope": "model"})
    assert plan.model_sweeps >= 1
    assert _shapes(plan) == {((), 1)}
    per_tensor = sum(t.bytes_in for t in plan.tensors)
    assert plan.bytes_in == per_tensor * (plan.model_sweeps + 1)


def test_a_tensor_of_one_band_is_read_once_for_all_its_passes(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties")
    assert all(t.rows_per_chunk >= t.rows and t.read_once for t in plan.tensors)
    assert plan.bytes_in == sum(t.bytes_in for t in plan.tensors)


def test_a_tensor_of_several_bands_is_read_again_for_every_pass(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties", options={"chunk_rows": 7})
    multi = [t for t in plan.tensors if t.rows > 7]
    single = [t for t in plan.tensors if t.rows <= 7]
    assert multi and single
    assert not any(t.read_once for t in multi) and all(t.read_once for t in single)
    assert all(t.folded for t in multi)  # ties without rescale: the tie counts share the map's read (plan/passes.py)
    assert plan.bytes_in == sum(t.bytes_in * (1 if t.read_once else t.passes - 1) for t in plan.tensors)


def test_blocks_are_whole_rows_of_about_the_plans_block_size(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties")
    for t in plan.tensors:
        if len(t.shape) >= 2:
            assert t.block_rows == max(1, plan.block_elems // t.row_elems), t.name
        else:
            assert t.block_rows == 1, t.name


# -- the executor acts on the plan's fields --------------------------------------------------------

def _execute(plan, out):
    from streammerge.execute import Executor

    out.mkdir()
    Executor(plan, out_dir=out, device=torch.device("cpu")).run()
    return shard_bytes(out)


def test_read_once_off_reads_every_pass_again_and_writes_the_same_bytes(tiny_family, tmp_path, monkeypatch):
    """Fusion off (the plan says re-read) gives identical bytes; the reads follow the plan's field."""
    from streammerge.io.reader import RowReader

    plan = _plan(tmp_path, tiny_family, "ties")
    unfused = dataclasses.replace(plan, tensors=tuple(dataclasses.replace(t, read_once=False) for t in plan.tensors))
    calls = [0]
    real = RowReader.read_rows

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(RowReader, "read_rows", counting)
    fused_bytes = _execute(plan, tmp_path / "fused")
    fused_reads, calls[0] = calls[0], 0
    assert _execute(unfused, tmp_path / "unfused") == fused_bytes
    inputs = sum(len(t.inputs) for t in plan.tensors if t.bytes_out)
    assert fused_reads == inputs and calls[0] == 3 * inputs


def test_a_plan_naming_other_passes_is_refused(tiny_family, tmp_path):
    plan = _plan(tmp_path, tiny_family, "ties")
    t0 = dataclasses.replace(plan.tensors[0], reduces=("histogram", "counts"))
    other = dataclasses.replace(plan, tensors=(t0, *plan.tensors[1:]))
    with pytest.raises(StreammergeError, match=r"lists the reduce passes \['histogram', 'counts'\], but method 'ties' "
                                               r"here runs \['histogram', 'tie_counts'\].*plan it again"):
        _execute(other, tmp_path / "out")


def test_the_executor_runs_the_spec_it_is_given(tiny_family, tmp_path):
    from streammerge.execute import Executor
    from streammerge.methods import get_method

    plan = _plan(tmp_path, tiny_family, "ties")
    with pytest.raises(StreammergeError, match="the plan is for method 'ties', not 'linear'"):
        Executor(plan, out_dir=tmp_path, device=torch.device("cpu"), spec=get_method("linear"))


def test_check_prints_each_tensors_passes_by_name(tiny_family, tmp_path):
    from rich.console import Console

    from streammerge.plan.explain import print_plan

    console = Console(record=True, width=200)
    print_plan(_plan(tmp_path, tiny_family, "ties"), console)
    assert "passes per tensor: 3 (histogram > tie_counts > map); re-read for later passes: 0" in console.export_text()


def test_scope_model_with_two_densities_for_one_model_is_refused_at_plan_time(tiny_family, tmp_path):
    import pytest

    from streammerge.errors import ConfigError

    base, experts = tiny_family
    doc = {"merge_method": "ties", "base_model": str(base), "parameters": {"scope": "model"},
           "models": [{"model": str(experts[0]), "parameters": {"weight": 0.5, "density": [0.3, 0.7]}},
                      {"model": str(experts[1]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    with pytest.raises(ConfigError, match=r"parameters: scope: model needs one density \(and gamma\) per model"):
        check(write_yaml(tmp_path / "c.yml", doc), RunOptions(max_memory=4 << 30))


def test_each_shard_header_and_offsets_are_in_the_plan_and_the_writer_follows_them(tiny_family, tmp_path):
    from streammerge.io.header import read_header

    plan = _plan(tmp_path, tiny_family, "ties", options={"out_shard_size": 60_000})
    assert len(plan.shards) > 1 and all(sp.header and len(sp.offsets) == len(sp.tensors) for sp in plan.shards)
    out = tmp_path / "written"
    _execute(plan, out)
    for sp in plan.shards:
        raw = (out / sp.filename).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert raw[8:8 + n].decode() == sp.header
        header = read_header(out / sp.filename)
        assert tuple(header.tensors[name].begin for name in sp.tensors) == sp.offsets
    # a header the plan says (same length: the offsets stand) is what the file gets
    sp0 = plan.shards[0]
    doctored = dataclasses.replace(sp0, header=sp0.header.replace('"format":"pt"', '"format":"xx"'))
    assert doctored.header != sp0.header
    other = dataclasses.replace(plan, shards=(doctored, *plan.shards[1:]))
    _execute(other, tmp_path / "doctored")
    assert read_header(tmp_path / "doctored" / sp0.filename).metadata == {"format": "xx"}
