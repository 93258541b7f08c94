#!/usr/bin/env python
"""The scale benchmark: streammerge on the 70B-shaped slab (and the 1.1B family) at several budgets.

    python scripts/bench_scale.py --preset 70b-slab --experts 2 --method ties --method linear \\
        --budget 1GiB --budget 2GiB --budget 4GiB --data /work/scale-data --out scale.md [--cold] [--plot DIR]

Builds (or reuses) base + N experts under ``DATA/PRESET`` (``streammerge.synth_fast`` for the Llama-3
presets, ``streammerge.synth`` for the others; ``--layers`` overrides the preset's layer count to fit a
disk), then runs ``streammerge run`` as a child process per method and budget with a JSON report, and
prints a markdown table: input bytes read per input byte (1.0 = each input read once), wall seconds,
mean per-shard GB/s, peak RSS against the budget. ``--cold`` drops the page cache before each run (needs
root and a writable /proc/sys/vm/drop_caches; the table says which). ``--mergekit`` runs mergekit 0.1.5
too (where it fits in memory: at 70B shapes it holds whole 2 GiB tensors per model, and it is not run by
default). Ends with a projection, from the measured seconds per input GB, for a full Llama-3-70B merge
and for 64B x 8 experts, with the disk and memory each needs. ``--keep`` keeps the inputs (default:
they are deleted at the end, as they take tens of GB). See scripts/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (same folder: configs, child-process measurement, machine line)

from streammerge.synth import FAST_PRESETS, PRESET_SHARD_SIZES, PRESETS, make_family  # noqa: E402

GiB = 1 << 30
# the settings the projection is made for: (name, parameters per model, inputs read, outputs written)
PROJECTIONS = (("Llama-3-70B, base + 2 experts", PRESETS["70b-full"].n_params, 3, 1),
               ("64B x 8 experts + base", 64e9, 9, 1))


def _inputs(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))


def _family(args, spec) -> tuple[Path, list[Path]]:
    root = args.data / (args.preset + (f"-l{args.layers}" if args.layers else ""))
    if args.preset in FAST_PRESETS:
        from streammerge.synth_fast import make_family_fast

        return make_family_fast(root, spec, args.experts, seed=0, reuse=True,
                                shard_size=PRESET_SHARD_SIZES[args.preset])
    return make_family(root, spec, args.experts, seed=0, reuse=True)


def _run_one(args, method, budget, cfg, paths, work, tool="streammerge") -> dict:
    out = work / f"out-{tool}-{method}-{budget}"
    shutil.rmtree(out, ignore_errors=True)
    tag = f"{tool}-{method}-{budget}-{'cold' if args.cold else 'warm'}"
    report = work / f"{tag}.json"
    if args.cold:
        bm.drop_caches()
    else:
        bm.warm(paths)
    if tool == "streammerge":
        cmd = [args.streammerge, "run", str(cfg), str(out), "--max-memory", budget, "--no-progress",
               "--report", str(report)]
        if args.plot:
            args.plot.mkdir(parents=True, exist_ok=True)
            cmd += ["--plot", str(args.plot / f"{tag}.png")]
    else:
        cmd = [args.mergekit_bin, str(cfg), str(out), "--lazy-unpickle"]
    rc, wall, peak, cpu, how = bm.measure(cmd, work / f"{tag}.log", use_time=False)
    row = {"tool": tool, "method": method, "budget": budget, "cache": "cold" if args.cold else "warm", "rc": rc,
           "wall_s": round(wall, 2), "peak_rss_gib": round(peak / GiB, 3), "cpu_s": round(cpu, 1),
           "command": " ".join(cmd)}
    if rc == 0 and report.is_file():
        r = json.loads(report.read_text())
        shards = [s for s in r["shards"] if not s["skipped"]]
        row["reads_per_input_byte"] = round(r["bytes_read"] / args.input_bytes, 3)
        row["shard_gbps_mean"] = round(sum(s["gb_per_s"] for s in shards) / max(len(shards), 1), 3)
        row["input_gb_per_s"] = round(args.input_bytes / 1e9 / wall, 3)
    shutil.rmtree(out, ignore_errors=True)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| tool | method | budget | cache | reads / input byte | wall s | input GB/s | shard GB/s | peak RSS GiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['method']} | {r['budget']} | {r['cache']} | {r.get('reads_per_input_byte', '—')} "
                     f"| {r['wall_s'] if r['rc'] == 0 else 'failed rc ' + str(r['rc'])} | {r.get('input_gb_per_s', '—')} "
                     f"| {r.get('shard_gbps_mean', '—')} | {r['peak_rss_gib']} |")
    return "\n".join(lines)


def _projection(rows: list[dict], model_bytes: int) -> str:
    lines = ["| setting | method | budget | input GB | est. hours | disk needed GB | memory |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, params, n_in, n_out in PROJECTIONS:
        gb_in = params * 2 * n_in / 1e9
        disk = params * 2 * (n_in + n_out) / 1e9
        for r in rows:
            if r["rc"] != 0 or "input_gb_per_s" not in r or r["tool"] != "streammerge":
                continue
            hours = gb_in / r["input_gb_per_s"] / 3600
            lines.append(f"| {name} | {r['method']} | {r['budget']} ({r['cache']}) | {gb_in:.0f} | {hours:.2f} "
                         f"| {disk:.0f} | peak {r['peak_rss_gib']} GiB measured |")
    return "\n".join(lines) + (f"\n\n(input GB/s measured on {model_bytes / 1e9:.1f} GB models; a full model has "
                               "more layers of the same shapes, so the rate carries over where the disk keeps up)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="70b-slab", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--method", action="append", help="repeatable (default: linear, ties, dare_ties, della)")
    ap.add_argument("--budget", action="append", help="repeatable --max-memory (default: 1GiB, 2GiB, 4GiB)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/scale-data"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--mergekit", action="store_true", help="run mergekit-yaml too, at the first budget only")
    ap.add_argument("--plot", type=Path, default=None, help="write each run's chart into this folder")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--out", type=Path, help="append the markdown (and FILE.json with the rows)")
    args = ap.parse_args(argv)
    spec = PRESETS[args.preset]
    if args.layers:
        spec = dataclasses.replace(spec, layers=args.layers)
    methods = args.method or ["linear", "ties", "dare_ties", "della"]
    budgets = args.budget or ["1GiB", "2GiB", "4GiB"]
    bindir = Path(sys.executable).parent
    args.streammerge = shutil.which("streammerge") or str(bindir / "streammerge")
    args.mergekit_bin = shutil.which("mergekit-yaml") or str(bindir / "mergekit-yaml")
    t0 = time.perf_counter()
    base, experts = _family(args, spec)
    made = time.perf_counter() - t0
    paths = [base, *experts]
    args.input_bytes = _inputs(paths)
    work = args.data / "work"
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = (f"## scale: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, base + {args.experts} experts, "
            f"{args.input_bytes / 1e9:.1f} GB of inputs, at {commit}\n\n{bm.machine()}; inputs made (or found) in "
            f"{made:.0f} s; command: {' '.join(sys.argv)}\n")
    print(head, flush=True)
    rows = []
    try:
        for method in methods:
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump(bm.method_config(method, base, experts, "bfloat16"), sort_keys=False))
            for budget in budgets:
                rows.append(_run_one(args, method, budget, cfg, paths, work))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
            if args.mergekit:
                rows.append(_run_one(args, method, budgets[0], cfg, paths, work, tool="mergekit"))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
    text = f"{head}\n{_table(rows)}\n\n### projection\n\n{_projection(rows, args.input_bytes // (args.experts + 1))}\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
