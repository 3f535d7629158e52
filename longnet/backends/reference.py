"""The dense oracle: SPEC.md §2 written as one masked softmax.

``o = softmax(q k^T * scale + log C) v`` where ``C[h, p, j]`` counts the
patterns in which query p and key j share a segment and are both kept by
head h (and ``j <= p`` when causal). It materialises (B, H, N, N) scores, so
it is for small N only; every fast backend is tested against it, forward and
backward (autograd through plain torch ops gives the exact gradient).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["count_matrix", "dilated_attention_reference", "keep_mask"]


def keep_mask(n: int, num_heads: int, segment_length: int, dilation_rate: int,
              device=None) -> Tensor:
    """(H, N) bool: rows kept by one pattern in each head (offset h mod r)."""
    pos = torch.arange(n, device=device)
    within = pos % segment_length
    heads = torch.arange(num_heads, device=device)
    offset = (heads % dilation_rate)[:, None]
    return (within[None, :] % dilation_rate) == offset


def count_matrix(n: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, is_causal: bool = False,
                 device=None) -> Tensor:
    """(H, N, N) int64: C[h, p, j] of SPEC.md §2."""
    pos = torch.arange(n, device=device)
    c = torch.zeros(num_heads, n, n, dtype=torch.int64, device=device)
    for w, r in zip(segment_lengths, dilation_rates):
        seg = pos // w
        same = seg[:, None] == seg[None, :]
        kept = keep_mask(n, num_heads, w, r, device=device)
        c += (same[None] & kept[:, :, None] & kept[:, None, :]).long()
    if is_causal:
        c = c * torch.tril(torch.ones(n, n, dtype=torch.int64, device=device))
    return c


def dilated_attention_reference(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                dilation_rates: Sequence[int], *, is_causal: bool = False,
                                scale: Optional[float] = None,
                                score_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Dense dilated attention. q, k, v: (B, N, H, D). Returns (out (B, N, H, D), lse (B, N, H) fp32).

    ``score_bias`` (H, N, N), if given, is added to the scores (used for the
    relative-position bias). Rows kept by no pattern give out = 0 and
    lse = -inf with finite gradients.
    """
    b, n, h, d = q.shape
    if scale is None:
        scale = d ** -0.5
    c = count_matrix(n, h, segment_lengths, dilation_rates, is_causal=is_causal, device=q.device)
    empty = (c == 0).all(dim=-1)  # (H, N)
    # Empty rows get a finite dummy bias so softmax stays finite; their output is zeroed below.
    log_c = torch.where(c > 0, c.to(q.dtype).log(), torch.full((), float("-inf"), dtype=q.dtype,
                                                                    device=q.device))
    log_c = torch.where(empty[:, :, None], torch.zeros((), dtype=q.dtype, device=q.device), log_c)
    scores = torch.einsum("bphd,bjhd->bhpj", q, k) * scale + log_c
    if score_bias is not None:
        scores = scores + score_bias.to(scores.dtype)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, N)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhpj,bjhd->bphd", probs, v)
    keep = (~empty).T[None, :, :, None]  # (1, N, H, 1)
    out = out * keep.to(out.dtype)
    lse = torch.where(empty[None], torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device), lse)
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.transpose(1, 2).to(lse_dt)
