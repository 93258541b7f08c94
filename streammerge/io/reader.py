"""Open a model folder and read row bands of its tensors.

Reads use `os.preadv` into a buffer we own, never a memory map: page-cache pages are then not part of
our resident set, so the memory budget only has to cover the buffers in flight. Pickled checkpoints are
the exception (torch's mmap loader), used only where no safetensors exist.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

from .._lazy import lazy_module
from ..errors import CheckpointError, short
from .header import FileStamp, Header, TensorInfo, read_header, require_regular

torch = lazy_module("torch")  # only pickled checkpoints and reading rows need it

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class ModelFiles:
    """Every tensor of one model folder, from headers only."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None
    files: list[Path] = field(default_factory=list)
    pickled: bool = False


def _load_json(path: Path) -> dict:
    try:
        require_regular(path, os.stat(path))  # a FIFO named config.json would block the open
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep, digit limit
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200] or type(e).__name__}); "
                              "fix or re-download it") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return doc


def open_model(path: str | os.PathLike) -> ModelFiles:
    """Inventory a model folder (or a single .safetensors file) without reading tensor data."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as e:  # a folder on the way we may not enter
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions") from None
    if not exists:
        raise CheckpointError(f"{path}: model path does not exist; check the path in the config "
                              "(a hub repository is named ORG/NAME or ORG/NAME@REVISION)")
    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a model folder or a .safetensors file")
        header = read_header(path)
        return ModelFiles(path.parent, dict(header.tensors), config_of(path.parent), [path])
    config = config_of(path)
    index = path / INDEX_NAME
    if index.exists():
        return open_indexed(path, config)
    single = path / SINGLE_NAME
    if single.exists():
        return ModelFiles(path, dict(read_header(single).tensors), config, [single])
    others = sorted(path.glob("*.safetensors"))
    if others:
        tensors = {}
        for f in others:
            for name, info in read_header(f).tensors.items():
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor {short(name)} is in both {tensors[name].file.name} and {f.name} "
                                          f"and there is no {INDEX_NAME} to say which is meant; remove the stray file")
                tensors[name] = info
        return ModelFiles(path, tensors, config, others)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return _open_pickled(path, bins, config)
    raise CheckpointError(f"{path}: no model.safetensors, {INDEX_NAME}, *.safetensors or pytorch_model*.bin found")


def _local_shard(index: Path, fpath: Path) -> Header:
    if not fpath.exists():
        raise CheckpointError(f"{index}: lists shard {short(fpath.name)}, which is missing from {fpath.parent}; "
                              "download the missing shard")
    return read_header(fpath)


def open_indexed(path: Path, config: dict | None,
                 header_of: Callable[[Path, Path], Header] = _local_shard) -> ModelFiles:
    """A folder with model.safetensors.index.json: every shard it lists, checked against the index.
    `header_of(index, shard_path)` reads one shard's header (a hub model reads it by range request)."""
    index = path / INDEX_NAME
    doc = _load_json(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: missing 'weight_map'; re-export the checkpoint")
    for fname in weight_map.values():
        if not isinstance(fname, str) or fname in ("", ".", "..") or Path(fname).name != fname:
            raise CheckpointError(f"{index}: weight_map names shard {str(fname)[:80]!r}, which is not a file "
                                  f"name inside {path}; re-export the checkpoint")
    tensors: dict[str, TensorInfo] = {}
    files = sorted(set(weight_map.values()))
    for fname in files:
        fpath = path / fname
        header = header_of(index, fpath)
        for name, info in header.tensors.items():
            if weight_map.get(name) != fname:
                raise CheckpointError(f"{fpath}: holds tensor {short(name)} that {INDEX_NAME} "
                                      f"{'does not list' if name not in weight_map else 'assigns to ' + short(weight_map[name])}; "
                                      "the index and shards disagree, re-export the checkpoint")
            tensors[name] = info
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise CheckpointError(f"{index}: lists {len(missing)} tensor(s) absent from their shard, "
                              f"e.g. {short(missing[0])} in {short(weight_map[missing[0]])}; re-download that shard")
    return ModelFiles(path, tensors, config, [path / f for f in files])


def config_of(path: Path) -> dict | None:
    cfg = path / "config.json"
    return _load_json(cfg) if cfg.exists() else None


def _open_pickled(path: Path, bins: list[Path], config: dict | None) -> ModelFiles:
    """Pickled weights: loaded with weights_only=True (no arbitrary objects) and mmap=True (no copy)."""
    from .header import CODE_OF

    tensors: dict[str, TensorInfo] = {}
    for f in bins:
        st = os.stat(f)
        require_regular(f, st)
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad pickles
            raise CheckpointError(f"{f}: cannot be loaded safely with weights_only=True ({e}); "
                                  "convert it to safetensors") from None
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor) or t.dtype not in CODE_OF:
                raise CheckpointError(f"{f}: entry {short(name)} is not a tensor of a supported dtype")
            nbytes = t.numel() * t.element_size()
            tensors[name] = TensorInfo(name, CODE_OF[t.dtype], tuple(t.shape), 0, nbytes, f, FileStamp.of(st))
    return ModelFiles(path, tensors, config, bins, pickled=True)


STREAM_STUBS = ("streams", ".streammerge")  # OUTDIR/.streammerge/streams/NAME: a streamed stage's stand-in


def is_stream_stub(path: Path) -> bool:
    """A shard of a streamed intermediate's stand-in folder: headers only, sparse data, never read."""
    return (path.parent.parent.name, path.parent.parent.parent.name) == STREAM_STUBS


class TensorSource(Protocol):
    """Tensors of one file served from memory (a streamed intermediate, `batch/handoff.py`)."""

    def read(self, name: str, start: int, out: torch.Tensor) -> None: ...

    def done_with(self, name: str) -> None: ...


class RowReader:
    """Reads row bands; owns its file descriptors (no global cache), closed by `close()`.

    `sources`: files whose tensors come from memory instead (a stage streamed into this one); a
    stand-in shard of a streamed stage read without its source is refused, never read as zeros.

    Each file's identity (`TensorInfo.stamp`, taken when its header was read at plan time) is compared
    when the file is opened and after every read (an fstat: about a microsecond), so an input replaced
    or rewritten during the run stops it before a band of changed bytes reaches an output shard. A file
    renamed over after it was opened is read on from the inode planned: its bytes are still the planned ones."""

    def __init__(self, sources: Mapping[Path, TensorSource] | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._sources = dict(sources or {})

    def _fd(self, path: Path, stamp: FileStamp | None) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if is_stream_stub(path):
                raise CheckpointError(f"{path}: the stand-in of a streamed stage (headers only); its tensors "
                                      "exist only while that stage runs: run the recipe with `streammerge batch`")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                raise _changed(path, "the file no longer exists") from None
            except OSError as e:
                raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e}); check the disk and the path") from None
            self._fds[path] = fd
            self._verify(fd, path, stamp)
        return fd

    @staticmethod
    def _verify(fd: int | None, path: Path, stamp: FileStamp | None) -> None:
        """Refuse `path` (open as `fd`, or by name when None) if it is no longer the file `stamp` describes."""
        if stamp is None:
            return
        try:
            now = os.fstat(fd) if fd is not None else os.stat(path)
        except FileNotFoundError:
            raise _changed(path, "the file no longer exists") from None
        what = stamp.change(FileStamp.of(now))
        if what is not None:
            raise _changed(path, what)

    def read_rows(self, info: TensorInfo, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of a tensor, in its stored dtype, shaped [r1 - r0, *shape[1:]] (whole 0/1-d tensors)."""
        shape = (r1 - r0, *info.shape[1:]) if len(info.shape) >= 2 else info.shape
        if info.file.suffix == ".bin":
            sd = self._pickles.get(info.file)
            if sd is None:
                self._verify(None, info.file, info.stamp)
                sd = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
                self._pickles[info.file] = sd
            t = sd[info.name]
            return (t[r0:r1] if len(info.shape) >= 2 else t).clone().reshape(shape)
        nbytes = (r1 - r0) * info.row_bytes
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8)
        else:
            out = out.view(torch.uint8).reshape(-1)[:nbytes]
        source = self._sources.get(info.file)
        if nbytes and source is not None:
            source.read(info.name, r0 * info.row_bytes, out)
        elif nbytes:
            self.pread_into(info.file, info.begin + r0 * info.row_bytes, out, info.stamp)
        return out.view(info.torch_dtype).reshape(shape)

    def done_with(self, infos: Iterable[TensorInfo]) -> None:
        """Every read of these inputs for one tensor is done: a source may let go of what only it needed."""
        for file, name in {(info.file, info.name) for info in infos}:
            source = self._sources.get(file)
            if source is not None:
                source.done_with(name)

    def pread_into(self, path: Path, offset: int, out: torch.Tensor, stamp: FileStamp | None = None) -> None:
        """Fill `out` from `path` at `offset`; with `stamp`, refuse a file that is no longer the one planned
        (checked after the read, so a change before or during it is seen)."""
        fd = self._fd(path, stamp)
        mv = memoryview(out.numpy()).cast("B")
        while len(mv):
            n = os.preadv(fd, [mv], offset)
            if n <= 0:
                self._verify(fd, path, stamp)
                raise CheckpointError(f"{path}: unexpected end of file at byte {offset}; the file was "
                                      "truncated or changed during the merge")
            mv = mv[n:]
            offset += n
        self._verify(fd, path, stamp)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickles.clear()

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _changed(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: changed since the plan was made ({what}); the run stopped, and no output "
                           "shard holding data read after the change was committed; re-run once the inputs are stable")
