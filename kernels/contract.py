"""What the torch, numba and Triton variants of a primitive share: constants and argument checks.

A leaf: it imports neither torch nor any other kernel module, so every variant (``kernels/X.py``,
``kernels/_numba/X.py``, ``kernels/_triton/X.py``) imports these by public name and no variant
imports another's private names or the torch module above it.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "MASK32",
    "NO_CONSENSUS_EPS",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "U64",
    "Consensus",
    "ceil_scaled",
    "check_args",
    "check_range",
    "check_u64",
    "keep_limit",
]

# Philox 4x32-10's multipliers and Weyl key increments (Salmon et al.); changing one changes every mask.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
U64 = 1 << 64

Consensus = Literal["sum", "count"]
NO_CONSENSUS_EPS = 1e-8  # mergekit's guard on the weight sum without consensus


def keep_limit(p: float) -> int:
    """The word bound of a keep with probability ``p``: ``u < p`` exactly when ``word < keep_limit(p)``.

    (word >> 8) < t  <=>  word < t * 256 for integers; t * 256 <= 2**32 fits int64.
    """
    return ceil_scaled(p) << 8


def ceil_scaled(p: float) -> int:
    """``ceil(p * 2**24)``, exactly (scaling by a power of two loses nothing)."""
    scaled = p * (1 << 24)
    t = int(scaled)
    return t + 1 if t < scaled else t


def check_args(seed: int, stream: int, start: int, count: int) -> None:
    """A Philox draw's arguments: 64-bit seed and stream, an element range inside the 2**64 space."""
    check_u64("seed", seed)
    check_u64("stream", stream)
    check_range(start, count)


def check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value < U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")


def check_range(start: int, count: int) -> None:
    if not isinstance(start, int) or not isinstance(count, int) or start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative ints, got {start!r}, {count!r}")
    if start + count > U64:
        raise ValueError(f"element range end {start + count} exceeds 2**64 (the element space)")
