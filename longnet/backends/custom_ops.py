"""The torch and math backends as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque op.

``torch.ops.longnet.dilated_attention_fwd(q, k, v, segment_lengths,
dilation_rates, is_causal, scale, force_math, segment_phases) -> (out, lse)``
and ``torch.ops.longnet.dilated_attention_bwd(dout, dlse, q, k, v, out, lse,
...) -> (dq, dk, dv)``, following flash-attention's Python interface: each
op has a fake (meta) implementation for tracing, and the forward has an
autograd formula that saves q, k, v, out, lse and calls the backward op.
Dynamo and AOTAutograd then never trace the Python loops over units, so a
model compiles with ``fullgraph=True`` and dynamic shapes.

Layouts: q, k, v (B, N, H, D) with any strides whose last dimension is
contiguous; out (B, N, H, D) contiguous in q's dtype; lse (B, N, H)
contiguous, float32 (float64 for float64 inputs); dq, dk, dv contiguous in
q's dtype. ``segment_phases`` is None or one phase per pattern.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import clip_segment
from .lse_grad import backward_grads, backward_inputs
from .numerics import acc_dtype, last_dim_contiguous
from .torch_backend import accumulate_grads, merge_patterns

__all__ = ["dilated_attention_torch", "dilated_attention_fwd", "dilated_attention_bwd", "mixture_forward",
           "mixture_backward"]


def _phases(segment_phases: Optional[List[int]]) -> Optional[Tuple[int, ...]]:
    return tuple(segment_phases) if segment_phases is not None else None


# Rows per block of the low-precision path (see _row_blocks): its fp32 accumulators are this many
# bytes per tensor at most, unless one period of the pattern is longer.
_BLOCK_BYTES = 256 * 2**20


def _row_blocks(q: Tensor, segment_lengths: Sequence[int], segment_phases: Optional[Sequence[int]]) -> List[slice]:
    """Row ranges of q (B, N, H, D) that no segment of any pattern crosses, for low-precision inputs.

    Out and the gradients accumulate in fp32 (:func:`~.numerics.acc_dtype`); for bf16 or fp16
    inputs at long N those accumulators would be twice the size of the outputs (9 GiB for
    dq, dk, dv at 1M tokens, H = 12, D = 64). With every phase 0, the segments of all
    patterns tile [0, N) in periods of P = lcm(w_i clipped to N), so the mixture is computed
    block by block, each block a multiple of P, and only one block's accumulators are alive.
    """
    b, n, h, d = q.shape
    if acc_dtype(q.dtype) == q.dtype or any(segment_phases or ()):
        return [slice(0, n)]
    period = math.lcm(*(clip_segment(w, n) for w in segment_lengths))
    rows = max(1, _BLOCK_BYTES // (b * h * d * 4 * period)) * period
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def mixture_forward(q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int],
                    is_causal: bool, scale: float, force_math: bool = False,
                    segment_phases: Optional[List[int]] = None) -> Tuple[Tensor, Tensor]:
    """(out, lse) of the mixture, no autograd: the body of ``dilated_attention_fwd``."""
    blocks = _row_blocks(q, segment_lengths, segment_phases)
    out = lse = None
    for rows in blocks:
        o, l = merge_patterns(q[:, rows], k[:, rows], v[:, rows], tuple(segment_lengths), tuple(dilation_rates),
                              is_causal, scale, force_math, segment_phases=_phases(segment_phases))
        if len(blocks) == 1:
            return o.to(q.dtype), l
        if out is None:
            out, lse = q.new_empty(q.shape), l.new_empty(q.shape[:3])
        out[:, rows].copy_(o)
        lse[:, rows].copy_(l)
    return out, lse


# custom_op(...)(fn) rather than a decorator keeps the bodies callable as plain functions
# (the fake-CUDA tests run them under FakeTensorMode, where the op itself would run its fake).
dilated_attention_fwd = torch.library.custom_op("longnet::dilated_attention_fwd", mutates_args=())(mixture_forward)


@dilated_attention_fwd.register_fake
def _fwd_fake(q, k, v, segment_lengths, dilation_rates, is_causal, scale, force_math=False, segment_phases=None):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, n, h), dtype=acc_dtype(q.dtype))


def mixture_backward(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                     out: Tensor, lse: Tensor, segment_lengths: List[int], dilation_rates: List[int],
                     is_causal: bool, scale: float, force_math: bool = False,
                     segment_phases: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (dq, dk, dv) for gradients dout (B, N, H, D) and dlse (B, N, H) of (out, lse); either may be None.

    The body of ``dilated_attention_bwd``.
    """
    blocks = _row_blocks(q, segment_lengths, segment_phases)

    def run(do: Tensor, o: Tensor, zero_values: bool):
        values = torch.zeros_like(v) if zero_values else v
        grads = None
        for rows in blocks:
            g = accumulate_grads(do[:, rows], q[:, rows], k[:, rows], values[:, rows], o[:, rows], lse[:, rows],
                                 tuple(segment_lengths), tuple(dilation_rates), is_causal, scale, force_math,
                                 segment_phases=_phases(segment_phases))
            if len(blocks) == 1:
                return g  # in the accumulation dtype; backward_grads converts
            if grads is None:  # several blocks: each block's accumulators are converted as it ends
                grads = [x.new_empty(x.shape) for x in (q, k, v)]
            for dst, src in zip(grads, g):
                dst[:, rows].copy_(src)
        return grads
    return backward_grads(run, backward_inputs(dout, dlse, out), q.dtype)


dilated_attention_bwd = torch.library.custom_op("longnet::dilated_attention_bwd", mutates_args=())(mixture_backward)


@dilated_attention_bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, segment_lengths, dilation_rates, is_causal, scale, force_math=False,
              segment_phases=None):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    # A gradient that never reached out or lse stays None: no zero tensors, no extra pass.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor]):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.longnet.dilated_attention_bwd(dout, dlse, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


dilated_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("longnet's torch and math backends are differentiable once: a backward through their "
                       "gradients (create_graph=True, gradgradcheck, a gradient penalty) is not supported; "
                       "backend='reference' is twice differentiable")


# Without this, a second backward fails with torch's "no autograd formula was registered".
dilated_attention_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def dilated_attention_torch(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                            dilation_rates: Sequence[int], *, is_causal: bool = False, scale: float,
                            force_math: bool = False, segment_phases: Optional[Sequence[int]] = None
                            ) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse (B, N, H)) for q, k, v (B, N, H, D) of any strides, differentiable.

    The registry's torch (``force_math=False``) and math (``True``) backends;
    ``segment_phases``: validated phases, one per pattern, or None for all 0.
    Only a last dimension that is not contiguous is copied.
    """
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    phases = [int(p) for p in segment_phases] if segment_phases is not None and any(segment_phases) else None
    return torch.ops.longnet.dilated_attention_fwd(q, k, v, [int(w) for w in segment_lengths],
                                                   [int(r) for r in dilation_rates], bool(is_causal), float(scale),
                                                   bool(force_math), phases)
