"""Crash safety: a merge killed at any moment leaves no half-written file under a final name, and
`--resume` finishes it with the same bytes as a run that was never interrupted.

The merges run as `python -m streammerge.cli run ...` subprocesses. Importing torch takes seconds and
varies between machines, so a kill is timed from the moment the run starts writing (its manifest
appears), at a seeded random fraction of how long an uninterrupted subprocess run took from that moment
to its index: each fifth of that window gets one kill.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_yaml
from streammerge.cli import main
from streammerge.io.header import read_header

# ~10 MB per model, 123 output shards of one or a few tensors each: about 1-2 s of merging.
SPEC = dict(hidden=128, intermediate=352, layers=24, vocab=2048, heads=4, kv_heads=2)
FLAGS = ["--out-shard-size", "60000", "--no-progress"]
KILLS = 5
SEED = 20250605


def _snapshot(*dirs: Path) -> dict[str, tuple[int, str | None]]:
    """Every file and folder under `dirs`: mtime and, for files, a hash of the bytes."""
    out = {}
    for d in dirs:
        for f in sorted([Path(d), *Path(d).rglob("*")]):
            st = f.stat()
            out[str(f)] = (st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None)
    return out


def _files(d: Path) -> dict[str, bytes]:
    """The output as a loader sees it: every top-level file but the in-progress ones."""
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file() and not f.name.endswith(".partial")}


class Job:
    def __init__(self, root: Path):
        from streammerge import synth

        base, experts = synth.make_family(root / "models", synth.SynthSpec(**SPEC), 2, seed=5)
        self.root = root
        self.inputs = [base, *experts]
        self.config = write_yaml(root / "merge.yml", {
            "merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.9},
            "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (0.6, [0.2, 0.5]))]})
        self.before = _snapshot(*self.inputs)
        # a first run fills numba's on-disk cache, so the compile pause does not stretch the timed window
        warmup = root / "warmup"
        proc = self.start(warmup)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        # the reference run is a subprocess too: it times the writing as the killed runs will see it
        reference = root / "reference"
        proc = self.start(reference)
        self.wait_until_writing(proc, reference)
        t0 = time.perf_counter()
        while not (reference / "model.safetensors.index.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        self.seconds = time.perf_counter() - t0  # from the manifest to the index: the window to kill in
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        self.expected = _files(reference)
        assert _files(warmup) == self.expected, "two uninterrupted runs wrote different bytes"
        self.shards = sorted(n for n in self.expected if n.startswith("model-"))
        assert len(self.shards) > 100 and "model.safetensors.index.json" in self.expected
        assert "config.json" in self.expected

    def start(self, out: Path) -> subprocess.Popen:
        # SIGINT back to its default in the child: a shell's background job (`pytest &` in a script) starts
        # with SIGINT ignored, the child would inherit that, and streammerge rightly keeps an ignored signal
        return subprocess.Popen([sys.executable, "-m", "streammerge.cli", "run", str(self.config), str(out), *FLAGS],
                                cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait_until_writing(self, proc: subprocess.Popen, out: Path) -> None:
        deadline = time.monotonic() + 60
        while not (out / ".streammerge" / "manifest.json").exists():
            assert proc.poll() is None, f"the merge ended before writing: {proc.communicate()}"
            assert time.monotonic() < deadline, "the merge did not start writing within 60 s"
            time.sleep(0.005)

    def assert_consistent(self, out: Path) -> list[str]:
        """What a killed run leaves: final names only for finished files; returns the shards present."""
        present = sorted(f.name for f in out.glob("model-*.safetensors"))
        for name in present:
            h = read_header(out / name)
            assert h.file_size == h.data_start + sum(t.nbytes for t in h.tensors.values()), name
        for name, data in _files(out).items():
            assert data == self.expected.get(name), f"{name} is under its final name but differs from a full run"
        if (out / "model.safetensors.index.json").exists():
            assert present == self.shards, "the index was written before every shard was complete"
        assert _snapshot(*self.inputs) == self.before, "an input file changed"
        return present

    def resume(self, out: Path, argv: list[str] | None = None) -> dict:
        report = out.parent / (out.name + "-report.json")
        argv = argv or ["run", str(self.config), str(out), *FLAGS, "--resume"]
        assert main([*argv, "--report", str(report)]) == 0
        assert _files(out) == self.expected
        assert not list(out.glob("*.partial"))
        assert _snapshot(*self.inputs) == self.before
        return json.loads(report.read_text())


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    return Job(tmp_path_factory.mktemp("crash"))


def _recorded(out: Path) -> set[str]:
    manifest = out / ".streammerge" / "manifest.json"
    return set(json.loads(manifest.read_text())["shards"]) if manifest.exists() else set()


def test_sigkill_at_random_moments_then_resume_gives_identical_bytes(job):
    rng = random.Random(SEED)
    interrupted = kept = 0
    outs = [job.root / f"killed-{k}" for k in range(KILLS)]
    proc = job.start(outs[0])
    for k, out in enumerate(outs):
        delay = job.seconds * (k + rng.random()) / KILLS
        job.wait_until_writing(proc, out)
        time.sleep(delay)
        running = proc.poll() is None
        proc.kill()
        proc.communicate(timeout=30)
        if k + 1 < KILLS:  # the next one imports torch while this one is checked and resumed
            proc = job.start(outs[k + 1])
        present = job.assert_consistent(out)
        if running and present != job.shards:
            interrupted += 1
        skipped_expected = {n for n in _recorded(out) if n in present}
        mtimes = {n: (out / n).stat().st_mtime_ns for n in skipped_expected}
        report = job.resume(out)
        skipped = {s["filename"] for s in report["shards"] if s["skipped"]}
        assert skipped == skipped_expected  # finished shards the manifest vouches for are not redone
        assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())
        kept += len(skipped)
    assert interrupted >= 3, f"only {interrupted} of {KILLS} kills landed while the merge was writing"
    assert kept > 0, "no kill left a finished shard for --resume to keep"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_promptly_and_say_how_to_resume(job, sig, code):
    out = job.root / f"signal-{sig.name}"
    proc = job.start(out)
    job.wait_until_writing(proc, out)
    while len(list(out.glob("model-*.safetensors"))) < 10:  # well into the merge, 113 shards to go
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == code
    assert "Traceback" not in err
    assert "interrupted" in err and "Finished shards are kept" in err
    present = job.assert_consistent(out)
    assert present != job.shards and not (out / "model.safetensors.index.json").exists()
    # the command it suggests is the one that finishes the merge
    suggested = err.split("continue with:", 1)[1].strip().splitlines()[0]
    argv = shlex.split(suggested)
    assert argv[0] == "streammerge" and "--resume" in argv and "60000" in argv
    keep = _recorded(out) & set(present)
    report = job.resume(out, argv[1:])
    assert {s["filename"] for s in report["shards"] if s["skipped"]} == keep


def test_a_signal_whose_interrupt_the_main_thread_lost_still_stops_the_run(tiny_family, tmp_path, monkeypatch):
    """The main thread can lose a signal's KeyboardInterrupt (raised in a finalizer the garbage collector
    runs there); the run's threads see the recorded interrupt and stop the run with it, no shard index."""
    from e2e.test_methods_basic import config_for
    from streammerge import RunOptions, run
    from streammerge.pipeline import interrupt
    from streammerge.runner import BandRunner

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("task_arithmetic", base, experts))
    real, calls = BandRunner.run_band, [0]

    def lost_signal(self, *a):
        calls[0] += 1
        if calls[0] == 3:
            interrupt(KeyboardInterrupt("SIGINT"))   # recorded by the handler; its raise went missing
        return real(self, *a)

    monkeypatch.setattr(BandRunner, "run_band", lost_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg, tmp_path / "out", RunOptions(max_memory=2 << 30, progress=False, out_shard_size=60_000))
    finally:
        interrupt(None)
    assert calls[0] >= 3
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
