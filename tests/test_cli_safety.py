"""Hostile command lines: every bad number is refused at parse time with one clear line and exit 2
(argparse's usage convention), a bad --report path before any merge work (exit 1), and Ctrl-C during
start-up ends with one line and exit 130, never a traceback."""

import builtins

import pytest

from conftest import write_yaml
from e2e.test_methods_basic import config_for
from streammerge.cli import EXIT_USAGE, main


@pytest.fixture
def cfg(tiny_family, tmp_path):
    base, experts = tiny_family
    return write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))


def _usage_error(capsys, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, last
    return last


@pytest.mark.parametrize("value, fragment", [
    ("0", "'0' is less than 1 byte"),
    ("0.5", "'0.5' is less than 1 byte"),
    ("0GiB", "'0GiB' is less than 1 byte"),
    ("1e400", "'1e400' is larger than"),
    ("99999999999999999999TiB", "is larger than"),
    ("lots", "cannot read 'lots' as a size"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_max_memory_values_that_are_no_budget_are_usage_errors(command, value, fragment, cfg, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [command, str(cfg), *([str(out)] if command == "run" else []), "--max-memory", value]
    _usage_error(capsys, argv, "argument --max-memory:", fragment)
    assert not out.exists()


def test_max_memory_zero_names_the_default_and_how_to_get_it(cfg, capsys):
    line = _usage_error(capsys, ["check", str(cfg), "--max-memory", "0"], "argument --max-memory:")
    assert "leave --max-memory out for the default" in line


@pytest.mark.parametrize("flag", ["--out-shard-size", "--max-gpu-memory"])
@pytest.mark.parametrize("value, fragment", [("0", "less than 1 byte"), ("0.1", "less than 1 byte"),
                                             ("1e400", "is larger than"), ("-5", "cannot read '-5' as a size")])
def test_other_sizes_are_range_checked(flag, value, fragment, cfg, capsys):
    _usage_error(capsys, ["check", str(cfg), flag, value], f"argument {flag}:", fragment)


@pytest.mark.parametrize("value", ["-1", str(2**64), "1" * 5000])
def test_random_seed_outside_64_bits_is_refused_at_parse_time(value, cfg, tmp_path, capsys):
    out = tmp_path / "out"
    line = _usage_error(capsys, ["run", str(cfg), str(out), "--random-seed", value, "--no-progress"],
                        "argument --random-seed:", "0 to 18446744073709551615")
    assert len(line) < 300  # a 5000-digit value is not printed whole
    assert not out.exists()


def test_random_seed_at_the_ends_of_the_range_is_accepted(cfg, capsys):
    assert main(["check", str(cfg), "--random-seed", "0"]) == 0
    assert main(["check", str(cfg), "--random-seed", str(2**64 - 1)]) == 0


@pytest.mark.parametrize("value", ["0", "-1", "100000"])
def test_num_threads_outside_its_range_is_refused(value, cfg, tmp_path, capsys):
    out = tmp_path / "out"
    _usage_error(capsys, ["run", str(cfg), str(out), "--num-threads", value], "argument --num-threads:",
                 "from 1 to 1024")
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "65"])
def test_prefetch_outside_its_range_is_refused(value, cfg, capsys):
    _usage_error(capsys, ["check", str(cfg), "--prefetch", value], "argument --prefetch:", "from 1 to 64")


def test_chunk_rows_must_be_positive(cfg, capsys):
    _usage_error(capsys, ["check", str(cfg), "--chunk-rows", "0"], "argument --chunk-rows:", "at least 1")


def test_library_options_refuse_the_same_numbers():
    from streammerge import RunOptions
    from streammerge.errors import ConfigError

    for bad, fragment in [({"seed": -1}, "RunOptions.seed: -1"), ({"seed": 2**64}, "RunOptions.seed"),
                          ({"prefetch": 0}, "RunOptions.prefetch: 0"), ({"max_memory": -1}, "RunOptions.max_memory"),
                          ({"out_shard_size": 0}, "RunOptions.out_shard_size: 0"),
                          ({"chunk_rows": 0}, "RunOptions.chunk_rows: 0")]:
        with pytest.raises(ConfigError, match=fragment):
            RunOptions(**bad)
    assert RunOptions(seed=2**64 - 1, prefetch=64).seed == 2**64 - 1


def test_parse_size_is_exact_and_bounded():
    from streammerge.errors import ConfigError
    from streammerge.options import parse_size

    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("5B") == 5 * 10**9
    assert parse_size("9223372036854775807") == 2**63 - 1
    for bad in ("1e400", "9223372036854775808", "1e99999999999"):
        with pytest.raises(ConfigError, match="is larger than"):
            parse_size(bad, "--max-memory")


# -- --report is checked before the merge -------------------------------------------------------------

@pytest.mark.parametrize("where, fragment", [
    ("folder", "is a folder; name a file"),
    ("missing/r.json", "does not exist; create it"),
    ("afile/r.json", "is not a folder"),
])
def test_bad_report_path_fails_before_any_output(where, fragment, cfg, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    code = main(["run", str(cfg), str(out), "--no-progress", "--report", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "error: --report" in err and fragment in err, err
    assert not out.exists()


def test_report_inside_the_new_output_folder_is_fine(cfg, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "--no-progress", "--report", str(out / "report.json")]) == 0
    assert (out / "report.json").read_text().startswith("{")


def test_report_fifo_is_refused_instead_of_blocking(cfg, tmp_path, capsys):
    import os

    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    assert main(["run", str(cfg), str(tmp_path / "out"), "--no-progress", "--report", str(fifo)]) == 1
    assert "is not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_checks_its_report_path_first(tmp_path, capsys):
    code = main(["bench", "--preset", "tiny", "--data", str(tmp_path / "data"), "--report", str(tmp_path)])
    assert code == 1
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# -- Ctrl-C before main's handlers are installed --------------------------------------------------------

def test_ctrl_c_during_startup_imports_is_one_line_and_130(cfg, monkeypatch, capsys):
    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "rich.console":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    code = main(["check", str(cfg)])
    monkeypatch.setattr(builtins, "__import__", real_import)
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == "interrupted."
