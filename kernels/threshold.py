"""Exact k-th largest magnitude of a streamed tensor, without sorting it.

A magnitude top-k over 1e9 elements must not sort (about 20 GB of scratch).  For IEEE floats the
bit pattern of ``|x|`` (the value with its sign bit cleared) is an unsigned integer that grows with
the magnitude, so the k-th largest magnitude is the k-th largest *key*, which histograms find:

* bf16 / fp16 (15-bit keys): one pass, one exact histogram of 2**15 bins;
* fp32 (31-bit keys): a coarse pass over the top 16 bits, then one refine pass over the low 15 bits
  of the elements in the coarse bin that holds the k-th key;
* fp64 (63-bit keys): the same narrowing in four passes (16 + 16 + 16 + 15 bits).

The caller feeds every element once per pass, in chunks of any size and in any order; the masks
(``topk_mask``) then walk the chunks in flat (row-major) order.  Several ranks can be resolved at
once (breadcrumbs needs two), and one finder can span many tensors of one model (TIES with model
scope): the flat order is then the caller's tensor order.

Rules:

* NaN is larger than every number: NaN keys lie above +inf's, so NaNs are kept first (ordered by
  payload bits), as ``torch.sort`` puts them first when descending.  -0.0 and +0.0 are equal.
* Ties: exactly ``k`` elements are kept, all with a key above the threshold and then the first
  ``k - n_above`` with a key equal to it, in flat order.  Counting equal keys seen in earlier chunks
  (``equal_seen_before``) makes the mask independent of the chunking.
* ``k == 0`` is allowed (an empty mask), so ``int(density * n) == 0`` needs no special case.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from . import dispatch

__all__ = ["KthMagnitude", "Threshold", "count_keys", "find_thresholds", "topk_mask"]

# Elements per histogram piece: keeps the key temporaries in cache (a chunked bf16 bincount ran
# at about 3.5x the speed of one over a whole 66M-element tensor).
_PIECE = 1 << 18


@dataclass(frozen=True)
class _Layout:
    int_dtype: torch.dtype
    key_bits: int  # bits of |x|: the bit width minus the sign bit
    widths: tuple[int, ...]  # bits resolved per pass, most significant first

    @property
    def key_mask(self) -> int:
        return (1 << self.key_bits) - 1


_LAYOUTS: dict[torch.dtype, _Layout] = {
    torch.bfloat16: _Layout(torch.int16, 15, (15,)),
    torch.float16: _Layout(torch.int16, 15, (15,)),
    torch.float32: _Layout(torch.int32, 31, (16, 15)),
    torch.float64: _Layout(torch.int64, 63, (16, 16, 16, 15)),
}


def _layout(dtype: torch.dtype) -> _Layout:
    try:
        return _LAYOUTS[dtype]
    except KeyError:
        names = ", ".join(str(d) for d in _LAYOUTS)
        raise ValueError(f"magnitude thresholds support {names}; got {dtype}") from None


@dataclass(frozen=True)
class Threshold:
    """The k-th largest magnitude and its tie rule, small enough to hand to every map pass.

    ``bits`` is the key (|x| bit pattern) of the k-th largest magnitude; masks compare keys, not
    floats, so the result is exact.  For ``k == 0`` nothing is kept and ``bits`` is -1.
    """

    bits: int
    dtype: torch.dtype
    n_above: int  # elements with key > bits
    n_equal_keep: int  # k - n_above: equal keys kept, the first ones in flat order
    n_equal: int  # elements with key == bits in the whole scope
    k: int

    @property
    def value(self) -> float:
        """The threshold magnitude as a float (NaN if the k-th element is a NaN; inf for k == 0)."""
        if self.k == 0:
            return float("inf")
        lay = _layout(self.dtype)
        return torch.tensor(self.bits, dtype=lay.int_dtype).view(self.dtype).item()


class KthMagnitude:
    """Histogram state that finds exact k-th largest magnitudes over ``passes`` passes.

    Usage: for ``p`` in ``range(finder.passes)``, feed every chunk once with ``update(chunk, p)``
    (in any order: counts do not care; only ``topk_mask`` needs flat order), then call
    ``finish_pass(p)``.  Then ``threshold_for(k)`` (or ``threshold`` for a single k) gives the
    result.  Ranks must be declared up front because every refine pass follows the
    coarse bin of each declared k; one-pass dtypes (bf16, fp16) answer any k after their pass.
    """

    def __init__(
        self, dtype: torch.dtype, n: int, k: int | Iterable[int], *, backend: str = "torch"
    ) -> None:
        self.dtype = dtype
        if backend == "torch":
            self._count_keys = count_keys
        elif backend == "triton":  # imported only when asked for
            from ._triton.histogram import count_keys as triton_count_keys

            self._count_keys = triton_count_keys
        else:
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        self._lay = _layout(dtype)
        n = _as_int(n, "n (elements in scope)")
        if n < 0:
            raise ValueError(f"n (elements in scope) must be non-negative, got {n}")
        self.n = n
        ks = tuple(k) if isinstance(k, Iterable) else (k,)
        if not ks:
            raise ValueError("at least one rank k is needed")
        ks = tuple(self._check_k(kk) for kk in ks)
        self.ks = tuple(dict.fromkeys(ks))  # declared order, duplicates dropped
        self.passes = len(self._lay.widths)
        self._pass = 0  # the pass update() accepts next
        self._seen = 0
        # Per pending rank: (prefix key bits resolved so far, elements above the prefix, rank left).
        self._targets: dict[int, tuple[int, int, int]] = {kk: (0, 0, kk) for kk in self.ks if kk}
        self._prefixes: list[int] = [0]
        self._hists: list[torch.Tensor] | None = None
        self._full_hist: torch.Tensor | None = None  # pass-0 histogram of one-pass dtypes
        self._results: dict[int, Threshold] = {}

    @property
    def done(self) -> bool:
        return self._pass == self.passes

    @property
    def threshold(self) -> Threshold:
        """The result for the single declared k."""
        if len(self.ks) != 1:
            raise ValueError(f"several ranks were declared {self.ks}; use threshold_for(k)")
        return self.threshold_for(self.ks[0])

    def update(self, chunk: torch.Tensor, pass_index: int) -> None:
        """Count one chunk (values in the finder's dtype, any shape) into the open pass."""
        self._expect_pass(pass_index)
        if chunk.dtype != self.dtype:
            raise ValueError(f"chunk dtype {chunk.dtype} differs from the finder's {self.dtype}")
        lay = self._lay
        width = lay.widths[pass_index]
        resolved = sum(lay.widths[:pass_index])
        if self._hists is None:
            self._hists = [
                torch.zeros(1 << width, dtype=torch.int64, device=chunk.device)
                for _ in self._prefixes
            ]
        self._count_keys(
            self._hists,
            chunk.reshape(-1).view(lay.int_dtype),
            lay.key_mask,
            lay.key_bits - resolved - width,
            width,
            lay.key_bits - resolved,
            self._prefixes if pass_index else None,
        )
        self._seen += chunk.numel()

    def finish_pass(self, pass_index: int) -> None:
        """Close a pass: check the element count and narrow every pending rank by one level."""
        self._expect_pass(pass_index)
        if self._seen != self.n:
            raise ValueError(
                f"pass {pass_index} saw {self._seen} elements but the scope has n={self.n}; "
                "feed every chunk exactly once per pass"
            )
        width = self._lay.widths[pass_index]
        empty = [torch.zeros(1 << width, dtype=torch.int64)] * len(self._prefixes)
        hists = [h.cpu() for h in (self._hists or empty)]
        if self.passes == 1:
            self._full_hist = hists[0]
        slot_of = {prefix: slot for slot, prefix in enumerate(self._prefixes)}
        last = pass_index == self.passes - 1
        for kk, (prefix, above, rank) in list(self._targets.items()):
            hist = hists[slot_of[prefix]]
            b, more, equal = _walk(hist, rank)
            prefix, above, rank = (prefix << width) | b, above + more, rank - more
            self._targets[kk] = (prefix, above, rank)
            if last:
                self._results[kk] = Threshold(prefix, self.dtype, above, rank, equal, kk)
        self._prefixes = sorted({prefix for prefix, _, _ in self._targets.values()}) or [0]
        self._hists = None
        self._seen = 0
        self._pass += 1

    def spawn(self) -> "KthMagnitude":
        """An empty finder at the same pass: workers count into their own, then `absorb` in any order."""
        twin = object.__new__(KthMagnitude)
        twin.__dict__.update(self.__dict__)
        twin._hists = None
        twin._seen = 0
        return twin

    def absorb(self, other: "KthMagnitude") -> None:
        """Add another finder's counts of the open pass (integer adds: exact and order-free)."""
        if other._pass != self._pass:
            raise ValueError("can only absorb a finder at the same pass")
        if other._hists is not None:
            if self._hists is None:
                self._hists = [h.clone() for h in other._hists]
            else:
                for mine, theirs in zip(self._hists, other._hists):
                    mine += theirs
        self._seen += other._seen

    def threshold_for(self, k: int) -> Threshold:
        """The threshold keeping exactly ``k`` elements (after the last pass)."""
        if not self.done:
            raise ValueError(
                f"thresholds are ready after all {self.passes} passes; {self._pass} finished"
            )
        k = self._check_k(k)
        if k == 0:
            return Threshold(-1, self.dtype, 0, 0, 0, 0)
        if k in self._results:
            return self._results[k]
        if self._full_hist is None:
            raise ValueError(
                f"k={k} was not declared; {self.dtype} needs a refine pass per rank, so pass "
                f"every rank to KthMagnitude(..., k=[...]) (declared: {self.ks})"
            )
        b, above, equal = _walk(self._full_hist, k)
        return Threshold(b, self.dtype, above, k - above, equal, k)

    def _check_k(self, k: int) -> int:
        k = _as_int(k, "rank k")
        if not 0 <= k <= self.n:
            raise ValueError(f"rank k must be an int in [0, n={self.n}], got {k}")
        return k

    def _expect_pass(self, pass_index: int) -> None:
        if pass_index != self._pass:
            state = "all passes are finished" if self.done else f"pass {self._pass} is open"
            raise ValueError(f"got pass_index={pass_index} but {state} (passes={self.passes})")


def _as_int(value: object, what: str) -> int:
    try:
        return operator.index(value)  # ints and numpy ints, not floats
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def count_keys(
    hists: list[torch.Tensor],
    bits: torch.Tensor,
    key_mask: int,
    shift: int,
    width: int,
    high_shift: int,
    prefixes: Sequence[int] | None,
) -> None:
    """Add one chunk to the pass histograms (torch reference; the Triton one mirrors it).

    ``bits`` is the chunk's flat integer view.  With ``key = bits & key_mask``, every element (when
    ``prefixes`` is None) or every element with ``key >> high_shift == prefixes[i]`` adds one to
    ``hists[i][(key >> shift) & (2**width - 1)]``.
    """
    dispatch.call("count_keys", bits.device, hists, bits, key_mask, shift, width, high_shift, prefixes)


def count_keys_fits_numba(hists: list[torch.Tensor], bits: torch.Tensor, key_mask: int, shift: int, width: int,
                          high_shift: int, prefixes: Sequence[int] | None) -> bool:
    """The compiled loop counts whole 16-bit keys into one 2**15-bin histogram."""
    return (prefixes is None and _bits16(bits) and key_mask == 0x7FFF and shift == 0
            and hists[0].numel() == 1 << 15)


def count_keys_torch(hists: list[torch.Tensor], bits: torch.Tensor, key_mask: int, shift: int, width: int,
                     high_shift: int, prefixes: Sequence[int] | None) -> None:
    for lo in range(0, bits.numel(), _PIECE):
        key = bits[lo : lo + _PIECE] & key_mask
        if prefixes is None:
            _count_into(hists[0], key >> shift if shift else key)
            continue
        high = key >> high_shift
        for hist, prefix in zip(hists, prefixes):
            _count_into(hist, (key[high == prefix] >> shift) & ((1 << width) - 1))


def _count_into(hist: torch.Tensor, bins: torch.Tensor) -> None:
    if bins.numel() * 8 < hist.numel():  # tiny chunk: skip a full-length bincount result
        ones = torch.ones(bins.shape, dtype=hist.dtype, device=hist.device)
        hist.index_add_(0, bins.to(device=hist.device, dtype=torch.int64), ones)
    elif bins.numel():
        hist += torch.bincount(bins, minlength=hist.numel()).to(hist.device)


def _walk(hist: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """Bin holding the rank-th largest key: (bin, elements in higher bins, elements in the bin)."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([rank])).item())
    b = hist.numel() - 1 - j
    count = int(hist[b])
    return b, int(from_top[j]) - count, count


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as the integer keys thresholds compare: the bit pattern with the sign cleared (x contiguous)."""
    lay = _layout(x.dtype)
    return x.view(lay.int_dtype) & lay.key_mask


def topk_mask(
    chunk: torch.Tensor, th: Threshold, equal_seen_before: int = 0
) -> tuple[torch.Tensor, int]:
    """Keep mask of one chunk: keys above the threshold plus the first equal ones in flat order.

    ``equal_seen_before`` is the number of keys equal to ``th.bits`` in earlier chunks of the scope
    (the sum of this function's second result over them); chunks must come in flat order.
    Returns the mask (shape of ``chunk``) and this chunk's count of equal keys.
    """
    if chunk.dtype != th.dtype:
        raise ValueError(f"chunk dtype {chunk.dtype} differs from the threshold's {th.dtype}")
    if th.k == 0:
        return torch.zeros(chunk.shape, dtype=torch.bool, device=chunk.device), 0
    flat = chunk.reshape(-1).view(_layout(th.dtype).int_dtype)
    mask, n_equal = dispatch.call("topk_mask", chunk.device, flat, th, equal_seen_before)
    return mask.reshape(chunk.shape), n_equal


def topk_mask_fits_numba(flat: torch.Tensor, th: Threshold, equal_seen_before: int) -> bool:
    return _bits16(flat)


def topk_mask_torch(flat: torch.Tensor, th: Threshold, equal_seen_before: int) -> tuple[torch.Tensor, int]:
    """The reference on a chunk's flat integer view: cache-sized pieces, equal keys kept in flat order."""
    lay = _layout(th.dtype)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    seen = equal_seen_before
    for lo in range(0, flat.numel(), _PIECE):
        key = flat[lo : lo + _PIECE] & lay.key_mask
        out = mask[lo : lo + _PIECE]
        equal = key == th.bits
        n_equal = int(equal.sum())
        room = th.n_equal_keep - seen  # equal keys still to keep
        if room >= n_equal:
            torch.ge(key, th.bits, out=out)
        elif room <= 0:
            torch.gt(key, th.bits, out=out)
        else:
            torch.gt(key, th.bits, out=out).logical_or_(equal & (equal.cumsum(0) <= room))
        seen += n_equal
    return mask, seen - equal_seen_before


def equal_per_row(rows: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """int64 ``[len(bits), rows]``: per row of a ``[rows, n]`` chunk, the keys equal to each threshold key."""
    lay = _layout(rows.dtype)
    view = rows.contiguous().view(lay.int_dtype)
    return dispatch.call("equal_per_row", rows.device, view, lay.key_mask, bits)


def equal_per_row_fits_numba(view: torch.Tensor, key_mask: int, bits: Sequence[int]) -> bool:
    return _bits16(view)


def equal_per_row_torch(view: torch.Tensor, key_mask: int, bits: Sequence[int]) -> torch.Tensor:
    key = view & key_mask
    return torch.stack([(key == b).sum(dim=1) for b in bits])


def _bits16(bits: torch.Tensor) -> bool:
    """Whether the 16-bit numba loops take this chunk: 16-bit keys on the CPU."""
    return bits.dtype == torch.int16 and bits.device.type == "cpu"


def find_thresholds(
    chunks: Callable[[], Iterable[torch.Tensor]],
    dtype: torch.dtype,
    n: int,
    ks: Sequence[int],
    *,
    backend: str = "torch",
) -> tuple[Threshold, ...]:
    """Run every pass, calling ``chunks()`` once per pass for a fresh iterator in flat order."""
    finder = KthMagnitude(dtype, n, ks, backend=backend)
    for p in range(finder.passes):
        for chunk in chunks():
            finder.update(chunk, p)
        finder.finish_pass(p)
    return tuple(finder.threshold_for(k) for k in ks)
