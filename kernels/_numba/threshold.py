"""Magnitude-threshold loops for 16-bit floats (bf16, fp16): histogram, equal counts, top-k mask.

Keys are ``bits & 0x7FFF`` (|x| as an integer, see ``kernels/threshold.py``); each loop reads the
bit pattern once, where the torch versions build key, comparison and cumsum temporaries.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_KEY = np.uint16(0x7FFF)


@nb.njit(nogil=True, cache=True)
def histogram16(hist, bits):
    """``hist[key] += 1`` for every element's key (one exact pass for 16-bit floats)."""
    for i in range(bits.size):
        hist[bits[i] & _KEY] += 1


@nb.njit(nogil=True, cache=True)
def equal_per_row16(out, bits, th):
    """``out[t, r]`` = elements of row ``r`` whose key equals ``th[t]``."""
    rows, n = bits.shape
    for t in range(th.size):
        target = th[t]
        for r in range(rows):
            c = 0
            row = bits[r]
            for j in range(n):
                c += (row[j] & _KEY) == target
            out[t, r] = c


@nb.njit(nogil=True, cache=True)
def topk_mask16(out, bits, th, room):
    """Keys above ``th``, plus the first ``room`` keys equal to it; returns the count of equal keys.

    The first loop carries no state between elements, so it vectorizes; the in-order pick of equal
    keys runs only when some but not all of them are kept (a few thousand per block at most).
    """
    n = bits.size
    n_equal = 0
    for i in range(n):
        key = np.int64(bits[i] & _KEY)
        out[i] = key > th
        n_equal += key == th
    if room <= 0 or n_equal == 0:
        return n_equal
    if room >= n_equal:
        for i in range(n):
            out[i] |= np.int64(bits[i] & _KEY) == th
        return n_equal
    left = room
    for i in range(n):
        if np.int64(bits[i] & _KEY) == th:
            out[i] = True
            left -= 1
            if left == 0:
                break
    return n_equal


# The dispatch table's numba implementations of the histogram ops: the ops' own names and arguments
# (``kernels/threshold.py`` holds the torch ones and the predicates that route 16-bit CPU keys here).

def count_keys(hists, bits, key_mask: int, shift: int, width: int, high_shift: int, prefixes) -> None:
    """``threshold.count_keys`` for whole 16-bit keys into one 2**15-bin histogram."""
    histogram16(hists[0].numpy(), _u16(bits))


def topk_mask(flat, th, equal_seen_before: int):
    """``threshold.topk_mask`` on a chunk's flat int16 view: (mask, equal keys in this chunk)."""
    import torch

    mask = torch.empty(flat.shape, dtype=torch.bool)
    n_equal = topk_mask16(mask.numpy(), _u16(flat), th.bits, th.n_equal_keep - equal_seen_before)
    return mask, int(n_equal)


def equal_per_row(view, key_mask: int, bits):
    """``threshold.equal_per_row`` on a ``[rows, n]`` int16 view."""
    import torch

    out = torch.empty(len(bits), view.shape[0], dtype=torch.int64)
    equal_per_row16(out.numpy(), _u16(view), np.array(list(bits), dtype=np.int64))
    return out


def _u16(bits):
    return bits.contiguous().numpy().view("uint16")
