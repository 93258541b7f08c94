#!/usr/bin/env python
"""Reads of the inputs against the budget, cold and warm page cache: what passes cost on a real disk.

    python scripts/bench_reads.py --method ties --preset 1b --data /work/bench-data --budget 1GiB --budget 4GiB

For each budget: `streammerge check`'s plan gives the reads per input byte; then `streammerge run` once
with the inputs evicted from the page cache (cold: posix_fadvise DONTNEED on every input file, which
drops only these files' pages, unlike /proc/sys/vm/drop_caches, so other work on the machine keeps its
cache) and once after reading every input file (warm). Prints a markdown table with the CPU and ISA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import method_config  # noqa: E402
from cpu_info import cpu_line  # noqa: E402

from streammerge import api  # noqa: E402
from streammerge.plan.passes import summary  # noqa: E402
from streammerge.synth import PRESETS, make_family  # noqa: E402


def _files(models: list[Path]) -> list[Path]:
    return [f for m in models for f in sorted(m.glob("*.safetensors"))]


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--budget", action="append", help="repeatable (default 1GiB and 4GiB)")
    args = ap.parse_args()
    budgets = args.budget or ["1GiB", "4GiB"]
    root = args.data / args.preset
    base, experts = make_family(root, PRESETS[args.preset], args.experts, seed=0, reuse=True)
    files = _files([base, *experts])
    total = sum(f.stat().st_size for f in files)
    print(f"# {args.method}, {args.preset} ({total / 1e9:.2f} GB of inputs); {cpu_line()}\n")
    print("| budget | plan | page cache | wall s | input GB/s (bytes read / wall) |")
    print("|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cfg = Path(tmp) / "config.yml"
        cfg.write_text(yaml.safe_dump(method_config(args.method, base, experts, "bfloat16"), sort_keys=False))
        for budget in budgets:
            plan = api.check(cfg, max_memory=budget).plan
            read = plan.bytes_in
            for cache in ("cold", "warm"):
                evict(files) if cache == "cold" else warm(files)
                out = Path(tmp) / f"out-{budget}-{cache}"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "streammerge.cli", "run", str(cfg), str(out), "--max-memory", budget],
                               check=True, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                print(f"| {budget} | {summary(plan)} | {cache} | {wall:.1f} | {read / wall / 1e9:.2f} |", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)


if __name__ == "__main__":
    main()
