"""The hub as it really answers: files huggingface_hub itself downloaded, LFS files redirected to a CDN
(which must never see the token), a renamed repository, and which of repo / revision / file is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import write_yaml
from hub_helpers import _fresh_hub_memo, fake_hub, hub_env  # noqa: F401  (fixtures)
from test_hub import _cli, _models_config, _serve, _shards, family  # noqa: F401  (family: a fixture)


@pytest.fixture(scope="module")
def local_shards(family, tmp_path_factory) -> dict[str, bytes]:
    """The same merge from local paths, made once for the module."""
    from streammerge.cli import main

    tmp = tmp_path_factory.mktemp("local")
    cfg = _models_config(tmp / "local.yml", str(family[0]), [str(e) for e in family[1]])
    assert main(["run", str(cfg), str(tmp / "out"), "--no-progress", "--quiet"]) == 0
    return _shards(tmp / "out")


def test_what_hf_hub_download_put_in_the_cache_merges_offline(capsys, tmp_path, family, fake_hub, monkeypatch,
                                                               local_shards):
    from huggingface_hub import hf_hub_download

    from fake_hub import FakeCDN

    cdn = FakeCDN(fake_hub)  # LFS files by 302, as huggingface.co answers: huggingface_hub follows it
    try:
        ids = _serve(fake_hub, family)
        cache = Path(os.environ["HF_HOME"]) / "hub"
        for repo_id, folder in zip(ids, [family[0], *family[1]]):
            for f in sorted(folder.iterdir()):
                hf_hub_download(repo_id, f.name, cache_dir=cache, endpoint=fake_hub.url, token=False)
        assert cdn.hits > 0
    finally:
        cdn.close()
    asked = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    assert len(fake_hub.requests) == asked
    assert _shards(tmp_path / "hub") == local_shards


@pytest.fixture
def gated_hub_with_cdn(hub_env, monkeypatch):
    from fake_hub import FakeCDN, FakeHub

    hub = FakeHub(token="hf_only_for_the_hub")
    cdn = FakeCDN(hub)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_only_for_the_hub")
    yield hub, cdn
    cdn.close()
    hub.close()


def test_lfs_files_redirected_to_a_cdn_are_read_and_fetched_without_the_token(capsys, tmp_path, family,
                                                                               gated_hub_with_cdn, local_shards):
    hub, cdn = gated_hub_with_cdn
    ids = _serve(hub, family)
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, out, err = _cli(capsys, "check", str(cfg))
    assert rc == 0, err
    weights = sum(hub.weight_bytes(r) for r in ids)
    assert cdn.hits > 0 and 0 < sum(hub.served.values()) < weights / 10
    assert "download" in out and "from the hub" in out
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    assert cdn.auth_seen == [], "the hub token reached the CDN"
    assert _shards(tmp_path / "hub") == local_shards


def test_a_download_cut_at_the_cdn_resumes_there_by_range(capsys, tmp_path, family, gated_hub_with_cdn, local_shards):
    hub, cdn = gated_hub_with_cdn
    ids = _serve(hub, family)
    shard = sorted(p.name for p in family[0].glob("*.safetensors"))[0]
    key, size = f"{ids[0]}/{shard}", (family[0] / shard).stat().st_size
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    assert _cli(capsys, "check", str(cfg))[0] == 0
    hub.drop_after[key] = 2000
    before = hub.served[key]
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 1 and "stopped after" in err and shard in err and "hf_only_for_the_hub" not in err, err
    cut_at = hub.served[key]
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    assert cut_at - before <= 2000 and hub.served[key] - cut_at == size - (cut_at - before) and cdn.auth_seen == []
    assert _shards(tmp_path / "hub") == local_shards


def test_an_expired_cdn_link_is_not_blamed_on_the_token(capsys, tmp_path, family, gated_hub_with_cdn):
    hub, cdn = gated_hub_with_cdn
    ids = _serve(hub, family)
    cdn.expired = True
    rc, out, err = _cli(capsys, "check", str(_models_config(tmp_path / "hub.yml", ids[0], ids[1:])))
    text = " ".join(err.split())
    assert rc == 1 and "download link" in text and "run the same command again" in text, err
    assert "token is not valid" not in text and "hf_only_for_the_hub" not in out + err


def test_a_renamed_repository_resolves_through_its_redirect(capsys, tmp_path, family, fake_hub, local_shards):
    ids = _serve(fake_hub, family)
    fake_hub.repos["new-org/base"] = fake_hub.repos.pop(ids[0])
    fake_hub.renamed[ids[0]] = "new-org/base"
    cfg = _models_config(tmp_path / "hub.yml", ids[0], ids[1:])
    rc, _, err = _cli(capsys, "check", str(cfg))
    assert rc == 0, err
    assert any(path.startswith("/new-org/base/resolve/") for _, path in fake_hub.requests)
    rc, _, err = _cli(capsys, "run", str(cfg), str(tmp_path / "hub"), "--no-progress")
    assert rc == 0, err
    assert _shards(tmp_path / "hub") == local_shards


@pytest.mark.parametrize("token", [None, "hf_valid"])
def test_a_missing_repo_revision_or_file_is_named_as_such(capsys, tmp_path, family, hub_env, monkeypatch, token):
    from fake_hub import FakeHub

    hub = FakeHub(token=None)
    if token:  # a logged-in caller is told 404 where an anonymous one is told 401
        hub.token = token
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        base, experts = family
        hub.add("org/base", base)
        shard = sorted(p.name for p in experts[0].glob("*.safetensors"))[-1]
        holed = tmp_path / "holed"
        shutil.copytree(experts[0], holed)
        (holed / shard).unlink()
        hub.add("org/holed", holed)
        wordings = {"repo": "repository org/nowhere not found", "revision": "revision 'v9' not found",
                    "file": f"lists shard {shard}, which the repository does not have"}
        for kind, name in [("repo", "org/nowhere"), ("revision", "org/base@v9"), ("file", "org/holed")]:
            rc, out, err = _cli(capsys, "check", str(_models_config(tmp_path / f"{kind}.yml", "org/base", [name])))
            text = " ".join(err.split())
            assert rc == 1 and wordings[kind] in text and name in text, (kind, err)
            assert not [w for k, w in wordings.items() if k != kind and w in text], err
            if token:
                assert token not in out + err
    finally:
        hub.close()
