"""`--backend ray`: the output shards of one plan computed as Ray tasks, one per shard.

Each task gets the plan (as JSON: small, whatever the model's size), reads its tensors' bands straight
from the input files (storage every worker sees, never Ray's object store), and writes its shard as a
local run does: into `NAME.partial`, renamed when complete. The driver records each finished shard in
the manifest as the tasks report, and writes the index, config.json and the rest last, as `run`
does; so a worker killed mid-shard leaves no shard under its final name, Ray's retry (or `--resume`)
redoes that shard only, and the output is byte-identical to a local run.

Each task asks Ray for the plan's memory estimate (`memory=`) and one CPU; torch threads follow.
Ray is the `ray` extra, imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import OutputError
from .options import RunOptions
from .plan.ir import Plan

MAX_RETRIES = 3  # a task whose worker dies is run again, up to this many times


def _ray():
    try:
        import ray
    except ImportError:
        raise OutputError("--backend ray needs Ray: pip install 'streammerge[ray]' (or run with --backend local)") from None
    return ray


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise OutputError(f"--backend ray: cannot join the Ray cluster at {address or 'a new local one'} ({e}); "
                          "check --address / RAY_ADDRESS, or run with --backend local") from None


def _shard_task(plan_json: str, cwd: str, out: str, index: int, device: str, prefetch: int, check_nonfinite: bool,
                durable: bool):
    """One shard, in a Ray worker: (its ShardReport, the non-finite tensors it found). The driver's working
    folder is this task's too, so a config's relative model paths name the same files on every node."""
    import torch

    from .execute import Executor
    from .plan.serialize import plan_from_json

    os.chdir(cwd)
    plan = plan_from_json(plan_json)
    others = frozenset(range(len(plan.shards))) - {index}
    ex = Executor(plan, out_dir=Path(out), device=torch.device(device), prefetch=prefetch, skip_shards=others,
                  check_nonfinite=check_nonfinite, durable=durable)
    result = ex.run()
    return result.shards[index], result.nonfinite


def ray_shards(plan: Plan, out: Path, device, options: RunOptions, skip: frozenset[int],
               on_progress: Callable[[int], None], shard_done: Callable[[int, object], None]):
    """Every shard not in `skip` as a Ray task; returns the run's ExecResult (as the local executor's)."""
    from .execute import ExecResult
    from .plan.serialize import plan_to_json
    from .report import ShardReport

    ray = _ray()
    _connect(ray, options.ray_address)
    plan_ref = ray.put(plan_to_json(plan))
    task = ray.remote(_shard_task).options(num_cpus=1, memory=max(plan.peak_estimate, 1), max_retries=MAX_RETRIES,
                                           retry_exceptions=False)
    stats = [ShardReport(s.filename, skipped=i in skip) for i, s in enumerate(plan.shards)]
    pending = {task.remote(plan_ref, os.getcwd(), str(Path(out).resolve()), i, device.type, options.prefetch,
                           options.check_nonfinite, options.fsync): i
               for i in range(len(plan.shards)) if i not in skip}
    nonfinite: list[str] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    report, bad = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise OutputError(f"--backend ray: shard {plan.shards[i].filename} failed ({str(e)[:300]}); its "
                                      "finished shards are kept: run again with --resume") from None
                stats[i] = report
                nonfinite += bad
                on_progress(report.bytes_read)
                shard_done(i, report)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return ExecResult(stats, nonfinite, device.type)
