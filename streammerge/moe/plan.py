"""A MoE config -> a passthrough Plan the normal executor and writer run.

Every output tensor is a copy of one input tensor: the base's attention, norms and embeddings under
their own names, each expert's MLP tensors renamed into its slot (down_proj scaled by residual_scale),
and the router rows (and Qwen2-MoE's zero attention biases) from a small safetensors file the gate step
writes first. So bands, --max-memory, --out-shard-size, --resume and the report work as for any merge.
Checks read headers, config.json and tokenizer files only (no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..arch import Arch
from ..errors import CheckpointError, ConfigError, ProblemsError, StreammergeError
from ..io.header import ITEMSIZE, TensorInfo
from ..io.reader import ModelFiles, open_model
from ..options import RunOptions
from ..plan import budget as budget_mod
from ..plan import rules
from ..plan.inputs import open_inputs
from ..plan.ir import Plan, Source, TensorPlan
from ..plan.shards import assign_shards, shard_plans, with_layout
from . import outputs
from .config import PROMPTED, MoEConfig

CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
NAMES = {v: k for k, v in CODES.items()}


@dataclass
class MoEInputs:
    """The opened models of a MoE config and what the checks found out about them."""

    cfg: MoEConfig
    models: dict[str, ModelFiles]
    archs: dict[str, Arch]
    arch: str                      # mixtral | qwen
    why: str
    out_dtype: str                 # safetensors code
    warnings: list[str] = field(default_factory=list)
    tokenizer_note: str | None = None

    @property
    def base(self) -> ModelFiles:
        return self.models[self.cfg.base_model]

    @property
    def base_arch(self) -> Arch:
        return self.archs[self.cfg.base_model]

    def synthesized(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors the gate step writes (name, shape): router rows, shared gates, zero biases."""
        a, cfg = self.base_arch, self.cfg
        hidden = int(self.base.config["hidden_size"])  # type: ignore[index]
        out = []
        for i in range(a.num_layers):
            gate, shared = outputs.gate_names(self.arch, i)
            out.append((gate, (len(cfg.experts), hidden)))
            if shared:
                out.append((shared, (1, hidden)))
            for suffix in outputs.missing_biases(self.arch, a.layer_suffixes):
                proj = suffix.replace(".bias", ".weight")
                out.append((a.layer_tensor(i, suffix), (self.base.tensors[a.layer_tensor(i, proj)].shape[0],)))
        return out


def open_moe(cfg: MoEConfig, config_dir: Path | None) -> MoEInputs:
    """Open every model from headers and check them as a MoE set; all problems at once."""
    refs = cfg.referenced_models()
    models, archs, problems = open_inputs(refs, config_dir)
    if problems:
        raise problems[0] if len(problems) == 1 else ProblemsError(problems)
    base, barch = models[cfg.base_model], archs[cfg.base_model]
    errs: list[StreammergeError] = []
    bcfg = base.config or {}
    if "hidden_size" not in bcfg or "intermediate_size" not in bcfg:
        errs.append(CheckpointError(f"{base.path}/config.json: hidden_size and intermediate_size are needed to build "
                                    "a MoE config.json"))
    for where, e in cfg.all_experts():
        mf, a = models[e.source_model], archs[e.source_model]
        if a.num_layers != barch.num_layers:
            errs.append(ConfigError(f"{where}: {mf.path} has {a.num_layers} layers, the base has {barch.num_layers}; "
                                    "experts must share the base's depth"))
            continue
        ecfg = mf.config or {}
        for key in ("hidden_size", "intermediate_size"):
            if key in ecfg and key in bcfg and ecfg[key] != bcfg[key]:
                errs.append(ConfigError(f"{where}: {mf.path} has {key} {ecfg[key]}, the base has {bcfg[key]}; every "
                                        "expert must have the base's shapes (fine-tunes of one base)"))
        for part in outputs.MLP_PARTS:
            name = barch.layer_tensor(0, f"mlp.{part}.weight")
            got, want = mf.tensors.get(name), base.tensors.get(name)
            if got is None or want is None:
                errs.append(CheckpointError(f"{where}: tensor {name!r} is missing from {mf.path if got is None else base.path}"
                                            "; MoE experts are Llama-shaped MLPs (gate_proj, up_proj, down_proj)"))
            elif got.shape != want.shape:
                errs.append(ConfigError(f"{where}: {name!r} is {list(got.shape)} in {mf.path} but {list(want.shape)} in "
                                        "the base; every expert must have the base's shapes"))
    if errs:
        raise errs[0] if len(errs) == 1 else ProblemsError(errs)
    types = {r: str((models[r].config or {}).get("model_type", "?")) for r in refs}
    arch, why = outputs.choose(cfg, types)
    note = check_tokenizer_files(base.path) if cfg.gate_mode in PROMPTED else None
    warnings = []
    n = len(cfg.experts)
    if n & (n - 1):
        warnings.append(f"{n} experts is not a power of two: llama.cpp will not load the model (as mergekit warns)")
    dtype = cfg.dtype or bcfg.get("torch_dtype") or bcfg.get("dtype")
    code = CODES.get(dtype) if isinstance(dtype, str) else None
    if code is None:
        code = base.tensors[barch.embed_name() or next(iter(base.tensors))].dtype
    return MoEInputs(cfg, models, archs, arch, why, code, warnings, note)


def check_tokenizer_files(model_dir: Path) -> str:
    """The base's tokenizer.json is there and is a tokenizer (JSON with a model); returns a note."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; gate modes that read prompts tokenize them with the base's "
                              "tokenizer.json (save the tokenizer with transformers to get one)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({e}); re-download it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{path}: has no tokenizer 'model'; it is not a tokenizers file")
    return f"prompts are tokenized with {path} ({doc['model'].get('type', '?')})"


def copies(inp: MoEInputs, gates_ref: str | None) -> list[outputs.Copy]:
    """Every output tensor as a copy, in layer order; synthesized ones come from `gates_ref` (None: left out)."""
    a, base = inp.base_arch, inp.cfg.base_model
    out = [outputs.Copy(n, base, n) for n in a.pre]
    synth = {name for name, _ in inp.synthesized()}
    for i in range(a.num_layers):
        for suffix in a.layer_suffixes:
            if not suffix.startswith("mlp."):
                out.append(outputs.Copy(a.layer_tensor(i, suffix), base, a.layer_tensor(i, suffix)))
        layer = [n for n in synth if n.startswith(f"{a.layer_prefix}.{i}.")]
        if gates_ref is not None:
            out += [outputs.Copy(n, gates_ref, n) for n in sorted(layer)]
        out += outputs.expert_copies(inp.arch, inp.cfg, i, a.layer_prefix or "model.layers")
    out += [outputs.Copy(n, base, n) for n in a.post]
    return out


def build_moe_plan(inp: MoEInputs, options: RunOptions, gates: ModelFiles | None, gates_ref: str = "<gates>") -> Plan:
    """The passthrough plan of the whole MoE; without `gates` (check) the synthesized tensors are left out."""
    refs = inp.cfg.referenced_models()
    models = dict(inp.models)
    if gates is not None:
        refs = [*refs, gates_ref]
        models[gates_ref] = gates
    index = {r: i for i, r in enumerate(refs)}
    budget = options.budget()
    baseline = budget_mod.baseline_rss("passthrough", options.device)
    data_budget = budget - baseline - budget_mod.ALLOCATOR_SLACK
    gpu_budget = options.max_gpu_memory if options.device in ("cuda", "auto") else 0
    tensors: list[TensorPlan] = []
    peak = 0
    for c in copies(inp, gates_ref if gates is not None else None):
        info = _info(models[c.model], c.in_name, c.out_name)
        rows = info.shape[0] if len(info.shape) >= 2 else 1
        rpc = budget_mod.rows_per_chunk(c.out_name, rows, [info], info.row_elems, info.dtype, inp.out_dtype,
                                        options.prefetch, data_budget, budget, options.chunk_rows, False, gpu_budget)
        peak = max(peak, budget_mod.in_flight(rpc, [info], info.row_elems, info.dtype, inp.out_dtype, options.prefetch))
        tensors.append(TensorPlan(
            name=c.out_name, shape=tuple(info.shape), out_dtype=inp.out_dtype, compute_dtype=info.dtype,
            inputs=(Source(index[c.model], info),), base=None, params=(),
            model_params=((("scale", c.scale),) + ((("noise", c.noise),) if c.noise else ()),),
            kind=inp.base_arch.kind_of(c.out_name), passes=1, rows=rows,
            row_elems=info.row_elems, rows_per_chunk=rpc, shard=-1, bytes_in=rows * info.row_bytes,
            bytes_out=math.prod(info.shape) * ITEMSIZE[inp.out_dtype], read_once=rules.read_once(rows, rpc)))
    sizes = {t.name: t.bytes_out for t in tensors}
    groups = assign_shards([(t.name, t.bytes_out) for t in tensors], options.out_shard_size)
    shard_of = {name: i for i, g in enumerate(groups) for name in g}
    tensors = [_with_shard(t, shard_of[t.name]) for t in tensors]
    by_name = {t.name: t for t in tensors}
    shards = [with_layout(sp, by_name) for sp in shard_plans(groups, sizes)]
    out_cfg = outputs.out_config(inp.arch, inp.base.config or {}, inp.cfg, NAMES[inp.out_dtype])
    return Plan(method="passthrough", models=tuple(models[r].path for r in refs), tensors=tuple(tensors),
                shards=tuple(shards), budget=budget, baseline_rss=baseline,
                peak_estimate=baseline + budget_mod.ALLOCATOR_SLACK + peak, seed=options.seed,
                out_layers=inp.base_arch.num_layers, out_config=out_cfg, reference_model=0, tokenizer_model=0,
                warnings=tuple(inp.warnings),
                device=options.device, gpu_budget=gpu_budget)


def gate_budget(options: RunOptions) -> int:
    """Bytes the gate forward may hold (weights bands and activations): the run's data budget."""
    return options.budget() - budget_mod.baseline_rss("passthrough", options.device) - budget_mod.ALLOCATOR_SLACK


def open_gates(folder: Path) -> ModelFiles:
    return open_model(folder)


def _info(mf: ModelFiles, name: str, out_name: str) -> TensorInfo:
    info = mf.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{mf.path}: tensor {name!r} (needed for output {out_name!r}) is missing")
    return info


def _with_shard(t: TensorPlan, shard: int) -> TensorPlan:
    from dataclasses import replace

    return replace(t, shard=shard)
