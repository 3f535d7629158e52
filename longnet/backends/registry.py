"""The backend registry: which implementations of the op exist and which one runs an input.

A backend is ``fn(q, k, v, segment_lengths, dilation_rates, *, is_causal, scale) -> (out, lse)``
on (B, N, H, D) tensors (the op adds ``segment_phases=`` only when some phase is not 0), a
``why_not(q) -> Optional[str]`` that names the reason it cannot run an input (None when it
can), and a priority for ``backend=None`` (higher wins).

The built-in backends are declared here; the optional Triton one is imported on first
need, and only for GPU inputs or when asked for by name, so ``import longnet`` stays light
and never imports Triton for CPU work. The registry imports the backends, never the
reverse: a third-party backend calls :func:`register_backend`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

# Imported, not looked up lazily: this registers the torch.ops.longnet custom ops (see
# custom_ops.py) as soon as longnet is imported, which torch.compile and exported graphs need.
from .custom_ops import dilated_attention_torch
from .varlen_ops import dilated_attention_varlen_torch, varlen_by_length

__all__ = ["Backend", "BACKENDS", "register_backend", "available_backends", "pick_backend", "get_backend",
           "check_backend_name"]

BackendFn = Callable[..., Tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    why_not: Callable[[Tensor], Optional[str]]
    priority: int
    # fn(q, k, v, w, r, *, cu_seqlens, key_padding_mask, is_causal, scale[, segment_phases]) for
    # variable-length batches (layouts in :mod:`.varlen_ops`); None when the backend has none.
    varlen: Optional[BackendFn] = None


def _reference(q, k, v, w, r, *, is_causal, scale, segment_phases=None):
    from .reference import dilated_attention_reference
    return dilated_attention_reference(q, k, v, w, r, is_causal=is_causal, scale=scale,
                                       segment_phases=segment_phases)


def _torch(q, k, v, w, r, *, is_causal, scale, segment_phases=None):
    return dilated_attention_torch(q, k, v, w, r, is_causal=is_causal, scale=scale, segment_phases=segment_phases)


def _math(q, k, v, w, r, *, is_causal, scale, segment_phases=None):
    return dilated_attention_torch(q, k, v, w, r, is_causal=is_causal, scale=scale, force_math=True,
                                   segment_phases=segment_phases)


def _reference_varlen(q, k, v, w, r, *, cu_seqlens, key_padding_mask, is_causal, scale, segment_phases=None):
    from .reference import dilated_attention_reference_varlen
    return dilated_attention_reference_varlen(q, k, v, w, r, cu_seqlens=cu_seqlens,
                                              key_padding_mask=key_padding_mask, is_causal=is_causal,
                                              scale=scale, segment_phases=segment_phases)


def _torch_varlen(q, k, v, w, r, *, cu_seqlens, key_padding_mask, is_causal, scale, segment_phases=None):
    return dilated_attention_varlen_torch(q, k, v, w, r, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask,
                                          is_causal=is_causal, scale=scale, segment_phases=segment_phases)


def _math_varlen(q, k, v, w, r, *, cu_seqlens, key_padding_mask, is_causal, scale, segment_phases=None):
    return dilated_attention_varlen_torch(q, k, v, w, r, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask,
                                          is_causal=is_causal, scale=scale, force_math=True,
                                          segment_phases=segment_phases)


def _anything(q: Tensor) -> Optional[str]:
    return None


def _cpu_or_cuda(q: Tensor) -> Optional[str]:
    if q.device.type in ("cpu", "cuda"):
        return None
    return f"it runs on cpu and cuda tensors, got a tensor on {q.device.type}"


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", _reference, _anything, -1, _reference_varlen),
    "math": Backend("math", _math, _anything, 0, _math_varlen),
    "torch": Backend("torch", _torch, _cpu_or_cuda, 10, _torch_varlen),
}


def register_backend(name: str, fn: BackendFn, supports: Callable[[Tensor], object], priority: int) -> None:
    """Add a backend. ``supports(q)`` returns True/None when it can run q, else False or a reason."""
    def why_not(q: Tensor) -> Optional[str]:
        ok = supports(q)
        if ok is True or ok is None:
            return None
        return ok if isinstance(ok, str) else f"it does not support {q.dtype} tensors on {q.device}"
    BACKENDS[name] = Backend(name, fn, why_not, priority)


_optional_loaded = False
# Why an optional backend is missing (its import error), so asking for it by name says so.
_UNAVAILABLE: Dict[str, str] = {}


def _load_optional() -> None:
    # Tried once: a failed import is not cached by Python and would search sys.path on every call.
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from . import triton_backend
    except ImportError as e:
        _UNAVAILABLE["triton"] = f"importing it failed ({type(e).__name__}: {e})"
        return
    # The interpreter is for tests: backend=None never picks it (math, priority 0, runs
    # everything), while backend="triton" still reaches it.
    BACKENDS["triton"] = Backend("triton", triton_backend.backend_fn, triton_backend.why_not,
                                 -2 if triton_backend.INTERPRET else 20,
                                 functools.partial(varlen_by_length, triton_backend.backend_fn))


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that can be selected with ``backend=``."""
    _load_optional()
    return tuple(BACKENDS)


def pick_backend(q: Tensor) -> Backend:
    """The highest-priority backend that can run q (B, N, H, D)."""
    if q.device.type != "cpu":  # optional backends are GPU kernels: don't import them for CPU work
        _load_optional()
    ok = [(b.priority, b.name) for b in BACKENDS.values() if b.why_not(q) is None]
    return BACKENDS[max(ok)[1]]


def check_backend_name(name: Optional[str]) -> None:
    """Raise ``ValueError`` unless ``name`` is None or a backend that can be loaded here, saying why."""
    if name is None or name in BACKENDS:
        return
    _load_optional()
    if name in _UNAVAILABLE:
        raise ValueError(f"backend {name!r} is not available: {_UNAVAILABLE[name]}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")


def get_backend(name: Optional[str], q: Tensor) -> Backend:
    """The backend called ``name`` (None: :func:`pick_backend`), checked against q, or a clear error."""
    if name is None:
        return pick_backend(q)
    check_backend_name(name)
    reason = BACKENDS[name].why_not(q)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run this input: {reason}")
    return BACKENDS[name]
