"""The output folder: the config read once, checksummed resume, what --overwrite may delete, the lock.

Each test builds its own output folder; tests that put symlinks to inputs in it copy the inputs first,
so a bug deletes a copy, never the session's shared family.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_dir, shard_bytes, write_yaml
from e2e.test_methods_basic import config_for
from streammerge import RunOptions, run
from streammerge.cli import main
from streammerge.errors import OutputError, ResumeError

SHARDED = 60_000  # bytes an output shard: the tiny family gives several shards


def _opts(**kw) -> RunOptions:
    return RunOptions(max_memory=2 << 30, progress=False, **kw)


def _output(tiny_family, tmp_path: Path, name: str = "out", **kw) -> tuple[Path, Path]:
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / f"{name}.yml", config_for("task_arithmetic", base, experts))
    out = tmp_path / name
    run(cfg, out, _opts(**kw))
    return cfg, out


def _card_config(out: Path) -> str:
    card = (out / "README.md").read_text()
    return card.split("```yaml\n", 1)[1].split("```", 1)[0]


# -- item 4: the config is read once -------------------------------------------------------------


def test_config_rewritten_during_the_run_is_not_what_the_card_documents(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    original = cfg.read_text()
    run(cfg, tmp_path / "out", _opts(), on_start=lambda plan: cfg.write_text("merge_method: slerp\n# edited\n"))
    assert _card_config(tmp_path / "out").strip() == original.strip()
    assert "edited" not in (tmp_path / "out" / "README.md").read_text()


def test_config_deleted_during_the_run_does_not_fail_it(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    original = cfg.read_text()

    def delete(n: int) -> None:
        if cfg.exists():
            cfg.unlink()

    run(cfg, tmp_path / "out", _opts(), on_progress=delete)
    assert not cfg.exists()
    assert _card_config(tmp_path / "out").strip() == original.strip()
    assert load_dir(tmp_path / "out")


# -- item 6: resume verifies checksums; a damaged manifest is a clear error ------------------------


def test_manifest_records_a_checksum_per_shard(tiny_family, tmp_path):
    from streammerge.io.checksum import file_digest

    _, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    shards = json.loads((out / ".streammerge" / "manifest.json").read_text())["shards"]
    assert len(shards) > 2 and set(shards) == set(shard_bytes(out))
    for name, rec in shards.items():
        assert rec["checksum"] == file_digest(out / name) and rec["size"] == (out / name).stat().st_size


def test_manifest_lists_shards_in_plan_order_whatever_order_they_finish_in(tiny_family, tmp_path):
    """Ray workers finish shards in any order; the manifest must still be the bytes a local run writes."""
    from streammerge.config import load_config
    from streammerge.merge import start_manifest
    from streammerge.plan.build import build_plan

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("task_arithmetic", base, experts))
    plan = build_plan(load_config(cfg), cfg, _opts(out_shard_size=SHARDED))
    assert len(plan.shards) > 2
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    for i, s in enumerate(plan.shards):
        (out / s.filename).write_bytes(bytes([i]) * 10)
    _, _, shard_done = start_manifest(out, plan, "fp", _opts())
    for i in reversed(range(len(plan.shards))):
        shard_done(i, SimpleNamespace(checksum=f"sum-{i}"))
    shards = json.loads((out / ".streammerge" / "manifest.json").read_text())["shards"]
    assert list(shards) == [s.filename for s in plan.shards]
    assert [r["checksum"] for r in shards.values()] == [f"sum-{i}" for i in range(len(plan.shards))]


def test_resume_redoes_a_shard_corrupted_in_place(tiny_family, tmp_path):
    cfg, full = _output(tiny_family, tmp_path, "full", out_shard_size=SHARDED)
    expected = shard_bytes(full)
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    shards = sorted(expected)
    (partial / shards[-1]).unlink()  # as if killed before the last shard committed
    (partial / "model.safetensors.index.json").unlink()
    victim = partial / shards[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor: same size, header intact
    victim.write_bytes(bytes(data))
    kept = (partial / shards[1]).stat().st_mtime_ns
    report = run(cfg, partial, _opts(out_shard_size=SHARDED, resume=True))
    assert shard_bytes(partial) == expected
    assert (partial / shards[1]).stat().st_mtime_ns == kept
    assert [s.filename for s in report.shards if not s.skipped] == [shards[0], shards[-1]]
    assert any(shards[0] in w and "checksum" in w and "merging it again" in w for w in report.warnings)


def test_resume_redoes_a_recorded_shard_that_is_a_symlink(tiny_family, tmp_path):
    cfg, full = _output(tiny_family, tmp_path, "full", out_shard_size=SHARDED)
    expected = shard_bytes(full)
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    name = sorted(expected)[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(partial / name, elsewhere)
    (partial / name).symlink_to(elsewhere)
    report = run(cfg, partial, _opts(out_shard_size=SHARDED, resume=True))
    assert not (partial / name).is_symlink() and shard_bytes(partial) == expected
    assert elsewhere.read_bytes() == expected[name]
    assert any(name in w and "symbolic link" in w for w in report.warnings)


@pytest.mark.parametrize("damage", [
    b"{\"fingerprint\": \"abc\", \"shards\": {",               # cut short: not JSON
    b"\xff\xfe not text",                                       # not even text
    b"[1, 2, 3]",                                               # JSON, not an object
    b"{\"fingerprint\": 7, \"shards\": []}",                    # wrong types
    b"{\"shards\": {}}",                                        # a key missing
    b"{\"fingerprint\": \"abc\", \"shards\": {\"model.safetensors\": {\"size\": \"big\"}}}",  # a bad record
])
def test_damaged_manifest_is_a_clear_resume_error(tiny_family, tmp_path, damage, capsys):
    cfg, out = _output(tiny_family, tmp_path)
    manifest = out / ".streammerge" / "manifest.json"
    manifest.write_bytes(damage)
    with pytest.raises(ResumeError) as e:
        run(cfg, out, _opts(resume=True))
    msg = str(e.value)
    assert str(manifest) in msg and "damaged" in msg and "--overwrite" in msg and len(msg) < 400
    assert main(["run", str(cfg), str(out), "--no-progress", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "damaged" in err and "Traceback" not in err


# -- item 7: --overwrite deletes only what a merge writes ----------------------------------------


def test_overwrite_keeps_unrelated_files_and_subfolders(tiny_family, tmp_path):
    cfg, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    (out / "eval" / "model.safetensors").write_bytes(b"not ours either")
    stale = out / "model-00099-of-00099.safetensors"
    stale.write_bytes(b"a shard of an older layout")
    run(cfg, out, _opts(overwrite=True))  # one shard this time
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "eval" / "scores.json").read_text() == "{}"
    assert (out / "eval" / "model.safetensors").read_bytes() == b"not ours either"
    assert not stale.exists() and not (out / "model.safetensors.index.json").exists()
    assert sorted(shard_bytes(out)) == ["model.safetensors"]


def test_overwrite_refuses_a_folder_with_a_stray_safetensors_and_no_marker(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="refusing to delete") as e:
        run(cfg, out, _opts(overwrite=True))
    assert "manifest.json" in str(e.value) and "mergekit_config.yml" in str(e.value)
    assert (out / "mine.safetensors").read_bytes() == b"precious" and (out / "notes.txt").exists()
    assert not (out / ".streammerge").exists()


def test_overwrite_accepts_a_mergekit_output(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mergekit_config.yml").write_text("merge_method: linear\n")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "keep.txt").write_text("keep")
    run(cfg, out, _opts(overwrite=True))
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "mergekit_config.yml").read_text() == cfg.read_text()  # mergekit's file, replaced by this run's
    assert (out / "keep.txt").read_text() == "keep" and load_dir(out)


def test_overwrite_refuses_when_the_config_lives_in_the_output(tiny_family, tmp_path):
    _, out = _output(tiny_family, tmp_path)
    base, experts = tiny_family
    inside = write_yaml(out / "mergekit_config.yml", config_for("linear", base, experts))
    text = inside.read_text()
    for opts in (dict(overwrite=True), dict(resume=True)):
        with pytest.raises(OutputError, match="inside the output folder") as e:
            run(inside, out, _opts(**opts))
        assert str(inside) in str(e.value)
    assert inside.read_text() == text and load_dir(out)


def _private_family(tiny_family, tmp_path: Path) -> tuple[Path, list[Path]]:
    base, experts = tiny_family
    root = tmp_path / "models"
    copies = [Path(shutil.copytree(m, root / m.name)) for m in (base, *experts)]
    return copies[0], copies[1:]


def test_overwrite_unlinks_a_symlinked_shard_not_its_target(tiny_family, tmp_path):
    base, experts = _private_family(tiny_family, tmp_path)
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    run(cfg, out, _opts())
    target = experts[0] / "model.safetensors"
    before = target.read_bytes()
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(target)  # an input's real shard, reached through a link
    (out / ".streammerge" / "old").symlink_to(experts[1], target_is_directory=True)
    run(cfg, out, _opts(overwrite=True))
    assert target.read_bytes() == before and sorted(p.name for p in experts[1].iterdir())
    assert not (out / "model.safetensors").is_symlink() and load_dir(out)


def test_an_input_file_that_resolves_inside_the_output_is_refused(tiny_family, tmp_path):
    base, experts = _private_family(tiny_family, tmp_path)
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    run(cfg, out, _opts())
    stash = out / "stash"
    stash.mkdir()
    shard = experts[0] / "model.safetensors"
    shutil.move(shard, stash / "model.safetensors")
    shard.symlink_to(stash / "model.safetensors")
    with pytest.raises(OutputError, match="inside the output folder") as e:
        run(cfg, out, _opts(overwrite=True))
    assert str(shard) in str(e.value)
    assert (stash / "model.safetensors").exists()


# -- item 8: one run at a time ---------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from streammerge.io.outdir import OutputLock
lock = OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_second_run_is_refused_while_another_holds_the_folder(tiny_family, tmp_path, capsys, flag):
    cfg, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["run", str(cfg), str(out), "--no-progress", "--out-shard-size", str(SHARDED), flag]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "another streammerge run" in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the lock dies with its process


def test_the_lock_is_held_for_the_whole_run(tiny_family, tmp_path):
    """A second run started from inside the first (at its start and between bands) is refused, and
    once the first has written its index the folder is free again."""
    from streammerge.io.outdir import OutputLock

    cfg, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    expected = shard_bytes(out)
    refused: list[str] = []

    def second(*_) -> None:
        if len(refused) < 2:
            with pytest.raises(OutputError, match="another streammerge run") as e:
                run(cfg, out, _opts(out_shard_size=SHARDED, overwrite=True))
            refused.append(str(e.value))

    run(cfg, out, _opts(out_shard_size=SHARDED, overwrite=True), on_start=second, on_progress=second)
    assert len(refused) == 2 and all(f"pid {os.getpid()}" in m for m in refused)
    assert shard_bytes(out) == expected
    OutputLock(out).acquire().release()


# -- start-up, durability, --report ----------------------------------------------------------------


@pytest.mark.parametrize("left", [[], ["lock"], ["lock", "manifest.json.partial"]])
def test_resume_accepts_what_a_stop_during_start_up_leaves(tiny_family, tmp_path, left):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    for name in left:
        (out / ".streammerge" / name).write_text("12345\n" if name == "lock" else "{\"fingerprint\": ")
    run(cfg, out, _opts(resume=True))
    assert load_dir(out) and (out / ".streammerge" / "manifest.json").exists()


def test_a_plain_run_accepts_a_folder_left_by_a_refused_start(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    (out / ".streammerge" / "lock").write_text("")
    run(cfg, out, _opts())
    assert load_dir(out)


def test_the_output_folder_is_fsynced_after_the_index(tiny_family, tmp_path, monkeypatch):
    import streammerge.merge as merge_mod

    calls: list[tuple[Path, bool]] = []
    real = merge_mod.fsync_dir

    def spy(path):
        calls.append((Path(path), (Path(path) / "model.safetensors.index.json").exists()))
        real(path)

    monkeypatch.setattr(merge_mod, "fsync_dir", spy)
    _, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    assert calls and calls[-1] == (out, True)
    assert any(p == out and not indexed for p, indexed in calls)  # config.json and the card, before the index


def test_check_report_path(tmp_path):
    from streammerge.merge import check_report_path
    from streammerge.io.outdir import check_report_path as same

    assert check_report_path is same
    check_report_path(tmp_path / "r.json")
    (tmp_path / "old.json").write_text("{}")
    check_report_path(tmp_path / "old.json")
    with pytest.raises(OutputError, match="is a folder") as e:
        check_report_path(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(OutputError, match="does not exist") as e:
        check_report_path(tmp_path / "missing" / "r.json")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_report_path(tmp_path / "file" / "r.json")


def test_a_stop_while_overwrite_clears_leaves_a_resumable_folder(tiny_family, tmp_path, monkeypatch):
    import streammerge.io.outdir as outdir_mod

    cfg, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    expected = shard_bytes(out)
    (out / "notes.txt").write_text("mine")
    real = outdir_mod.clear_output

    def stopped(folder, planned=()):
        real(folder, planned)
        raise KeyboardInterrupt  # SIGTERM once the old output is deleted, before any new shard

    monkeypatch.setattr(outdir_mod, "clear_output", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, _opts(out_shard_size=SHARDED, overwrite=True))
    monkeypatch.setattr(outdir_mod, "clear_output", real)
    run(cfg, out, _opts(out_shard_size=SHARDED, resume=True))
    assert shard_bytes(out) == expected and (out / "notes.txt").read_text() == "mine"


def test_a_reference_model_without_config_json_is_not_silent(tiny_family, tmp_path):
    base, experts = _private_family(tiny_family, tmp_path)
    (experts[0] / "config.json").unlink()
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    report = run(cfg, tmp_path / "out", _opts())
    said = [w for w in report.warnings if "config.json" in w and str(experts[0]) in w]
    assert (tmp_path / "out" / "config.json").exists() or said


def test_stale_partials_that_are_links_are_unlinked_not_written_through(tiny_family, tmp_path):
    cfg, out = _output(tiny_family, tmp_path)
    victims = [tmp_path / "victim-shard", tmp_path / "victim-manifest"]
    for v in victims:
        v.write_text("precious")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.partial").symlink_to(victims[0])
    (out / ".streammerge" / "manifest.json.partial").symlink_to(victims[1])
    run(cfg, out, _opts(resume=True))
    assert [v.read_text() for v in victims] == ["precious", "precious"] and load_dir(out)
    assert not list(out.glob("*.partial")) and not list((out / ".streammerge").glob("*.partial"))


def test_resume_refuses_a_folder_where_a_shard_belongs_and_keeps_it(tiny_family, tmp_path):
    from streammerge.errors import OutputError

    cfg, out = _output(tiny_family, tmp_path, out_shard_size=SHARDED)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.mkdir()
    (shard / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"is a folder where this merge's shard belongs; .* move it away"):
        run(cfg, out, _opts(out_shard_size=SHARDED, resume=True))
    assert (shard / "mine.txt").read_text() == "keep"
