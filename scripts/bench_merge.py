#!/usr/bin/env python
"""Benchmark streammerge against mergekit on synthetic Llama checkpoints, in the same run.

    python scripts/bench_merge.py --method linear --method ties --preset 1b --experts 3 \\
        --data /work/bench-data --max-memory 1GiB --out docs/bench.md

Builds (or reuses) a base and N experts with ``streammerge.synth`` under ``DATA/PRESET``, writes one
mergekit YAML per method, runs each tool as a child process under ``/usr/bin/time -v`` (or, without
it, polls the child's process-tree RSS every 20 ms with psutil), and prints a markdown table of wall
seconds, peak RSS and mergekit-wall / streammerge-wall. See scripts/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from streammerge.synth import PRESETS, SynthSpec, make_family

TIME_BIN = "/usr/bin/time"
GiB = 1 << 30

# Methods whose output is a pure function of the inputs: --compare reports their differences.
# dare_* and della* draw random masks, so two tools (or two seeds) legitimately differ.
DETERMINISTIC = {
    "linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce",
    "slerp", "nuslerp", "multislerp", "karcher", "model_stock",
}


def found_family(data: Path, preset: str, experts: int) -> tuple[Path, list[Path]]:
    """DATA/PRESET/{base,expert_1..N} as they are when all exist (a benchmark family made before), else a
    fresh seeded one written there."""
    root = data / preset
    found = [root / f"expert_{i}" for i in range(1, experts + 1)]
    if (root / "base").is_dir() and all(e.is_dir() for e in found):
        return root / "base", found
    return make_family(root, PRESETS[preset], experts, reuse=True)


def method_config(method: str, base: Path, experts: list[Path], dtype: str) -> dict:
    """A standard mergekit 0.1.5 config for ``method`` over base + experts (weights 1/K, density 0.5)."""
    k = len(experts)
    w = 1.0 / k
    exp = [str(p) for p in experts]
    cfg: dict
    if method == "linear":  # normalize defaults to true
        cfg = {"models": [{"model": m, "parameters": {"weight": w}} for m in exp]}
    elif method == "multislerp":
        cfg = {"models": [{"model": m, "parameters": {"weight": w}} for m in exp]}
    elif method == "karcher":  # mergekit 0.1.5's karcher weighs the models equally: no weight parameter
        cfg = {"models": [{"model": m} for m in exp]}
    elif method == "task_arithmetic":
        cfg = {"base_model": str(base), "models": [{"model": m, "parameters": {"weight": w}} for m in exp]}
    elif method in ("ties", "dare_ties", "dare_linear", "della", "della_linear"):
        cfg = {
            "base_model": str(base),
            "models": [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m in exp],
        }
    elif method in ("breadcrumbs", "breadcrumbs_ties"):  # gamma defaults to 0.01
        cfg = {
            "base_model": str(base),
            "models": [{"model": m, "parameters": {"weight": w, "density": 0.9}} for m in exp],
        }
    elif method == "sce":
        cfg = {
            "base_model": str(base),
            "models": [{"model": m} for m in exp],
            "parameters": {"select_topk": 0.5},
        }
    elif method == "model_stock":
        if k < 2:
            raise SystemExit("model_stock needs at least 2 experts (--experts 2)")
        cfg = {"base_model": str(base), "models": [{"model": m} for m in exp]}
    elif method == "slerp":  # two models: the base and the first expert, halfway
        cfg = {
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": exp[0]}],
            "parameters": {"t": 0.5},
        }
    elif method == "nuslerp":  # two experts, equal weights
        if k < 2:
            raise SystemExit("nuslerp needs at least 2 experts (--experts 2)")
        cfg = {"models": [{"model": m, "parameters": {"weight": 0.5}} for m in exp[:2]]}
    elif method in ("nearswap", "arcee_fusion"):  # the base and one expert
        cfg = {"base_model": str(base), "models": [{"model": str(base)}, {"model": exp[0]}]}
        if method == "nearswap":
            cfg["parameters"] = {"t": 0.01}
    elif method in ("ram", "ramplus_tl"):
        cfg = {"base_model": str(base), "models": [{"model": m} for m in exp], "parameters": {"epsilon": 0.02}}
        if method == "ramplus_tl":
            cfg["parameters"].update({"r": 0.5, "alpha": 0.9})
    elif method == "widen":  # streammerge only: mergekit 0.1.5 has no widen
        cfg = {"base_model": str(base), "models": [{"model": m} for m in exp]}
    else:
        raise SystemExit(f"unknown --method {method!r}; choose from: {', '.join(sorted(METHODS))}")
    return {"merge_method": method, **cfg, "dtype": dtype}


METHODS = sorted(DETERMINISTIC | {"dare_ties", "dare_linear", "della", "della_linear", "nearswap", "arcee_fusion", "ram",
                                   "ramplus_tl", "widen"})
NO_MERGEKIT = {"widen"}  # methods mergekit 0.1.5 does not have: streammerge runs alone


# ---------------------------------------------------------------- measuring a child process


@dataclass
class Run:
    method: str
    tool: str
    command: list[str]
    rc: int = -1
    wall_s: float = float("nan")
    peak_rss: int = 0  # bytes
    cpu_s: float = float("nan")
    how: str = ""
    log: Path | None = None
    loadavg: str = ""
    extra: dict = field(default_factory=dict)


def _parse_time_v(text: str) -> tuple[int, float]:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    sys_ = re.search(r"System time \(seconds\): ([\d.]+)", text)
    cpu = float(user.group(1)) + float(sys_.group(1)) if user and sys_ else float("nan")
    return (int(rss.group(1)) * 1024 if rss else 0), cpu


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], log: Path, use_time: bool) -> tuple[int, float, int, float, str]:
    """Run ``cmd``; return (rc, wall s, peak RSS bytes, cpu s, how the peak was measured)."""
    with open(log, "w") as out:
        if use_time:
            tfile = log.with_suffix(".time")
            t0 = time.perf_counter()
            rc = subprocess.call([TIME_BIN, "-v", "-o", str(tfile), *cmd], stdout=out, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
            rss, cpu = _parse_time_v(tfile.read_text() if tfile.exists() else "")
            return rc, wall, rss, cpu, "/usr/bin/time -v (max RSS of the largest process)"
        import psutil

        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(child.pid)
        peak = 0
        cpu = 0.0
        while child.poll() is None:
            peak = max(peak, _tree_rss(ps))
            try:
                t = ps.cpu_times()
                cpu = max(cpu, t.user + t.system + t.children_user + t.children_system)
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        return child.returncode, wall, peak, cpu, "psutil RSS of the process tree, polled every 20 ms"


# ---------------------------------------------------------------- page cache


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches (root): {e}") from e


def warm(paths: list[Path]) -> float:
    """Read every file once so both tools start from a warm page cache; return seconds spent."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for d in paths:
        for f in sorted(d.iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as h:
                    while h.readinto(buf):
                        pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------- comparing two outputs


def _tensor_files(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def compare(a: Path, b: Path, band_elems: int = 1 << 24) -> dict:
    """Max |a - b| per tensor, streamed in row bands (two bands of fp32 in memory at a time)."""
    from safetensors import safe_open

    fa, fb = _tensor_files(a), _tensor_files(b)
    only = sorted(set(fa) ^ set(fb))
    worst = ("", 0.0)
    equal = 0
    shape_mismatch = []
    for name in sorted(set(fa) & set(fb)):
        with safe_open(str(fa[name]), framework="pt") as ha, safe_open(str(fb[name]), framework="pt") as hb:
            sa, sb = ha.get_slice(name), hb.get_slice(name)
            shape = sa.get_shape()
            if shape != sb.get_shape():
                shape_mismatch.append(name)
                continue
            row = 1
            for d in shape[1:]:
                row *= d
            rows = max(1, band_elems // max(row, 1))
            m = 0.0
            n = shape[0] if shape else 1
            for start in range(0, n, rows):
                if shape:
                    ta, tb = sa[start : start + rows], sb[start : start + rows]
                else:
                    ta, tb = ha.get_tensor(name), hb.get_tensor(name)
                m = max(m, (ta.float() - tb.float()).abs().max().item() if ta.numel() else 0.0)
                del ta, tb
        equal += m == 0.0
        if m > worst[1]:
            worst = (name, m)
    return {
        "tensors": len(set(fa) & set(fb)),
        "bit_equal": equal,
        "max_abs_diff": worst[1],
        "worst_tensor": worst[0] or None,
        "only_in_one": only,
        "shape_mismatch": shape_mismatch,
    }


# ---------------------------------------------------------------- machine and report


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / (1 << 20):.1f} GiB RAM"
    except (OSError, AttributeError):
        pass
    from cpu_info import isa   # scripts/: the ISA heads every table (AVX2 and AVX-512 differ a lot)

    target = os.environ.get("NUMBA_CPU_NAME")
    jit = f", numba target {target}" if target else ""
    return f"{os.cpu_count()} CPUs ({cpu}), ISA {isa()}{jit}, {mem}, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt(x: float, nd: int = 1) -> str:
    return "—" if x != x else f"{x:.{nd}f}"


def table(runs: list[Run]) -> str:
    lines = [
        "| method | tool | wall s | peak RSS GiB | CPU s | speed ratio (mergekit / streammerge) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    walls = {(r.method, r.tool): r.wall_s for r in runs if r.rc == 0}
    for r in runs:
        ratio = ""
        if r.tool == "streammerge" and r.rc == 0 and (r.method, "mergekit") in walls:
            ratio = f"{walls[(r.method, 'mergekit')] / r.wall_s:.2f}×"
        status = "" if r.rc == 0 else f" (failed, rc {r.rc})"
        lines.append(
            f"| {r.method} | {r.tool}{status} | {_fmt(r.wall_s)} | {_fmt(r.peak_rss / GiB, 2)} "
            f"| {_fmt(r.cpu_s)} | {ratio} |"
        )
    return "\n".join(lines)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 512MiB)")
    scale = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    return int(float(m.group(1)) * ((1024 if m.group(3) or not m.group(2) else 1000) ** scale))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", required=True, help=f"repeatable; one of {', '.join(METHODS)}")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--noise", type=float, default=0.02, help="expert = base + noise * N(0,1)")
    ap.add_argument("--shard-size", type=parse_size, default=1 << 30, help="input shard size (default 1GiB)")
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--work", type=Path, help="configs, logs, outputs (default DATA/PRESET/bench)")
    ap.add_argument("--dtype", default="bfloat16", help="mergekit `dtype:` written into each config")
    ap.add_argument("--max-memory", default="1GiB", help="streammerge's --max-memory")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-streammerge", action="store_true")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is reported")
    ap.add_argument("--compare", action="store_true", help="max |diff| per tensor between the two outputs")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags (shell-quoted string)")
    ap.add_argument("--streammerge-args", default="", help="extra streammerge run flags")
    ap.add_argument("--no-time", action="store_true", help="measure with psutil even if /usr/bin/time exists")
    ap.add_argument("--out", type=Path, help="append the results (markdown) to this file")
    args = ap.parse_args(argv)

    for m in args.method:
        if m not in METHODS:
            ap.error(f"unknown --method {m!r}; choose from: {', '.join(METHODS)}")
    bindir = Path(sys.executable).parent
    tools: dict[str, str] = {}
    for tool, exe in (("mergekit", "mergekit-yaml"), ("streammerge", "streammerge")):
        if getattr(args, f"skip_{tool}"):
            continue
        found = shutil.which(exe) or (str(bindir / exe) if (bindir / exe).exists() else None)
        if not found:
            ap.error(f"{exe} is not on PATH nor in {bindir}; install it or pass --skip-{tool}")
        tools[tool] = found
    if not tools:
        ap.error("both tools skipped: nothing to run")
    use_time = not args.no_time and os.access(TIME_BIN, os.X_OK)
    if not use_time:
        import psutil  # noqa: F401  (fail early if the fallback is unavailable)

    spec: SynthSpec = PRESETS[args.preset]
    root = args.data / args.preset
    work = args.work or root / "bench"
    work.mkdir(parents=True, exist_ok=True)
    n_models = args.experts + 1
    need = spec.n_bytes * n_models
    have = shutil.disk_usage(args.data if args.data.exists() else args.data.parent).free
    existing = sum(f.stat().st_size for f in root.glob("*/*.safetensors")) if root.exists() else 0
    if need - existing > have - 2 * spec.n_bytes:
        raise SystemExit(
            f"{args.data}: {have / GiB:.1f} GiB free; the data needs {need / GiB:.1f} GiB "
            f"and each output {spec.n_bytes / GiB:.1f} GiB"
        )

    print(f"# data: {root} ({args.preset}: {spec.n_params / 1e9:.2f}B params, {spec.dtype}, base + {args.experts})")
    t0 = time.perf_counter()
    base, experts = make_family(
        root, spec, args.experts, seed=args.seed, noise=args.noise, shard_size=args.shard_size, reuse=True
    )
    print(f"# data ready in {time.perf_counter() - t0:.1f} s")
    inputs = [base, *experts]

    runs: list[Run] = []
    compares: dict[str, dict] = {}
    configs: dict[str, str] = {}
    for method in args.method:
        cfg_text = yaml.safe_dump(method_config(method, base, experts, args.dtype), sort_keys=False)
        cfg = work / f"{method}.yml"
        cfg.write_text(cfg_text)
        configs[method] = cfg_text
        print(f"\n## {method}: {cfg}\n{cfg_text}")
        outs: dict[str, Path] = {}
        for tool, exe in tools.items():
            out = work / f"out-{method}-{tool}"
            if tool == "mergekit" and method in NO_MERGEKIT:
                continue
            if tool == "mergekit":
                cmd = [exe, str(cfg), str(out), "--lazy-unpickle", *shlex.split(args.mergekit_args)]
            else:
                cmd = [exe, "run", str(cfg), str(out), "--max-memory", args.max_memory,
                       *shlex.split(args.streammerge_args)]
            done: list[Run] = []
            failed: Run | None = None
            for rep in range(args.repeat):
                if out.exists():
                    shutil.rmtree(out)
                if args.cold:
                    drop_caches()
                else:
                    warm(inputs)
                os.sync()  # the previous run's output must not still be flushing while this one is timed
                r = Run(method, tool, cmd, log=work / f"{method}-{tool}-{rep}.log")
                r.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
                print(f"$ {shlex.join(cmd)}", flush=True)
                r.rc, r.wall_s, r.peak_rss, r.cpu_s, r.how = measure(cmd, r.log, use_time)
                print(
                    f"  rc {r.rc}  wall {r.wall_s:.1f} s  peak RSS {r.peak_rss / GiB:.2f} GiB  "
                    f"cpu {_fmt(r.cpu_s)} s  (load average before: {r.loadavg})",
                    flush=True,
                )
                if r.rc != 0:
                    tail = r.log.read_text(errors="replace").splitlines()[-15:]
                    print("  log tail:\n    " + "\n    ".join(tail), file=sys.stderr)
                    failed = r
                    break
                done.append(r)
            if failed is not None:
                best = failed
            else:
                best = min(done, key=lambda x: x.wall_s)
                best.peak_rss = max(x.peak_rss for x in done)
            runs.append(best)
            if best.rc == 0:
                outs[tool] = out
        if args.compare and len(outs) == 2:
            if method in DETERMINISTIC:
                compares[method] = compare(outs["mergekit"], outs["streammerge"])
            else:
                compares[method] = {"skipped": "random masks: outputs differ by design"}
            print(f"  compare: {compares[method]}")
        if not args.keep_outputs:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)

    md = table(runs)
    print("\n" + md)
    if args.out:
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cache = "cold (page cache dropped before each run)" if args.cold else (
            "warm (every input file read once before each run)"
        )
        parts = [
            f"\n### bench_merge — {now}\n",
            f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
            f"- machine: {machine()}",
            f"- commit: {commit()}",
            f"- versions: python {platform.python_version()}, torch {_version('torch')}, "
            f"mergekit {_version('mergekit')}, streammerge {_version('streammerge')}",
            f"- data: synthetic `{args.preset}` ({spec.n_params / 1e9:.2f}B params, {spec.dtype}, "
            f"input shards ≤ {args.shard_size / GiB:.2f} GiB), base + {args.experts} experts, seed {args.seed}",
            f"- page cache: {cache}; repeats: {args.repeat} (fastest shown, highest peak)",
            f"- peak RSS: {runs[0].how if runs else ''}",
        ]
        for tool in tools:
            r = next((x for x in runs if x.tool == tool), None)
            if r:
                parts.append(f"- {tool}: `{shlex.join(r.command)}`")
        parts += ["", md, ""]
        for method, res in compares.items():
            parts.append(f"- compare {method}: `{json.dumps(res)}`")
        parts.append("\n<details><summary>configs</summary>\n")
        for method, text in configs.items():
            parts.append(f"```yaml\n# {method}\n{text}```")
        parts.append("</details>\n")
        with open(args.out, "a") as f:
            f.write("\n".join(parts) + "\n")
        print(f"\nappended to {args.out}")
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
