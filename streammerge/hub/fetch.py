"""Download what a plan reads from the hub, into the hub cache: resumable, size- and hash-verified.

A file goes to `blobs/ETAG.incomplete` first; an interrupted download keeps those bytes and the next
run asks for the rest with a range request. Only a complete file whose size (and, for LFS files, whose
sha256, which is their ETag) matches is renamed to `blobs/ETAG` and linked into the snapshot.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from ..errors import HubError
from . import cache
from .refs import RepoRef

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def download(client, meta, on_bytes: Callable[[int], None] | None = None) -> Path:
    """One file into the cache; returns its snapshot path."""
    blobs = cache.repo_dir(meta.repo_id) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / meta.etag
    if not (blob.is_file() and blob.stat().st_size == meta.size):
        _download_blob(client, meta, blob, on_bytes)
    return cache.link_blob(meta.repo_id, meta.commit, meta.filename, blob)


def _download_blob(client, meta, blob: Path, on_bytes: Callable[[int], None] | None) -> None:
    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.is_file() else 0
    if have > meta.size:
        partial.unlink()
        have = 0
    free = shutil.disk_usage(blob.parent).free
    if meta.size - have > free:
        raise HubError(f"{meta.repo_id}: {meta.filename} needs {meta.size - have} more bytes and {blob.parent} "
                       f"has {free} free; free some space or set HF_HUB_CACHE to a bigger disk")
    digest = hashlib.sha256() if _SHA256.match(meta.etag) else None
    if digest is not None and have:
        with open(partial, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                digest.update(chunk)
    if on_bytes and have:
        on_bytes(have)
    if have < meta.size:
        with open(partial, "ab") as f:
            try:
                for chunk in client.stream(meta, have):
                    f.write(chunk)
                    have += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
            except (HubError, http.client.HTTPException, OSError) as e:
                f.flush()
                raise HubError(f"{meta.repo_id}: download of {meta.filename} stopped after {f.tell()} of {meta.size} "
                               f"bytes ({e}); run the same command again to resume from there") from None
            f.flush()
            os.fsync(f.fileno())
    if have != meta.size:
        raise HubError(f"{meta.repo_id}: download of {meta.filename} stopped after {have} of {meta.size} bytes; "
                       "run the same command again to resume from there")
    if digest is not None and digest.hexdigest() != meta.etag:
        partial.unlink()
        raise HubError(f"{meta.repo_id}: {meta.filename} as downloaded does not match its sha256 ({meta.etag}); "
                       "the partial file was removed: run again to download it afresh")
    os.replace(partial, blob)


def fetch_downloads(downloads: tuple[tuple[str, int], ...], allow: bool, progress: bool) -> int:
    """Download the plan's pending files (`Plan.downloads`); returns the bytes received. With `allow`
    False (`--no-download`) they are refused, named, with their total size."""
    from .http import HubClient
    from .open import pending_meta

    todo = [(Path(p), n) for p, n in downloads if not Path(p).exists()]
    if not todo:
        return 0
    total = sum(n for _, n in todo)
    if not allow:
        names = ", ".join(_name(p) for p, _ in todo[:4]) + (f" and {len(todo) - 4} more" if len(todo) > 4 else "")
        raise HubError(f"--no-download: {len(todo)} file(s) the merge reads ({total / 1e9:.2f} GB) are not in the hub "
                       f"cache: {names}; run without --no-download, or download them first (huggingface-cli download)")
    client = HubClient()
    with _bar(total, progress) as advance:
        for path, _ in todo:
            planned, meta = pending_meta(path), _meta_again(client, path)  # a fresh link: signed CDN links expire
            if planned is not None and (planned.etag, planned.size) != (meta.etag, meta.size):
                raise HubError(f"{meta.repo_id}@{meta.commit}: {meta.filename} changed on the hub since the plan "
                               "was made; run the same command again")
            download(client, meta, advance)
    return client.bytes_received


def _name(path: Path) -> str:
    where = cache.parse_snapshot_path(path)
    return f"{where[0]}/{where[2]}" if where else str(path)


def _meta_again(client, path: Path):
    """A plan made in another process names the file only: its metadata again from the hub."""
    where = cache.parse_snapshot_path(path)
    if where is None:
        raise HubError(f"{path}: is neither on disk nor a hub cache path; re-plan the merge")
    repo_id, commit, filename = where
    meta = client.head(RepoRef(repo_id, commit), filename)
    if meta is None:
        raise HubError(f"{repo_id}@{commit}: {filename} is no longer on the hub")
    return meta


class _bar:
    """A byte progress bar on stderr (none with --no-progress or --quiet)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn("[bold]download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 console=Console(stderr=True))
        self.progress.__enter__()
        task = self.progress.add_task("download", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.show:
            self.progress.__exit__(*exc)
