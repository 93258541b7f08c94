"""Config -> Plan: which output tensors exist, their inputs, resolved parameters, chunking and shards.

Reads configs, index files and safetensors headers only; never tensor data. Follows mergekit 0.1.5's
planning: `models` becomes one slice over every model's full layer range (the base appended when not
listed); layer tensors get the gradient position t = i / (n - 1) within their slice (t = 1 for a
one-layer slice); pre tensors (embeddings) use the first slice's sources and post tensors (final norm,
lm_head) the last slice's, both at t = 0.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..arch import Arch
from ..config import MergeConfig, OutputSlice, SliceSource, evaluate
from ..errors import CheckpointError, ConfigError, ProblemsError, StreammergeError, clip, short
from ..hub.open import pending
from ..io.header import FLOAT_CODES, ITEMSIZE, TensorInfo
from ..io.reader import ModelFiles
from ..methods import MethodSpec, TensorJob, get_method
from ..methods.registry import REQUIRED, Param
from ..options import RunOptions
from ..unsupported import config_warnings
from . import budget as budget_mod
from . import passes, rules
from .inputs import check_same_depth, config_source, embedding_rows, open_inputs, out_config
from .ir import Plan, Source, TensorPlan
from .params import converter
from .shards import assign_shards, shard_plans, with_layout
from .vocab import check_tokenizer_source, cropped_vocabulary

TORCH_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
CODE_OF_NAME = {v: k for k, v in TORCH_NAME.items()}


@dataclass(frozen=True)
class _Slice:
    sources: tuple[SliceSource, ...]
    definition: OutputSlice | None
    base: str | None


class Planner:
    def __init__(self, config: MergeConfig, config_dir: Path | None, options: RunOptions):
        self.config = config
        self.config_dir = config_dir
        self.options = options
        self.spec: MethodSpec = get_method(config.merge_method)
        self.model_refs: list[str] = config.referenced_models()
        self.models: dict[str, ModelFiles] = {}
        self.archs: dict[str, Arch] = {}
        self.warnings: list[str] = config_warnings(config, options.copy_tokenizer)
        self.problems: list[StreammergeError] = []
        self._problem_kinds: dict[str, int] = {}

    # -- models -------------------------------------------------------------------------------------
    def open_models(self) -> None:
        self.models, self.archs, problems = open_inputs(self.model_refs, self.config_dir)
        for e in problems:
            self.problem(e)

    def problem(self, e: StreammergeError) -> None:
        """Collect a problem; the same problem on many tensors is reported once with a count."""
        kind = _problem_kind(e)
        if kind in self._problem_kinds:
            self._problem_kinds[kind] += 1
            return
        self._problem_kinds[kind] = 1
        self.problems.append(e)

    def raise_problems(self) -> None:
        if not self.problems:
            return
        out = []
        for e in self.problems:
            more = self._problem_kinds[_problem_kind(e)] - 1
            out.append(type(e)(f"{e} (and {more} more like it)") if more else e)
        if len(out) == 1:
            raise out[0]  # one mistake keeps its own type, however many tensors it touches
        raise ProblemsError(out)

    # -- slices ------------------------------------------------------------------------------------
    def slices(self) -> list[_Slice]:
        cfg = self.config
        if cfg.models is not None:
            check_same_depth(cfg, self.archs)
            sources = [SliceSource(model=m.model, layer_range=(0, self.archs[m.model].num_layers), parameters=m.parameters)
                       for m in cfg.models]
            if cfg.base_model and all(m.model != cfg.base_model for m in cfg.models):
                sources.append(SliceSource(model=cfg.base_model, layer_range=(0, self.archs[cfg.base_model].num_layers)))
            return [_Slice(tuple(sources), None, cfg.base_model)]
        out = []
        for i, s in enumerate(cfg.slices or []):
            lens = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lens) > 1:
                raise ConfigError(f"slices[{i}].sources: every source must span the same number of layers, "
                                  f"got layer_range lengths {sorted(lens)}")
            for j, src in enumerate(s.sources):
                n = self.archs[src.model].num_layers
                if src.layer_range[1] > n:
                    raise ConfigError(f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is outside "
                                      f"{src.model!r}, which has {n} layers (valid: 0 to {n})")
            out.append(_Slice(tuple(s.sources), s, s.base_model or cfg.base_model))
        return out

    def check_contract(self, slices: list[_Slice]) -> None:
        spec = self.spec
        for i, sl in enumerate(slices):
            where = "models" if self.config.models is not None else f"slices[{i}]"
            refs = [s.model for s in sl.sources]
            if spec.base == "required" and sl.base is None:
                raise ConfigError(f"base_model: method {spec.name!r} needs a base model; add 'base_model: <path>'")
            if spec.base == "required" and sl.base not in refs:
                raise ConfigError(f"{where}: base model {sl.base!r} is not among the sources of this slice; add it")
            n = len([r for r in refs if r != sl.base]) if spec.base != "ignored" else len(refs)
            lo, hi = spec.min_models, spec.max_models
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                extra = " besides the base" if spec.base != "ignored" and sl.base is not None else ""
                raise ConfigError(f"{where}: method {spec.name!r} takes {want} model(s){extra}, got {n}")

    # -- parameters ---------------------------------------------------------------------------------
    def _scopes(self, sl: _Slice, model: str | None) -> list[dict | None]:
        scopes: list[dict | None] = []
        if model is not None:
            scopes.extend(s.parameters for s in sl.sources if s.model == model)
        if sl.definition is not None:
            scopes.append(sl.definition.parameters)
        scopes.append(self.config.parameters)
        return scopes

    def _resolve(self, param: Param, scopes: list[dict | None], tensor: str, t: float, where: str) -> Any:
        conv = converter(param, where)
        for scope in scopes:
            if scope and param.name in scope:
                try:
                    v = evaluate(scope[param.name], tensor, t, conv)
                except ValueError as e:
                    raise ConfigError(f"{where}: parameter {param.name!r}: {e}") from None
                if v is not None:
                    if param.check is not None:
                        msg = param.check(v)
                        if msg:
                            raise ConfigError(f"{where}: parameter {param.name!r} {msg} (tensor {short(tensor)})")
                    return v
        if param.default is REQUIRED:
            raise ConfigError(f"{where}: method {self.spec.name!r} needs parameter {param.name!r}"
                              f" for tensor {short(tensor)}; set it under 'parameters'")
        return param.default

    def check_unknown_params(self) -> None:
        import difflib

        known = {p.name for p in self.spec.params}
        places: list[tuple[str, dict | None]] = [("parameters", self.config.parameters)]
        for i, m in enumerate(self.config.models or []):
            places.append((f"models[{i}].parameters", m.parameters))
        for i, s in enumerate(self.config.slices or []):
            places.append((f"slices[{i}].parameters", s.parameters))
            for j, src in enumerate(s.sources):
                places.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
        per_model = {p.name for p in self.spec.params if p.per_model}
        for where, params in places:
            for key in params or {}:
                model_level = where.startswith("models[") or ".sources[" in where
                if model_level and key in known and key not in per_model:
                    self.warnings.append(f"{where}.{key}: {key!r} is a global parameter of {self.spec.name!r}; "
                                         "a value set per model is ignored (as in mergekit): move it under 'parameters'")
                if key not in known:
                    close = difflib.get_close_matches(key, sorted(known), n=2)
                    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
                    self.problem(ConfigError(f"{where}.{key}: method {self.spec.name!r} has no parameter {key!r}; {hint}"
                                             f"its parameters: {', '.join(sorted(known)) or '(none)'}"))

    # -- tensors ------------------------------------------------------------------------------------
    def _input(self, ref: str, name: str, out_name: str) -> TensorInfo:
        mf, arch = self.models[ref], self.archs[ref]
        info = mf.tensors.get(name)
        if info is None and arch.tied and arch.kind_of(name) == "lm_head" and arch.embed_name():
            info = mf.tensors.get(arch.embed_name())
        if info is None:
            raise CheckpointError(f"{mf.path}: tensor {short(name)} (needed for output {short(out_name)}) is missing")
        if info.dtype not in FLOAT_CODES:
            raise CheckpointError(f"{info.file}: tensor {short(name)} has dtype {info.dtype}; only bf16, fp16, fp32 "
                                  "and fp64 tensors can be merged")
        return info

    def build(self) -> Plan:
        """Plan the merge, collecting every problem the headers and the config show before raising."""
        self.check_unknown_params()
        self.open_models()
        if len(self.models) < len(self.model_refs):
            self.raise_problems()
        try:
            slices = self.slices()
            self.check_contract(slices)
        except StreammergeError as e:
            self.problem(e)
            self.raise_problems()
        ref_name = self.config.base_model or slices[0].sources[0].model
        ref_arch = self.archs[ref_name]
        entries: list[tuple[str, str, list[tuple[str, str]], _Slice, float]] = []
        first, last = slices[0], slices[-1]
        for name in ref_arch.pre:
            entries.append((name, ref_arch.kind_of(name), [(s.model, name) for s in first.sources], first, 0.0))
        out_layer = 0
        for sl in slices:
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                for suffix in ref_arch.layer_suffixes:
                    out_name = ref_arch.layer_tensor(out_layer, suffix)
                    ins = [(s.model, self.archs[s.model].layer_tensor(s.layer_range[0] + idx, suffix)) for s in sl.sources]
                    entries.append((out_name, "layer", ins, sl, t))
                out_layer += 1
        for name in ref_arch.post:
            entries.append((name, ref_arch.kind_of(name), [(s.model, name) for s in last.sources], last, 0.0))

        model_index = {ref: i for i, ref in enumerate(self.model_refs)}
        budget = self.options.budget()
        baseline = budget_mod.baseline_rss(self.spec.name, self.options.device)  # numba's share included
        data_budget = budget - baseline - budget_mod.ALLOCATOR_SLACK
        widest_k = max((len(e[2]) for e in entries), default=1)
        self._floor = budget_mod.Floor(budget, baseline, self.spec.block_elems, widest_k, compute_threads())
        self._block_elems = self._floor.block_elems(data_budget)
        tensors: list[TensorPlan] = []
        peak = gpu_peak = 0
        for out_name, kind, ins, sl, t in entries:
            try:
                planned = self._plan_tensor(out_name, kind, ins, sl, t, model_index, data_budget, budget)
            except StreammergeError as e:
                self.problem(e)
                continue
            tensors.append(planned[0])
            peak = max(peak, planned[1])
            gpu_peak = max(gpu_peak, planned[2])
        if (low := self._floor.error()) is not None:  # one error naming the real floor, not one per tensor
            self.problem(low)
        tokenizer_model = None
        try:
            tokenizer_model = self._tokenizer_model(model_index, ref_name)
        except StreammergeError as e:
            self.problem(e)
        self.raise_problems()
        plan = self._finish(tensors, peak, budget, baseline, out_layer, ref_name, ref_arch, model_index, tokenizer_model)
        gpu_budget = self._gpu_budget()
        return replace(plan, device=self.options.device, gpu_budget=gpu_budget,
                       gpu_peak_estimate=budget_mod.GPU_ALLOCATOR_SLACK + gpu_peak if gpu_budget else 0)

    def _gpu_budget(self) -> int:
        """--max-gpu-memory on a cuda/auto run; 0 (unchecked) on CPU or unset (merge.run fills in 80%)."""
        return self.options.max_gpu_memory if self.options.device in ("cuda", "auto") else 0

    def _plan_tensor(self, out_name: str, kind: str, ins: list[tuple[str, str]], sl: _Slice, t: float,
                     model_index: dict[str, int], data_budget: int, budget: int) -> tuple[TensorPlan, int, int]:
        """One output tensor's plan, the bytes it keeps in flight in host memory and on the device."""
        infos = [self._input(ref, name, out_name) for ref, name in ins]
        crop = None
        if len({i.shape for i in infos}) > 1:
            crop = self._common_shape(out_name, kind, infos, [r for r, _ in ins])
        shape = crop or infos[0].shape
        compute = self._compute_dtype(infos)
        out_dtype = CODE_OF_NAME[self.config.out_dtype] if self.config.out_dtype else self._result_dtype(compute)
        base_idx = next((j for j, (r, _) in enumerate(ins) if r == sl.base), None) if sl.base else None
        params = tuple((p.name, self._resolve(p, self._scopes(sl, None), out_name, t, clip(out_name)))
                       for p in self.spec.params if not p.per_model)
        mparams = []
        for j, (ref, in_name) in enumerate(ins):
            applicable = [p for p in self.spec.params if p.per_model and (j != base_idx or p.base_too)]
            mparams.append(tuple((p.name, self._resolve(p, self._scopes(sl, ref), in_name, t, f"{ref}: {clip(in_name)}"))
                                 for p in applicable))
        rows = shape[0] if len(shape) >= 2 else 1
        row_elems = infos[0].row_elems
        blocked = self.options.device == "cpu"  # CPU compute runs in blocks (TensorPlan.block_rows)
        block_work = budget_mod.block_work(len(infos), compute, compute_threads(), self._block_elems) if blocked else 0
        rpc = budget_mod.rows_per_chunk(out_name, rows, infos, row_elems, compute, out_dtype, self.options.prefetch,
                                        data_budget - block_work, budget, self.options.chunk_rows, blocked,
                                        self._gpu_budget(), self._floor)
        in_flight = block_work + budget_mod.in_flight(rpc, infos, row_elems, compute, out_dtype, self.options.prefetch, blocked)
        gpu_in_flight = budget_mod.gpu_in_flight(rpc, infos, row_elems, compute, out_dtype) if self._gpu_budget() else 0
        numel = math.prod(shape)
        plan = TensorPlan(
            name=out_name, shape=tuple(shape), out_dtype=out_dtype, compute_dtype=compute,
            inputs=tuple(Source(model_index[ref], info, rows if crop else None) for (ref, _), info in zip(ins, infos)),
            base=base_idx, params=params, model_params=tuple(mparams), kind=kind,
            passes=1, rows=rows, row_elems=row_elems, rows_per_chunk=rpc, shard=-1,
            bytes_in=sum(rows * i.row_bytes for i in infos), bytes_out=numel * ITEMSIZE[out_dtype],
            read_once=rules.read_once(rows, rpc),
            block_rows=rules.block_rows(tuple(shape), rows, row_elems, self._block_elems))
        job = TensorJob.from_plan(plan, self.options.seed)
        plan, in_flight = passes.settle(self.spec, plan, job, infos, self.options.prefetch, data_budget - block_work,
                                        budget - data_budget, block_work, in_flight, blocked and not self.options.chunk_rows)
        job = TensorJob.from_plan(plan, self.options.seed)
        if self.spec.validate is not None:
            msg = self.spec.validate(job)
            if msg:
                raise ConfigError(f"{clip(out_name)}: {msg}")
        return plan, in_flight, gpu_in_flight

    def _finish(self, tensors: list[TensorPlan], peak: int, budget: int, baseline: int, out_layer: int,
                ref_name: str, ref_arch: Arch, model_index: dict[str, int], tokenizer_model: int | None) -> Plan:
        sweeps = 0
        if self.spec.model_pass is not None:
            jobs = [TensorJob.from_plan(t, self.options.seed) for t in tensors]
            sweeps = self.spec.model_pass.sweeps(jobs)
            msg = self.spec.model_pass.check(jobs) if sweeps and self.spec.model_pass.check else None
            if msg:
                raise ConfigError(f"parameters: {msg}")
        sizes = {t.name: t.bytes_out for t in tensors}
        groups = assign_shards([(t.name, t.bytes_out) for t in tensors], self.options.out_shard_size)
        shards = shard_plans(groups, sizes)
        shard_of = {name: i for i, g in enumerate(groups) for name in g}
        tensors = [replace(t, shard=shard_of[t.name]) for t in tensors]
        by_name = {t.name: t for t in tensors}
        shards = [with_layout(sp, by_name) for sp in shards]
        out_dtype_name = TORCH_NAME[tensors[0].out_dtype] if tensors else None
        config_ref, warning = config_source(self.models, self.model_refs, ref_name)
        if warning:
            self.warnings.append(warning)
        return Plan(
            method=self.spec.name,
            models=tuple(self.models[r].path for r in self.model_refs),
            tensors=tuple(tensors), shards=tuple(shards), budget=budget, baseline_rss=baseline,
            peak_estimate=baseline + budget_mod.ALLOCATOR_SLACK + peak, seed=self.options.seed, out_layers=out_layer,
            out_config=out_config(self.models[config_ref].config, out_layer, out_dtype_name, ref_arch,
                                  embedding_rows(tensors, ref_arch)),
            reference_model=model_index[ref_name], tokenizer_model=tokenizer_model,
            warnings=tuple(self.warnings), model_sweeps=sweeps, block_elems=self._block_elems,
            downloads=pending(s.info.file for t in tensors for s in t.inputs),
        )

    def _result_dtype(self, compute: str) -> str:
        """Without out_dtype, tensors are written in the dtype the method returns (mergekit's rule)."""
        if self.spec.result_dtype is None:
            return compute
        from ..io.header import CODE_OF, torch_dtype  # torch: only the methods that declare result_dtype

        return CODE_OF[self.spec.result_dtype(torch_dtype(compute))]

    def _compute_dtype(self, infos: list[TensorInfo]) -> str:
        if self.config.dtype:
            return CODE_OF_NAME[self.config.dtype]
        code = infos[0].dtype
        for i in infos[1:]:
            code = promote_float(code, i.dtype)
        return code

    def _common_shape(self, out_name: str, kind: str, infos: list[TensorInfo], refs: list[str]) -> tuple[int, ...]:
        """Embeddings whose vocabularies differ are an error, as in mergekit 0.1.5 ("Tensor size mismatch"),
        unless --unsafe-truncate-embeddings asks for mergekit's crop to the smallest; any other shape
        difference is an error."""
        shapes = [i.shape for i in infos]
        if kind in ("embedding", "lm_head") and len({s[1:] for s in shapes}) == 1:
            rows, warning = cropped_vocabulary(out_name, [s[0] for s in shapes], refs, self.config,
                                               self.options.unsafe_truncate_embeddings)
            self.warnings.append(warning)
            return (rows, *shapes[0][1:])
        detail = "; ".join(f"{r}: {list(s)}" for r, s in zip(refs, shapes))
        raise CheckpointError(f"tensor {short(out_name)} has different shapes across models ({detail}); these models "
                              "do not share a backbone and cannot be merged tensor by tensor")

    def _tokenizer_model(self, model_index: dict[str, int], ref_name: str) -> int | None:
        src = self.config.tokenizer_source or (self.config.tokenizer.source if self.config.tokenizer else None)
        if src is None or src == "base" or src in model_index:  # ('union' is refused by the config's own checks)
            if src is not None:
                check_tokenizer_source(self.models, self.archs)
            return model_index[ref_name if src in (None, "base") else src]
        raise ConfigError(f"tokenizer_source: {src!r} is not one of the models in this merge; use 'base' or a model path "
                          "that appears under models/slices")


def promote_float(a: str, b: str) -> str:
    """torch.promote_types on float codes, without torch: the wider one; bf16 with fp16 gives fp32."""
    if a == b:
        return a
    if ITEMSIZE[a] != ITEMSIZE[b]:
        return a if ITEMSIZE[a] > ITEMSIZE[b] else b
    return "F32"


def _problem_kind(e: Exception) -> str:
    """A problem's text with tensor names, quoted values and numbers blanked: one kind per mistake."""
    return re.sub(r"'[^']*'|\b[\w-]+(?:\.[\w-]+)+\b|\d+", "…", str(e))


def build_plan(config: MergeConfig, config_path: str | os.PathLike | None, options: RunOptions) -> Plan:
    """Validate a config against the checkpoints' headers and plan the whole merge."""
    config_dir = Path(config_path).resolve().parent if config_path else None
    return Planner(config, config_dir, options).build()


def compute_threads() -> int:
    """Compute threads a CPU run will use (torch's intra-op default: one per core)."""
    return os.cpu_count() or 1
