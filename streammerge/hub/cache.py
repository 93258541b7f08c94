"""The Hugging Face cache layout, read and written as huggingface_hub does, so a model streammerge
downloads is a cache hit for transformers and `huggingface-cli`, and theirs are hits for us:

    HUB_CACHE/models--ORG--NAME/refs/REVISION        the commit a branch or tag pointed at
    HUB_CACHE/models--ORG--NAME/blobs/ETAG           file contents (ETAG: sha256 for LFS files)
    HUB_CACHE/models--ORG--NAME/snapshots/COMMIT/F   a relative symlink to ../../blobs/ETAG

The environment is read on every call (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HF_HUB_OFFLINE,
HF_ENDPOINT), in huggingface_hub's order of precedence, so a changed variable takes effect at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .refs import RepoRef

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def repo_dir(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(repo_id: str, commit: str) -> Path:
    return repo_dir(repo_id) / "snapshots" / commit


def cached_commit(ref: RepoRef) -> str | None:
    """The commit the cache holds for this revision (a commit hash is its own), or None."""
    rev = ref.revision or "main"
    if _COMMIT.match(rev):
        return rev if snapshot_dir(ref.repo_id, rev).is_dir() else None
    try:
        commit = (repo_dir(ref.repo_id) / "refs" / rev).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.match(commit) and snapshot_dir(ref.repo_id, commit).is_dir() else None


def record_ref(ref: RepoRef, commit: str) -> None:
    """refs/REVISION -> commit, as huggingface_hub writes it (written whole, then renamed)."""
    rev = ref.revision or "main"
    if rev == commit:
        return
    path = repo_dir(ref.repo_id) / "refs" / rev
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".streammerge-tmp")
    tmp.write_text(commit)
    tmp.replace(path)


def parse_snapshot_path(path: Path) -> tuple[str, str, str] | None:
    """(repo_id, commit, filename) of a file under a cache snapshot; None for any other path."""
    parts = path.parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            return parts[i][len("models--"):].replace("--", "/"), parts[i + 2], "/".join(parts[i + 3:])
    return None


def link_blob(repo_id: str, commit: str, filename: str, blob: Path) -> Path:
    """snapshots/COMMIT/FILENAME as a relative symlink to the blob; returns the snapshot path."""
    dest = snapshot_dir(repo_id, commit) / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, dest.parent)
    tmp = dest.with_name(dest.name + ".streammerge-link")
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(target, tmp)
    tmp.replace(dest)
    return dest
