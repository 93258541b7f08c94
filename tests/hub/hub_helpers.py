"""Helpers the hub tests share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from fake_hub import FakeHub  # noqa: E402


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty hub cache in a temporary HF_HOME, no token, online."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    return home / "hub"


@pytest.fixture
def fake_hub(hub_env, monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.close()


@pytest.fixture(autouse=True)
def _fresh_hub_memo():
    """Each test plans from a cold process state (the opener memoises remote headers per process)."""
    from streammerge.hub.open import forget

    forget()
    yield




def populate_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40, branch: str = "main") -> Path:
    """Lay a model folder out in the hub cache as huggingface_hub does (blobs, snapshot symlinks, refs)."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snap
