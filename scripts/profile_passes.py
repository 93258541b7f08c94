#!/usr/bin/env python
"""Where a merge spends its time, pass by pass: a profile, not a guess.

    python scripts/profile_passes.py --method model_stock --preset 1b --experts 3 --data /work/bench-data
    python scripts/profile_passes.py --method arcee_fusion --preset small --cprofile 25

Runs one merge in-process on ``streammerge.synth`` checkpoints (made under DATA/PRESET if missing, as
``bench_merge.py`` makes them) with the method's reduce passes and map wrapped in timers, and prints,
per pass: calls, seconds summed over the compute threads, and the share of all compute; then the
reader's and writer's seconds and the run's wall time. ``--cprofile N`` runs the compute on one thread
and prints the N functions with the most time inside the passes (cProfile, cumulative), which names
the torch calls or kernels a pass spends its time in. The CPU model and instruction set head the output.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import method_config  # noqa: E402
from cpu_info import cpu_line  # noqa: E402

from streammerge import api  # noqa: E402
from streammerge.methods import table  # noqa: E402
from streammerge.synth import PRESETS, make_family  # noqa: E402

_lock = threading.Lock()
SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
PROFILE: cProfile.Profile | None = None


def _timed(name: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        if PROFILE is not None:
            PROFILE.enable()
        try:
            return fn(*a, **k)
        finally:
            if PROFILE is not None:
                PROFILE.disable()
            dt = time.perf_counter() - t0
            with _lock:
                SECONDS[name] += dt
                CALLS[name] += 1
    return wrapper


def instrument(method: str) -> None:
    """Replace the method's spec in the table by one whose passes are timed (same results)."""
    spec = table.METHODS[method]

    def reduces(job):
        out = []
        for r in spec.reduces_for(job):
            out.append(dataclasses.replace(
                r, init=_timed(f"{r.name}.init", r.init), update=_timed(f"{r.name}.update", r.update),
                finish=_timed(f"{r.name}.finish", r.finish),
                merge=_timed(f"{r.name}.merge", r.merge) if r.merge else None,
                so_far=_timed(f"{r.name}.so_far", r.so_far) if r.so_far else None))
        return tuple(out)

    table.METHODS[method] = dataclasses.replace(spec, map=_timed("map", spec.map), reduce_plan=reduces)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="one compute thread; top N functions")
    args = ap.parse_args()

    root = args.data / args.preset
    base, experts = make_family(root, PRESETS[args.preset], args.experts, seed=0, shard_size=1 << 30, reuse=True)
    cfg = method_config(args.method, base, experts, "bfloat16")
    instrument(args.method)
    global PROFILE
    if args.cprofile:
        import torch
        torch.set_num_threads(1)    # no worker pool: every pass runs on the compute thread, one at a time
        PROFILE = cProfile.Profile()
    print(f"# {args.method}, preset {args.preset}, {args.experts} experts, --max-memory {args.max_memory}; {cpu_line()}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cfg_path = Path(tmp) / "config.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        report = api.run(cfg_path, Path(tmp) / "out", max_memory=args.max_memory)
        wall = time.perf_counter() - t0
    total = sum(SECONDS.values()) or 1.0
    print("\n| pass | calls | seconds (all threads) | share of compute |\n|---|---:|---:|---:|")
    for name, s in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {CALLS[name]} | {s:.2f} | {100 * s / total:.1f}% |")
    read = sum(s.read_s for s in report.shards)
    write = sum(s.write_s for s in report.shards)
    gb = sum(s.bytes_read for s in report.shards) / 1e9
    print(f"\nwall {wall:.1f} s; reader {read:.1f} s for {gb:.2f} GB; writer {write:.1f} s; peak RSS "
          f"{report.peak_rss / 2**30:.2f} GiB")
    if PROFILE is not None:
        out = io.StringIO()
        pstats.Stats(PROFILE, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print("\n```\n" + out.getvalue().strip() + "\n```")


if __name__ == "__main__":
    main()
