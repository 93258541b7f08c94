#!/usr/bin/env python
"""The ties config on the local backend and on a two-worker local Ray cluster, same run: wall seconds
and a byte comparison of every output file (issue 15's "a two-worker local Ray run of the ties config is
byte-identical to the local run").

    python scripts/bench_ray.py --data /work/bench-data --preset 1b --experts 3 --max-memory 1GiB \\
        --out-shard-size 1GiB --workers 2 --work /tmp/ray-bench

Uses DATA/PRESET/{base,expert_*} as they are when they exist (made with `streammerge synth` /
scripts/bench_merge.py), else writes them with streammerge.synth. With --address it joins that cluster;
without, `streammerge run --backend ray` starts a local one with Ray's default of one CPU per core (two
workers on a 2-core VM; --workers only labels the table). (`ray start --head` on 127.0.0.1 was tried first: Ray 2.60's clusters started
that way refuse a driver that connects by explicit address without their auth token.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import commit, found_family, method_config  # noqa: E402


def _digests(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "lock"}


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--out-shard-size", default="1GiB", help="several shards, so that the workers share them")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: a new local one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ray-bench"))
    args = ap.parse_args()

    base, experts = found_family(args.data, args.preset, args.experts)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = args.work / "ties.yml"
    cfg.write_text(yaml.safe_dump(method_config("ties", base, experts, "bfloat16"), sort_keys=False))
    sm = [sys.executable, "-m", "streammerge.cli", "run", str(cfg)]
    flags = ["--max-memory", args.max_memory, "--out-shard-size", args.out_shard_size, "--no-progress", "--overwrite"]
    local, on_ray = args.work / "local", args.work / "ray"
    for d in (local, on_ray):
        shutil.rmtree(d, ignore_errors=True)
    local_s = _timed([*sm, str(local), *flags])
    env_start = time.perf_counter()
    start_s = time.perf_counter() - env_start
    where = ["--address", args.address] if args.address else []
    ray_s = _timed([*sm, str(on_ray), *flags, "--backend", "ray", *where])
    a, b = _digests(local), _digests(on_ray)
    same = a == b
    print(f"| commit | shards | local wall s | ray start s | ray ({args.workers} workers) wall s | files | identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    shards = sum(1 for n in a if n.endswith(".safetensors"))
    row = [commit(), shards, f"{local_s:.1f}", f"{start_s:.1f}", f"{ray_s:.1f}", len(a), "yes" if same else "NO"]
    print("| " + " | ".join(map(str, row)) + " |")
    if not same:
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                print(f"differs: {name}", file=sys.stderr)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
