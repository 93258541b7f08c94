"""Counter-based random numbers: Philox 4x32-10 in plain torch integer ops.

A DARE/DELLA mask bit must be a pure function of ``(seed, model, tensor, element)`` so that
chunking, ordering and the device never change it.  Philox (Salmon et al., SC'11, "Parallel random
numbers: as easy as 1, 2, 3") gives that: ten rounds of a bijection on a 128-bit counter under a
64-bit key.

Layout (fixed; changing it changes every mask):

* key = ``(seed & 0xFFFFFFFF, seed >> 32)``;
* element ``e`` of stream ``s`` is word ``e % 4`` of the block for counter
  ``(q & 0xFFFFFFFF, q >> 32, s & 0xFFFFFFFF, s >> 32)`` with ``q = e // 4``
  (one Philox evaluation yields four words, so this is 4x cheaper than one block per element);
* uniform = ``(word >> 8) * 2**-24``: 24 random bits, exact in float32, in ``[0, 1)``.

uint32 values live in int64 tensors (torch has no shifts on unsigned types).  The 32x32 -> 64-bit
product wraps in int64 with the same bit pattern as the unsigned product, so ``>> 32`` then a mask
gives the high word on every backend; the known-answer tests (counters of all ones) pin that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import dispatch
from .contract import MASK32, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, U64, check_args, keep_limit

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "KeepDraw",
    "bernoulli_keep",
    "keep_limit",
    "philox4x32_10",
    "philox_uniform",
    "philox_words",
    "stream_id",
]

# Blocks per piece: the six int64 buffers stay in cache, and each op stays under torch's intra-op
# grain size (32768), so the ~100 small ops per piece run on the calling thread.  Splitting them
# across OpenMP threads made every op a barrier and, on a shared 2-core box, cut throughput 5x;
# parallel work belongs to the executor (threads over chunks).  On a GPU the limit is launches,
# so pieces there are large (the Triton kernel is the fast path anyway).
_PIECE_BLOCKS = 30_000
_PIECE_BLOCKS_GPU = 1 << 22
# Up to this many elements, Python ints beat ~110 tensor ops of per-call overhead (1-row chunks).
_SMALL = 64

Word = torch.Tensor | int


def stream_id(model_index: int, tensor_name: str) -> int:
    """A stable 64-bit stream for one tensor of one model.

    blake2b (never Python's salted ``hash``) of the model index and the UTF-8 name, so the same
    config draws the same masks in every process and on every machine.
    """
    if not isinstance(model_index, int) or not 0 <= model_index < U64:
        raise ValueError(f"model_index must be an int in [0, 2**64), got {model_index!r}")
    if not isinstance(tensor_name, str):
        raise TypeError(f"tensor_name must be a str, got {type(tensor_name).__name__}")
    h = hashlib.blake2b(digest_size=8, person=b"streammerge-rng")
    h.update(model_index.to_bytes(8, "little"))
    h.update(tensor_name.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def philox4x32_10(
    c0: Word, c1: Word, c2: Word, c3: Word, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox 4x32 bijection, 10 rounds, on int64 tensors holding uint32 values.

    Counter words may be tensors (broadcast together) or ints; the key is two Python ints.
    Returns the four output words as int64 tensors in ``[0, 2**32)``.
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(*(_as_words(c) for c in (c0, c1, c2, c3)))
    k0 &= MASK32
    k1 &= MASK32
    for _ in range(10):
        p0 = c0 * PHILOX_M0  # wraps in int64; the bit pattern is the exact uint64 product
        p1 = c2 * PHILOX_M1
        # Sign-extension garbage above bit 31 is cleared by one mask after the xors; the low
        # products feed only xors before the next mask, so they stay unmasked until the end.
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & MASK32,
            p1,
            ((p0 >> 32) ^ c3 ^ k1) & MASK32,
            p0,
        )
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1 & MASK32, c2, c3 & MASK32


def philox_words(
    seed: int, stream: int, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Raw uint32 words (as int64) for elements ``start .. start+count-1`` of a stream."""
    check_args(seed, stream, start, count)
    return dispatch.call("philox_words", device, seed, stream, start, count, device)


def philox_words_numba(seed: int, stream: int, start: int, count: int,
                       device: torch.device | str | None) -> torch.Tensor:
    from ._numba import philox as kernel

    out = torch.empty(count, dtype=torch.int64)
    kernel.words_into(out.numpy(), seed, stream, start)
    return out


def philox_words_torch(seed: int, stream: int, start: int, count: int,
                       device: torch.device | str | None) -> torch.Tensor:
    if count <= _SMALL:
        return torch.tensor(_words_py(seed, stream, start, count), dtype=torch.int64, device=device)
    first, buf = _block_buffer(start, count, torch.int64, device)
    for q0, cols in _pieces(seed, stream, start, count, buf.device):
        view = buf[q0 - first : q0 - first + cols[0].numel()]
        for j in range(4):
            view[:, j] = cols[j]
    return buf.view(-1)[start - 4 * first : start - 4 * first + count]


def philox_uniform(
    seed: int, stream: int, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 uniforms in ``[0, 1)`` for elements ``start .. start+count-1`` of a stream."""
    check_args(seed, stream, start, count)
    return dispatch.call("philox_uniform", device, seed, stream, start, count, device)


def philox_uniform_numba(seed: int, stream: int, start: int, count: int,
                         device: torch.device | str | None) -> torch.Tensor:
    from ._numba import philox as kernel

    out = torch.empty(count, dtype=torch.float32)
    kernel.uniform_into(out.numpy(), seed, stream, start)
    return out


def philox_uniform_torch(seed: int, stream: int, start: int, count: int,
                         device: torch.device | str | None) -> torch.Tensor:
    if count <= _SMALL:
        u = [(w >> 8) * 2.0**-24 for w in _words_py(seed, stream, start, count)]
        return torch.tensor(u, dtype=torch.float32, device=device)
    first, buf = _block_buffer(start, count, torch.float32, device)
    for q0, cols in _pieces(seed, stream, start, count, buf.device):
        view = buf[q0 - first : q0 - first + cols[0].numel()]
        for j in range(4):
            view[:, j] = cols[j].bitwise_right_shift_(8)  # < 2**24: exact in float32
    buf.mul_(2.0**-24)
    return buf.view(-1)[start - 4 * first : start - 4 * first + count]


def bernoulli_keep(
    seed: int,
    stream: int,
    start: int,
    count: int,
    p: float | torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep mask ``u < p`` for elements ``start .. start+count-1`` of a stream.

    ``p`` is a float (DARE's density) or a tensor broadcastable to ``[count]`` (DELLA's per-element
    probabilities).  The comparison is exact: a float ``p`` is compared as ``(word >> 8) <
    ceil(p * 2**24)``, which equals ``u < p`` in real numbers; a tensor ``p`` is compared in the
    promoted dtype, where the float32 ``u`` is exact.  So P(keep) = p up to 2**-24.
    """
    if isinstance(p, torch.Tensor):
        if device is None:
            device = p.device
        u = philox_uniform(seed, stream, start, count, device)
        return u < p.to(u.device)
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"keep probability p must be in [0, 1], got {p}")
    check_args(seed, stream, start, count)
    return dispatch.call("bernoulli_keep", device, seed, stream, start, count, p, device)


def bernoulli_keep_numba(seed: int, stream: int, start: int, count: int, p: float,
                         device: torch.device | str | None) -> torch.Tensor:
    from ._numba import philox as kernel

    out = torch.empty(count, dtype=torch.bool)
    kernel.keep_into(out.numpy(), seed, stream, start, keep_limit(p))
    return out


def bernoulli_keep_torch(seed: int, stream: int, start: int, count: int, p: float,
                         device: torch.device | str | None) -> torch.Tensor:
    limit = keep_limit(p)
    if count <= _SMALL:
        keep = [w < limit for w in _words_py(seed, stream, start, count)]
        return torch.tensor(keep, dtype=torch.bool, device=device)
    first, buf = _block_buffer(start, count, torch.bool, device)
    for q0, cols in _pieces(seed, stream, start, count, buf.device):
        view = buf[q0 - first : q0 - first + cols[0].numel()]
        for j in range(4):
            torch.lt(cols[j], limit, out=view[:, j])
    return buf.view(-1)[start - 4 * first : start - 4 * first + count]


def _block_buffer(
    start: int, count: int, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[int, torch.Tensor]:
    """A ``[blocks, 4]`` buffer for every block the range touches (at most 6 spare words)."""
    first, last = start >> 2, (start + count + 3) >> 2
    return first, torch.empty((last - first, 4), dtype=dtype, device=device)


def _pieces(
    seed: int, stream: int, start: int, count: int, device: torch.device
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(first block, [word0, word1, word2, word3])`` a cache-sized run of blocks at a time.

    The rounds run in place on six reused buffers; the yielded columns are overwritten by the next
    piece, so consumers copy them out before advancing.
    """
    first, last = start >> 2, (start + count + 3) >> 2
    piece = _PIECE_BLOCKS if device.type == "cpu" else _PIECE_BLOCKS_GPU
    size = min(piece, max(last - first, 1))
    bufs = [torch.empty(size, dtype=torch.int64, device=device) for _ in range(6)]
    for qa in range(first, last, piece):
        n = min(piece, last - qa)
        c0, c1, c2, c3, t0, t1 = (b[:n] for b in bufs)
        torch.arange(qa, qa + n, dtype=torch.int64, device=device, out=c2)
        torch.bitwise_and(c2, MASK32, out=c0)
        torch.bitwise_right_shift(c2, 32, out=c1)
        c2.fill_(stream & MASK32)
        c3.fill_(stream >> 32)
        k0, k1 = seed & MASK32, seed >> 32
        for _ in range(10):
            torch.mul(c0, PHILOX_M0, out=t0)  # wraps in int64: bit pattern of the uint64 product
            torch.mul(c2, PHILOX_M1, out=t1)
            # High words: sign-extension garbage above bit 31 is cleared by one mask after the
            # xors.  Low words stay unmasked: they only feed xors before the next mask.
            c1.bitwise_xor_(k0).bitwise_xor_(torch.bitwise_right_shift(t1, 32, out=c0))
            c1.bitwise_and_(MASK32)
            c3.bitwise_xor_(k1).bitwise_xor_(torch.bitwise_right_shift(t0, 32, out=c2))
            c3.bitwise_and_(MASK32)
            # (c0, c1, c2, c3) <- (new c0 in c1, lo1 in t1, new c2 in c3, lo0 in t0)
            c0, c1, c2, c3, t0, t1 = c1, t1, c3, t0, c0, c2
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        c1.bitwise_and_(MASK32)
        c3.bitwise_and_(MASK32)
        yield qa, [c0, c1, c2, c3]


def _words_py(seed: int, stream: int, start: int, count: int) -> list[int]:
    """The same words with exact Python ints (no wrapping, so the high word is just ``>> 32``)."""
    words: list[int] = []
    for q in range(start >> 2, (start + count + 3) >> 2):
        c0, c1, c2, c3 = q & MASK32, q >> 32, stream & MASK32, stream >> 32
        k0, k1 = seed & MASK32, seed >> 32
        for _ in range(10):
            p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
            c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        words += (c0, c1, c2, c3)
    skip = start & 3
    return words[skip : skip + count]


@dataclass(frozen=True)
class KeepDraw:
    """DARE's keep masks for a chunk of K models, described instead of drawn: row k keeps element i
    where ``bernoulli_keep(seed, streams[k], start + i, 1, ps[k])`` would, all of it where ``ps[k]`` is None.
    A fused kernel draws each tile where it is used; ``tensor`` draws the whole mask for the other paths."""

    seed: int
    streams: tuple[int, ...]
    ps: tuple[float | None, ...]
    start: int
    packed: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    """The same bits, drawn already (by DARE's rescale pass), as one uint8 array per model (None for a
    model without a mask), element i in bit i % 8 of byte i // 8; the fused kernel reads them instead
    of drawing again, the other paths ignore them."""

    def tensor(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[K, ...]`` bool mask of ``shape``."""
        count = 1
        for s in shape[1:]:
            count *= s
        mask = torch.ones((len(self.ps), count), dtype=torch.bool, device=device)
        for k, (stream, p) in enumerate(zip(self.streams, self.ps)):
            if p is not None:
                mask[k] = bernoulli_keep(self.seed, stream, self.start, count, p, device=device)
        return mask.reshape(shape)

    def limits(self) -> list[int]:
        """Per model, the word bound of its keep (``keep_limit``), 0 where it has no mask (p > 0 always
        gives a bound of at least 256)."""
        return [0 if p is None else keep_limit(p) for p in self.ps]


def _as_words(c: Word) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(torch.int64)
    return torch.tensor(c & MASK32, dtype=torch.int64)
