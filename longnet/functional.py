"""``longnet.dilated_attention``: the op, shaped like ``F.scaled_dot_product_attention``.

Layouts: q, k, v and the output are (B, N, H, D) — batch, positions, heads,
head dim — and q, k, v may have any strides (e.g. a transposed (B, H, N, D)
tensor). lse is (B, N, H), float32 (float64 for float64 inputs).

:func:`dilated_attention` is the public entry and validates everything.
Modules validate their pattern once, when they are built, and call
:func:`_dilated_attention`, which trusts the pattern and scale it is given.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .backends.numerics import default_scale
from .backends.registry import available_backends, get_backend, register_backend
from .patterns import validate_pattern, validate_phases

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
        return default_scale(head_dim)
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
                      group=None, segment_phases: Optional[Sequence[int]] = None
                      ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dilated attention of LongNet (docs/design.md §1-2), a mixture of dilation patterns.

    By default this computes exactly docs/design.md §1-2. ``segment_phases`` opts in
    to shifted segment boundaries (an extension, see :mod:`longnet.patterns`):
    pattern i cuts the positions into [0, φ_i), [φ_i, φ_i + w_i), ... instead
    of [0, w_i), [w_i, 2 w_i), .... Its main use is the local-window variant
    of :meth:`longnet.DilatedPattern.with_local_window`, which adds the
    patterns (window, 1, phase 0) and (window, 1, phase window/2) so that in
    every head each pair of neighbours shares a segment, which removes the
    causal blind spot of docs/design.md §2.1.

    Args:
        q, k, v: (B, N, H, D), same shape, dtype and device, any strides.
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
            :mod:`longnet.distributed`); or a ``SequenceParallelPlan`` made for
            this block length and pattern, which skips re-checking the split.
        segment_phases: φ_i, same length as ``segment_lengths``, 0 <= φ_i < w_i;
            None (default) means all 0, i.e. exactly the paper's cut (docs/design.md §1).

    Returns:
        out (B, N, H, D), or (out, lse). Rows kept by no pattern get 0. The
        backward is the exact gradient, through the mixture weights too.
    """
    _check_inputs(q, k, v)
    w, r = validate_pattern(segment_lengths, dilation_rates)
    phases = validate_phases(segment_phases, w)
    scale = _check_scale(scale, q.shape[-1])
    return _run(q, k, v, w, r, is_causal, scale, return_lse, backend, group, phases)


def _dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Tuple[int, ...],
                       dilation_rates: Tuple[int, ...], *, is_causal: bool = False,
                       scale: Optional[float] = None, return_lse: bool = False,
                       backend: Optional[str] = None, group=None,
                       segment_phases: Optional[Tuple[int, ...]] = None
                       ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`dilated_attention` for callers that validated the pattern and scale already.

    ``segment_lengths``/``dilation_rates`` must be what
    :func:`longnet.patterns.validate_pattern` returned, ``segment_phases``
    what :func:`longnet.patterns.validate_phases` returned (or None), and
    ``scale`` a finite float or None: modules check them once at construction,
    so no layer re-checks them on every forward. q, k, v are still checked
    (cheap, no sync).
    """
    _check_inputs(q, k, v)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return _run(q, k, v, segment_lengths, dilation_rates, is_causal, scale, return_lse, backend, group,
                segment_phases)


def _run(q, k, v, w, r, is_causal, scale, return_lse, backend, group, phases=None):
    """Dispatch checked arguments: to the sequence-parallel op with a group, else to a backend.

    Backends get ``segment_phases`` only when some phase is not 0, so the
    default path (and a backend that knows no phases) is exactly as before.
    """
    extra = {"segment_phases": tuple(phases)} if phases is not None and any(phases) else {}
    if group is not None:
        from .backends.sequence_parallel import sequence_parallel_dilated_attention
        out, lse = sequence_parallel_dilated_attention(q, k, v, w, r, group=group, is_causal=is_causal,
                                                       scale=scale, backend=backend, **extra)
    else:
        out, lse = get_backend(backend, q).fn(q, k, v, w, r, is_causal=bool(is_causal), scale=scale, **extra)
    return (out, lse) if return_lse else out
