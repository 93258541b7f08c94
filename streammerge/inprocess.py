"""In-process merges for notebooks and tests: `merge_tensors` and `merge_state_dicts`, in the shape of
mergekit 0.1.5's calls of the same names (method name, inputs, base, parameters, dtype, out_dtype).

They run the same method specs and kernels a file merge runs, on whole tensors in memory: each tensor
is one band (the method's reduce passes, then its map), and whole-model sweeps (TIES with scope:
model) run over every tensor first. Results do not depend on the band size, so a merge here gives the
same bits as `streammerge.run` over the same tensors written as checkpoints, given the inputs in the
order the config lists them (sums over models run in input order) and the same `seed`. The random
streams of DARE and DELLA are numbered as a config numbers its models: the base 0, the others 1, 2, ...
in input order.

Parameters: a scalar applies to every input; a per-model parameter (weight, density, ...) may also be a
sequence, one value per input or one per input other than the base, or a mapping keyed by the inputs'
ids. Gradients and filters need a layer position: write a config and call `streammerge.run`.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .arch import EMBED_HINTS, HEAD_HINTS, LAYER_RE, Arch, infer_arch
from .errors import CheckpointError, ConfigError
from .io.reader import ModelFiles
from .methods import MethodSpec, TensorJob, get_method
from .methods.registry import REQUIRED, Param
from .plan.params import converter

if TYPE_CHECKING:
    import torch

StateDict = Mapping[str, "torch.Tensor"]
DTypeLike = Union["torch.dtype", str, None]

__all__ = ["merge_tensors", "merge_state_dicts"]


def merge_tensors(tensors: Sequence[torch.Tensor], method: str, *, parameters: Mapping[str, Any] | None = None,
                  ids: Sequence[Hashable] | None = None, base_index: int | None = None, name: str | None = None,
                  dtype: DTypeLike = None, out_dtype: DTypeLike = None, seed: int = 0) -> torch.Tensor:
    """Merge the inputs of one output tensor with `method` (a name from `streammerge.methods.METHODS`).

    `base_index`: which input is the base model. `ids`: names of the inputs for mapping-valued
    parameters (default: their positions). `name`: the tensor's name (it seeds the random masks and
    tells an embedding, which some methods treat apart). `dtype`: the dtype the inputs are loaded in
    (default: their promoted dtype); `out_dtype`: the result's (default: what the method returns)."""
    tensors = list(tensors)
    ids = _ids(ids, len(tensors))
    spec = get_method(method)
    _check_contract(spec, len(tensors), base_index)
    tensor_name = name if name is not None else "tensor"
    job, out = _job(spec, tensor_name, _kind(tensor_name), tensors, ids, base_index, parameters or {}, dtype,
                    out_dtype, seed)
    (result,) = _compute(spec, [job], [tensors], [out])
    return result


def merge_state_dicts(models: Mapping[Hashable, StateDict] | Sequence[StateDict], method: str, *,
                      parameters: Mapping[str, Any] | None = None, base: Hashable | None = None, strict: bool = True,
                      dtype: DTypeLike = None, out_dtype: DTypeLike = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge whole state dicts (or `torch.nn.Module`s) tensor by tensor; returns the merged state dict.

    `models`: a mapping id -> state dict, or a sequence (ids are then the positions); `base`: the id of
    the base model. With `strict`, every model must hold the same tensor names; without, only the names
    all hold are merged. Tensors that are not floating point are copied when every model holds the same
    values, else refused."""
    import torch

    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise ConfigError("merge_state_dicts: no models given; pass a list or dict of state dicts")
    ids = [i for i, _ in items]
    dicts = [_as_state_dict(i, m) for i, m in items]
    if base is not None and base not in ids:
        raise ConfigError(f"merge_state_dicts: base {base!r} is not one of the models' ids ({', '.join(map(repr, ids))})")
    base_index = ids.index(base) if base is not None else None
    spec = get_method(method)
    _check_contract(spec, len(ids), base_index)
    names = [n for n in dicts[0] if all(n in d for d in dicts[1:])]
    if strict:
        for i, d in zip(ids, dicts):
            if set(d) != set(dicts[0]):
                odd = sorted(set(d) ^ set(dicts[0]))
                raise ConfigError(f"merge_state_dicts: model {i!r} does not hold the same tensors as model {ids[0]!r} "
                                  f"(first difference: {odd[0]!r}, {len(odd)} in all); pass strict=False to merge only "
                                  "the tensors every model holds")
    arch = _arch(names)
    jobs, inputs, outs, copied = [], [], [], {}
    for n in _plan_order(arch, names):
        tensors = [d[n] for d in dicts]
        if not all(t.is_floating_point() for t in tensors):
            if not all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors):
                raise ConfigError(f"tensor {n!r} is not floating point and differs between the models; such tensors "
                                  "are copied only when every model holds the same values")
            copied[n] = tensors[0].clone()
            continue
        kind = arch.kind_of(n) if arch is not None else _kind(n)
        job, out = _job(spec, n, kind, tensors, ids, base_index, parameters or {}, dtype, out_dtype, seed)
        jobs.append(job)
        inputs.append(tensors)
        outs.append(out)
    merged = dict(zip((j.name for j in jobs), _compute(spec, jobs, inputs, outs)))
    return {n: merged[n] if n in merged else copied[n] for n in names}


# -- jobs ---------------------------------------------------------------------------------------------

def _ids(ids: Sequence[Hashable] | None, n: int) -> list[Hashable]:
    if n == 0:
        raise ConfigError("merge_tensors: no tensors given")
    if ids is None:
        return list(range(n))
    ids = list(ids)
    if len(ids) != n or len(set(ids)) != n:
        raise ConfigError(f"merge_tensors: ids must name each of the {n} inputs once, got {ids!r}")
    return ids


def _as_state_dict(model_id: Hashable, model: Any) -> StateDict:
    import torch

    if isinstance(model, torch.nn.Module):
        model = model.state_dict()
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise TypeError(f"model {model_id!r}: expected a state dict (names -> tensors) or a torch.nn.Module, "
                        f"got {type(model).__name__}")
    return model


def _check_contract(spec: MethodSpec, n: int, base_index: int | None) -> None:
    if base_index is not None and not 0 <= base_index < n:
        raise ConfigError(f"base_index {base_index} is outside the {n} inputs")
    if spec.base == "required" and base_index is None:
        raise ConfigError(f"method {spec.name!r} needs a base model; pass base_index= (merge_tensors) or base= "
                          "(merge_state_dicts)")
    others = n - 1 if base_index is not None and spec.base != "ignored" else n
    lo, hi = spec.min_models, spec.max_models
    if others < lo or (hi is not None and others > hi):
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        extra = " besides the base" if base_index is not None and spec.base != "ignored" else ""
        raise ConfigError(f"method {spec.name!r} takes {want} model(s){extra}, got {others}")


def _arch(names: list[str]) -> Arch | None:
    """The inventory the planner would infer from these tensor names (None when they do not form one,
    e.g. layers that hold different tensors)."""
    try:
        return infer_arch(ModelFiles(Path("(state dict)"), dict.fromkeys(names), None))
    except CheckpointError:
        return None


def _plan_order(arch: Arch | None, names: list[str]) -> list[str]:
    """The planner's tensor order (pre, layers, post): TIES with scope: model breaks ties across tensors in
    that order, so the same order gives the file merge's bits."""
    if arch is None:
        return names
    order = [*arch.pre, *(arch.layer_tensor(i, s) for i in range(arch.num_layers) for s in arch.layer_suffixes),
             *arch.post]
    return order if sorted(order) == sorted(names) else names


def _kind(name: str) -> str:
    """The tensor's kind as the planner names it, from the name alone (merge_tensors has no model)."""
    if any(h in name for h in HEAD_HINTS):
        return "lm_head"
    if LAYER_RE.match(name):
        return "layer"
    if any(h in name for h in EMBED_HINTS):
        return "embedding"
    return "other"


def _dtype(value: DTypeLike, what: str) -> torch.dtype | None:
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    from .config import DTYPE_NAMES

    if value not in DTYPE_NAMES:
        raise ConfigError(f"{what}: unknown dtype {value!r}; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[value])


def _job(spec: MethodSpec, name: str, kind: str, tensors: list[torch.Tensor], ids: list[Hashable], base_index: int | None,
         parameters: Mapping[str, Any], dtype: DTypeLike, out_dtype: DTypeLike, seed: int) -> tuple[TensorJob, Any]:
    """The method's view of one tensor, as the planner would resolve it, and the output dtype."""
    import torch

    from .io.header import CODE_OF

    known = {p.name for p in spec.params}
    unknown = [k for k in parameters if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"parameters.{unknown[0]}: method {spec.name!r} has no parameter {unknown[0]!r}; {hint}"
                          f"its parameters: {', '.join(sorted(known)) or '(none)'}")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ConfigError(f"tensor {name!r}: the inputs have different shapes ({sorted(shapes)}); in-process merges "
                          "take tensors of one shape")
    for t in tensors:
        if not t.is_floating_point() or t.dtype not in CODE_OF:
            raise ConfigError(f"tensor {name!r}: dtype {t.dtype} cannot be merged; only bf16, fp16, fp32 and fp64")
    if len({t.device for t in tensors}) > 1:
        raise ConfigError(f"tensor {name!r}: the inputs are on different devices; move them to one")
    compute = _dtype(dtype, "dtype")
    if compute is None:
        compute = tensors[0].dtype
        for t in tensors[1:]:
            compute = torch.promote_types(compute, t.dtype)
    out = _dtype(out_dtype, "out_dtype") or (spec.result_dtype(compute) if spec.result_dtype else compute)
    shape = tuple(tensors[0].shape)
    model_ids = _stream_ids(len(tensors), base_index)
    global_params = {p.name: _value(spec, p, parameters, None, ids, base_index, name)
                     for p in spec.params if not p.per_model}
    per_model = tuple({p.name: _value(spec, p, parameters, j, ids, base_index, name)
                       for p in spec.params if p.per_model and (j != base_index or p.base_too)}
                      for j in range(len(tensors)))
    rows = shape[0] if len(shape) >= 2 else 1
    numel = tensors[0].numel()
    job = TensorJob(name=name, shape=shape, rows=rows, compute_code=CODE_OF[compute], base=base_index,
                    params=global_params, model_params=per_model, model_ids=model_ids, seed=seed, kind=kind,
                    row_elems=numel // rows if rows else 0, read_once=True)
    if spec.validate is not None and (msg := spec.validate(job)):
        raise ConfigError(f"{name}: {msg}")
    return job, out


def _stream_ids(n: int, base_index: int | None) -> tuple[int, ...]:
    """A config's model numbering: the base first, then the others in order."""
    order = ([base_index] if base_index is not None else []) + [j for j in range(n) if j != base_index]
    return tuple(order.index(j) for j in range(n))


def _value(spec: MethodSpec, param: Param, parameters: Mapping[str, Any], j: int | None, ids: list[Hashable],
           base_index: int | None, tensor: str) -> Any:
    """Parameter `param` for input `j` (None: a global parameter), converted and checked as the planner does."""
    where = f"parameters.{param.name}"
    raw = parameters.get(param.name)
    if j is not None and isinstance(raw, Mapping):
        raw = raw.get(ids[j])
    elif j is not None and isinstance(raw, (list, tuple)):
        others = [i for i in range(len(ids)) if i != base_index]
        if len(raw) == len(ids):
            raw = raw[j]
        elif base_index is not None and len(raw) == len(others):
            raw = raw[others.index(j)]
        else:
            raise ConfigError(f"{where}: {len(raw)} values for {len(ids)} inputs; give one per input, or one per "
                              "input other than the base, or a dict keyed by the inputs' ids")
    elif isinstance(raw, (list, tuple, Mapping)):
        raise ConfigError(f"{where}: {param.name!r} is a global parameter of {spec.name!r} and takes one value here; "
                          "gradients and filters need a layer position: write a config and use streammerge.run")
    if raw is None:
        if param.default is REQUIRED:
            who = f" for input {ids[j]!r}" if j is not None else ""
            raise ConfigError(f"{where}: method {spec.name!r} needs parameter {param.name!r}{who}")
        return param.default
    value = converter(param, where)(raw)
    if param.check is not None and (msg := param.check(value)):
        raise ConfigError(f"{where}: parameter {param.name!r} {msg} (tensor {tensor!r})")
    return value


# -- compute ------------------------------------------------------------------------------------------

def _compute(spec: MethodSpec, jobs: list[TensorJob], inputs: list[list[torch.Tensor]], outs: list) -> list:
    """Whole-model sweeps, then for each tensor its reduce passes and its map, each on the whole tensor."""
    import torch

    # copies: a method may work in place on its band, and the caller's tensors are never modified
    loaded = lambda i: [t.detach().to(jobs[i].compute_dtype, copy=True) for t in inputs[i]]  # noqa: E731
    model_stats: dict[int, Any] = {}
    mp = spec.model_pass
    sweeps = mp.sweeps(jobs) if mp is not None else 0
    if sweeps:
        if mp.check is not None and (msg := mp.check(jobs)):
            raise ConfigError(f"parameters: {msg}")
        try:
            state = mp.init(jobs)
        except ValueError as e:
            raise ConfigError(f"method {spec.name!r}: {e}") from None
        with torch.no_grad():
            for sweep in range(sweeps):
                for i, job in enumerate(jobs):
                    if job.numel:
                        mp.update(state, sweep, i, job, loaded(i), 0)
                mp.end_sweep(state, sweep)
        model_stats = {i: mp.result(state, i, job) for i, job in enumerate(jobs) if job.numel}
    results = []
    with torch.no_grad():
        for i, job in enumerate(jobs):
            if job.numel == 0:
                results.append(torch.empty(job.shape, dtype=outs[i], device=inputs[i][0].device))
                continue
            chunks = loaded(i)
            stats: list[Any] = [model_stats[i]] if i in model_stats else []
            for red in spec.reduces_for(job):
                state = red.init(job, stats)
                red.update(state, job, chunks, 0)
                stats.append(red.finish(state, job, stats))
            res = spec.map(job, chunks, stats, 0)
            results.append(res.to(outs[i]).reshape(job.shape))  # (a fresh tensor: made from the copies)
    return results
