"""Run options, declared once: the CLI builds them from flags, the library takes them as given."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str | int, what: str = "size") -> int:
    """'1GiB', '512M', '5B' (mergekit's B = billion), '1e9' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)", s)
    if not m:
        raise ConfigError(f"{what}: cannot read {text!r} as a size; write e.g. 1GiB, 512MiB or 5B")
    num, unit = float(m[1]), m[2].upper()
    if unit == "B":
        unit = "G"  # mergekit's sizes: K, M, B = thousand, million, billion
    if unit not in _UNITS:
        raise ConfigError(f"{what}: unknown unit {m[2]!r} in {text!r}; use B, KiB, MiB, GiB, KB, MB, GB")
    return int(num * _UNITS[unit])


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

    def budget(self) -> int:
        return self.max_memory or default_max_memory()
