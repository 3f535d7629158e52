"""torchscale's dilated attention, as a function: the numerics its pretrained weights were trained with.

This is *not* longnet's :func:`longnet.dilated_attention` (docs/design.md §1-2).
It reproduces what ``torchscale.component.dilated_attention.DilatedAttention``
computes between its projections, rule for rule (docs/gigapath.md lists
every difference from longnet's semantics):

* Each pattern (w, r) clamps its segment to the sequence, ``w' = min(w, N)``,
  zero-pads the sequence to a multiple of ``w'`` and each segment to a
  multiple of ``r``. The zero keys are *inside* the softmax: each adds
  exp(0) to a non-causal row's denominator (and nothing to its numerator).
* Head offsets come in contiguous groups: with ``g = ceil(H / r)``, head
  ``j`` keeps the positions ``p`` with ``p mod r == j // g``. When ``r`` does
  not divide H some offsets have fewer heads, or none.
* When r does not divide ``w'``, the r-padded segments are laid end to end
  before the first N rows are kept, so segment s's rows land
  ``s * (ceil(w'/r) * r - w')`` positions late, and rows of the padding
  (zero queries: a plain mean of the segment's values) fill the gaps.
* A row a pattern does not keep gets log-sum-exp ``-1e8`` and output 0 from
  it, and so does a kept row whose log-sum-exp is exactly 0 (torchscale finds
  "not kept" by comparing with 0).
* Patterns are mixed with weights softmax(lse) over the patterns.

The one deliberate difference: the backward is the exact gradient of this
forward, including through the mixture weights (torchscale computes them
under ``no_grad``). The forward is the same up to rounding.

Layouts: q, k, v and the output are (B, N, H, D) with any strides whose last
dimension is contiguous; every sequence of the batch has all N positions
(padding masks are handled one level up, by running each sequence alone:
:func:`per_sequence`).

``attend(q, k, v, causal, scale) -> (out, lse)`` on (Z, H, L, D) picks the
kernel: :func:`kernel_attend` (longnet's kernels, exact backward) or
:func:`dense_attend` (plain PyTorch, differentiated by autograd: the dense
reference of the same function).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import kernels
from ..backends.lse_grad import backward_grads, backward_inputs
from ..backends.numerics import acc_dtype, default_scale, last_dim_contiguous
from ..checks import check_int

__all__ = ["torchscale_dilated_attention", "kernel_attend", "dense_attend", "per_sequence", "UNCOVERED_LSE",
           "head_offsets"]

# The log-sum-exp torchscale gives rows a pattern does not keep (its sparse_to_dense fill).
UNCOVERED_LSE = -1e8

Attend = Callable[[Tensor, Tensor, Tensor, bool, float], Tuple[Tensor, Tensor]]


class _KernelAttention(torch.autograd.Function):
    """(out, lse) of dense attention on (Z, H, L, D) through longnet's kernels, with the exact
    backward for gradients reaching out *and* lse (:mod:`longnet.backends.lse_grad`)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = kernels.attn_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        acc = acc_dtype(q.dtype)

        def run(do, o, zero_values):
            vv = torch.zeros_like(v) if zero_values else v
            grads = kernels.attn_bwd(do, q, k, vv, o, lse, ctx.causal, ctx.scale)
            return [g.to(acc) for g in grads]

        dq, dk, dv = backward_grads(run, backward_inputs(dout, dlse, out), q.dtype)
        return dq, dk, dv, None, None


def kernel_attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """Dense attention on (Z, H, L, D) with longnet's kernels: out (Z, H, L, D), lse (Z, H, L) float32."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _KernelAttention.apply(q, k, v, causal, scale)


def dense_attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """The plain-PyTorch reference of :func:`kernel_attend` (scores materialised, autograd backward)."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(acc))
    return out.to(q.dtype), lse


def head_offsets(num_heads: int, dilation_rate: int) -> List[int]:
    """The position offset (mod r) each head keeps, in torchscale's contiguous-group assignment."""
    group = -(-num_heads // dilation_rate)
    return [j // group for j in range(num_heads)]


def _split(x: Tensor, sl: int, nseg: int, m: int, r: int) -> Tensor:
    """(B, N, H, D) -> (B * nseg, m, r, H, D): zero-padded segments of sl rows, each padded to m * r."""
    b, n, h, d = x.shape
    if nseg * sl != n:
        x = F.pad(x, (0, 0, 0, 0, 0, nseg * sl - n))
    if m * r != sl:
        x = F.pad(x.reshape(b, nseg, sl, h, d), (0, 0, 0, 0, 0, m * r - sl))
    return x.reshape(b * nseg, m, r, h, d)  # a view when nothing was padded


def _pattern(q: Tensor, k: Tensor, v: Tensor, w: int, r: int, causal: bool, scale: float,
             attend: Attend) -> Tuple[Tensor, Tensor]:
    """One pattern's dense (out (B, N, H, D), lse (B, N, H)) in torchscale's rules (module docstring)."""
    b, n, h, d = q.shape
    sl = min(w, n)
    nseg, m, group = -(-n // sl), -(-sl // r), -(-h // r)
    qs, ks, vs = (_split(t, sl, nseg, m, r) for t in (q, k, v))
    out = q.new_zeros((b * nseg, m, r, h, d))
    lse = torch.full((b * nseg, m, r, h), UNCOVERED_LSE, dtype=acc_dtype(q.dtype), device=q.device)
    for off in range(r):
        h0, h1 = off * group, min((off + 1) * group, h)
        if h0 >= h1:
            break  # offsets past the last head group are kept by no head
        o, l = attend(*(t[:, :, off, h0:h1].transpose(1, 2) for t in (qs, ks, vs)), causal, scale)
        out[:, :, off, h0:h1] = o.transpose(1, 2)
        lse[:, :, off, h0:h1] = l.transpose(1, 2)
    lse = lse.masked_fill(lse == 0, UNCOVERED_LSE)
    # The r-padded segments are concatenated *before* the first n rows are taken, as torchscale's
    # scattering does: when r does not divide sl, segment s lands s * (m * r - sl) rows late.
    return out.view(b, nseg * m * r, h, d)[:, :n], lse.view(b, nseg * m * r, h)[:, :n]


def torchscale_dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                 dilation_rates: Sequence[int], *, is_causal: bool = False,
                                 scale: Optional[float] = None, attend: Attend = kernel_attend) -> Tensor:
    """torchscale's dilated attention of (B, N, H, D) q, k, v (already projected, XPOS applied).

    Returns (B, N, H, D) in q's dtype. The patterns are merged online
    (running max, sum and weighted sum in float32), so only one pattern's
    dense output is alive at a time.
    """
    if len(segment_lengths) != len(dilation_rates) or not segment_lengths:
        raise ValueError("segment_lengths and dilation_rates must be non-empty and of equal length, got "
                         f"{list(segment_lengths)} and {list(dilation_rates)}")
    # torchscale slices with these, so a fractional one fails there too; never truncate it here.
    segment_lengths = [check_int("segment_lengths", w) for w in segment_lengths]
    dilation_rates = [check_int("dilation_rates", r) for r in dilation_rates]
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    acc = acc_dtype(q.dtype)
    run_max = total = mixed = None
    for w, r in zip(segment_lengths, dilation_rates):
        o, lse = _pattern(q, k, v, w, r, is_causal, scale, attend)
        lse = lse.unsqueeze(-1)
        if run_max is None:
            run_max, total, mixed = lse, torch.ones_like(lse), o.to(acc)
            continue
        new_max = torch.maximum(run_max, lse)
        old_w, new_w = torch.exp(run_max - new_max), torch.exp(lse - new_max)
        total = total * old_w + new_w
        mixed = mixed * old_w + o.to(acc) * new_w
        run_max = new_max
    return (mixed / total).to(q.dtype)


def per_sequence(fn: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor,
                 padding_mask: Optional[Tensor]) -> Tensor:
    """``fn`` run on each sequence's real positions alone; padded rows of the result are 0.

    q, k, v (B, N, H, D); ``padding_mask`` (B, N) bool, True = padding
    (torchscale's convention), any layout, or None (every position real: one
    batched call). ``fn`` maps (1, n, H, D) triples to (1, n, H, D), so a
    sequence gets exactly the output it would get without the others, and a
    fully padded sequence gets zeros (never NaN).
    """
    if padding_mask is None or not bool(padding_mask.any()):
        return fn(q, k, v)
    if padding_mask.shape != q.shape[:2]:
        raise ValueError(f"padding mask must have shape (B, N) = {tuple(q.shape[:2])}, "
                         f"got {tuple(padding_mask.shape)}")
    out = q.new_zeros(q.shape)
    for i in range(q.shape[0]):
        keep = (~padding_mask[i].to(torch.bool)).nonzero().squeeze(-1)
        if keep.numel() == 0:
            continue
        part = fn(*(t[i:i + 1].index_select(1, keep) for t in (q, k, v)))
        out[i].index_copy_(0, keep, part[0])
    return out
