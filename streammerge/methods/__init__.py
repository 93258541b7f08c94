"""Merge methods: the declarative units (`registry`), one family per module, and the literal table
of them (`table`). Nothing registers itself on import; nothing here imports torch."""

from __future__ import annotations

from .registry import MethodSpec, ModelPass, Param, Reduce, TensorJob
from .table import METHODS, get_method

__all__ = ["METHODS", "MethodSpec", "ModelPass", "Param", "Reduce", "TensorJob", "get_method"]
