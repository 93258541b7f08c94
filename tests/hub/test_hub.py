"""Hub model names end to end: the cache used offline, check from headers only, downloads of what a
plan reads (resumable, verified), --no-download, and tokens kept out of messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import write_yaml
from hub_helpers import _fresh_hub_memo, fake_hub, hub_env, populate_cache  # noqa: F401  (fixtures)
from streammerge.cli import main

TINY_SHARD = 48 << 10


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from streammerge import synth

    return synth.make_family(tmp_path_factory.mktemp("hubfam"), synth.PRESETS["tiny"], 2, seed=4, shard_size=TINY_SHARD)


def _models_config(path: Path, base: str, experts: list[str]) -> Path:
    return write_yaml(path, {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                             "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]})


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _local_merge(capsys, tmp_path, family, name="local") -> dict[str, bytes]:
    base, experts = family
    cfg = _models_config(tmp_path / f"{name}.yml", str(base), [str(e) for e in experts])
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / name), "--no-progress")
    assert rc == 0, err
    return _shards(tmp_path / name)


def _serve(fake_hub, family) -> list[str]:
    base, experts = family
    ids = ["org/base", "org/expert-1", "org/expert-2"]
    for repo_id, folder in zip(ids, [base, *experts]):
        fake_hub.add(repo_id, folder)
    return ids


def test_cached_repos_merge_offline_to_the_bytes_of_local_paths(capsys, tmp_path, family, hub_env, monkeypatch):
    base, experts = family
    ids = ["org/base", "org/expert-1", "org/expert-2"]
    for repo_id, folder in zip(ids, [base, *experts]):
        populate_cache(hub_env, repo_id, folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    assert _shards(tmp_path / "hub") == _local_merge(capsys, tmp_path, family)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "org/base" in card and "org/expert-2" in card
    rc, _, err = _cli(capsys, "check", str(_models_config(tmp_path / "missing.yml", "org/base", ["org/absent"])))
    assert rc == 1 and "org/absent" in err and "HF_HUB_OFFLINE" in err, err


def test_check_reads_headers_only_and_says_what_run_downloads(capsys, tmp_path, family, fake_hub):
    ids = _serve(fake_hub, family)
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, out, err = _cli(capsys, "check", str(cfg))
    assert rc == 0, err
    weights = sum(fake_hub.weight_bytes(r) for r in ids)
    served = sum(n for k, n in fake_hub.served.items() if k.endswith(".safetensors"))
    assert 0 < served < weights / 10, (served, weights)
    m = re.search(r"download (\d+) file\(s\) from the hub, ([\d.]+) (KiB|MiB)", out)
    assert m, out
    shard_count = sum(len(list(f.glob("*.safetensors"))) for f in [family[0], *family[1]])
    assert int(m[1]) == shard_count
    assert not list(hub_env_blobs(ids[0]).glob("*")) or all(
        not p.name.startswith("model-") for p in hub_env_blobs(ids[0]).iterdir())


def hub_env_blobs(repo_id: str) -> Path:
    import os

    return Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--")) / "blobs"


def test_check_finds_the_same_mistake_remotely_as_locally(capsys, tmp_path, family, fake_hub, tmp_path_factory):
    import dataclasses

    from streammerge import synth

    wide = synth.write_checkpoint(tmp_path_factory.mktemp("wide") / "wide",
                                  dataclasses.replace(synth.PRESETS["tiny"], hidden=96), seed=9, shard_size=TINY_SHARD)
    _serve(fake_hub, family)
    fake_hub.add("org/wide", wide)
    rc_l, _, err_l = _cli(capsys, "check", str(_models_config(tmp_path / "l.yml", str(family[0]), [str(wide)])))
    rc_r, _, err_r = _cli(capsys, "check", str(_models_config(tmp_path / "r.yml", "org/base", ["org/wide"])))
    assert rc_l == rc_r == 1

    def normal(text: str) -> str:
        text = re.sub(r"\S*models--org--(\w+)/snapshots/[0-9a-f]{40}", r"org/\1", " ".join(text.split()))
        return text.replace(str(family[0]), "org/base").replace(str(wide), "org/wide").replace(str(tmp_path) + "/", "")
    assert normal(err_l).replace("l.yml", "X") == normal(err_r).replace("r.yml", "X")


def test_a_slice_downloads_only_the_shards_holding_its_layers(capsys, tmp_path, family, fake_hub):
    ids = _serve(fake_hub, family)
    doc = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [{"model": ids[1], "layer_range": [0, 1]}]}]}
    rc, _, err = _cli(capsys, "run", str(write_yaml(tmp_path / "slice.yml", doc)), str(tmp_path / "out"), "--no-progress")
    assert rc == 0, err
    index = json.loads((family[1][0] / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {f for name, f in index.items() if not re.search(r"layers\.([1-9]\d*)\.", name)}
    fetched = {k.split("/")[-1] for k, n in fake_hub.served.items()
               if k.startswith(ids[1]) and k.endswith(".safetensors") and n > 4096}
    assert fetched == wanted and wanted < set(index.values()), (fetched, wanted)


def test_a_dropped_connection_resumes_and_the_result_is_the_local_one(capsys, tmp_path, family, fake_hub):
    ids = _serve(fake_hub, family)
    shard = sorted(p.name for p in family[1][1].glob("*.safetensors"))[0]
    key = f"{ids[2]}/{shard}"
    size = (family[1][1] / shard).stat().st_size
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "check", str(cfg))
    assert rc == 0, err
    before = fake_hub.served[key]
    fake_hub.drop_after[key] = 1000
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 1 and "stopped after" in err and "run the same command again" in err and shard in err, err
    assert list(hub_env_blobs(ids[2]).glob("*.incomplete"))
    served_then = fake_hub.served[key]
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    resumed = fake_hub.served[key] - served_then
    assert served_then - before <= 1000 + 8 and resumed < size, (resumed, size)
    assert not list(hub_env_blobs(ids[2]).glob("*.incomplete"))
    assert _shards(tmp_path / "hub") == _local_merge(capsys, tmp_path, family)


def test_no_download_refuses_what_is_not_cached(capsys, tmp_path, family, fake_hub):
    ids = _serve(fake_hub, family)
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "out"), "--no-progress", "--no-download")
    assert rc == 1 and "--no-download" in err and "org/base/model-" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in hub_env_blobs(ids[0]).iterdir() if p.stat().st_size > TINY_SHARD // 2]


def test_the_cache_streammerge_writes_is_the_one_huggingface_hub_reads(capsys, tmp_path, family, fake_hub):
    from huggingface_hub import try_to_load_from_cache

    ids = _serve(fake_hub, family)
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert rc == 0, err
    index = json.loads((family[0] / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[0]
    found = try_to_load_from_cache(ids[0], shard, cache_dir=hub_env_blobs(ids[0]).parents[1])  # (its env is read at import)
    assert found and Path(found).read_bytes() == (family[0] / shard).read_bytes()


def test_a_bad_token_is_refused_without_being_printed(capsys, tmp_path, family, hub_env, monkeypatch):
    from fake_hub import FakeHub

    hub = FakeHub(token="hf_the_right_one")
    try:
        hub.add("org/base", family[0])
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_42")
        cfg = write_yaml(tmp_path / "hub.yml", {"merge_method": "linear",
                                                "models": [{"model": "org/base", "parameters": {"weight": 1.0}}]})
        rc, out, err = _cli(capsys, "check", str(cfg))
        assert rc == 1 and "access denied" in err and "token" in err, err
        assert "hf_wrong_secret_42" not in out + err
        monkeypatch.setenv("HF_TOKEN", "hf_the_right_one")
        rc, out, err = _cli(capsys, "check", str(cfg))
        assert rc == 0, err
    finally:
        hub.close()
