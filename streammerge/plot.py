"""The run chart (``--plot FILE.png``): where a merge's time and memory go.

Top: per-shard throughput over the run, one point per shard at the time it was committed: read GB/s
(input bytes over the reader threads' seconds), compute GB/s (input bytes over compute seconds) and
write GB/s (output bytes over the writer's seconds). Bottom: resident memory over time (from
``streammerge.memwatch``) against the budget. ``chart_series`` gives the numbers behind the picture, so
tests and scripts can check them without reading pixels. matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

from pathlib import Path

from .report import RunReport

__all__ = ["PlotUnavailable", "chart_series", "require_matplotlib", "write_chart"]

_HINT = "pip install 'streammerge[plot]' (or pip install matplotlib)"


class PlotUnavailable(ImportError):
    """--plot was asked for and matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable now, before a long run, if the chart could not be drawn at its end."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {_HINT}") from e


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def chart_series(report: RunReport, samples: list[tuple[float, int]], t0: float | None = None) -> dict:
    """The chart's data: times in seconds from ``t0`` (default: the first sample, else the first shard's
    start), rates in GB/s, memory in GiB; shards kept by --resume are left out (nothing was read)."""
    shards = [s for s in report.shards if not s.skipped]
    if t0 is None:
        t0 = samples[0][0] if samples else min((s.started for s in shards), default=0.0)
    return {
        "shard": [s.filename for s in shards],
        "t_s": [s.finished - t0 for s in shards],
        "read_gbps": [_rate(s.bytes_read, s.read_s) for s in shards],
        "compute_gbps": [_rate(s.bytes_read, s.compute_s) for s in shards],
        "write_gbps": [_rate(s.bytes_written, s.write_s) for s in shards],
        "mem_t_s": [t - t0 for t, _ in samples],
        "mem_gib": [rss / 2**30 for _, rss in samples],
        "budget_gib": report.budget / 2**30,
        "peak_rss_gib": report.peak_rss / 2**30,
    }


def write_chart(path: str | Path, report: RunReport, samples: list[tuple[float, int]],
                t0: float | None = None, title: str | None = None) -> dict:
    """Draw the chart to ``path`` (PNG, 1200 x 800 pixels) and return ``chart_series``'s data."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)   # no display: the chart is a file
    import matplotlib.pyplot as plt

    data = chart_series(report, samples, t0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), dpi=100, sharex=True)
    try:
        for key, label in (("read_gbps", "read"), ("compute_gbps", "compute"), ("write_gbps", "write")):
            top.plot(data["t_s"], data[key], marker="o", label=label)
        top.set_ylabel("GB/s per shard")
        top.set_title(title or f"streammerge {report.method} on {report.device}: {report.seconds:.1f} s")
        top.legend(loc="upper right")
        top.grid(alpha=0.3)
        bottom.plot(data["mem_t_s"], data["mem_gib"], label="resident memory")
        bottom.axhline(data["budget_gib"], color="red", linestyle="--", label=f"budget {data['budget_gib']:.2f} GiB")
        bottom.set_ylabel("GiB")
        bottom.set_xlabel("seconds from the start of the run")
        bottom.set_ylim(bottom=0, top=max([data["budget_gib"], *data["mem_gib"]]) * 1.15)
        bottom.legend(loc="lower right")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)
    return data
