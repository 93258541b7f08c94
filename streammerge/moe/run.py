"""`streammerge moe`: check a mergekit-moe config, compute the gates out of core, run the copy plan.

Order: parse and check (headers only), compute the router rows layer by layer under the data budget
and write them (with any zero biases) to a small safetensors file, plan every output tensor as a
passthrough copy, then the normal executor and writer; the folder gets config.json, the base's
tokenizer files, mergekit_config.yml and a model card, the index last. The gates file is kept in a
cache keyed by the config, the seed and the base's files (`$STREAMMERGE_CACHE`, else
`~/.cache/streammerge`), so `--resume` finds the same input bytes and an identical rerun skips the
forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..config import read_config_text
from ..io import card, checkpoint
from ..io.header import FileStamp
from ..options import RunOptions
from ..plan.ir import Plan
from ..report import RunReport, peak_rss_bytes
from .config import MoEConfig, parse_moe_text
from .plan import MoEInputs, build_moe_plan, gate_budget, open_gates, open_moe


def check_moe(config_path: str | os.PathLike, options: RunOptions | None = None) -> tuple[MoEInputs, Plan]:
    """Validate a MoE config from headers, config.json and tokenizer files; returns the inputs and the
    copy plan (router rows left out: they are computed by the run)."""
    options = options or RunOptions()
    text = read_config_text(config_path)
    cfg = parse_moe_text(text, str(config_path))
    inp = open_moe(cfg, Path(config_path).resolve().parent)
    return inp, build_moe_plan(inp, options, None)


def cache_root() -> Path:
    env = os.environ.get("STREAMMERGE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streammerge"


def _gates_key(inp: MoEInputs, seed: int) -> str:
    h = hashlib.sha256(inp.cfg.model_dump_json().encode())
    h.update(f"{inp.arch}:{inp.out_dtype}:{seed}".encode())
    files = sorted({i.file for i in inp.base.tensors.values()} | {inp.base.path / "tokenizer.json",
                                                                  inp.base.path / "tokenizer_config.json"})
    for f in files:
        if f.exists():
            st = FileStamp.of(f.stat())
            h.update(f"{f}:{st.size}:{st.mtime_ns}".encode())
    return h.hexdigest()[:32]


def write_gates(inp: MoEInputs, options: RunOptions) -> Path:
    """Compute the router rows (and zero biases) into the cache; returns the folder. Reuses a finished one."""
    import torch
    from safetensors.torch import save_file

    from .gates import compute_gates

    folder = cache_root() / "moe-gates" / _gates_key(inp, options.seed)
    if (folder / "model.safetensors").is_file():
        return folder
    cfg = inp.cfg
    need = list(cfg.experts) + list(cfg.shared_experts or [])
    if inp.arch != "qwen":
        need = list(cfg.experts)
    vecs = compute_gates(inp.base, inp.base_arch, need, cfg.gate_mode, gate_budget(options), options.seed)
    tensors = {}
    n = len(cfg.experts)
    for name, shape in inp.synthesized():
        layer = int(name.split(".")[2])
        if name.endswith("shared_expert_gate.weight"):
            tensors[name] = vecs[layer, n:n + 1].contiguous()
        elif name.endswith("gate.weight"):
            tensors[name] = vecs[layer, :n].contiguous()
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "gates.json").write_text(json.dumps({"gate_mode": cfg.gate_mode, "seed": options.seed}) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another run finished the same gates first
        pass
    return folder


def run_moe(config_path: str | os.PathLike, out: str | os.PathLike, options: RunOptions | None = None,
            on_start=None, on_progress=None) -> RunReport:
    """Build the MoE `config_path` describes into `out`; returns the run report."""
    from .. import execute  # noqa: F401  torch first: it is part of the baseline the plan measures
    from ..merge import execute_plan, plan_fingerprint, prepare_out_dir, resolve_device, with_gpu_budget
    from ..pipeline import bound_malloc

    options = with_gpu_budget(options or RunOptions())
    t0 = time.perf_counter()
    text = read_config_text(config_path)
    cfg = parse_moe_text(text, str(config_path))
    inp = open_moe(cfg, Path(config_path).resolve().parent)
    build_moe_plan(inp, options, None)  # budget and shape problems before the gate forward
    device = resolve_device(options.device)
    bound_malloc()  # before the gate forward too: freed bands go back to the OS
    gates = open_gates(write_gates(inp, options))
    plan = build_moe_plan(inp, options, gates)
    out = Path(out)
    fingerprint = plan_fingerprint(plan, cfg)
    lock = prepare_out_dir(out, plan, options, fingerprint, config_path)
    try:
        plan, result, used = execute_plan(plan, out, fingerprint, device, options, on_start, on_progress)
        _finish(out, plan, cfg, text, options, inp)
    finally:
        lock.release()
    return RunReport(method="moe", out_dir=str(out), seconds=time.perf_counter() - t0, peak_rss=peak_rss_bytes(),
                     budget=plan.budget, device=result.device, shards=result.shards,
                     nonfinite_tensors=result.nonfinite, warnings=list(plan.warnings), kernels=used)


def _finish(out: Path, plan: Plan, cfg: MoEConfig, text: str, options: RunOptions, inp: MoEInputs) -> None:
    """Tokenizer, config copy, model card, config.json, then the index (the commit order of `run`)."""
    if options.copy_tokenizer:
        checkpoint.copy_tokenizer(inp.base.path, out)
    card.write_config_copy(out, text)
    if options.write_model_card:
        refs = cfg.referenced_models()
        inputs = [card.describe_input(r, inp.models[r].path) for r in refs]
        card.write_model_card(out, text, f"moe ({inp.arch}, gate_mode {cfg.gate_mode})", inputs, cfg.base_model,
                              cfg.model_dump(mode="json", exclude_none=True))
    from ..merge import commit_index

    checkpoint.write_config(out, plan.out_config or {})
    commit_index(out, plan, options.fsync)
