"""`batch --stream-intermediates`: a stage read by one later stage only streams into it in memory, never
written, and its reader's output is byte-identical to the written run's; where it cannot stream it is
written and `check` says why; the hand-off holds what the plans say and carries a failure across."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from streammerge.batch import stream
from streammerge.batch.handoff import Handoff
from streammerge.batch.recipe import parse_recipe
from streammerge.batch.stages import check_stages, run_stages
from streammerge.cli import main
from streammerge.errors import StreammergeError
from streammerge.options import RunOptions


def _recipe(tmp_path: Path, base, experts) -> Path:
    docs = [
        {"name": "s1", "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
         "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]},
        {"name": "s2", "merge_method": "linear", "dtype": "bfloat16",
         "models": [{"model": "s1", "parameters": {"weight": 0.5}}, {"model": str(experts[0]), "parameters": {"weight": 0.5}}]},
        {"name": "s3", "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
         "models": [{"model": "s2", "parameters": {"weight": 1.0}}]},
    ]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _run(recipe: Path, out: Path, **kw):
    return run_stages(recipe, parse_recipe(recipe.read_text()), out, RunOptions(progress=False), **kw)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture()
def written(tmp_path, tiny_family):
    base, experts = tiny_family
    recipe = _recipe(tmp_path, base, experts)
    _run(recipe, tmp_path / "written")
    return recipe


def test_a_streamed_stage_is_never_written_and_its_reader_is_byte_identical(tmp_path, written):
    out = tmp_path / "streamed"
    results = {r.name: r for r in _run(written, out, stream=True)}
    assert results["s1"].status == "streamed" and results["s1"].streamed_into == "s2"
    assert results["s1"].bytes_read > 0 and results["s1"].held_peak > 0
    assert not (out / "s1").exists()
    assert results["s2"].status == "built" and results["s3"].status == "built"
    for name in ("s2", "s3"):
        assert _shards(out / name) == _shards(tmp_path / "written" / name) != {}
    # the stand-in holds headers only: its data blocks are sparse, so its disk use is far below its size
    stub = out / ".streammerge" / "streams" / "s1"
    files = list(stub.glob("*.safetensors"))
    assert files and sum(f.stat().st_blocks * 512 for f in files) < sum(f.stat().st_size for f in files) // 4
    # an unchanged recipe: the reader is reused, so its producer is not needed at all
    assert [r.status for r in _run(written, out, stream=True)] == ["unneeded", "reused", "reused"]


def test_check_says_which_stage_streams_and_leaves_no_stand_in(tmp_path, written, capsys):
    out = tmp_path / "fresh"
    rc = main(["batch", str(written), str(out), "--check", "--stream-intermediates", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "stream into s2 (not written)" in text and "streams s1 in" in text, text
    assert "written: it reads a streamed stage" in text, text       # s2 is read by s3 alone but reads s1 streamed
    assert not out.exists()


def test_where_both_runs_do_not_fit_the_stage_is_written_and_check_says_why(tmp_path, written, monkeypatch):
    monkeypatch.setattr(stream, "held_peak", lambda producer, consumer, files: 1 << 50)
    rows = dict((s.name, w) for s, w in check_stages(written, parse_recipe(written.read_text()), tmp_path / "o",
                                                      RunOptions(progress=False), stream=True))
    assert "written: streaming it into s2 needs" in rows["s1"] and "over --max-memory" in rows["s1"], rows
    out = tmp_path / "o"
    results = {r.name: r for r in _run(written, out, stream=True)}
    assert results["s1"].status == "built" and (out / "s1" / "config.json").is_file()
    assert _shards(out / "s3") == _shards(tmp_path / "written" / "s3")


def test_a_stand_in_read_outside_its_stream_is_refused(tmp_path, written, capsys):
    out = tmp_path / "streamed"
    _run(written, out, stream=True)
    stub = out / ".streammerge" / "streams" / "s1"
    cfg = tmp_path / "alone.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16",
                                   "models": [{"model": str(stub), "parameters": {"weight": 1.0}}]}))
    assert main(["run", str(cfg), str(tmp_path / "alone"), "--no-progress"]) != 0
    assert "stand-in of a streamed stage" in capsys.readouterr().err
    assert not (tmp_path / "alone" / "model.safetensors").exists()


def test_a_failing_producer_stops_its_reader(tmp_path, written, monkeypatch):
    from streammerge import execute

    real = execute.Executor.run

    def boom(self):
        if self.sources is None and self.out_dir.parent.name == "streams":
            raise RuntimeError("producer broke")
        return real(self)

    monkeypatch.setattr(execute.Executor, "run", boom)
    with pytest.raises(StreammergeError, match="'s1', streamed into this one, stopped: producer broke"):
        _run(written, tmp_path / "failing", stream=True)
    assert not (tmp_path / "failing" / "s2" / "model.safetensors").exists()


def test_the_hand_off_holds_at_most_its_room_and_lets_go_after_the_last_reader():
    sizes = {"a": 8, "b": 8, "c": 8}
    h = Handoff("p", sizes, {"a": 1, "b": 2, "c": 1}, room=16)
    got: dict[str, bytes] = {}

    def consumer():
        for name in ("a", "b", "b", "c"):
            out = torch.empty(8, dtype=torch.uint8)
            h.read(name, 0, out)
            got[name] = bytes(out.tolist())
            h.done_with(name)

    t = threading.Thread(target=consumer)
    t.start()
    for i, name in enumerate(("a", "b", "c")):
        h.put(name, 0, torch.full((4,), i, dtype=torch.uint8))
        h.put(name, 4, torch.full((4,), i + 10, dtype=torch.uint8))
    h.finish()
    t.join(10)
    assert got == {n: bytes([i] * 4 + [i + 10] * 4) for i, n in enumerate("abc")}
    assert h.peak <= 16 and h.held == 0 and not h.ready


def test_a_hand_off_failure_reaches_the_waiting_reader():
    h = Handoff("p", {"a": 4}, {"a": 1}, room=4)
    threading.Timer(0.2, h.fail, (RuntimeError("disk gone"),)).start()
    with pytest.raises(StreammergeError, match="disk gone"):
        h.read("a", 0, torch.empty(4, dtype=torch.uint8))
