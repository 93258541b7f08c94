#!/usr/bin/env bash
# The GPU check, in one command: the first thing to run on a machine with CUDA.
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--data DIR] [--preset 1b] [--wheels DIR] [--minutes 8]
#
# 1. machine: nvidia-smi, CPU model and flags, free disk (no network is needed at any step);
# 2. installs what is missing (torch, triton, pytest, the package itself) from the wheels carried with
#    the tree (WHEELS, default ./wheels) with pip --no-index: it never reaches an index;
# 3. runs the GPU tests (pytest -m gpu);
# 4. runs scripts/bench_gpu.py on PRESET (default 1b: 2.2 GB a model, so that all of it fits in 8
#    minutes with mergekit --cuda alongside; 3b where time allows) with 2 experts for linear, ties, dare_ties and della, warm
#    and cold page cache, after measuring the disk's and pinned host-to-device bandwidth, under a
#    `timeout` of MINUTES (default 8) for the whole benchmark;
# 5. writes OUT/gpu_check.json and OUT/gpu_check.md: each step's command, exit code and seconds, the
#    machine, and the benchmark's markdown.
# --dry-run prints the steps it would run (each on a line starting "would run:") and runs none of them;
# it works on a machine without a GPU.
set -u
DRY=0; OUT=gpu-check; DATA=/tmp/streammerge-gpu-data; PRESET=1b; WHEELS=wheels; MINUTES=8
PY=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --data) DATA=$2; shift ;;
    --preset) PRESET=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --minutes) MINUTES=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
  shift
done
case "$MINUTES" in ''|*[!0-9]*) echo "gpu_check.sh: --minutes expects whole minutes, got '$MINUTES'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.." || exit 2
[ "$DRY" = 1 ] || mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create --out $OUT" >&2; exit 2; }
STEPS=()   # name|rc|seconds, for the summary

step() {   # step NAME COMMAND...: run (or with --dry-run, print) one step, log its output, record rc
  local name=$1; shift
  if [ "$DRY" = 1 ]; then echo "would run: [$name] $*"; return 0; fi
  echo "== $name: $*"
  local t0 rc; t0=$(date +%s)
  "$@" > >(tee "$OUT/$name.log") 2>&1; rc=$?
  STEPS+=("$name|$rc|$(( $(date +%s) - t0 ))")
  echo "== $name: exit $rc"
  return $rc
}

missing() {  # the Python modules among the arguments that do not import
  "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}

step machine bash -c 'nvidia-smi; lscpu | grep -E "Model name|Flags" | cut -c1-300; df -h "$0"' "$DATA"
NEED=$( [ "$DRY" = 1 ] && echo "(checked at run time)" || missing torch triton pytest streammerge numba safetensors )
if [ -n "$NEED" ]; then
  if [ "$DRY" = 0 ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: missing Python modules: $NEED, and no wheels folder '$WHEELS' to install them from" >&2
    exit 3
  fi
  step install "$PY" -m pip install --no-index --find-links "$WHEELS" -e ".[test,gpu]"
fi
step cuda "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.version.cuda)' \
  || { [ "$DRY" = 1 ] || { echo "gpu_check.sh: no CUDA device: nothing to check" >&2; exit 4; }; }
step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step bench timeout $(( MINUTES * 60 )) "$PY" scripts/bench_gpu.py --preset "$PRESET" --experts 2 --data "$DATA" \
  --method linear --method ties --method dare_ties --method della --cache both --out "$OUT/gpu_bench.md"
if [ "$DRY" = 1 ]; then echo "would write: $OUT/gpu_check.json $OUT/gpu_check.md"; exit 0; fi

"$PY" - "$OUT" "${STEPS[@]}" <<'PYEOF'
import json, platform, subprocess, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), [s.split("|") for s in sys.argv[2:]]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
summary = {"commit": commit, "machine": platform.platform(), "processor": platform.processor(),
           "steps": [{"name": n, "rc": int(rc), "seconds": int(s), "log": f"{n}.log"} for n, rc, s in steps]}
bench = out / "gpu_bench.md"
summary["bench_markdown"] = bench.read_text() if bench.is_file() else None
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# GPU check at {commit}", "", "| step | exit | seconds |", "|---|---|---|"]
lines += [f"| {n} | {rc} | {s} |" for n, rc, s in steps]
lines += ["", summary["bench_markdown"] or "(no benchmark output)"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md")
PYEOF
