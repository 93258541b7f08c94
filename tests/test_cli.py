"""The command line: exit codes, mergekit-style invocation, check output, demo."""

import json

from conftest import load_dir, write_yaml
from e2e.test_methods_basic import config_for
from streammerge.cli import main


def test_run_mergekit_style_and_report(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    report = tmp_path / "r.json"
    code = main([str(cfg), str(tmp_path / "out"), "--lazy-unpickle", "--allow-crimes", "--out-shard-size", "1B",
                 "--no-progress", "--report", str(report), "--max-memory", "1GiB"])
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["method"] == "linear" and doc["shards"][0]["bytes_written"] > 0 and doc["peak_rss"] > 0
    assert load_dir(tmp_path / "out")
    out = capsys.readouterr().out  # results on stdout, diagnostics on stderr
    assert "peak RSS" in out and "GB/s" in out


def test_existing_output_is_refused_without_overwrite(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(cfg), str(out), "--no-progress"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["run", str(cfg), str(out), "--no-progress", "--overwrite"]) == 1
    assert "refusing to delete" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_check_exit_codes(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    good = write_yaml(tmp_path / "g.yml", config_for("linear", base, experts))
    assert main(["check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write_yaml(tmp_path / "b.yml", {"merge_method": "lineer", "models": [{"model": str(base)}]})
    assert main(["check", str(bad)]) == 1
    assert "did you mean 'linear'" in capsys.readouterr().err
    assert main(["check"]) == 2


def test_output_inside_an_input_is_refused(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    assert main(["run", str(cfg), str(experts[0] / "merged"), "--no-progress"]) == 1
    assert "overlaps input model" in capsys.readouterr().err
    assert not (experts[0] / "merged").exists()


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert (tmp_path / "demo" / "merged" / "config.json").exists()
    assert "merged model" in capsys.readouterr().err


def test_bench_prints_per_shard_throughput(tmp_path, capsys):
    report = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--data", str(tmp_path / "data"), "--report", str(report),
                 "--max-memory", "1GiB"]) == 0
    doc = json.loads(report.read_text())
    assert doc["bytes_read"] > doc["bytes_written"] > 0
    assert "GB/s" in capsys.readouterr().err
    assert main(["bench", "--preset", "huge"]) == 2


def test_no_fsync_writes_the_same_bytes(tiny_family, tmp_path):
    from conftest import shard_bytes

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    assert main(["run", str(cfg), str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["run", str(cfg), str(tmp_path / "b"), "--no-progress", "--no-fsync"]) == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_not_enough_free_disk_is_refused_before_writing(tiny_family, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert main(["run", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "are free on its filesystem" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _parsed_options(argv):
    from streammerge.cli import build_parser, options_from_args

    return options_from_args(build_parser().parse_args(argv))


def test_flags_left_out_give_the_library_defaults():
    from streammerge.options import RunOptions

    assert _parsed_options(["run", "c.yml", "out"]) == RunOptions()
    assert _parsed_options(["check", "c.yml"]) == RunOptions()


def test_every_option_flag_sets_its_field():
    """Generated from RunOptions' metadata: each flag reaches its field; `--cuda` (mergekit) wins over --device."""
    import dataclasses

    from streammerge.options import RunOptions, option_flags

    argv = ["run", "c.yml", "out", "--max-memory", "2GiB", "--max-gpu-memory", "3G", "--device", "auto",
            "--out-shard-size", "1GiB", "--random-seed", "7", "--prefetch", "3", "--chunk-rows", "5", "--overwrite",
            "--resume", "--no-progress", "--no-fsync", "--no-copy-tokenizer", "--no-write-model-card", "--allow-crimes",
            "--unsafe-truncate-embeddings", "--no-download", "--backend", "ray", "--address", "head:6379"]
    got = _parsed_options(argv)
    assert got == RunOptions(max_memory=2 << 30, max_gpu_memory=3 * 10**9, device="auto", out_shard_size=1 << 30,
                             seed=7, prefetch=3, chunk_rows=5, overwrite=True, resume=True, progress=False,
                             fsync=False, copy_tokenizer=False, write_model_card=False, allow_crimes=True,
                             unsafe_truncate_embeddings=True, download=False, backend="ray", ray_address="head:6379")
    flagged = {name for name, _, _ in option_flags()}
    assert {f.name for f in dataclasses.fields(RunOptions)} - flagged == {"check_nonfinite"}
    changed = {f.name for f in dataclasses.fields(RunOptions) if getattr(got, f.name) != f.default}
    assert changed == flagged   # the command line above reaches every flagged field
    assert _parsed_options(["check", "c.yml", "--cuda", "--device", "cpu"]).device == "cuda"
    assert _parsed_options(["run", "c.yml", "o", "--no-copy-tokenizer", "--copy-tokenizer"]).copy_tokenizer is True


def test_run_options_are_keyword_only():
    import pytest

    from streammerge.options import RunOptions

    with pytest.raises(TypeError):
        RunOptions(1 << 30)   # type: ignore[misc]


def test_help_lists_the_presets_and_methods_from_their_tables(capsys):
    """bench's --method lists the demo's configs (the methods bench can run), each a registered method."""
    from streammerge.demo import TEMPLATES
    from streammerge.methods import get_method
    from streammerge.synth_spec import PRESETS

    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{', '.join(list(PRESETS)[:-1])} or {list(PRESETS)[-1]} (default: small)" in text
    assert f"{', '.join(list(TEMPLATES)[:-1])} or {list(TEMPLATES)[-1]} (default: linear)" in text
    for name in TEMPLATES:
        assert get_method(name).name == name
