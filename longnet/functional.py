"""``longnet.dilated_attention``: the op, shaped like ``F.scaled_dot_product_attention``.

Layouts: q, k, v and the output are (B, N, H, D) — batch, positions, heads,
head dim — and q, k, v may have any strides (e.g. a transposed (B, H, N, D)
tensor). lse is (B, N, H), float32 (float64 for float64 inputs). Variable-length batches
(:mod:`longnet.varlen`): packed q, k, v (T, H, D) with ``cu_seqlens`` (lse (T, H)), or
(B, N, H, D) with ``key_padding_mask`` (B, N).

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
from .backends.registry import BACKENDS, available_backends, get_backend, register_backend
from .patterns import validate_pattern, validate_phases
from .varlen import check_varlen_args

__all__ = ["dilated_attention", "available_backends", "register_backend"]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, packed: bool = False) -> None:
    """Tensors, shapes, dtypes and devices of q, k, v: (B, N, H, D), or (T, H, D) when ``packed``."""
    layout, ndim = ("(T, H, D)", 3) if packed else ("(B, N, H, D)", 4)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}"
                             + (" (packed input with cu_seqlens)" if packed else ""))
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape {layout}, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    # A packed batch may hold no tokens at all (T = 0): every sequence empty.
    sizes = (("number of heads H", q.shape[-2]), ("head dim D", q.shape[-1]))
    if not packed:
        sizes = (("batch size B", q.shape[0]), ("sequence length N", q.shape[1])) + sizes
    for dim_name, size in sizes:
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
                      cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                      key_padding_mask: Optional[Tensor] = None,
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

    Variable-length batches (:mod:`longnet.varlen`): each sequence is segmented from its
    own first token and gives exactly what it gives alone, at a cost of the sum over
    sequences (not B x the longest).

    Args:
        q, k, v: (B, N, H, D), same shape, dtype and device, any strides; or packed
            (T, H, D) with ``cu_seqlens``.
        cu_seqlens: (B + 1,) int32 on q's device, cumulative from 0 to T (flash-attn's
            varlen convention): sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]).
            Sequences may be empty. Output (T, H, D), lse (T, H).
        max_seqlen: accepted for flash-attn compatibility (an int >= 0); the lengths are
            read from cu_seqlens.
        key_padding_mask: (B, N) bool, True = a real token, for padded (B, N, H, D) input;
            each row's real tokens must be one contiguous run (left, right or both-side
            padding). Padding rows give 0 (lse -inf) and get gradient 0.
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
    _check_inputs(q, k, v, packed=cu_seqlens is not None)
    w, r = validate_pattern(segment_lengths, dilation_rates)
    phases = validate_phases(segment_phases, w)
    scale = _check_scale(scale, q.shape[-1])
    varlen = None
    if cu_seqlens is not None or key_padding_mask is not None or max_seqlen is not None:
        check_varlen_args(q, cu_seqlens, max_seqlen, key_padding_mask, group)
        varlen = {"cu_seqlens": cu_seqlens, "key_padding_mask": key_padding_mask}
    return _run(q, k, v, w, r, is_causal, scale, return_lse, backend, group, phases, varlen)


def _dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Tuple[int, ...],
                       dilation_rates: Tuple[int, ...], *, is_causal: bool = False,
                       scale: Optional[float] = None, return_lse: bool = False,
                       backend: Optional[str] = None, group=None,
                       segment_phases: Optional[Tuple[int, ...]] = None,
                       cu_seqlens: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
                       ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`dilated_attention` for callers that validated the pattern and scale already.

    ``segment_lengths``/``dilation_rates`` must be what
    :func:`longnet.patterns.validate_pattern` returned, ``segment_phases``
    what :func:`longnet.patterns.validate_phases` returned (or None), and
    ``scale`` a finite float or None: modules check them once at construction,
    so no layer re-checks them on every forward. q, k, v are still checked
    (cheap, no sync), and so are ``cu_seqlens`` / ``key_padding_mask`` when given.
    """
    _check_inputs(q, k, v, packed=cu_seqlens is not None)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    varlen = None
    if cu_seqlens is not None or key_padding_mask is not None:
        check_varlen_args(q, cu_seqlens, None, key_padding_mask, group)
        varlen = {"cu_seqlens": cu_seqlens, "key_padding_mask": key_padding_mask}
    return _run(q, k, v, segment_lengths, dilation_rates, is_causal, scale, return_lse, backend, group,
                segment_phases, varlen)


def _run_varlen(q, k, v, w, r, is_causal, scale, backend, extra, varlen):
    """Dispatch a variable-length batch to its backend's varlen entry, or say that it has none."""
    chosen = get_backend(backend, q)
    if chosen.varlen is None:
        raise ValueError(f"backend {chosen.name!r} does not support cu_seqlens / key_padding_mask; use one of "
                         f"{sorted(n for n, b in BACKENDS.items() if b.varlen is not None)}")
    return chosen.varlen(q, k, v, w, r, is_causal=bool(is_causal), scale=scale, **varlen, **extra)


def _run(q, k, v, w, r, is_causal, scale, return_lse, backend, group, phases=None, varlen=None):
    """Dispatch checked arguments: to the sequence-parallel op with a group, else to a backend.

    Backends get ``segment_phases`` only when some phase is not 0, so a third-party backend
    that knows no phases still runs every unphased pattern.
    """
    extra = {"segment_phases": tuple(phases)} if phases is not None and any(phases) else {}
    if varlen is not None:
        out, lse = _run_varlen(q, k, v, w, r, is_causal, scale, backend, extra, varlen)
    elif group is not None:
        from .backends.sequence_parallel import sequence_parallel_dilated_attention
        out, lse = sequence_parallel_dilated_attention(q, k, v, w, r, group=group, is_causal=is_causal,
                                                       scale=scale, backend=backend, **extra)
    else:
        out, lse = get_backend(backend, q).fn(q, k, v, w, r, is_causal=bool(is_causal), scale=scale, **extra)
    return (out, lse) if return_lse else out
