"""Conventions every backend and kernel shares: the default score scale, the accumulation dtype,
and the one layout requirement of the flash kernels (a contiguous last dimension)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_scale", "acc_dtype", "last_dim_contiguous", "TOLERANCE"]

# (atol, rtol) per input dtype and quantity for a backend's result against the float64
# reference on the same rounded inputs ~ N(0, 1): what the tests and `longnet selftest` accept.
TOLERANCE = {
    torch.float64: {"out": (1e-10, 1e-10), "lse": (1e-10, 1e-10), "grad": (5e-10, 5e-10)},
    torch.float32: {"out": (2e-5, 2e-5), "lse": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"out": (5e-3, 5e-3), "lse": (1e-4, 1e-4), "grad": (5e-3, 5e-3)},
    torch.bfloat16: {"out": (3e-2, 3e-2), "lse": (1e-4, 1e-4), "grad": (8e-2, 3e-2)},
}


def default_scale(head_dim: int) -> float:
    """The score scale when none is given: D ** -0.5 (docs/design.md §1)."""
    return head_dim ** -0.5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of lse and of every accumulation (merged outputs, summed gradients).

    float64 inputs keep float64; everything else accumulates in float32, so
    half-precision partials are merged and summed without compounding rounding.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_dim_contiguous(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (all the kernels need), else a contiguous copy.

    Every other stride may be anything, so strided views (transposed heads,
    slices, unbound qkv) reach the kernels without a copy.
    """
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()
