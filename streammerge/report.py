"""What a run reports: a per-shard table, the peak RSS the OS saw, and the same as JSON."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


def peak_rss_bytes() -> int:
    """The OS's high-water mark of this process's resident set.

    On Linux, VmHWM of this address space; not ru_maxrss, which exec inherits from the parent's
    address space (a merge started by a big process would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass
class ShardReport:
    """One output shard of a run: filled in by the executor's threads as the shard is read, computed and
    written (the one type from the writer to the JSON report)."""

    filename: str
    bytes_read: int = 0
    bytes_written: int = 0
    skipped: bool = False     # kept by --resume: not written by this run
    bytes_shared: int = 0     # of bytes_read, what a batch read once for an earlier output (batch/shared.py)
    passes_adopted: int = 0   # tensor reduce passes another output of a batch computed for this one (batch/reuse.py)
    # seconds spent per stage (they overlap: the stages run concurrently). read and write: wall time of
    # the reader and writer threads; compute: wall time on CPU, the compute stream's time on CUDA;
    # h2d and d2h (CUDA only): the copy streams' time, measured with CUDA events
    read_s: float = 0.0
    h2d_s: float = 0.0
    compute_s: float = 0.0
    d2h_s: float = 0.0
    write_s: float = 0.0
    checksum: str = ""        # io.checksum's digest of the committed shard, set before on_shard_done
    started: float = 0.0      # perf_counter() at its first band, and when it was committed
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 0.0)

    @property
    def gbps(self) -> float:
        return (self.bytes_read + self.bytes_written) / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"filename": self.filename, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "bytes_shared": self.bytes_shared, "passes_adopted": self.passes_adopted, "seconds": self.seconds, "skipped": self.skipped, "read_s": self.read_s, "h2d_s": self.h2d_s,
                "compute_s": self.compute_s, "d2h_s": self.d2h_s, "write_s": self.write_s,
                "gb_per_s": round(self.gbps, 3)}


@dataclass
class RunReport:
    method: str
    out_dir: str
    seconds: float
    peak_rss: int
    budget: int
    device: str
    shards: list[ShardReport] = field(default_factory=list)
    nonfinite_tensors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kernels: dict[str, list[str]] = field(default_factory=dict)  # primitive -> implementations that ran it

    def to_json(self) -> dict:
        d = asdict(self)
        d["shards"] = [s.to_json() for s in self.shards]
        d["bytes_read"] = sum(s.bytes_read for s in self.shards)
        d["bytes_written"] = sum(s.bytes_written for s in self.shards)
        return d

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def print(self, console, diagnostics=None) -> None:
        """The table and totals on `console`; warnings and NaN reports on `diagnostics` (default: the same)."""
        from rich.table import Table

        diagnostics = diagnostics or console
        from rich.markup import escape

        # the heading on a line of its own: a table title wraps at the table's width, cutting the path
        console.print(f"streammerge {self.method}: {escape(self.out_dir)}", highlight=False, soft_wrap=True)
        table = Table()
        for col in ("shard", "read", "written", "seconds", "GB/s"):
            table.add_column(col, justify="right" if col != "shard" else "left")
        for s in self.shards:
            table.add_row(s.filename + (" (resumed)" if s.skipped else ""), _fmt(s.bytes_read), _fmt(s.bytes_written),
                          f"{s.seconds:.2f}", f"{s.gbps:.2f}")
        console.print(table)
        total_r = sum(s.bytes_read for s in self.shards)
        total_w = sum(s.bytes_written for s in self.shards)
        console.print(f"read {_fmt(total_r)}, wrote {_fmt(total_w)} in {self.seconds:.2f} s on {self.device}; "
                      f"peak RSS {self.peak_rss / 2**30:.2f} GiB (budget {self.budget / 2**30:.2f} GiB)")
        if self.kernels:
            console.print("kernels: " + "; ".join(f"{p} {', '.join(v)}" for p, v in self.kernels.items()))

        for w in self.warnings:
            diagnostics.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
        if self.nonfinite_tensors:
            diagnostics.print(f"[red]NaN or Inf in the output of {len(self.nonfinite_tensors)} tensor(s):[/red] "
                          + escape(", ".join(self.nonfinite_tensors[:10])), soft_wrap=True)


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
