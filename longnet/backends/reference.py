"""The dense oracle: docs/design.md §2 written as one masked softmax.

``o = softmax(q k^T * scale + log C) v`` where ``C[h, p, j]`` counts the
patterns in which query p and key j share a segment and are both kept by
head h (and ``j <= p`` when causal); with segment phases (see
:mod:`longnet.patterns`), segments are those of each pattern's phase. It materialises (B, H, N, N) scores, so
it is for small N only; every fast backend is tested against it, forward and
backward (autograd through plain torch ops gives the exact gradient).

It is the oracle, so non-finite inputs must not reach a row that cannot see
them: a score (p, j) with C = 0 is replaced by -inf (``where``, never an
addition of -inf, which would turn an inf score into NaN), and when q, k or v
hold inf or NaN, each row's own keys and values are selected before any
product, so 0 * inf never arises, forward or backward.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import clip_phase, clip_segment, keep_mask as _keep_mask, segment_start, validate_phases
from .numerics import acc_dtype, default_scale

__all__ = ["count_matrix", "dilated_attention_reference", "dilated_attention_reference_varlen", "keep_mask",
           "masked_softmax", "mixture_bias"]


def keep_mask(n: int, num_heads: int, segment_length: int, dilation_rate: int,
              device=None, phase: int = 0) -> Tensor:
    """(H, N) bool: rows kept by one pattern in each head (:func:`longnet.patterns.keep_mask`)."""
    return _keep_mask(torch.arange(n, device=device), torch.arange(num_heads, device=device),
                      clip_segment(segment_length, n), dilation_rate, clip_phase(phase, n))


def count_matrix(n: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, is_causal: bool = False,
                 device=None, segment_phases: Optional[Sequence[int]] = None) -> Tensor:
    """(H, N, N) int64: C[h, p, j] of docs/design.md §2 (with each pattern's segment phase, default 0)."""
    pos = torch.arange(n, device=device)
    c = torch.zeros(num_heads, n, n, dtype=torch.int64, device=device)
    for w, r, phi in zip(segment_lengths, dilation_rates, validate_phases(segment_phases, segment_lengths)):
        # Clipped: w >= N is one segment (and no int64 overflow for huge w or phase).
        w, phi = clip_segment(w, n), clip_phase(phi, n)
        seg = segment_start(pos, w, phi)
        same = seg[:, None] == seg[None, :]
        kept = keep_mask(n, num_heads, w, r, device=device, phase=phi)
        c += (same[None] & kept[:, :, None] & kept[:, None, :]).long()
    if is_causal:
        c = c * torch.tril(torch.ones(n, n, dtype=torch.int64, device=device))
    return c


def _scores(q: Tensor, k: Tensor, allowed: Tensor, finite: bool) -> Tensor:
    """(B, H, N, N) q.k for the allowed (H, N, N) pairs; the others are arbitrary finite values.

    With non-finite inputs each pair's q and k are selected first, so a masked
    pair multiplies zeros, never an inf or NaN (forward or backward).
    """
    if finite:
        return torch.einsum("bphd,bjhd->bhpj", q, k)
    mask = allowed[None, :, :, :, None]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    qs = torch.where(mask, q.permute(0, 2, 1, 3)[:, :, :, None, :], zero)
    ks = torch.where(mask, k.permute(0, 2, 1, 3)[:, :, None, :, :], zero)
    return (qs * ks).sum(-1)


def _weighted_values(probs: Tensor, v: Tensor, allowed: Tensor, finite: bool) -> Tensor:
    """(B, N, H, D) sum_j probs[b, h, p, j] v[b, j, h]; probs is 0 outside ``allowed``."""
    if finite:
        return torch.einsum("bhpj,bjhd->bphd", probs, v)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    vs = torch.where(allowed[None, :, :, :, None], v.permute(0, 2, 1, 3)[:, :, None, :, :], zero)
    return (probs[..., None] * vs).sum(-2).transpose(1, 2)


def mixture_bias(n: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                 is_causal: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The mixture of docs/design.md §2 as an additive score bias: (bias, allowed, empty).

    ``allowed`` (H, N, N) is C > 0; ``bias`` (H, N, N) is log C where allowed, -inf elsewhere,
    except on ``empty`` (H, N) rows (kept by no pattern), where it is 0 everywhere, so that a
    softmax over them stays finite; their output must be zeroed by the caller.
    softmax(q k^T scale + bias) is then the mixture, for any attention that takes a float mask.
    """
    c = count_matrix(n, num_heads, segment_lengths, dilation_rates, is_causal=is_causal, device=device,
                     segment_phases=segment_phases)
    allowed = c > 0
    empty = ~allowed.any(dim=-1)
    fill = torch.where(empty, 0.0, float("-inf")).to(dtype)[:, :, None]
    bias = torch.where(allowed, c.clamp(min=1).to(dtype).log(), fill)
    return bias, allowed, empty


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tuple[Tensor, Tensor]:
    """(probs, lse) of a softmax over the last dim restricted to ``allowed`` (broadcast to scores).

    Scores outside ``allowed`` are replaced (``where``, so an inf score never meets -inf and
    makes NaN); a row with nothing allowed must hold finite scores there (see
    :func:`mixture_bias`), and its probabilities are returned as exact zeros.
    """
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(allowed, torch.exp(scores - lse[..., None]),
                        torch.zeros((), dtype=scores.dtype, device=scores.device))
    return probs, lse


def dilated_attention_reference(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                dilation_rates: Sequence[int], *, is_causal: bool = False,
                                scale: Optional[float] = None,
                                score_bias: Optional[Tensor] = None,
                                segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Dense dilated attention. q, k, v: (B, N, H, D), any strides. Returns (out (B, N, H, D), lse (B, N, H)).

    lse is float32 (float64 for float64 inputs). ``score_bias`` (H, N, N), if
    given, is added to the scores (used for the relative-position bias). Rows
    kept by no pattern give out = 0 and lse = -inf with finite gradients.
    ``segment_phases``: one per pattern, default all 0 (see :mod:`longnet.patterns`).
    """
    b, n, h, d = q.shape
    scale = default_scale(d) if scale is None else scale
    bias, allowed, empty = mixture_bias(n, h, segment_lengths, dilation_rates, is_causal=is_causal, dtype=q.dtype,
                                        device=q.device, segment_phases=segment_phases)
    finite = bool(all(torch.isfinite(x).all() for x in (q, k, v)))
    scores = _scores(q, k, allowed, finite) * scale
    if score_bias is not None:
        scores = scores + score_bias.to(scores.dtype)
    probs, lse = masked_softmax(torch.where(allowed, scores + bias, bias), allowed)  # lse (B, H, N)
    out = _weighted_values(probs, v, allowed, finite)
    lse = torch.where(empty[None], torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device), lse)
    return out, lse.transpose(1, 2).to(acc_dtype(q.dtype))


def dilated_attention_reference_varlen(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                       dilation_rates: Sequence[int], *, cu_seqlens: Optional[Tensor] = None,
                                       key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                                       scale: Optional[float] = None,
                                       segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """The oracle for variable lengths: :func:`dilated_attention_reference` run on each sequence alone.

    Packed q, k, v (T, H, D) with ``cu_seqlens``, or padded (B, N, H, D) with
    ``key_padding_mask`` (layouts of :mod:`.varlen_ops`). Rows of no sequence get
    out 0 and lse -inf; autograd through the slices gives them gradient 0.
    """
    from .varlen_ops import sequences
    starts, lengths = sequences(q, cu_seqlens, key_padding_mask)
    h, d = q.shape[-2:]
    fq, fk, fv = (x.reshape(-1, h, d) for x in (q, k, v))
    rows = fq.shape[0]
    outs, lses, pos = [], [], 0
    for s, n in sorted(zip(starts, lengths)):
        if n == 0:
            continue
        if s > pos:  # a gap (padding): zeros and -inf, no kernel
            outs.append(fq.new_zeros(s - pos, h, d))
            lses.append(torch.full((s - pos, h), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device))
        o, l = dilated_attention_reference(fq[None, s:s + n], fk[None, s:s + n], fv[None, s:s + n],
                                           segment_lengths, dilation_rates, is_causal=is_causal, scale=scale,
                                           segment_phases=segment_phases)
        outs.append(o[0])
        lses.append(l[0])
        pos = s + n
    if rows > pos:
        outs.append(fq.new_zeros(rows - pos, h, d))
        lses.append(torch.full((rows - pos, h), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device))
    out = torch.cat(outs) if outs else fq.new_zeros(0, h, d)
    lse = torch.cat(lses) if lses else torch.zeros(0, h, dtype=acc_dtype(q.dtype), device=q.device)
    return out.view(q.shape), lse.view(q.shape[:-1])
