#!/usr/bin/env python
"""A two-stage recipe (s1: ties over the experts; s2: linear of s1 and the first expert) run by
`streammerge batch` with s1 written to OUTDIR/s1 and with `--stream-intermediates` (s1 streamed into s2,
never written), and mergekit-multi 0.1.5 running the same recipe (it writes s1), in the same run: wall
seconds, peak RSS, bytes written, and whether s2 is byte-identical both ways (issue 15, item 2).

    python scripts/bench_stream.py --data /work/bench-data --preset 1b --experts 3 --max-memory 4GiB \\
        --repeat 3 --out docs/bench-stream.md

Uses DATA/PRESET/{base,expert_*} where they exist, else writes them with streammerge.synth. The page
cache is warm (the inputs are read once first); rounds are interleaved and each row's median reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402

from streammerge.synth import PRESETS  # noqa: E402

GiB = 1 << 30


def recipe(base: Path, experts: list[Path]) -> list[dict]:
    s1 = {"name": "s1", **bm.method_config("ties", base, experts, "bfloat16")}
    s2 = {"name": "s2", "merge_method": "linear", "dtype": "bfloat16",
          "models": [{"model": "s1", "parameters": {"weight": 0.5}},
                     {"model": str(experts[0]), "parameters": {"weight": 0.5}}]}
    return [s1, s2]


def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.safetensors"))}


def _written(d: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in d.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream-bench"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)

    base, experts = bm.found_family(args.data, args.preset, args.experts)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    path = args.work / "recipe.yml"
    path.write_text(yaml.safe_dump_all(recipe(base, experts), sort_keys=False))
    sm = str(Path(sys.executable).parent / "streammerge")
    bm.warm([base, *experts])
    runs: dict[str, list[dict]] = {"written": [], "streamed": []}
    digests: dict[str, dict] = {}
    for _ in range(args.repeat):
        for tag, extra in (("written", []), ("streamed", ["--stream-intermediates"])):
            out, rep = args.work / tag, args.work / f"{tag}.json"
            cmd = [sm, "batch", str(path), str(out), "--max-memory", args.max_memory, "--no-progress",
                   "--report", str(rep), *extra]
            rc, wall, peak, cpu, _ = bm.measure(cmd, args.work / f"{tag}.log", use_time=True)
            if rc:
                print((args.work / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
                return 1
            stages = {s["name"]: s for s in json.loads(rep.read_text())["stages"]}
            runs[tag].append({"wall_s": wall, "peak_rss": peak, "cpu_s": cpu, "written": _written(out),
                              "s1": stages["s1"]["status"], "held": stages["s1"]["held_peak"]})
            digests[tag] = _digests(out / "s2")
            shutil.rmtree(out)
    mk = None
    if not args.skip_mergekit:
        out = args.work / "mergekit"
        cmd = [str(Path(sys.executable).parent / "mergekit-multi"), str(path), "-I", str(out), "--lazy-unpickle"]
        rc, wall, peak, cpu, _ = bm.measure(cmd, args.work / "mergekit.log", use_time=True)
        mk = {"rc": rc, "wall_s": wall, "peak_rss": peak, "cpu_s": cpu, "written": _written(out)}
        shutil.rmtree(out, ignore_errors=True)
    lines = [f"{bm.machine()}; commit {bm.commit()}; {args.preset} family, base + {args.experts} experts, "
             f"--max-memory {args.max_memory}, warm page cache; median of {args.repeat} interleaved rounds",
             "", "| s1 | wall s | peak RSS GiB | CPU s | bytes written GB | s1 tensors held at most MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for tag, rs in runs.items():
        r = sorted(rs, key=lambda x: x["wall_s"])[(len(rs) - 1) // 2]
        each = ", ".join(f"{x['wall_s']:.1f}" for x in rs)
        lines.append(f"| {tag} ({r['s1']}) | {r['wall_s']:.1f} ({each}) | {r['peak_rss'] / GiB:.2f} | {r['cpu_s']:.1f} "
                     f"| {r['written'] / 1e9:.2f} | {r['held'] / 2**20:.0f} |")
    if mk is not None:
        fail = f" (rc {mk['rc']})" if mk["rc"] else ""
        lines.append(f"| mergekit-multi 0.1.5{fail} (written), once | {mk['wall_s']:.1f} | {mk['peak_rss'] / GiB:.2f} "
                     f"| {mk['cpu_s']:.1f} | {mk['written'] / 1e9:.2f} | — |")
    same = digests["written"] == digests["streamed"] != {}
    lines += ["", f"s2 byte-identical written and streamed: {'yes' if same else 'NO'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
