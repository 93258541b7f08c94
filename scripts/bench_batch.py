#!/usr/bin/env python
"""A batch of four configs over the same models (ties d=0.3, ties d=0.7, dare_ties d=0.5, linear) in
one `streammerge batch` run with shared reads, against each config run alone and against mergekit
0.1.5 running the four one after another, all in the same run: wall seconds, peak RSS, input bytes read,
and whether every batch output is byte-identical to its config run alone (issue 15's "done when").

    python scripts/bench_batch.py --data /work/bench-data --preset 1b --experts 3 --max-memory 4GiB \\
        --out docs/bench-batch.md

Uses DATA/PRESET/{base,expert_*} where they exist, else writes them with streammerge.synth. The page
cache is warm for every run (the first run warms it; say so in the figures). --cold drops it before each
run (root only). --repeat N runs the streammerge ones N rounds, interleaved (each config alone, then the
batch, per round), and reports each row's median wall time with every run's figure beside it: on a
small shared machine one run's wall time varies by a third.
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
CONFIGS = (("ties-d0.3", "ties", 0.3), ("ties-d0.7", "ties", 0.7), ("dare_ties-d0.5", "dare_ties", 0.5),
           ("linear", "linear", None))


def configs(base: Path, experts: list[Path]) -> list[dict]:
    out = []
    for name, method, density in CONFIGS:
        doc = bm.method_config(method, base, experts, "bfloat16")
        if density is not None:
            for m in doc["models"]:
                m["parameters"]["density"] = density
        out.append({"name": name, **doc})
    return out


def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/batch-bench"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the streammerge runs (median reported)")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)

    base, experts = bm.found_family(args.data, args.preset, args.experts)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    docs = configs(base, experts)
    recipe = args.work / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    bindir = Path(sys.executable).parent
    sm, mk = str(bindir / "streammerge"), str(bindir / "mergekit-yaml")
    bm.warm([base, *experts])
    rows, digests = [], {}

    def timed(tag: str, cmd: list[str]) -> dict:
        if args.cold:
            bm.drop_caches()
        rc, wall, peak, cpu, _ = bm.measure(cmd, args.work / f"{tag}.log", use_time=True)
        if rc:
            print((args.work / f"{tag}.log").read_text()[-3000:], file=sys.stderr)
        return {"tag": tag, "rc": rc, "wall_s": wall, "peak_rss": peak, "cpu_s": cpu}

    for doc in docs:
        cfg = args.work / f"{doc['name']}.yml"
        cfg.write_text(yaml.safe_dump({k: v for k, v in doc.items() if k != "name"}, sort_keys=False))
    runs: dict[str, list[dict]] = {}
    identical = True
    for rnd in range(args.repeat):
        for doc in docs:
            out, rep = args.work / "alone" / doc["name"], args.work / f"{doc['name']}.json"
            row = timed(f"alone-{doc['name']}", [sm, "run", str(args.work / f"{doc['name']}.yml"), str(out),
                                                   "--max-memory", args.max_memory, "--no-progress", "--report", str(rep)])
            row["bytes_read"] = json.loads(rep.read_text())["bytes_read"] if row["rc"] == 0 else 0
            runs.setdefault(doc["name"], []).append(row)
            if rnd == 0:
                digests[doc["name"]] = _digests(out)
            shutil.rmtree(out)
        rep = args.work / "batch.json"
        row = timed("batch", [sm, "batch", str(recipe), str(args.work / "batch"), "--max-memory", args.max_memory,
                              "--no-progress", "--report", str(rep)])
        batch = json.loads(rep.read_text()) if row["rc"] == 0 else {"bytes_from_files": 0, "bytes_alone": 0}
        row["bytes_read"] = batch["bytes_from_files"]
        runs.setdefault("batch", []).append(row)
        identical &= all(_digests(args.work / "batch" / d["name"]) == digests[d["name"]] for d in docs)
        shutil.rmtree(args.work / "batch", ignore_errors=True)
    for name, rs in runs.items():
        rows.append(("streammerge batch" if name == "batch" else "streammerge run",
                     "all four, shared reads" if name == "batch" else name, _median(rs)))
    mk_total = 0.0
    if not args.skip_mergekit:
        for doc in docs:
            out = args.work / "mergekit" / doc["name"]
            row = timed(f"mergekit-{doc['name']}", [mk, str(args.work / f"{doc['name']}.yml"), str(out),
                                                    "--lazy-unpickle"])
            row["bytes_read"] = 0
            mk_total += row["wall_s"]
            rows.append(("mergekit-yaml 0.1.5", doc["name"], row))
            shutil.rmtree(out, ignore_errors=True)

    slowest = max(r["wall_s"] for tool, _, r in rows if tool == "streammerge run")
    alone_sum = sum(r["wall_s"] for tool, _, r in rows if tool == "streammerge run")
    batch_row = next(r for tool, _, r in rows if tool == "streammerge batch")
    lines = [f"{bm.machine()}; commit {bm.commit()}; {args.preset} family, base + {args.experts} experts, "
             f"--max-memory {args.max_memory}, {'cold' if args.cold else 'warm'} page cache"
             + (f"; streammerge rows: median of {args.repeat} interleaved rounds" if args.repeat > 1 else ""),
             "", "| tool | config | wall s | peak RSS GiB | CPU s | input GB read |", "|---|---|---:|---:|---:|---:|"]
    for tool, name, r in rows:
        fail = f" (rc {r['rc']})" if r["rc"] else ""
        read = f"{r['bytes_read'] / 1e9:.2f}" if r["bytes_read"] else "—"
        each = f" ({', '.join(f'{w:.1f}' for w in r['walls'])})" if len(r.get("walls", [])) > 1 else ""
        lines.append(f"| {tool}{fail} | {name} | {r['wall_s']:.1f}{each} | {r['peak_rss'] / GiB:.2f} | {r['cpu_s']:.1f} "
                     f"| {read} |")
    lines += ["", f"batch / slowest single: {batch_row['wall_s'] / slowest:.2f}× "
                  f"(the four alone, one after another: {alone_sum:.1f} s); input bytes read by the batch: "
                  f"{batch['bytes_from_files'] / 1e9:.2f} GB, by the four alone: {batch['bytes_alone'] / 1e9:.2f} GB; "
                  f"every batch output byte-identical to its config run alone: {'yes' if identical else 'NO'}"]
    if mk_total:
        lines.append(f"mergekit 0.1.5, the four one after another: {mk_total:.1f} s "
                     f"({mk_total / batch_row['wall_s']:.1f}× the batch's wall time)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0 if identical and all(r["rc"] == 0 for _, _, r in rows) else 1


def _median(rs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one for an even count), with every wall time."""
    mid = sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2]
    return {**mid, "rc": max(r["rc"] for r in rs), "walls": [r["wall_s"] for r in rs]}


if __name__ == "__main__":
    raise SystemExit(main())
