"""One merge, end to end: config -> plan -> execute -> commit the output folder.

Commit order makes an interrupted run safe: shards appear under their final names only when complete,
then tokenizer files and the model card, then config.json, and the index last, so no loader mistakes a
partial folder for a finished model. A manifest in `OUT/.streammerge/` records finished shards for
`--resume`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import MergeConfig, load_config
from .errors import OutputError, ResumeError
from .io import checkpoint
from .io.writer import write_json_atomic
from .options import RunOptions, default_max_gpu_memory
from .plan.build import build_plan
from .plan.ir import Plan
from .report import RunReport, ShardReport, peak_rss_bytes

if TYPE_CHECKING:
    import torch

MANIFEST_DIR = ".streammerge"


def check(config_path: str | os.PathLike, options: RunOptions | None = None) -> Plan:
    """Validate the config against the checkpoints' headers and return the plan; reads no tensor data."""
    options = options or RunOptions()
    return build_plan(load_config(config_path), config_path, options)


def plan_fingerprint(plan: Plan, config: MergeConfig) -> str:
    h = hashlib.sha256()
    h.update(config.model_dump_json().encode())
    h.update(json.dumps([(s.filename, list(s.tensors), s.nbytes) for s in plan.shards]).encode())
    h.update(str(plan.seed).encode())
    stats: dict[Path, os.stat_result] = {}
    for t in plan.tensors:
        for s in t.inputs:
            st = stats.get(s.info.file) or stats.setdefault(s.info.file, s.info.file.stat())
            h.update(f"{s.info.file}:{st.st_size}:{st.st_mtime_ns}:{s.info.begin}".encode())
    return h.hexdigest()


def _resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OutputError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise OutputError(f"--device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def _with_gpu_budget(options: RunOptions) -> RunOptions:
    """A cuda/auto run without --max-gpu-memory plans under 80% of the device's memory: read here, at run
    time, so that planning (and `check`) never needs torch."""
    if options.max_gpu_memory or options.device not in ("cuda", "auto"):
        return options
    import torch

    if not torch.cuda.is_available():
        return options  # auto runs on the CPU; cuda is refused by _resolve_device
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return dataclasses.replace(options, max_gpu_memory=default_max_gpu_memory(total))


def prepare_out_dir(out: Path, plan: Plan, options: RunOptions) -> None:
    out_abs = out.resolve()
    for m in plan.models:
        m_abs = Path(m).resolve()
        if out_abs == m_abs or m_abs in out_abs.parents or out_abs in m_abs.parents:
            raise OutputError(f"output folder {out} overlaps input model {m}; choose a folder outside every input")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if options.resume and out.exists() and any(out.iterdir()) and not (out / MANIFEST_DIR / "manifest.json").exists():
        raise ResumeError(f"--resume: {out} holds files but no {MANIFEST_DIR}/manifest.json, so it was not started by "
                          "streammerge; run without --resume into an empty folder")
    if out.exists() and any(out.iterdir()) and not options.resume:
        if not options.overwrite:
            raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                              "or --resume to continue an interrupted merge into it")
        looks_like_output = (out / MANIFEST_DIR).exists() or any(out.glob("*.safetensors")) or \
            any(out.glob("*.partial"))
        if not looks_like_output:
            raise OutputError(f"output folder {out} holds files that are not a merge output; refusing to delete "
                              "them with --overwrite. Pick an empty or new folder")
        shutil.rmtree(out)
    _check_free_disk(out, plan, options)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_DIR).mkdir(exist_ok=True)


def _check_free_disk(out: Path, plan: Plan, options: RunOptions) -> None:
    """Refuse before any work when the output's filesystem cannot hold the planned shards."""
    probe = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    done = sum(s.nbytes for s in plan.shards if (out / s.filename).exists()) if options.resume else 0
    need = plan.bytes_out - done + (1 << 20)
    if free < need:
        raise OutputError(f"output folder {out}: the merge writes {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
                          f"are free on its filesystem; free space or choose another folder")


def _load_manifest(out: Path, fingerprint: str, plan: Plan) -> frozenset[int]:
    path = out / MANIFEST_DIR / "manifest.json"
    if not path.exists():
        raise ResumeError(f"--resume: {path} not found; {out} was not started by streammerge (run without --resume)")
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") != fingerprint:
        raise ResumeError(f"--resume: the manifest in {out} was written for a different config, inputs or shard "
                          "layout; run with --overwrite to start again")
    done = set()
    for i, shard in enumerate(plan.shards):
        f = out / shard.filename
        rec = doc.get("shards", {}).get(shard.filename)
        if rec and f.exists() and f.stat().st_size == rec["size"]:
            done.add(i)
    return frozenset(done)


def run(config_path: str | os.PathLike, out: str | os.PathLike, options: RunOptions | None = None,
        on_start: Callable[[Plan], None] | None = None, on_progress: Callable[[int], None] | None = None) -> RunReport:
    """Merge as the config says into `out`; returns the run report."""
    from .execute import Executor  # before planning: torch is part of the memory baseline the plan measures

    options = _with_gpu_budget(options or RunOptions())
    t0 = time.perf_counter()
    config = load_config(config_path)
    plan = build_plan(config, config_path, options)
    device = _resolve_device(options.device)
    out = Path(out)
    prepare_out_dir(out, plan, options)
    fingerprint = plan_fingerprint(plan, config)
    manifest_path = out / MANIFEST_DIR / "manifest.json"
    skip = _load_manifest(out, fingerprint, plan) if options.resume and manifest_path.exists() else frozenset()
    manifest = {"fingerprint": fingerprint, "shards": {}}
    if skip:
        manifest = json.loads(manifest_path.read_text())
    write_json_atomic(manifest_path, manifest)
    for stale in out.glob("*.partial"):
        stale.unlink()
    if on_start:
        on_start(plan)

    def shard_done(i: int, stats) -> None:
        f = out / plan.shards[i].filename
        manifest["shards"][plan.shards[i].filename] = {"size": f.stat().st_size}
        write_json_atomic(manifest_path, manifest)

    executor = Executor(plan, out, device, options.prefetch, skip, on_progress, shard_done, options.check_nonfinite,
                        options.fsync)
    from .kernels import dispatch

    dispatch.reset()
    result = executor.run()
    _finish_folder(out, plan, config, config_path, options)
    shards = [ShardReport(s.filename, s.bytes_read, s.bytes_written, s.seconds, skipped=i in skip, read_s=s.read_s,
                          h2d_s=s.h2d_s, compute_s=s.compute_s, d2h_s=s.d2h_s, write_s=s.write_s)
              for i, s in enumerate(result.shards)]
    return RunReport(method=plan.method, out_dir=str(out), seconds=time.perf_counter() - t0, peak_rss=peak_rss_bytes(),
                     budget=plan.budget, device=result.device, shards=shards, nonfinite_tensors=result.nonfinite,
                     warnings=list(plan.warnings), kernels=dispatch.used())


def _finish_folder(out: Path, plan: Plan, config: MergeConfig, config_path, options: RunOptions) -> None:
    if options.copy_tokenizer and plan.tokenizer_model is not None:
        checkpoint.copy_tokenizer(Path(plan.models[plan.tokenizer_model]), out, config.chat_template)
    if options.write_model_card:
        raw = Path(config_path).read_text() if config_path else checkpoint.dump_yaml(config.model_dump(exclude_none=True))
        checkpoint.write_model_card(out, raw, plan.method, [str(m) for m in plan.models])
    if plan.out_config is not None:
        checkpoint.write_config(out, plan.out_config)
    if len(plan.shards) > 1:
        weight_map = {name: s.filename for s in plan.shards for name in s.tensors}
        checkpoint.write_index(out, weight_map, sum(s.nbytes for s in plan.shards))
