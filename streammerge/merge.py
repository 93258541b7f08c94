"""One merge, end to end: config -> plan -> execute -> commit the output folder.

Commit order makes an interrupted run safe: the lock and the manifest come first (so `--resume`
accepts any folder a run started), shards appear under their final names only when complete, then
tokenizer files and the model card, then config.json, and the index last, so no loader mistakes a
partial folder for a finished model. The manifest in `OUT/.streammerge/` records each finished shard's
size and checksum for `--resume`. The config file is read once: what the folder says about it is what ran.
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

from .config import MergeConfig, load_config_text, read_config_text
from .errors import CheckpointError, OutputError, ResumeError
from .io import card, checkpoint, outdir
from .io.chat_templates import resolve_chat_template
from .io.checksum import file_digest
from .io.header import FileStamp
from .io.outdir import MANIFEST_DIR, check_report_path  # noqa: F401  (check_report_path: public, for the CLI)
from .io.writer import fsync_dir, write_json_atomic
from .options import RunOptions, default_max_gpu_memory
from .plan.build import build_plan
from .plan.ir import Plan
from .report import RunReport, peak_rss_bytes

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from .io.reader import TensorSource


def check(config_path: str | os.PathLike | None, options: RunOptions | None = None, *,
          config_text: str | None = None) -> Plan:
    """Validate the config against the checkpoints' headers and return the plan; reads no tensor data.
    With `config_text` the config is that text (`config_path` may then be None: relative model paths
    are taken from the working directory)."""
    options = options or RunOptions()
    text = read_config_text(config_path) if config_text is None else config_text
    return build_plan(load_config_text(text, _source(config_path)), config_path, options)


def _source(config_path: str | os.PathLike | None) -> str:
    return "config" if config_path is None else str(config_path)


def plan_fingerprint(plan: Plan, config: MergeConfig) -> str:
    h = hashlib.sha256()
    h.update(config.model_dump_json().encode())
    h.update(json.dumps([(s.filename, list(s.tensors), s.nbytes) for s in plan.shards]).encode())
    h.update(str(plan.seed).encode())
    for t in plan.tensors:
        for s in t.inputs:
            st = s.info.stamp or FileStamp.of(s.info.file.stat())  # recorded with the header: no second stat
            h.update(f"{s.info.file}:{st.size}:{st.mtime_ns}:{s.info.begin}".encode())
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


resolve_device = _resolve_device  # public name for `streammerge moe`


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


with_gpu_budget = _with_gpu_budget  # public name for `streammerge moe`


def _input_files(plan: Plan) -> list[Path]:
    """Every file the run reads from an input model: shards, config.json, tokenizer and generation files."""
    files = {s.info.file for t in plan.tensors for s in t.inputs}
    for m in plan.models:
        for name in ("config.json", *checkpoint.TOKENIZER_FILES, *checkpoint.GENERATION_FILES):
            if os.path.lexists(Path(m) / name):
                files.add(Path(m) / name)
    return sorted(files)


def prepare_out_dir(out: Path, plan: Plan, options: RunOptions, fingerprint: str,
                    config_path: str | os.PathLike | None = None) -> outdir.OutputLock:
    """Check the folder may be used, lock it, write a fresh manifest (unless resuming), then with
    --overwrite delete what an earlier merge wrote there and nothing else: the folder holds a marker at
    every moment, so a run stopped anywhere here is resumable. Returns the held lock; the caller
    releases it once the index is written."""
    out_abs = out.resolve()
    for m in plan.models:
        m_abs = Path(m).resolve()
        if out_abs == m_abs or m_abs in out_abs.parents or out_abs in m_abs.parents:
            raise OutputError(f"output folder {out} overlaps input model {m}; choose a folder outside every input")
    outdir.check_outside(out, [*([config_path] if config_path else []), *_input_files(plan)])
    state = outdir.check_folder(out, options.overwrite, options.resume)
    _check_free_disk(out, plan, options, state)
    lock = outdir.OutputLock(out).acquire()
    try:
        outdir.remove_partials(out)
        if not options.resume:
            write_json_atomic(outdir.manifest_path(out), {"fingerprint": fingerprint, "shards": {}})
            if state in ("streammerge", "mergekit"):
                outdir.clear_output(out, [s.filename for s in plan.shards])
    except BaseException:
        lock.release()
        raise
    return lock


def _check_free_disk(out: Path, plan: Plan, options: RunOptions, state: str) -> None:
    """Refuse before any work (before the folder is created) when its filesystem cannot hold the
    shards still to write: a resume keeps the shards there, an overwrite frees what it deletes."""
    probe = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if options.resume:
        kept_or_freed = sum(s.nbytes for s in plan.shards if (out / s.filename).is_file())
    elif state in ("streammerge", "mergekit"):
        kept_or_freed = sum(f.lstat().st_size for f in outdir.merge_files(out, [s.filename for s in plan.shards])
                            if not f.is_symlink())
    else:
        kept_or_freed = 0
    need = plan.bytes_out - kept_or_freed + (1 << 20)
    if free < need:
        raise OutputError(f"output folder {out}: the merge writes {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
                          f"are free on its filesystem; free space or choose another folder")


def _finished_shards(out: Path, fingerprint: str, plan: Plan) -> tuple[frozenset[int], dict, list[str]]:
    """The shards a --resume keeps: recorded in the manifest, a regular file, the recorded size and
    checksum. One that fails is our own file, so it is deleted and merged again, with a warning."""
    doc = outdir.read_manifest(out)
    if doc["fingerprint"] != fingerprint:
        raise ResumeError(f"--resume: the manifest in {out} was written for a different config, inputs or shard "
                          "layout; run with --overwrite to start again")
    done, records, warnings = set(), {}, []
    for i, shard in enumerate(plan.shards):
        rec = doc["shards"].get(shard.filename)
        if rec is None:
            continue
        f = out / shard.filename
        problem = _shard_problem(f, rec)
        if problem is None:
            done.add(i)
            records[shard.filename] = rec
            continue
        if f.is_dir() and not f.is_symlink():
            raise OutputError(f"--resume: {f} is a folder where this merge's shard belongs; it was not written by "
                              "streammerge, so it is not deleted: move it away and run again")
        warnings.append(f"--resume: {f} {problem}; merging it again")
        if os.path.lexists(f):
            f.unlink()
    return frozenset(done), records, warnings


def _shard_problem(f: Path, rec: dict) -> str | None:
    if f.is_symlink():
        return "is a symbolic link, not the shard this merge wrote"
    if not f.is_file():
        return "is missing" if not f.exists() else "is not a regular file"
    size = f.stat().st_size
    if size != rec["size"]:
        return f"is {size} bytes, not the {rec['size']} recorded when it was written"
    if not rec.get("checksum"):
        return None  # recorded without a checksum: the size is all there is to check
    try:
        digest = file_digest(f)
    except (CheckpointError, OSError) as e:
        return f"cannot be read back as a shard ({str(e)[:120]})"
    if digest != rec["checksum"]:
        return "does not match the checksum recorded when it was written (its bytes changed since)"
    return None


def run(config_path: str | os.PathLike | None, out: str | os.PathLike, options: RunOptions | None = None,
        on_start: Callable[[Plan], None] | None = None, on_progress: Callable[[int], None] | None = None, *,
        config_text: str | None = None, sources: Mapping[Path, TensorSource] | None = None) -> RunReport:
    """Merge as the config says into `out`; returns the run report. `config_text`: as in `check`;
    `sources`: input files served from memory (`batch/stream.py`, a stage streamed into this one)."""
    from . import execute  # noqa: F401  before planning: torch is part of the memory baseline the plan measures

    options = _with_gpu_budget(options or RunOptions())
    t0 = time.perf_counter()
    text = read_config_text(config_path) if config_text is None else config_text
    config = load_config_text(text, _source(config_path))
    plan = build_plan(config, config_path, options)
    if plan.downloads:  # hub shards the merge reads: into the cache, then planned again from the files
        from .hub.fetch import fetch_downloads

        outdir.check_folder(Path(out), options.overwrite, options.resume)  # before, not after, the download
        fetch_downloads(plan.downloads, options.download, options.progress)
        plan = build_plan(config, config_path, options)
    device = _resolve_device(options.device)
    out = Path(out)
    fingerprint = plan_fingerprint(plan, config)
    lock = prepare_out_dir(out, plan, options, fingerprint, config_path)
    try:
        return _run_locked(plan, config, text, out, fingerprint, device, options, t0, on_start, on_progress, sources)
    finally:
        lock.release()


def _run_locked(plan: Plan, config: MergeConfig, text: str, out: Path, fingerprint: str, device: torch.device,
                options: RunOptions, t0: float, on_start: Callable[[Plan], None] | None,
                on_progress: Callable[[int], None] | None, sources: Mapping[Path, TensorSource] | None = None
                ) -> RunReport:
    plan, result, used = execute_plan(plan, out, fingerprint, device, options, on_start, on_progress, sources)
    finish_folder(out, plan, config, text, options)
    return RunReport(method=plan.method, out_dir=str(out), seconds=time.perf_counter() - t0, peak_rss=peak_rss_bytes(),
                     budget=plan.budget, device=result.device, shards=result.shards, nonfinite_tensors=result.nonfinite,
                     warnings=list(plan.warnings), kernels=used)


def execute_plan(plan: Plan, out: Path, fingerprint: str, device: torch.device, options: RunOptions,
                 on_start: Callable[[Plan], None] | None = None, on_progress: Callable[[int], None] | None = None,
                 sources: Mapping[Path, TensorSource] | None = None):
    """Write a planned merge's shards into a locked, prepared `out` (resuming where the manifest says);
    returns (plan with resume warnings, ExecResult, kernels used). Shared by `run` and `streammerge moe`,
    which writes the files around the shards itself."""
    from .execute import Executor
    from .pipeline import bound_malloc

    plan, skip, shard_done = start_manifest(out, plan, fingerprint, options)
    if on_start:
        on_start(plan)
    from .kernels import dispatch

    dispatch.reset()
    if options.backend == "ray":
        from .ray_backend import ray_shards

        return plan, ray_shards(plan, out, device, options, skip, on_progress or (lambda n: None), shard_done), {}
    bound_malloc()  # process-wide: once per run, before its threads start
    executor = Executor(plan, out_dir=out, device=device, prefetch=options.prefetch, skip_shards=skip,
                        on_progress=on_progress, on_shard_done=shard_done, check_nonfinite=options.check_nonfinite,
                        durable=options.fsync, sources=sources)
    result = executor.run()
    return plan, result, dispatch.used()


def start_manifest(out: Path, plan: Plan, fingerprint: str, options: RunOptions
                   ) -> tuple[Plan, frozenset[int], Callable[[int, object], None]]:
    """The manifest of a locked, prepared `out` at the start of its shards' writing: with --resume, the
    shards kept (verified) and the plan with their warnings; returns (plan, kept shards, the callback
    that records a finished shard). Shared by `execute_plan` and a batch's shared-read run."""
    manifest_path = outdir.manifest_path(out)
    skip, records, warnings = frozenset(), {}, []
    if options.resume and manifest_path.exists():
        skip, records, warnings = _finished_shards(out, fingerprint, plan)
    manifest = {"fingerprint": fingerprint, "shards": records}
    write_json_atomic(manifest_path, manifest)
    if warnings:
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, *warnings))

    def shard_done(i: int, stats) -> None:
        f = out / plan.shards[i].filename
        # the executor's streamed checksum; read back only where it gives none
        checksum = getattr(stats, "checksum", "") or file_digest(f)
        done = {**manifest["shards"], plan.shards[i].filename: {"size": f.stat().st_size, "checksum": checksum}}
        # in the plan's shard order, not the order shards finished in: the manifest of a Ray run (or a
        # resumed one) is then byte-identical to a local run's
        manifest["shards"] = {s.filename: done[s.filename] for s in plan.shards if s.filename in done}
        write_json_atomic(manifest_path, manifest)

    return plan, skip, shard_done


def finish_folder(out: Path, plan: Plan, config: MergeConfig, config_text: str, options: RunOptions) -> None:
    """The files around the shards, from the config text the run planned from (never re-read); the
    folder is fsynced before the index goes in, and after, so a power loss keeps the commit order."""
    # mergekit saves the tokenizer a tokenizer_source builds even with --no-copy-tokenizer
    builds_tokenizer = config.tokenizer_source is not None or config.tokenizer is not None
    if (options.copy_tokenizer or builds_tokenizer) and plan.tokenizer_model is not None:
        template = resolve_chat_template(config.chat_template, [Path(m) for m in plan.models])
        checkpoint.copy_tokenizer(Path(plan.models[plan.tokenizer_model]), out, template)
    card.write_config_copy(out, config_text)
    if options.write_model_card:
        inputs = [card.describe_input(ref, path) for ref, path in zip(config.referenced_models(), plan.models)]
        card.write_model_card(out, config_text, plan.method, inputs, config.base_model,
                              config.model_dump(mode="json", exclude_none=True))
    if plan.out_config is not None:
        checkpoint.write_config(out, plan.out_config)
    commit_index(out, plan, options.fsync)


def commit_index(out: Path, plan: Plan, fsync: bool) -> None:
    """The last step of a merge folder: fsync what is there, then the index (sharded outputs), fsynced,
    so a loader never finds an index before the files it names."""
    if fsync:
        fsync_dir(out)
    if len(plan.shards) > 1:
        weight_map = {name: s.filename for s in plan.shards for name in s.tensors}
        checkpoint.write_index(out, weight_map, sum(s.nbytes for s in plan.shards))
        if fsync:
            fsync_dir(out)
