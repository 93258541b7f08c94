"""The method table is literal: every spec a family module defines is listed, under its own name, and
every reduce pass has a stable name (the plan lists passes by name)."""

import pytest

from streammerge.methods import METHODS, MethodSpec, TensorJob, get_method
from streammerge.methods import basic, karcher, selective, spherical, stock, task_vectors, widen
from streammerge.errors import ConfigError


def test_every_spec_is_in_the_table_under_its_own_name():
    defined = {id(v): v for m in (basic, karcher, selective, spherical, stock, task_vectors, widen)
               for v in vars(m).values() if isinstance(v, MethodSpec)}
    assert {id(s) for s in METHODS.values()} == set(defined)
    assert all(spec.name == name for name, spec in METHODS.items())


def test_a_miss_names_the_close_ones_and_all():
    with pytest.raises(ConfigError, match=r"unknown method 'tie'; did you mean 'ties'.*known methods: arcee_fusion,"):
        get_method("tie")


def _job(method: str, code: str, **params) -> TensorJob:
    spec = get_method(method)
    g = {p.name: p.default for p in spec.params if not p.per_model}
    g.update(params)
    mp = {p.name: p.default for p in spec.params if p.per_model}
    mp.update(weight=0.5, density=0.5)
    return TensorJob(name="w", shape=(8, 16), rows=8, compute_code=code, base=0, params=g,
                     model_params=({}, mp, mp), model_ids=(0, 1, 2), seed=0, row_elems=16)


@pytest.mark.parametrize("method, code, names", [
    ("ties", "BF16", ["histogram", "tie_counts"]),
    ("ties", "F32", ["histogram", "histogram_refine1", "tie_counts"]),
    ("dare_ties", "BF16", ["rescale_sums"]),
    ("della", "BF16", ["rescale_sums"]),
    ("sce", "BF16", ["sce_weights"]),
    ("model_stock", "BF16", ["gram"]),
    ("widen", "BF16", ["column_stats"]),
])
def test_reduce_names(method, code, names):
    job = _job(method, code)
    assert [r.name for r in get_method(method).reduces_for(job)] == names


def test_tensor_job_keeps_the_code_and_gives_the_torch_dtype():
    import torch

    job = _job("linear", "BF16")
    assert job.compute_code == "BF16" and job.compute_dtype is torch.bfloat16
