"""The plan as data: frozen, printable, and everything the executor needs, nothing it must decide.

Each decision the executor acts on is a field here, set once by a named rule of the planner
(`plan/build.py`): a tensor's passes (`reduces` by name, then the map), whether it is read once for all
of them (`read_once`), its compute blocks (`block_rows`), and the model-wide sweeps (`Plan.model_sweeps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.header import TensorInfo


@dataclass(frozen=True)
class Source:
    """One input of an output tensor: which model (index into Plan.models) and where its bytes are."""

    model: int
    info: TensorInfo
    crop_rows: int | None = None   # read only the first rows (vocabulary cropped to a common size)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str                      # safetensors code, e.g. "BF16"
    compute_dtype: str                  # the dtype inputs are loaded in (mergekit's `dtype`)
    inputs: tuple[Source, ...]
    base: int | None                    # index into `inputs`
    params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[tuple[str, Any], ...], ...]
    kind: str
    passes: int                         # reduce passes + 1 map pass: len(reduces) + 1
    rows: int
    row_elems: int
    rows_per_chunk: int
    shard: int
    bytes_in: int
    bytes_out: int
    reduces: tuple[str, ...] = ()       # the method's reduce passes for this tensor, by name, in order
    read_once: bool = True              # one band holds the tensor: read once for all its passes
    block_rows: int = 0                 # CPU compute blocks of this many rows (0: the band is one block)
    folded: bool = False                # the last reduce runs in the map's read (plan/passes.py: fold)
    one_read_budget: int = 0            # --max-memory from which one band would hold it (0: not planned so)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[str, ...]            # in data order
    nbytes: int
    header: str = ""                    # the header's JSON text, padded as written after its 8-byte length
    offsets: tuple[int, ...] = ()       # each tensor's absolute data offset in the file, in `tensors` order


@dataclass(frozen=True)
class Plan:
    method: str
    models: tuple[Path, ...]
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    budget: int
    baseline_rss: int
    peak_estimate: int
    seed: int
    out_layers: int
    out_config: dict | None = field(default=None, compare=False)
    reference_model: int = 0            # index into models: config.json / tokenizer source
    tokenizer_model: int | None = None
    warnings: tuple[str, ...] = ()
    model_sweeps: int = 0               # whole-model passes before the per-tensor ones (TIES scope: model)
    block_elems: int = 1 << 17          # CPU compute block (elements), sized by the budget
    device: str = "cpu"                 # as asked: cpu | cuda | auto
    gpu_budget: int = 0                 # --max-gpu-memory (bytes) the bands were planned under; 0: unchecked
    gpu_peak_estimate: int = 0          # device bytes in flight at most (with the allocator allowance)
    downloads: tuple[tuple[str, int], ...] = ()  # hub files the run fetches first: (cache path, bytes)

    @property
    def bytes_in(self) -> int:
        per_tensor = sum(t.bytes_in * (1 if t.read_once else t.passes - int(t.folded)) for t in self.tensors)
        return per_tensor + self.model_sweeps * sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)
