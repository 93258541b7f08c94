"""Micro-benchmark: CPU throughput of the Philox draws (`philox_uniform`, `bernoulli_keep`).

    python scripts/bench_philox.py [--log2-n 22] [--repeat 2]

Prints M elements/s of wall time and per CPU-second, best of `--repeat` after one warm-up call. It
never asserts a speed (moved here from tests/kernel_tests/test_philox.py, where it only printed).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from streammerge.kernels.philox import bernoulli_keep, philox_uniform

SEED, STREAM = 0x0123456789ABCDEF, 0xFEDCBA9876543210


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2-n", type=int, default=22, help="draw 2^N elements (default: 22)")
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per function (default: 2)")
    args = ap.parse_args()
    n = 1 << args.log2_n
    for name, fn in (
        ("philox_uniform", lambda: philox_uniform(SEED, STREAM, 0, n)),
        ("bernoulli_keep", lambda: bernoulli_keep(SEED, STREAM, 0, n, 0.3)),
    ):
        fn()
        best_wall, best_cpu = math.inf, math.inf
        for _ in range(args.repeat):
            w, c = time.perf_counter(), time.process_time()
            fn()
            best_wall = min(best_wall, time.perf_counter() - w)
            best_cpu = min(best_cpu, time.process_time() - c)
        print(f"{name}: {n / best_wall / 1e6:.0f} M elem/s wall, "
              f"{n / best_cpu / 1e6:.0f} M elem/s per CPU-second ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
