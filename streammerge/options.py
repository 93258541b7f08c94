"""Run options, declared once: the CLI builds them from flags, the library takes them as given.

Every number is range-checked here, where it enters: a size, a seed or a count from a flag or a
caller never reaches a loop or an allocation unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import psutil

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
MAX_SIZE = 2**63 - 1   # file offsets and sizes are signed 64-bit on every platform we write to
MAX_SEED = 2**64 - 1   # the Philox key is 64 bits
MAX_PREFETCH = 64      # bands read ahead; more only multiplies the buffers in flight
MAX_THREADS = 1024


def shown(text: object, limit: int = 40) -> str:
    """`repr(text)`, cut to `limit` characters: a 5000-digit flag value is not echoed whole."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def parse_size(text: str | int, what: str = "size", minimum: int = 0) -> int:
    """'1GiB', '512M', '5B' (mergekit's B = billion), '1e9' -> bytes, exact (decimal arithmetic, so
    '1e400' is "too large", not a float overflow), between `minimum` and 2^63-1."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f"{what}: expected a size such as 1GiB or a number of bytes, got {shown(text)}")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        s = text.strip().replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)", s)
        if not m:
            raise ConfigError(f"{what}: cannot read {shown(text)} as a size; write e.g. 1GiB, 512MiB or 5B")
        unit = m[2].upper()
        if unit == "B":
            unit = "G"  # mergekit's sizes: K, M, B = thousand, million, billion
        if unit not in _UNITS:
            raise ConfigError(f"{what}: unknown unit {shown(m[2])} in {shown(text)}; use B, KiB, MiB, GiB, KB, MB, GB")
        num = Decimal(m[1])
        value = num * _UNITS[unit] if num.adjusted() < 40 else Decimal(10) ** 40  # bound before multiplying
    if value > MAX_SIZE:
        raise ConfigError(f"{what}: {shown(text)} is larger than {MAX_SIZE} bytes (8 EiB); give a smaller size")
    if value < minimum:
        raise ConfigError(f"{what}: {shown(text)} is less than {_bytes(minimum)}")
    return int(value)


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def check_int(value: object, what: str, lo: int, hi: int | None = None) -> int:
    """`value` (an int, or a string of one) in [lo, hi], or a ConfigError naming `what` and the range."""
    want = f"an integer from {lo} to {hi}" if hi is not None else f"an integer of at least {lo}"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:  # also a string of more digits than Python converts
            raise ConfigError(f"{what}: cannot read {shown(value)} as an integer; use {want}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what}: expected {want}, got {shown(value)}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{what}: {shown(value)} is out of range; use {want}")
    return value


GPU_DEFAULT_FRACTION = 0.8  # --max-gpu-memory default: this share of the device's total memory


def default_max_gpu_memory(total: int) -> int:
    """The device budget of a CUDA run without --max-gpu-memory: 80% of the device's total memory (the
    rest is left to the CUDA context, the kernels' own buffers and whatever else runs there)."""
    return int(total * GPU_DEFAULT_FRACTION)


def default_max_memory() -> int:
    """Half of the memory available now, at least 1 GiB and at most 16 GiB: safe beside other work."""
    avail = psutil.virtual_memory().available
    return max(1 << 30, min(avail // 2, 16 << 30))


@dataclass(frozen=True)
class RunOptions:
    max_memory: int = 0                # bytes; 0 -> default_max_memory()
    device: str = "cpu"                # cpu | cuda | auto
    out_shard_size: int = 5 * 1000**3  # mergekit's default "5B"
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    chunk_rows: int | None = None      # force a row-band size (tests, debugging)
    prefetch: int = 2                  # row bands read ahead of the compute
    copy_tokenizer: bool = True
    allow_crimes: bool = False
    write_model_card: bool = True
    progress: bool = True
    check_nonfinite: bool = True
    fsync: bool = True                 # durable shards (power-loss safe); atomic renames need no fsync
    max_gpu_memory: int = 0            # bytes of device buffers (cuda/auto); 0 -> 80% of the device, read at run time

    def __post_init__(self) -> None:
        """A library caller's numbers get the checks the CLI's flags get, before any plan or file."""
        check_int(self.max_memory, "RunOptions.max_memory", 0, MAX_SIZE)
        check_int(self.max_gpu_memory, "RunOptions.max_gpu_memory", 0, MAX_SIZE)
        check_int(self.out_shard_size, "RunOptions.out_shard_size", 1, MAX_SIZE)
        check_int(self.seed, "RunOptions.seed", 0, MAX_SEED)
        check_int(self.prefetch, "RunOptions.prefetch", 1, MAX_PREFETCH)
        if self.chunk_rows is not None:
            check_int(self.chunk_rows, "RunOptions.chunk_rows", 1)

    def budget(self) -> int:
        return self.max_memory or default_max_memory()
