#!/usr/bin/env python
"""What numba/LLVM emits for the compiled kernels: vector width, packed vs scalar float ops, gathers.

    python scripts/profile_isa.py                       # this machine's CPU
    NUMBA_CPU_NAME=haswell python scripts/profile_isa.py  # AVX2 code on an AVX-512 machine
    NUMBA_CPU_NAME=znver3 python scripts/profile_isa.py

Compiles every kernel afresh (a temporary NUMBA_CACHE_DIR, so the assembly is at hand) by running tiny
merges of the given methods, then prints per kernel and signature: the widest vector register its
code uses (zmm 512-bit, ymm 256, xmm 128), how many packed float/integer instructions and scalar float
instructions (`ss`/`sd`) it has, and gathers. A hot loop with many scalar ops and few packed ones did
not vectorize: hoist the branch or the 2-D indexing out of it (kernels/_numba/dots.py `_form`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-isa-")   # before numba is imported

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import method_config  # noqa: E402
from cpu_info import cpu_line  # noqa: E402

_PACKED = re.compile(r"^\s*v?(p\w+|\w+p[sd])\s")
_SCALAR = re.compile(r"^\s*v?\w+s[sd]\s")
_GATHER = re.compile(r"gather")


def summarize(asm: str) -> dict[str, int | str]:
    lines = [ln for ln in asm.splitlines() if ln.strip() and not ln.lstrip().startswith((".", "#"))]
    width = "zmm" if any("zmm" in ln for ln in lines) else "ymm" if any("ymm" in ln for ln in lines) else "xmm"
    vec = [ln for ln in lines if "mm" in ln]
    return {"widest": width,
            "packed": sum(1 for ln in vec if _PACKED.match(ln) and ("ymm" in ln or "zmm" in ln)),
            "scalar": sum(1 for ln in vec if _SCALAR.match(ln)),
            "gathers": sum(1 for ln in vec if _GATHER.search(ln)),
            "instructions": len(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append",
                    help="methods whose kernels to compile (default: ties dare_ties della model_stock nuslerp ram)")
    args = ap.parse_args()
    methods = args.method or ["ties", "dare_ties", "della", "model_stock", "nuslerp", "ram"]

    from numba.core.registry import CPUDispatcher

    from streammerge import api, synth

    with tempfile.TemporaryDirectory() as tmp:
        base, experts = synth.make_family(Path(tmp) / "m", synth.PRESETS["tiny"], 3, seed=0)
        for m in methods:
            cfg = Path(tmp) / f"{m}.yml"
            cfg.write_text(yaml.safe_dump(method_config(m, base, experts, "bfloat16"), sort_keys=False))
            api.run(cfg, Path(tmp) / f"out-{m}")
    import numba

    print(f"# {cpu_line()}; numba {numba.__version__}, LLVM target {numba.config.CPU_NAME or 'host'}\n")
    print("| kernel | signature | widest register | packed ops (ymm/zmm) | scalar float ops | gathers | instructions |")
    print("|---|---|---|---:|---:|---:|---:|")
    seen: set[int] = set()
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("streammerge.kernels._numba.") or mod is None:
            continue
        for attr, fn in sorted(vars(mod).items()):
            if (not isinstance(fn, CPUDispatcher) or id(fn) in seen
                    or getattr(fn, "targetoptions", {}).get("inline") == "always"):
                continue
            seen.add(id(fn))
            name = fn.py_func.__module__
            for sig in fn.signatures:
                s = summarize(fn.inspect_asm(sig))
                short = ", ".join(str(t)[:24] for t in sig)
                print(f"| {name.rsplit('.', 1)[1]}.{attr} | {short[:70]} | {s['widest']} | {s['packed']} | "
                      f"{s['scalar']} | {s['gathers']} | {s['instructions']} |")


if __name__ == "__main__":
    main()
