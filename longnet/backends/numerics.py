"""Numerical conventions every backend shares: the default score scale and the accumulation dtype."""

from __future__ import annotations

import torch

__all__ = ["default_scale", "acc_dtype"]


def default_scale(head_dim: int) -> float:
    """The score scale when none is given: D ** -0.5 (SPEC.md §1)."""
    return head_dim ** -0.5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of lse and of every accumulation (merged outputs, summed gradients).

    float64 inputs keep float64; everything else accumulates in float32, so
    half-precision partials are merged and summed without compounding rounding.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
