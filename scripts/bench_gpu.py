#!/usr/bin/env python
"""Benchmark streammerge on a GPU, stage by stage, next to the machine's limits and mergekit --cuda.

    python scripts/bench_gpu.py --preset 3b --experts 3 --data /tmp/bench-data --out gpu-bench.md

Builds (or reuses) a base and N experts with ``streammerge.synth`` under ``DATA/PRESET``, measures the
physical limits (disk read bandwidth with the inputs' pages dropped, pinned host-to-device and
device-to-host bandwidth with CUDA events), then runs ``streammerge run --device cuda`` for each method
and page-cache mode (cold: every input file's pages dropped with posix_fadvise(DONTNEED); warm: every
input file read once), and ``mergekit-yaml --cuda`` where it is installed. Prints (and with ``--out``
appends) Markdown tables: per-shard GB/s of each stage (read, host-to-device, kernel, device-to-host,
write) under a row of the measured limits, and wall seconds with the speed ratio vs mergekit.
Needs no network. See scripts/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (same folder: configs, child-process measurement, machine line)

from streammerge.synth import PRESETS, make_family  # noqa: E402

GiB = 1 << 30
METHODS = ("linear", "ties", "dare_ties", "della")
MODES = ("cold", "warm")
STAGES = ("read", "h2d", "kernel", "d2h", "write")  # columns of the per-shard table
NEEDED = ("torch", "safetensors", "numpy", "psutil", "rich", "yaml", "pydantic")


# ---------------------------------------------------------------- page cache and physical limits


def _files(paths: list[Path]) -> list[Path]:
    return [f for d in paths for f in sorted(Path(d).iterdir()) if f.is_file()]


def evict(paths: list[Path]) -> None:
    """Drop the page-cache pages of every file under `paths` (no root needed): the data is flushed first,
    since DONTNEED skips dirty pages."""
    os.sync()
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(files: list[Path], block: int = 16 << 20) -> float:
    """GB/s of reading `files` front to back in `block`-byte reads, as they are cached now."""
    buf = bytearray(block)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as h:
            while n := h.readinto(buf):
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 8) -> dict:
    """Pinned host <-> device GB/s, timed with CUDA events (run in a child process: its CUDA context
    is gone before the merges start)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {"device_name": torch.cuda.get_device_name(), "bytes": nbytes, "reps": reps}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        dst.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out[name] = nbytes * reps / (start.elapsed_time(end) / 1000) / 1e9
    return out


def limits(inputs: list[Path], device: str) -> dict:
    base_files = _files([inputs[0]])
    evict([inputs[0]])
    cold = read_bandwidth(base_files)
    warm = read_bandwidth(base_files)  # the first read left it in the page cache
    res = {"disk_cold": cold, "page_cache": warm, "disk_bytes": sum(f.stat().st_size for f in base_files)}
    if device == "cuda":
        r = subprocess.run([sys.executable, __file__, "--probe-copies"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"measuring host<->device bandwidth failed:\n{r.stderr[-2000:]}")
        res.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return res


# ---------------------------------------------------------------- runs


@dataclass
class Result:
    method: str
    mode: str
    tool: str
    command: list[str]
    rc: int = -1
    wall_s: float = float("nan")
    peak_rss: int = 0
    report: dict = field(default_factory=dict)  # streammerge's --report JSON


def run_one(method: str, mode: str, tool: str, cmd: list[str], out: Path, inputs: list[Path], log: Path,
            use_time: bool, report: Path | None) -> Result:
    if out.exists():
        shutil.rmtree(out)
    if report is not None and report.exists():
        report.unlink()
    if mode == "cold":
        evict(inputs)
    else:
        bm.warm(inputs)
    os.sync()  # the previous run's output must not still be flushing while this one is timed
    print(f"$ {shlex.join(cmd)}   [{mode} cache]", flush=True)
    r = Result(method, mode, tool, cmd)
    r.rc, r.wall_s, r.peak_rss, _, _ = bm.measure(cmd, log, use_time)
    print(f"  rc {r.rc}  wall {r.wall_s:.1f} s  peak RSS {r.peak_rss / GiB:.2f} GiB", flush=True)
    if r.rc != 0:
        print("  log tail:\n    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
    elif report is not None:
        r.report = json.loads(report.read_text())
    return r


# ---------------------------------------------------------------- tables


def _gbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 and nbytes else "—"


def stage_table(results: list[Result], lim: dict) -> str:
    """Per shard: GB/s of each stage = its bytes / the seconds that stage spent on the shard (the stages
    overlap, so the slowest one bounds the shard). read and H2D move the bytes read, the kernel consumes
    them, D2H and write move the bytes written."""
    lines = ["| method | cache | shard | read GB/s | H2D GB/s | kernel GB/s | D2H GB/s | write GB/s | shard s | shard GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    h2d, d2h = lim.get("h2d"), lim.get("d2h")
    lines.append(f"| *measured limit* | | | {lim['disk_cold']:.2f} (disk) · {lim['page_cache']:.2f} (cache) | "
                 f"{'—' if h2d is None else f'{h2d:.2f}'} | | {'—' if d2h is None else f'{d2h:.2f}'} | | | |")
    for r in results:
        if r.tool != "streammerge" or not r.report:
            continue
        for s in r.report["shards"]:
            rd, wr = s["bytes_read"], s["bytes_written"]
            cells = [_gbps(rd, s["read_s"]), _gbps(rd, s["h2d_s"]), _gbps(rd, s["compute_s"]),
                     _gbps(wr, s["d2h_s"]), _gbps(wr, s["write_s"])]
            lines.append(f"| {r.method} | {r.mode} | {s['filename']} | " + " | ".join(cells)
                         + f" | {s['seconds']:.2f} | {s['gb_per_s']:.2f} |")
    return "\n".join(lines)


def wall_table(results: list[Result]) -> str:
    lines = ["| method | cache | streammerge wall s | peak RSS GiB | GB/s (in + out) | mergekit wall s "
             "| speed ratio (mergekit / streammerge) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by = {(r.method, r.mode, r.tool): r for r in results}
    for (method, mode, tool), r in by.items():
        if tool != "streammerge":
            continue
        mk = by.get((method, mode, "mergekit"))
        ok = r.rc == 0
        wall = f"{r.wall_s:.1f}" if ok else f"failed (rc {r.rc})"
        moved = (r.report.get("bytes_read", 0) + r.report.get("bytes_written", 0)) if ok else 0
        mk_wall = "not run" if mk is None else (f"{mk.wall_s:.1f}" if mk.rc == 0 else f"failed (rc {mk.rc})")
        ratio = f"{mk.wall_s / r.wall_s:.2f}×" if ok and mk is not None and mk.rc == 0 else ""
        lines.append(f"| {method} | {mode} | {wall} | {r.peak_rss / GiB:.2f} | {_gbps(moved, r.wall_s) if ok else '—'} "
                     f"| {mk_wall} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", help=f"repeatable (default: {', '.join(METHODS)})")
    ap.add_argument("--cache", choices=(*MODES, "both"), default="both", help="page cache before each run (default both)")
    ap.add_argument("--preset", default="3b", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--shard-size", type=bm.parse_size, default=1 << 30, help="input shard size (default 1GiB)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="threads making the data")
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench-data"), help="inputs (local disk), reused")
    ap.add_argument("--work", type=Path, help="configs, logs, reports, outputs (default DATA/PRESET/bench-gpu)")
    ap.add_argument("--dtype", default="bfloat16", help="mergekit `dtype:` written into each config")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda (the point); cpu only to try the script on a machine without a GPU")
    ap.add_argument("--max-memory", default="8GiB", help="streammerge's --max-memory (default 8GiB)")
    ap.add_argument("--max-gpu-memory", default=None, help="streammerge's --max-gpu-memory (default: its own)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and cache mode; the fastest is reported")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags (shell-quoted string)")
    ap.add_argument("--streammerge-args", default="", help="extra streammerge run flags")
    ap.add_argument("--no-time", action="store_true", help="measure with psutil even if /usr/bin/time exists")
    ap.add_argument("--out", type=Path, help="append the results (markdown) to this file")
    ap.add_argument("--probe-copies", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe_copies:
        print(json.dumps(copy_bandwidth()))
        return 0
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        ap.error(f"missing Python packages: {', '.join(missing)} (install them from local wheels)")
    methods = args.method or list(METHODS)
    for m in methods:
        if m not in bm.METHODS:
            ap.error(f"unknown --method {m!r}; choose from: {', '.join(bm.METHODS)}")
    modes = MODES if args.cache == "both" else (args.cache,)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device (torch.cuda.is_available() is False); --device cpu only tries the script")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: nothing may try to download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bindir = Path(sys.executable).parent
    exe = {t: shutil.which(e) or (str(bindir / e) if (bindir / e).exists() else None)
           for t, e in (("streammerge", "streammerge"), ("mergekit", "mergekit-yaml"))}
    if exe["streammerge"] is None:
        ap.error(f"streammerge is not on PATH nor in {bindir}; pip install -e . first")
    tools = ["streammerge"] + ([] if args.skip_mergekit or exe["mergekit"] is None else ["mergekit"])
    if "mergekit" not in tools:
        print("# mergekit: " + ("skipped" if args.skip_mergekit else "mergekit-yaml is not installed; not run"))
    use_time = not args.no_time and os.access(bm.TIME_BIN, os.X_OK)

    spec = PRESETS[args.preset]
    root = args.data / args.preset
    work = args.work or root / "bench-gpu"
    root.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    have = shutil.disk_usage(root).free
    existing = sum(f.stat().st_size for f in root.glob("*/*.safetensors"))
    need = spec.n_bytes * (args.experts + 1) - existing + spec.n_bytes * len(tools)
    if need > have:
        raise SystemExit(f"{root}: {have / GiB:.1f} GiB free; the data and the outputs need {need / GiB:.1f} GiB more")
    print(f"# data: {root} ({args.preset}: {spec.n_params / 1e9:.2f}B params, {spec.dtype}, base + {args.experts})")
    t0 = time.perf_counter()
    base, experts = make_family(root, spec, args.experts, seed=args.seed, shard_size=args.shard_size, reuse=True,
                                threads=args.threads)
    inputs = [base, *experts]
    print(f"# data ready in {time.perf_counter() - t0:.1f} s")

    lim = limits(inputs, args.device)
    print(f"# disk read {lim['disk_cold']:.2f} GB/s cold, {lim['page_cache']:.2f} GB/s from the page cache"
          + (f"; pinned H2D {lim['h2d']:.2f} GB/s, D2H {lim['d2h']:.2f} GB/s on {lim['device_name']}"
             if "h2d" in lim else ""))

    results: list[Result] = []
    configs: dict[str, str] = {}
    for method in methods:
        text = yaml.safe_dump(bm.method_config(method, base, experts, args.dtype), sort_keys=False)
        cfg = work / f"{method}.yml"
        cfg.write_text(text)
        configs[method] = text
        for mode in modes:
            for tool in tools:
                out = work / f"out-{method}-{tool}"
                report = work / f"{method}-{mode}-report.json" if tool == "streammerge" else None
                if tool == "streammerge":
                    cmd = [exe[tool], "run", str(cfg), str(out), "--device", args.device, "--max-memory",
                           args.max_memory, "--report", str(report), "--no-progress"]
                    if args.max_gpu_memory:
                        cmd += ["--max-gpu-memory", args.max_gpu_memory]
                    cmd += shlex.split(args.streammerge_args)
                else:
                    cmd = [exe[tool], str(cfg), str(out), "--lazy-unpickle",
                           *(["--cuda"] if args.device == "cuda" else []), *shlex.split(args.mergekit_args)]
                runs = []
                for rep in range(args.repeat):
                    r = run_one(method, mode, tool, cmd, out, inputs, work / f"{method}-{mode}-{tool}-{rep}.log",
                                use_time, report)
                    runs.append(r)
                    if r.rc != 0:
                        break
                ok = [r for r in runs if r.rc == 0]
                best = min(ok, key=lambda r: r.wall_s) if len(ok) == len(runs) else runs[-1]
                best.peak_rss = max(r.peak_rss for r in runs)
                results.append(best)
                shutil.rmtree(out, ignore_errors=True)

    stages, walls = stage_table(results, lim), wall_table(results)
    print("\n" + stages + "\n\n" + walls)
    if args.out:
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts = [
            f"\n### bench_gpu — {now}\n",
            f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
            f"- machine: {bm.machine()}; GPU: {lim.get('device_name', 'none')}",
            f"- versions: python {platform.python_version()}, torch {bm._version('torch')}, "
            f"triton {bm._version('triton')}, mergekit {bm._version('mergekit')}, "
            f"streammerge {bm._version('streammerge')}",
            f"- data: synthetic `{args.preset}` ({spec.n_params / 1e9:.2f}B params, {spec.dtype}, input shards ≤ "
            f"{args.shard_size / GiB:.2f} GiB), base + {args.experts} experts, seed {args.seed}, in {root}",
            f"- limits: disk read {lim['disk_cold']:.2f} GB/s with the base model's {lim['disk_bytes'] / 1e9:.2f} GB "
            f"evicted by posix_fadvise(DONTNEED), {lim['page_cache']:.2f} GB/s from the page cache"
            + (f"; pinned H2D {lim['h2d']:.2f} GB/s, D2H {lim['d2h']:.2f} GB/s "
               f"({lim['reps']} × {lim['bytes'] >> 20} MiB, CUDA events)" if "h2d" in lim else ""),
            "- cache: cold = every input file's pages dropped (posix_fadvise DONTNEED) before the run; "
            "warm = every input file read once before the run",
            f"- repeats: {args.repeat} (fastest shown, highest peak)",
        ]
        for tool in tools:
            r = next((x for x in results if x.tool == tool), None)
            if r:
                parts.append(f"- {tool}: `{shlex.join(r.command)}`")
        parts += ["", stages, "", walls, "", "<details><summary>configs</summary>\n"]
        parts += [f"```yaml\n# {m}\n{t}```" for m, t in configs.items()]
        parts.append("</details>\n")
        with open(args.out, "a") as f:
            f.write("\n".join(parts) + "\n")
        print(f"\nappended to {args.out}")
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
