"""``longnet.dilated_attention``: the op, shaped like ``F.scaled_dot_product_attention``.

Layouts: q, k, v and the output are (B, N, H, D) — batch, positions, heads,
head dim. lse is (B, N, H), float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from torch import Tensor

from .patterns import validate_pattern

__all__ = ["dilated_attention", "available_backends", "register_backend", "BACKENDS"]

BackendFn = Callable[..., Tuple[Tensor, Tensor]]


def _reference(q, k, v, w, r, *, is_causal, scale):
    from .backends.reference import dilated_attention_reference
    return dilated_attention_reference(q, k, v, w, r, is_causal=is_causal, scale=scale)


def _torch(q, k, v, w, r, *, is_causal, scale):
    from .backends.torch_backend import dilated_attention_torch
    return dilated_attention_torch(q, k, v, w, r, is_causal=is_causal, scale=scale)


def _math(q, k, v, w, r, *, is_causal, scale):
    from .backends.torch_backend import dilated_attention_torch
    return dilated_attention_torch(q, k, v, w, r, is_causal=is_causal, scale=scale, force_math=True)


# name -> (callable, predicate "can run these inputs", auto-selection priority: higher first)
BACKENDS: Dict[str, Tuple[BackendFn, Callable[[Tensor], bool], int]] = {
    "reference": (_reference, lambda q: True, -1),
    "math": (_math, lambda q: True, 0),
    "torch": (_torch, lambda q: q.device.type in ("cpu", "cuda"), 10),
}


def register_backend(name: str, fn: BackendFn, supports: Callable[[Tensor], bool], priority: int) -> None:
    """Add a backend. ``fn(q, k, v, w, r, *, is_causal, scale) -> (out, lse)``."""
    BACKENDS[name] = (fn, supports, priority)


_optional_loaded = False


def _load_optional_backends() -> None:
    # Optional backends register themselves on import; a missing dependency just means "absent".
    # Tried once: a failed import is not cached by Python and would search sys.path every call.
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from .backends import triton_backend  # noqa: F401
    except ImportError:
        pass


def available_backends() -> Tuple[str, ...]:
    _load_optional_backends()
    return tuple(BACKENDS)


def _pick_backend(q: Tensor) -> str:
    if q.device.type != "cpu":  # optional backends are GPU kernels: don't import them for CPU work
        _load_optional_backends()
    ok = [(prio, name) for name, (_, supports, prio) in BACKENDS.items() if supports(q)]
    return max(ok)[1]


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
        from .distributed import sequence_parallel_dilated_attention
        out, lse = sequence_parallel_dilated_attention(q, k, v, w, r, group=group, is_causal=is_causal,
                                                       scale=scale, backend=backend)
        return (out, lse) if return_lse else out
    if backend is None:
        backend = _pick_backend(q)
    else:
        if backend not in BACKENDS:
            _load_optional_backends()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {backend!r}")
        if not BACKENDS[backend][1](q):
            raise ValueError(f"backend {backend!r} does not support {q.dtype} tensors on {q.device}")
    fn = BACKENDS[backend][0]
    out, lse = fn(q, k, v, w, r, is_causal=bool(is_causal), scale=scale)
    return (out, lse) if return_lse else out
