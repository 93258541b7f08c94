"""Model references as mergekit writes them: which strings are hub names, and the mapping form."""

import pytest

from streammerge.config import parse_config
from streammerge.errors import ConfigError
from streammerge.hub.cache import parse_snapshot_path
from streammerge.hub.refs import RepoRef, is_local, parse_repo_ref


@pytest.mark.parametrize("ref, expected", [
    ("meta-llama/Llama-3.1-8B", RepoRef("meta-llama/Llama-3.1-8B")),
    ("org/name@v1.0", RepoRef("org/name", "v1.0")),
    ("org/name@" + "a" * 40, RepoRef("org/name", "a" * 40)),
    ("org/na.me_2@refs/pr/3", RepoRef("org/na.me_2", "refs/pr/3")),
    ("./org/name", None), ("/abs/path", None), ("~/models/x", None), ("a/b/c", None),
    ("org--x/name", None), ("org/..name", None), ("name-only", None), ("org/name@", None),
    ("org/name@bad rev", None),
])
def test_which_strings_are_hub_names(ref, expected):
    assert parse_repo_ref(ref) == expected


def test_an_existing_local_folder_wins_over_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_local("org/name", None)
    assert not is_local("org/other", None)
    assert is_local("name", tmp_path / "org")  # relative to the config's folder


def test_mergekit_mapping_form_becomes_the_string_form():
    cfg = parse_config({"merge_method": "linear", "base_model": {"model": {"path": "org/base", "revision": "v2"}},
                        "models": [{"model": {"model": {"path": "org/a"}}, "parameters": {"weight": 1.0}},
                                   {"model": "org/b@main", "parameters": {"weight": 1.0}}]})
    assert cfg.referenced_models() == ["org/base@v2", "org/a", "org/b@main"]


@pytest.mark.parametrize("ref, words", [
    ({"model": {"path": "org/a"}, "lora": {"path": "org/l"}}, "LoRA adapters"),
    ({"model": {"path": "org/a"}, "override_architecture": "X"}, "override_architecture"),
    ({"model": {"revision": "v1"}}, "needs model: {path"),
    ({"model": {"path": "org/a", "rev": "v1"}}, "['path', 'revision']"),
    ({"path": "org/a"}, "takes the keys"),
])
def test_bad_mapping_forms_are_named(ref, words):
    with pytest.raises(ConfigError) as e:
        parse_config({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]})
    assert words in str(e.value) and "models[0].model" in str(e.value)


def test_snapshot_paths_name_repo_commit_and_file(tmp_path):
    p = tmp_path / "hub" / "models--org--name" / "snapshots" / ("b" * 40) / "model-00001-of-00002.safetensors"
    assert parse_snapshot_path(p) == ("org/name", "b" * 40, "model-00001-of-00002.safetensors")
    assert parse_snapshot_path(tmp_path / "model.safetensors") is None
