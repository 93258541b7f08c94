"""Parse and validate safetensors headers ourselves, so a damaged file fails before any data is read.

A safetensors file is: 8 bytes little-endian u64 header length N, N bytes of JSON, then the data
region. Offsets in the JSON are relative to the data region; we store absolute file offsets so that
readers never have to redo the arithmetic (and never overflow: Python ints are unbounded).
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import CheckpointError, clip, short

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> (torch dtype name, item size). Parsing and planning need only the sizes, so
# this module does not import torch (`streammerge check` need not load it): torch dtypes are looked up by
# name when a run first asks for them (`DTYPES`, `CODE_OF`, `torch_dtype`, `TensorInfo.torch_dtype`).
_TABLE: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "I16": ("int16", 2),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
ITEMSIZE: dict[str, int] = {code: size for code, (_, size) in _TABLE.items()}
FLOAT_CODES = ("BF16", "F16", "F32", "F64")


@functools.cache
def _torch_tables() -> tuple[dict[str, tuple[torch.dtype, int]], dict[torch.dtype, str]]:
    import torch

    dtypes = {code: (getattr(torch, tname), size) for code, (tname, size) in _TABLE.items()}
    return dtypes, {dt: code for code, (dt, _) in dtypes.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (imports torch)."""
    return _torch_tables()[0][code][0]


def __getattr__(name: str) -> Any:
    """`DTYPES` (code -> (torch dtype, item size)) and `CODE_OF` (torch dtype -> code): these import torch."""
    if name == "DTYPES":
        return _torch_tables()[0]
    if name == "CODE_OF":
        return _torch_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FileStamp(NamedTuple):
    """A file's identity when its header was read: the reader compares it on every read, so an input
    replaced or rewritten during a run stops the run instead of mixing old and new weights."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStamp":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change(self, now: "FileStamp") -> str | None:
        """What differs in `now`, in words; None when nothing does."""
        if (now.dev, now.ino) != (self.dev, self.ino):
            return f"replaced by another file: inode {self.ino} is now {now.ino}"
        if now.size != self.size:
            return f"size {self.size} bytes is now {now.size}"
        if now.mtime_ns != self.mtime_ns:
            return f"modified in place: mtime {self.mtime_ns} ns is now {now.mtime_ns} ns"
        return None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in one file, and that file's identity when the header was read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path
    stamp: FileStamp | None = None

    def __post_init__(self) -> None:
        if self.stamp is not None and not isinstance(self.stamp, FileStamp):  # a plan file gives a plain tuple
            object.__setattr__(self, "stamp", FileStamp(*self.stamp))

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def rows(self) -> int:
        """Row bands split the first dimension; 0-d and 1-d tensors are one row."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) >= 2 else self.numel

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.itemsize


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int
    stamp: FileStamp | None = None


def _fail(path: Path, what: str, fix: str = "re-download or re-export this file") -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {fix}")


def _count(n: int) -> str:
    # str() of an int over 4300 digits raises ValueError (Python >= 3.11); a product of huge dims can be one.
    return str(n) if n.bit_length() < 128 else f"more than 2^{n.bit_length() - 1}"


def parse_header_bytes(path: Path, prefix: bytes, file_size: int, stamp: FileStamp | None = None) -> Header:
    """Validate a header given the file's first 8+N bytes and its size (pure: used by the fuzz tests).
    As safetensors does, the tensors must tile the data region: no overlap, no gap, nothing after."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail(path, f"file is {file_size} bytes, too short to be safetensors (needs at least 8)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the file ({file_size} bytes): truncated")
    raw = prefix[8 : 8 + n]
    if len(raw) < n:
        raise _fail(path, f"header truncated: expected {n} bytes, got {len(raw)}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, ints over Python's digit limit
        raise _fail(path, f"header is not valid JSON ({short(str(e), 200)})") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply to be safetensors") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"header must be a JSON object, got {type(doc).__name__}")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        where = f"tensor {short(name)}"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where}: entry must be an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise _fail(path, f"{where}: unknown dtype {short(dtype)} (known: {', '.join(ITEMSIZE)})",
                        "convert the checkpoint to bf16, fp16 or fp32")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _fail(path, f"{where}: shape must be a list of non-negative integers, got {short(shape)}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _fail(path, f"{where}: data_offsets must be two integers, got {short(offs)}")
        b, e = offs
        if not 0 <= b <= e:
            raise _fail(path, f"{where}: data_offsets {short(offs)} are not ordered non-negative offsets")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if e - b != expected:
            raise _fail(path, f"{where}: data_offsets span {e - b} bytes but shape {short(shape)} in {dtype} "
                              f"needs {_count(expected)}")
        if e > data_len:
            raise _fail(path, f"{where}: data ends at byte {e} of a {data_len}-byte data region: file truncated")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e, path, stamp)
    _check_tiling(path, tensors, data_start, data_len)
    return Header(path, tensors, metadata, data_start, file_size, stamp)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """safetensors' rule, with offsets relative to the data region: sorted by (begin, end), each tensor
    begins where the previous one ended (a zero-size tensor too), and the last one ends the file. Bytes
    no tensor covers are damage (a bad export or a file overwritten in part), never merged as if whole."""
    spans = sorted((t.begin - data_start, t.end - data_start, t.name) for t in tensors.values())
    reach, owner = 0, ""
    for b, e, name in spans:  # overlaps first: a tensor moved onto another also leaves a gap behind
        if b < reach:
            raise _fail(path, f"tensors {short(owner)} and {short(name)} overlap in the data region")
        if e >= reach:
            reach, owner = e, name
    end = 0
    for b, e, name in spans:
        if b > end:
            raise _fail(path, f"data region bytes {end}..{b} (file bytes {data_start + end}..{data_start + b}) "
                              f"belong to no tensor (the next one is {short(name)}); safetensors refuses such a file")
        end = e
    if end < data_len:
        after = "after the last tensor" if spans else "after the header"
        raise _fail(path, f"{data_len - end} bytes {after} (file bytes {data_start + end}..{data_start + data_len}) "
                          "belong to no tensor: the file has trailing data; safetensors refuses such a file")


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of one safetensors file; never reads tensor data."""
    path = Path(path)
    try:
        require_regular(path, os.stat(path))  # before open: opening a FIFO blocks until a writer comes
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            require_regular(path, st)  # swapped in between the stat and the open
            size = st.st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; check the model path in the config") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; make the file readable") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); check the disk and the path") from None
    return parse_header_bytes(path, head, size, FileStamp.of(st))


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def require_regular(path: Path, st: os.stat_result) -> None:
    """Refuse anything but a regular file: a FIFO or a device can block a read, or never end."""
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
    raise CheckpointError(f"{path}: is not a regular file ({kind}); streammerge reads inputs only from regular "
                          "files, which cannot block; copy the data into a regular file")
