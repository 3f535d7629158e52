"""Dilated attention with an additive score bias on original positions (slow path).

Used for ``DilatedAttention(use_rel_pos_bias=True)``. For each pattern unit
(see :mod:`.torch_backend`) it gathers the kept rows, materialises that
segment group's (m x m) scores plus ``bias_fn(rel)`` and differentiates with
plain autograd, so the bias table gets exact gradients too. Memory is
O(B * nseg * H * m^2) per unit instead of flash's O(m): use it for moderate N.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .numerics import acc_dtype
from .reference import masked_softmax
from .torch_backend import iter_units, unit_view

__all__ = ["dilated_attention_biased"]


def dilated_attention_biased(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                             dilation_rates: Sequence[int], *, is_causal: bool, scale: float,
                             bias_fn: Callable[[Tensor], Tensor],
                             segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """q, k, v (B, N, H, D), any strides -> (out (B, N, H, D), lse (B, N, H) fp32, fp64 for fp64).

    ``bias_fn(rel)`` maps a LongTensor of original-position differences
    ``rel[i, j] = pos_i - pos_j`` of shape (m, m) to a bias of shape (H, m, m).
    ``segment_phases``: validated, one per pattern, None for all 0.
    """
    b, n, h, d = q.shape
    acc = acc_dtype(q.dtype)
    n_pat = len(segment_lengths)
    outs = [torch.zeros(b, n, h, d, dtype=acc, device=q.device) for _ in range(n_pat)]
    lses = [torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device) for _ in range(n_pat)]
    for u in iter_units(b, n, h, segment_lengths, dilation_rates, (q, k, v), segment_phases):
        qu, ku, vu = (unit_view(x, u).to(acc) for x in (q, k, v))  # (Z, Hs, m, D)
        idx = torch.arange(u.kept, device=q.device)
        rel = (idx[:, None] - idx[None, :]) * u.rate
        bias = bias_fn(rel)[u.offset::u.rate].to(acc)  # (Hs, m, m)
        s = torch.matmul(qu, ku.transpose(-1, -2)) * scale + bias
        allowed = rel >= 0 if is_causal else torch.ones_like(rel, dtype=torch.bool)
        probs, lse_u = masked_softmax(s.masked_fill(~allowed, float("-inf")), allowed)
        o_u = torch.matmul(probs, vu)
        # copy_ into views of non-leaf buffers is recorded by autograd (CopySlices).
        unit_view(outs[u.pattern], u).copy_(o_u)
        unit_view(lses[u.pattern], u).copy_(lse_u)
    lse_all = torch.stack(lses)  # (P, B, N, H)
    empty = torch.isinf(lse_all).all(0)
    # Rows no pattern keeps: feed zeros so logsumexp's backward stays finite; masked below.
    lse_safe = torch.where(empty[None], torch.zeros((), dtype=acc, device=q.device), lse_all)
    lse = torch.logsumexp(lse_safe, dim=0)
    weights = torch.exp(lse_safe - lse[None]) * (~empty)[None].to(acc)
    out = sum(wt.unsqueeze(-1) * o for wt, o in zip(weights, outs))
    lse = lse.masked_fill(empty, float("-inf"))
    return out.to(q.dtype), lse
