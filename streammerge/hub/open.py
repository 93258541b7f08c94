"""A model reference to the planner's inventory (`ModelFiles`), from the cache or from the hub.

A hub model's tensors are placed where the cache will hold them (`snapshots/COMMIT/FILE`), so the plan
is the same whether a shard is already downloaded or not; the shards still on the hub are listed in
`pending` with their sizes, and `hub.fetch` downloads exactly those the plan reads. Small files the plan
itself reads (config.json, the index, tokenizer and generation files) are downloaded while opening.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..config import resolve_model_path
from ..errors import CheckpointError, HubError
from ..io.checkpoint import GENERATION_FILES, TOKENIZER_FILES
from ..io.header import MAX_HEADER_BYTES, Header, parse_header_bytes, read_header
from ..io.reader import INDEX_NAME, SINGLE_NAME, ModelFiles, config_of, open_indexed, open_model
from . import cache
from .refs import RepoRef, is_local, parse_repo_ref

SIDE_FILES = ("config.json", INDEX_NAME, *TOKENIZER_FILES, *GENERATION_FILES)

# per process: the shards still on the hub (snapshot path -> their metadata) and the headers read from
# them, so planning twice (before and after the downloads) asks the hub once
_pending: dict[Path, object] = {}
_headers: dict[Path, Header] = {}


def open_ref(ref: str, config_dir: Path | None) -> ModelFiles:
    """A config's model reference: an existing path wins; else `org/name[@rev]` is a hub repository."""
    repo = None if is_local(ref, config_dir) else parse_repo_ref(ref)
    if repo is None:
        return open_model(resolve_model_path(ref, config_dir))
    return open_hub_model(repo)


def open_hub_model(ref: RepoRef) -> ModelFiles:
    """From the cache when the revision's snapshot is complete there (no network); else from the hub,
    headers only, unless HF_HUB_OFFLINE is set."""
    commit = cache.cached_commit(ref)
    if commit is not None:
        snap = cache.snapshot_dir(ref.repo_id, commit)
        try:
            return open_model(snap)
        except CheckpointError as e:
            if cache.offline():
                raise HubError(f"{ref}: the cached snapshot is incomplete ({e}); unset HF_HUB_OFFLINE so the "
                               "missing files can be fetched") from None
    elif cache.offline():
        raise HubError(f"{ref}: not in the hub cache ({cache.hub_cache()}) and HF_HUB_OFFLINE is set; unset it, "
                       f"or download the model first (huggingface-cli download {ref.repo_id})")
    return _open_remote(ref)


def _open_remote(ref: RepoRef) -> ModelFiles:
    from .fetch import download
    from .http import HubClient

    client = HubClient()
    config_meta = client.head(ref, "config.json")
    if config_meta is None:
        raise HubError(f"{ref}: the repository has no config.json; is it a model repository?")
    pinned = RepoRef(ref.repo_id, config_meta.commit)
    snap = cache.snapshot_dir(ref.repo_id, config_meta.commit)
    for name in SIDE_FILES:
        if not (snap / name).exists():
            meta = config_meta if name == "config.json" else client.head(pinned, name)
            if meta is not None:
                download(client, meta)
    cache.record_ref(ref, config_meta.commit)

    def header_of(_index: Path, path: Path) -> Header:
        if path.exists():
            return read_header(path)
        if path not in _headers:
            meta = client.head(pinned, path.name)
            if meta is None:
                raise HubError(f"{ref}: {INDEX_NAME} lists shard {path.name}, which the repository does not have")
            _headers[path] = _remote_header(client, meta, path)
            _pending[path] = meta
        return _headers[path]

    config = config_of(snap)
    if (snap / INDEX_NAME).exists():
        return open_indexed(snap, config, header_of)
    single = snap / SINGLE_NAME
    if client.head(pinned, SINGLE_NAME) is None and not single.exists():
        raise HubError(f"{ref}: has neither {INDEX_NAME} nor {SINGLE_NAME}; streammerge reads safetensors "
                       "weights from the hub (a repo with only pytorch_model*.bin: download it and give the folder)")
    return ModelFiles(snap, dict(header_of(snap / INDEX_NAME, single).tensors), config, [single])


def _remote_header(client, meta, path: Path) -> Header:
    """The header by two range requests (its length, then its JSON): the weights are never fetched."""
    if meta.size < 8:
        return parse_header_bytes(path, b"", meta.size)
    prefix = client.read(meta, 0, 8)
    (n,) = struct.unpack("<Q", prefix)
    if n <= MAX_HEADER_BYTES and 8 + n <= meta.size:
        prefix += client.read(meta, 8, n)
    return parse_header_bytes(path, prefix, meta.size)


def pending(paths) -> tuple[tuple[str, int], ...]:
    """Of `paths`, the files still on the hub: (snapshot path, bytes) in path order."""
    return tuple((str(p), _pending[p].size) for p in sorted(set(paths)) if p in _pending and not p.exists())


def pending_meta(path: Path):
    return _pending.get(Path(path))


def forget() -> None:
    """Drop what this process remembers of hub files (a long-lived process planning again from scratch)."""
    _pending.clear()
    _headers.clear()
