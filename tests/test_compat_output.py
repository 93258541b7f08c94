"""What a mergekit user finds: the output folder (mergekit_config.yml, a model card with base_model), results
on stdout and diagnostics on stderr, and config keys tolerated or refused as mergekit 0.1.5 would."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import write_yaml
from streammerge import RunOptions, run
from streammerge.merge import check
from streammerge.cli import main
from streammerge.config import parse_config
from streammerge.errors import ConfigError
from streammerge.io import card, outdir

ROOT = Path(__file__).resolve().parent.parent


def _config_text(models: list[Path], base: Path) -> str:
    lines = ["# merged for the card test — a comment and a non-ASCII dash, kept as written",
             "merge_method: task_arithmetic", f"base_model: {base}", "models:"]
    for m, w in zip(models, (0.7, 0.3)):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}}}"]
    return "\n".join(lines + ["parameters: {lambda: 0.9}", "dtype: float32", ""])


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture(scope="module")
def merged(tiny_family, tmp_path_factory):
    """A merge whose base sits in a hub-cache layout (models--acme--tiny-base/snapshots/REV)."""
    base, experts = tiny_family
    root = tmp_path_factory.mktemp("card")
    rev = "0123456789abcdef0123456789abcdef01234567"
    cached = root / "hub" / "models--acme--tiny-base" / "snapshots" / rev
    shutil.copytree(base, cached)
    text = _config_text(experts[:2], cached)
    cfg = root / "c.yml"
    cfg.write_text(text, encoding="utf-8")
    out = root / "out"
    run(cfg, out, RunOptions(max_memory=2 << 30, progress=False))
    return out, text, cached, rev, experts[:2]


def test_mergekit_config_yml_is_the_text_as_run(merged):
    out, text, *_ = merged
    assert (out / "mergekit_config.yml").read_text(encoding="utf-8") == text


def test_model_card_has_base_model_metadata_inputs_parameters_and_home(merged):
    out, text, cached, rev, experts = merged
    readme = (out / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(readme)
    assert meta["base_model"] == ["acme/tiny-base"]  # hub repos only: a local path means nothing on the hub
    assert meta["base_model_relation"] == "merge" and "merge" in meta["tags"] and meta["library_name"] == "transformers"
    assert f"[acme/tiny-base](https://huggingface.co/acme/tiny-base) | {rev} |" in readme
    for e in experts:
        assert f"| `{e}` | - | `{e}` |" in readme
    assert "`task_arithmetic`, with `acme/tiny-base` as the base model." in readme
    assert "- all models: `{lambda: 0.9}`" in readme and f"- `{experts[0]}`: `{{weight: 0.7}}`" in readme
    assert text.rstrip() in readme and card.HOMEPAGE in readme


def test_homepage_is_pyprojects():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Homepage"] == card.HOMEPAGE


@pytest.mark.parametrize("ref, path, repo, revision", [
    ("org/name", "/cache/whatever", "org/name", None),
    ("org/name@v1.0", "/cache/whatever", "org/name", "v1.0"),
    ("./org/name", "./org/name", None, None),
    ("/models/a", "/models/a", None, None),
    ("x", "/h/models--org--name/snapshots/abc", "org/name", "abc"),
])
def test_hub_inputs_are_recognised(ref, path, repo, revision):
    found = card.describe_input(ref, path)
    assert (found.repo, found.revision) == (repo, revision)


def test_overwrite_deletes_the_files_a_merge_writes(merged, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(merged[0], out)
    (out / "chat_template.jinja").write_text("{{ x }}")
    (out / "notes.txt").write_text("mine")
    names = {f.name for f in outdir.merge_files(out)}
    assert {"mergekit_config.yml", "README.md", "chat_template.jinja", "config.json", "model.safetensors"} <= names
    assert "notes.txt" not in names


def test_check_prints_the_plan_on_stdout_and_warnings_on_stderr(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "paramters": {"weight": 1}, "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in experts[:2]]})
    capsys.readouterr()
    assert main(["check", str(cfg)]) == 0
    got = capsys.readouterr()
    assert "output shards" in got.out and "ok: the config" in got.out and "warning" not in got.out
    assert "paramters: unknown key, ignored as mergekit 0.1.5 ignores it; did you mean 'parameters'?" in got.err
    assert "output shards" not in got.err


def test_piped_results_are_not_cut_to_80_columns(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in experts[:2]]})
    out = tmp_path / ("a_long_output_folder_name_" * 6)
    capsys.readouterr()
    assert main(["run", str(cfg), str(out), "--no-progress", "--max-memory", "2GiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(f"streammerge linear: {out}" in line for line in lines)  # the table's title, on one line
    assert any("peak RSS" in line and "GiB)" in line for line in lines)


# -- keys mergekit tolerates, and keys it acts on that streammerge does not implement ----------------------

def _doc(**extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}], **extra}


def test_extra_keys_are_tolerated_with_a_warning_at_every_level_mergekit_ignores_them(tiny_family, tmp_path):
    from streammerge.unsupported import ignored_keys

    base, experts = tiny_family
    doc = {"merge_method": "passthrough", "author": "me", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2], "layer_rnage": [0, 1]}], "note": "first"}]}
    assert ignored_keys(parse_config(doc)) == [
        "author: unknown key, ignored as mergekit 0.1.5 ignores it; allowed keys: merge_method, models, slices, "
        "base_model, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, name",
        "slices[0].note: unknown key, ignored as mergekit 0.1.5 ignores it; allowed keys: sources, base_model, "
        "residual_weight, parameters",
        "slices[0].sources[0].layer_rnage: unknown key, ignored as mergekit 0.1.5 ignores it; did you mean 'layer_range'?"]
    plan = check(write_yaml(tmp_path / "c.yml", doc), RunOptions(max_memory=2 << 30))
    assert sum("unknown key" in w for w in plan.warnings) == 3


@pytest.mark.parametrize("extra, needle", [
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union' (mergekit's default for a 'tokenizer:' section) is not "
                                    "implemented yet"),
    ({"tokenizer": {"pad_to_multiple_of": 64, "source": "base"}}, "tokenizer.pad_to_multiple_of: padding the vocabulary"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "a"}}}}, "tokenizer.tokens: per-token embedding"),
    ({"tokenizer": {"pad_to_multiple_of": 8}}, "tokenizer.source: 'union'"),  # mergekit's default source
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "give either 'tokenizer_source' or 'tokenizer'"),
    ({"modules": {"text": {"models": []}}}, "modules: mergekit's multi-module merges are not implemented"),
])
def test_what_mergekit_acts_on_and_we_do_not_implement_is_an_error(extra, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(_doc(**extra), "c.yml")
    assert needle in str(e.value)


def test_a_typo_in_a_required_key_still_gets_its_hint():
    with pytest.raises(ConfigError) as e:
        parse_config({"merge_method": "linear", "modles": [{"model": "a"}]}, "c.yml")
    assert "give exactly one of 'models' or 'slices'" in str(e.value) and "did you mean 'models'" in str(e.value)


@pytest.mark.parity
def test_mergekit_tolerates_the_same_extra_keys():
    from e2e.parity import mergekit_or_skip

    mergekit_or_skip()
    from mergekit.config import MergeConfiguration

    doc = {"merge_method": "passthrough", "author": "me", "slices": [
        {"sources": [{"model": "/m", "layer_range": [0, 2], "layer_rnage": [0, 1]}], "note": "first"}]}
    MergeConfiguration.model_validate(doc)  # no error: extras ignored at every level
    parse_config(doc)
    with pytest.raises(Exception, match="Cannot specify both tokenizer_source and tokenizer"):
        MergeConfiguration.model_validate(_doc(tokenizer={"source": "base"}, tokenizer_source="base"))
    assert MergeConfiguration.model_validate(_doc(tokenizer={})).tokenizer.source == "union"
