"""Run options, declared once: the CLI builds them from flags, the library takes them as given.

Each `RunOptions` field carries its own command-line spelling in its metadata (`Flag`: the flag, its
help, its mergekit aliases, how its text is read, which subcommands take it) and its range; `cli/flags.py`
generates the flags from these and `__post_init__` checks the range, so neither restates an option.
Every number is range-checked here, where it enters: a size, a seed or a count from a flag or a
caller never reaches a loop or an allocation unchecked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
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


MERGE_COMMANDS = ("run", "check", "bench")  # the subcommands that build a RunOptions
@dataclass(frozen=True)
class MergekitFlag:
    """A mergekit-yaml flag that is no RunOptions field, shown under "mergekit compatibility" in `run --help`.

    `kind`: "ignored" (means nothing for a streaming engine: accepted, and `note` says why under -v),
    "switch" (sets the CLI's `dest` to True, `negation` to False), "count" (repeatable, counted in
    `dest`). `value`: the metavar of a flag that takes a value (an integer when `integer`). `refused`:
    why `negation` is not implemented, a usage error, so that it can never silently change the result."""

    name: str
    help: str
    kind: str = "ignored"
    negation: str | None = None
    value: str | None = None
    integer: bool = False
    note: str | None = None
    refused: str | None = None
    dest: str | None = None
    extra: tuple[str, ...] = ()   # further spellings of `name`

    @property
    def target(self) -> str:
        return self.dest or "mergekit_" + self.name.lstrip("-").replace("-", "_")


MERGEKIT_FLAGS = (
    MergekitFlag("--quiet", "print nothing but errors: no progress bar, warnings or report table", kind="switch",
                 negation="--no-quiet", dest="quiet"),
    MergekitFlag("-v", "print a note for each mergekit flag accepted but ignored (repeatable)", kind="count",
                 dest="verbose", extra=("--verbose",)),
    MergekitFlag("--safe-serialization", "write safetensors (always; --no-safe-serialization is refused)",
                 negation="--no-safe-serialization",
                 refused="streammerge writes safetensors only; pickled (.bin) output is not implemented; leave the "
                         "flag out"),
    MergekitFlag("--trust-remote-code", "accepted, ignored", negation="--no-trust-remote-code",
                 note="streammerge runs no model code (it reads config.json and safetensors); ignored"),
    MergekitFlag("--lazy-unpickle", "accepted, ignored", negation="--no-lazy-unpickle",
                 note="streammerge reads safetensors only and never unpickles; ignored"),
    MergekitFlag("--low-cpu-memory", "accepted, ignored", negation="--no-low-cpu-memory",
                 note="streammerge keeps resident memory under --max-memory; ignored"),
    MergekitFlag("--read-to-gpu", "accepted, ignored", negation="--no-read-to-gpu",
                 note="streammerge stages row bands on the device it computes on; ignored"),
    MergekitFlag("--multi-gpu", "accepted, ignored", negation="--no-multi-gpu",
                 note="streammerge computes on one device; ignored"),
    MergekitFlag("--async-write", "accepted, ignored", negation="--no-async-write",
                 note="streammerge always writes asynchronously; ignored"),
    MergekitFlag("--write-threads", "accepted, ignored", value="N", integer=True,
                 note="streammerge's writer sets its own threads; ignored"),
    MergekitFlag("--clone-tensors", "accepted, ignored", negation="--no-clone-tensors",
                 note="streammerge writes every output tensor from its own buffer; ignored"),
    MergekitFlag("--lazy-loader", "accepted, ignored", note="streammerge reads byte ranges lazily always; ignored"),
    MergekitFlag("--transformers-cache", "accepted, ignored", value="PATH",
                 note="streammerge reads model folders only; ignored"),
    MergekitFlag("--lora-merge-cache", "accepted, ignored", value="PATH",
                 note="streammerge applies no LoRA adapters ('model+lora' is a config error); ignored"),
    MergekitFlag("--lora-merge-dtype", "accepted, ignored", value="DTYPE",
                 note="streammerge applies no LoRA adapters ('model+lora' is a config error); ignored"),
)
"""The mergekit-yaml 0.1.5 flags `run` takes beside RunOptions' own (which carry their mergekit aliases)."""


def parse_device(text: str) -> str:
    """mergekit's `cuda:N` is our `cuda` when N is 0; any other index is refused rather than computed elsewhere."""
    m = re.fullmatch(r"cuda:(\d+)", text.strip())
    if m is None:
        return text
    if m[1].strip("0"):  # (not int(): a 5000-digit index is text too long to convert)
        index = m[1] if len(m[1]) <= 6 else "N"
        raise ConfigError(f"--device: {shown(text)}: streammerge computes on the first visible GPU only; run with "
                          f"CUDA_VISIBLE_DEVICES={index} and --device cuda")
    return "cuda"


@dataclass(frozen=True)
class Alias:
    """A mergekit spelling that sets one value: `--cuda` is `--device cuda`, and wins over `--device`."""

    flag: str
    value: object
    help: str
    negation: str | None = None   # a switch that cancels this alias (mergekit's --no-cuda)
    note: str | None = None       # what `run -v` says of the part of mergekit's meaning that is ignored


@dataclass(frozen=True)
class Flag:
    """How a `RunOptions` field is spelled on the command line. A flag left out gives the field's default.

    `kind`: "size" (read by `parse_size`, at least 1 byte; `hint` is added to a too-small value's
    message), "int" (read by `check_int` over the field's range), "choice" (one of `choices`), "text"
    (taken as written), or
    "switch" (no value: sets the field to `sets`; `negation`, when given, is a second switch that sets
    the opposite)."""

    name: str
    help: str | None = None
    kind: str = "switch"
    commands: tuple[str, ...] = MERGE_COMMANDS
    hidden: bool = False              # accepted, left out of --help (debugging and test flags)
    hint: str = ""
    choices: tuple[str, ...] = ()
    sets: bool = True
    negation: str | None = None
    aliases: tuple[Alias, ...] = ()
    convert: Callable[[str], str] | None = None  # "choice": maps the text before the check (cuda:0 -> cuda)


def _option(default: object, flag: Flag | None = None, lo: int | None = None, hi: int | None = None):
    """A RunOptions field: its default, its flag, and the integer range a library caller is held to
    (`lo`/`hi`; None: not an integer option)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "range": None if lo is None else (lo, hi)})


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Everything a run is told besides its config and output folder. Field order is --help's order."""

    max_memory: int = _option(0, Flag(  # bytes; 0 -> default_max_memory()
        "--max-memory", "hard ceiling on resident memory, e.g. 1GiB (default: half the available RAM, 1-16 GiB)",
        kind="size", hint="write a size such as 2GiB or 512MiB, or leave --max-memory out for the default (half "
                          "the available RAM, 1-16 GiB)"), 0, MAX_SIZE)
    # bytes of device buffers (cuda/auto); 0 -> 80% of the device, read at run time
    max_gpu_memory: int = _option(0, Flag(
        "--max-gpu-memory", "ceiling on the device buffers of a CUDA run, e.g. 8GiB (default: 80% of the GPU's memory)",
        kind="size", hint="write a size such as 8GiB, or leave --max-gpu-memory out for 80% of the GPU's memory"),
        0, MAX_SIZE)
    device: str = _option("cpu", Flag(
        "--device", "where to compute (default: cpu)", kind="choice", choices=("cpu", "cuda", "auto"),
        convert=parse_device,
        aliases=(Alias("--cuda", "cuda", "mergekit alias for --device cuda", negation="--no-cuda"),
                 Alias("--gpu-rich", "cuda", "mergekit alias: --device cuda here (one device; the rest is ignored)",
                       note="means --device cuda here; its --low-cpu-memory, --read-to-gpu and --multi-gpu are "
                            "ignored"))))
    out_shard_size: int = _option(5 * 1000**3, Flag(  # mergekit's default "5B"
        "--out-shard-size", "maximum output shard size (default: 5B, mergekit's: 5e9 bytes)", kind="size",
        hint="write a size such as 5B (mergekit's default, 5e9 bytes) or 2GiB"), 1, MAX_SIZE)
    seed: int = _option(0, Flag(
        "--random-seed", "seed of the counter-based random masks, 0 to 2^64-1 (default: 0)", kind="int"), 0, MAX_SEED)
    prefetch: int = _option(2, Flag(  # row bands read ahead of the compute
        "--prefetch", "row bands read ahead of the compute, 1 to 64 (default: 2)", kind="int"), 1, MAX_PREFETCH)
    chunk_rows: int | None = _option(None, Flag(  # force a row-band size (tests, debugging)
        "--chunk-rows", kind="int", hidden=True), 1)
    overwrite: bool = _option(False, Flag("--overwrite", "replace an existing output folder", commands=("run",)))
    resume: bool = _option(False, Flag("--resume", "continue an interrupted merge into OUT", commands=("run",)))
    progress: bool = _option(True, Flag("--no-progress", "no progress bar", commands=("run",), sets=False))
    backend: str = _option("local", Flag(
        "--backend", "where the shards are computed: local (default), or ray (a Ray task per output shard, "
        "reading the inputs from storage every worker sees; `pip install 'streammerge[ray]'`)", kind="choice",
        choices=("local", "ray"), commands=("run",)))
    ray_address: str | None = _option(None, Flag(
        "--address", "--backend ray: the Ray cluster to join (default: RAY_ADDRESS, else a Ray started on this "
        "machine)", kind="text", commands=("run",)))
    download: bool = _option(True, Flag(  # hub models: fetch the files the plan reads into the hub cache
        "--no-download", "download nothing from the hub: every file the merge reads must be in the hub cache",
        commands=("run",), sets=False))
    fsync: bool = _option(True, Flag(  # durable shards (power-loss safe); atomic renames need no fsync
        "--no-fsync", "skip fsync before each shard's rename: faster, still safe if the process is killed, not if "
                      "the machine loses power", commands=("run",), sets=False))
    copy_tokenizer: bool = _option(True, Flag("--copy-tokenizer", "copy tokenizer files (default)", commands=("run",),
                                              negation="--no-copy-tokenizer"))
    write_model_card: bool = _option(True, Flag("--write-model-card", commands=("run",),
                                                negation="--no-write-model-card"))
    allow_crimes: bool = _option(False, Flag("--allow-crimes", "mergekit flag: accepted", commands=("run",),
                                             negation="--no-allow-crimes"))
    # mergekit's crop of differing vocabularies to the smallest; without it a difference is an error
    unsafe_truncate_embeddings: bool = _option(False, Flag(
        "--unsafe-truncate-embeddings", "UNSAFE (mergekit flag): crop embeddings and lm_head of differing "
        "vocabularies to the smallest; assumes the kept token ids mean the same in every model",
        negation="--no-unsafe-truncate-embeddings"))
    check_nonfinite: bool = _option(True)

    def __post_init__(self) -> None:
        """A library caller's numbers get the checks the CLI's flags get, before any plan or file."""
        for f in dataclasses.fields(self):
            value, bounds = getattr(self, f.name), f.metadata.get("range")
            if bounds is not None and not (value is None and f.default is None):
                check_int(value, f"RunOptions.{f.name}", *bounds)
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"--backend: {shown(self.backend)}: use local or ray")
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigError("--address names a Ray cluster, which only --backend ray uses; add --backend ray or "
                              "leave --address out")

    def budget(self) -> int:
        return self.max_memory or default_max_memory()


def option_flags() -> list[tuple[str, Flag, tuple[int, int | None] | None]]:
    """(field name, flag, integer range) of every RunOptions field that has a flag, in --help's order."""
    return [(f.name, f.metadata["flag"], f.metadata["range"]) for f in dataclasses.fields(RunOptions)
            if f.metadata.get("flag") is not None]
