"""Chunk-wise compute primitives of streammerge (torch implementations; no Triton import here).

Triton versions live in ``streammerge.kernels._triton`` and are imported only when asked for.
"""

from .philox import bernoulli_keep, philox4x32_10, philox_uniform, philox_words, stream_id
from .threshold import KthMagnitude, Threshold, find_thresholds, topk_mask
from .sums import sum_models
from .vote import agree_mask, mix, sign_consensus

__all__ = [
    "KthMagnitude",
    "Threshold",
    "agree_mask",
    "bernoulli_keep",
    "find_thresholds",
    "mix",
    "philox4x32_10",
    "philox_uniform",
    "philox_words",
    "sign_consensus",
    "stream_id",
    "sum_models",
    "topk_mask",
]
