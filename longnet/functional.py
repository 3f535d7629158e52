"""``longnet.dilated_attention``: the op, shaped like ``F.scaled_dot_product_attention``.

Layouts: q, k, v and the output are (B, N, H, D) — batch, positions, heads,
head dim. lse is (B, N, H), float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .backends.registry import available_backends, get_backend, register_backend
from .patterns import validate_pattern

__all__ = ["dilated_attention", "available_backends", "register_backend"]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, H, D), got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, N, H, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "q, k and v must have the same shape (B, N, H, D), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, n, h, d = q.shape
    for dim_name, size in (("batch size B", b), ("sequence length N", n), ("number of heads H", h),
                           ("head dim D", d)):
        if size == 0:
            raise ValueError(f"q has an empty {dim_name} (shape {tuple(q.shape)}); expected it to be >= 1")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def dilated_attention(q: Tensor, k: Tensor, v: Tensor,
                      segment_lengths: Union[int, Sequence[int]],
                      dilation_rates: Union[int, Sequence[int]], *,
                      is_causal: bool = False, scale: Optional[float] = None,
                      return_lse: bool = False, backend: Optional[str] = None,
                      group=None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dilated attention of LongNet (SPEC.md §1-2), a mixture of dilation patterns.

    Args:
        q, k, v: (B, N, H, D), same shape, dtype and device.
        segment_lengths: w_i, an int or a sequence. Any N is allowed (the last
            segment may be short; w >= N means one segment).
        dilation_rates: r_i, same length as ``segment_lengths``, 1 <= r_i <= w_i.
            Head h of pattern i keeps rows with offset ``h mod r_i``.
        is_causal: queries only see keys at positions <= their own.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return lse (B, N, H), -inf for rows kept by no pattern.
        backend: "torch" (strided views + flash kernel, CPU and CUDA), "math"
            (same algorithm, plain matmuls), "reference" (dense oracle, small N),
            further registered ones, or None for the best available.
        group: a ``torch.distributed`` process group for sequence parallelism:
            each rank passes its contiguous block of the sequence (see
            :mod:`longnet.distributed`).

    Returns:
        out (B, N, H, D), or (out, lse). Rows kept by no pattern get 0. The
        backward is the exact gradient, through the mixture weights too.
    """
    _check_inputs(q, k, v)
    w, r = validate_pattern(segment_lengths, dilation_rates)
    scale = _check_scale(scale, q.shape[-1])
    if group is not None:
        from .backends.sequence_parallel import sequence_parallel_dilated_attention
        out, lse = sequence_parallel_dilated_attention(q, k, v, w, r, group=group, is_causal=is_causal,
                                                       scale=scale, backend=backend)
    else:
        out, lse = get_backend(backend, q).fn(q, k, v, w, r, is_causal=bool(is_causal), scale=scale)
    return (out, lse) if return_lse else out
