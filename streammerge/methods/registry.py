"""Merge methods as small declarative units: parameters, reduce passes, a map function.

The executor runs every `Reduce` of a method as one pass over the tensor's row bands (in row order),
then the `map` pass, which produces output rows. A method never sees a whole tensor unless the tensor
is a single row band; statistics that need the whole tensor come from its reduce passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Literal, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    import torch

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter: `per_model` ones are looked up per input model, the others once per tensor."""

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    base_too: bool = True                 # a per-model parameter the base model also takes
    kind: Literal["float", "int", "bool", "str"] = "float"
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


class PlannedTensor(Protocol):
    """What `TensorJob.from_plan` reads of a tensor's plan (`plan.ir.TensorPlan`, a higher layer, which
    this module does not import); read-only, as the frozen plan is."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def rows(self) -> int: ...

    @property
    def compute_dtype(self) -> str: ...

    @property
    def base(self) -> int | None: ...

    @property
    def params(self) -> Sequence[tuple[str, Any]]: ...

    @property
    def model_params(self) -> Sequence[Sequence[tuple[str, Any]]]: ...

    @property
    def inputs(self) -> Sequence[Any]: ...

    @property
    def kind(self) -> str: ...

    @property
    def row_elems(self) -> int: ...

    @property
    def read_once(self) -> bool: ...


@dataclass(frozen=True)
class TensorJob:
    """What a method sees of one output tensor: everything resolved, nothing to look up."""

    name: str
    shape: tuple[int, ...]
    rows: int
    compute_code: str                     # the loaded dtype as a safetensors code ("BF16"): no torch to plan
    base: int | None                      # index of the base model among the inputs
    params: Mapping[str, Any]             # global params, evaluated for this tensor
    model_params: tuple[Mapping[str, Any], ...]  # per-input params (the base's entry included)
    model_ids: tuple[int, ...]            # stable model index of each input, for random streams
    seed: int
    kind: str = "other"                   # "embedding", "lm_head", "layer", "other"
    row_elems: int = 1
    read_once: bool = False               # the plan's rule: one band holds the tensor, all passes run on it

    @classmethod
    def from_plan(cls, t: PlannedTensor, seed: int) -> "TensorJob":
        return cls(name=t.name, shape=t.shape, rows=t.rows, compute_code=t.compute_dtype, base=t.base,
                   params=dict(t.params), model_params=tuple(dict(m) for m in t.model_params),
                   model_ids=tuple(s.model for s in t.inputs), seed=seed, kind=t.kind, row_elems=t.row_elems,
                   read_once=t.read_once)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The loaded dtype as a torch dtype (imports torch: methods call it while computing)."""
        from ..io.header import torch_dtype

        return torch_dtype(self.compute_code)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Reduce:
    """One reduce pass, named for what it computes (the plan lists passes by name): `init(job, stats)`
    makes a state from the results of the tensor's earlier passes (`stats`, so passes chain without
    shared closures), `update` folds a row band into it, `finish` turns it into a small statistic
    (`stats[i]` of later passes). Bands arrive in row order (`row0` is the band's first row) unless
    `merge` is given: then the executor may fold sub-bands into fresh states (each from `init`) on
    several threads and `merge(into, other)` them in row order, which must give the same result.

    `so_far(state, job, stats)`, when given, is the statistic of the rows folded so far, all that the
    map of those rows needs (TIES's tie counts: equal elements before each row). The planner may then
    fold this last reduce into the map's read of a tensor too big for one band (`plan.passes`): each
    band is folded, then mapped, in row order, and the tensor is read once less.

    `share(job)`, when given, is a key of everything the pass's state depends on besides the input
    tensors (TIES's |δ| histogram: the dtype and which models are masked, not the density): a batch
    whose outputs give the same key over the same inputs computes the pass once (`batch/reuse.py`), and
    the others build their state with `adopt(own_state_from_init, computed_state)` before their own
    `finish`. The computed state may be adopted while its own `finish` runs: finish must only read
    what adopt takes."""

    name: str
    init: Callable[[TensorJob, Sequence[Any]], Any]
    update: Callable[[Any, TensorJob, list[torch.Tensor], int], None]
    finish: Callable[[Any, TensorJob, Sequence[Any]], Any]
    merge: Callable[[Any, Any], None] | None = None
    so_far: Callable[[Any, TensorJob, Sequence[Any]], Any] | None = None
    share: Callable[[TensorJob], Hashable | None] | None = None
    adopt: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class ModelPass:
    """Sweeps over every tensor of the merge before any tensor's own passes (TIES over the whole model).

    `sweeps(jobs)` says how many (0: not needed for this config); `check(jobs)` is the planner's
    torch-free test of the parameters (a message, or None); `init(jobs)` makes the state, in the run;
    `update(state, sweep, index, job, chunks, row0)` folds one band of tensor `index` (tensors in plan
    order, bands in row order); `end_sweep(state, sweep)` closes a sweep; `result(state, index, job)` is
    the statistic of tensor `index`, handed to its map as `stats[0]`."""

    sweeps: Callable[[Sequence[TensorJob]], int]
    init: Callable[[Sequence[TensorJob]], Any]
    update: Callable[[Any, int, int, TensorJob, list[torch.Tensor], int], None]
    end_sweep: Callable[[Any, int], None]
    result: Callable[[Any, int, TensorJob], Any]
    check: Callable[[Sequence[TensorJob]], str | None] | None = None


MapFn = Callable[[TensorJob, list["torch.Tensor"], Sequence[Any], int], "torch.Tensor"]


# The block of methods whose maps and reduces are fused compiled loops: per-block Python and the thread
# hand-off are their cost, so they take the largest block the planner gives (plan.budget.BLOCK_ELEMS).
FUSED_BLOCK_ELEMS = 1 << 19


@dataclass(frozen=True)
class MethodSpec:
    """A method: its parameters, reduce passes and map. Every map is row-local (output rows depend only on
    the same input rows and the reduces' statistics): the planner's compute blocks rely on it."""

    name: str
    map: MapFn
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_models: int = 1                   # inputs other than the base
    max_models: int | None = None
    reduces: tuple[Reduce, ...] = ()
    description: str = ""
    paper: str = ""
    validate: Callable[[TensorJob], str | None] | None = None
    reduce_plan: Callable[[TensorJob], tuple[Reduce, ...]] | None = None  # reduces that depend on the tensor
    # CPU block size it runs best at: small where torch temporaries dominate (they stay in cache and
    # under glibc's mmap threshold), FUSED_BLOCK_ELEMS where fused kernels and reused buffers do the work.
    block_elems: int = 1 << 17
    model_pass: ModelPass | None = None
    # The dtype `map` returns for a loaded dtype when it is not that dtype (mergekit's ramplus_tl and
    # arcee_fusion promote to fp32 and write that when `out_dtype` is unset); None: the loaded dtype.
    result_dtype: Callable[[torch.dtype], torch.dtype] | None = None

    def reduces_for(self, job: TensorJob) -> tuple[Reduce, ...]:
        return self.reduce_plan(job) if self.reduce_plan is not None else self.reduces


# -- common parameter checks ----------------------------------------------------------------------

def in_range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return f"must be a number, got {v!r}"
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            return f"must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}, got {v}"
        return None
    return check
