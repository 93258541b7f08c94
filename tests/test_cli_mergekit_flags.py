"""Every flag mergekit-yaml accepts parses in `streammerge run`, read from mergekit's own click command."""

import pytest

from conftest import write_yaml
from e2e.test_methods_basic import config_for
from streammerge.cli import build_parser, main, options_from_args

DUMMY = {"--device": "cpu", "--random-seed": "1", "--out-shard-size": "1B"}  # any other value-taking flag: "1"
REFUSED = {"--no-safe-serialization"}  # pickled output is not implemented: refused, tested below


def _mergekit_flags() -> list[tuple[str, bool]]:
    """(spelling, takes a value) of every option of mergekit-yaml's click command, both halves of a pair."""
    click = pytest.importorskip("click", reason="mergekit (and its click) is not installed")
    try:
        from mergekit.scripts.run_yaml import main as mergekit_yaml
    except ImportError as e:
        pytest.skip(f"mergekit is not importable: {e}")
    flags = []
    for p in mergekit_yaml.params:
        if not isinstance(p, click.Option):
            continue  # CONFIG_FILE, OUT_PATH
        takes_value = not (p.is_flag or p.count)
        flags += [(name, takes_value) for name in (*p.opts, *p.secondary_opts)]
    return flags


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_every_mergekit_flag_parses_before_and_after_the_positionals():
    flags = _mergekit_flags()
    assert {"--no-allow-crimes", "-j", "--gpu-rich", "--no-quiet", "-v", "--lora-merge-dtype"} <= {f for f, _ in flags}
    for flag, takes_value in flags:
        if flag in REFUSED:
            continue
        words = [flag, DUMMY.get(flag, "1")] if takes_value else [flag]
        for argv in (["run", *words, "c.yml", "out"], ["run", "c.yml", "out", *words]):
            try:
                args = _parse(argv)
            except SystemExit:
                pytest.fail(f"streammerge refused mergekit's {flag}: {argv}")
            assert (args.config, args.out) == ("c.yml", "out"), argv
            options_from_args(args)  # and builds the run's options


def test_mergekit_flags_are_shown_under_their_own_group(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    group = text[text.index("mergekit compatibility:"):]
    for flag in ("--cuda", "--gpu-rich", "--quiet", "-v", "--async-write", "--lora-merge-cache", "--no-multi-gpu"):
        assert flag in group, flag


def test_no_safe_serialization_is_refused(capsys):
    assert main(["c.yml", "out", "--no-safe-serialization"]) == 2
    err = capsys.readouterr().err
    assert ("--no-safe-serialization: streammerge writes safetensors only; pickled (.bin) output is not "
            "implemented; leave the flag out") in err
    assert main(["--safe-serialization", "--help"]) == 0  # the positive half is what we do anyway


def test_device_cuda_0_is_cuda_and_another_index_is_refused(capsys):
    assert options_from_args(_parse(["run", "c.yml", "o", "--device", "cuda:0"])).device == "cuda"
    assert options_from_args(_parse(["check", "c.yml", "--device", "cuda:0"])).device == "cuda"
    assert options_from_args(_parse(["run", "c.yml", "o", "--device", "cpu"])).device == "cpu"
    assert main(["c.yml", "out", "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert ("argument --device: 'cuda:1': streammerge computes on the first visible GPU only; run with "
            "CUDA_VISIBLE_DEVICES=1 and --device cuda") in err
    assert main(["c.yml", "out", "--device", "gpu"]) == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err  # the old message, unchanged


def test_mergekit_aliases_and_pairs_set_what_mergekit_sets():
    def opts(*flags):
        return options_from_args(_parse(["run", "c.yml", "o", *flags]))

    assert opts("--gpu-rich").device == "cuda"
    assert opts("--cuda", "--no-cuda").device == "cpu"
    assert opts("--no-cuda", "--cuda").device == "cuda"
    assert opts("--allow-crimes", "--no-allow-crimes").allow_crimes is False
    assert opts("--no-quiet").progress is True
    args = _parse(["run", "-j", "2", "c.yml", "o", "-v", "-v"])
    assert args.num_threads == 2 and args.verbose == 2
    assert _parse(["run", "c.yml", "o", "--quiet", "--no-quiet"]).quiet is False


def test_quiet_run_prints_nothing(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    assert main(["--quiet", str(cfg), str(tmp_path / "out"), "--max-memory", "1GiB"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() or list((tmp_path / "out").glob("*.safetensors"))
    got = capsys.readouterr()
    assert (got.out, got.err) == ("", "")
    # errors still print
    assert main([str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err


def test_verbose_prints_a_note_for_each_ignored_flag(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    note = "note: --async-write: streammerge always writes asynchronously; ignored"
    assert main([str(cfg), str(tmp_path / "a"), "--async-write", "--no-progress", "--no-lazy-unpickle",
                 "--write-threads", "4"]) == 0
    assert "note:" not in capsys.readouterr().err  # only under -v
    assert main(["-v", str(cfg), str(tmp_path / "b"), "--async-write", "--no-progress", "--no-lazy-unpickle",
                 "--write-threads", "4"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert note in lines
    assert "note: --no-lazy-unpickle: streammerge reads safetensors only and never unpickles; ignored" in lines
    assert "note: --write-threads: streammerge's writer sets its own threads; ignored" in lines


def test_verbose_gpu_rich_says_what_it_means_here():
    from streammerge.cli.flags import notes

    assert notes(_parse(["run", "c.yml", "o", "--gpu-rich", "-v"])) == [
        "note: --gpu-rich: means --device cuda here; its --low-cpu-memory, --read-to-gpu and --multi-gpu are ignored"]
