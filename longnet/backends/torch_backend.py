"""The fast path: strided views of each pattern's kept rows, a flash kernel, an exact merge.

No gather copies are made: for a pattern (w, r) and head offset s, the kept
rows of all segments and of all heads with ``h mod r == s`` form the strided
view ``x.view(B, nseg, w, H, D)[:, :, s::r, s::r]``, which PyTorch's flash
kernels read directly. Partial outputs are merged into one output buffer
with the stable update of SPEC.md §7, and the backward calls each partial's
flash backward with the merged out and lse, which is the exact gradient of
the mixture (weights included). Saved for backward: q, k, v, out, lse.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import kernels

__all__ = ["dilated_attention_torch", "iter_units", "unit_view"]


class Unit(NamedTuple):
    """A group of equally long segments and one head offset of one pattern.

    Rows [start, start + nseg * seg_len) cut into ``nseg`` segments of
    ``seg_len``; heads ``offset::rate`` keep rows ``offset::rate`` of each.
    ``batch`` is None for all batch items at once, else one index (used when
    batch and segments cannot share one strided dimension).
    """

    pattern: int
    start: int
    nseg: int
    seg_len: int
    offset: int
    rate: int
    kept: int
    batch: Optional[int]


def iter_units(batch: int, n: int, num_heads: int, segment_lengths: Sequence[int],
               dilation_rates: Sequence[int]) -> Iterator[Unit]:
    """Every (pattern, segment group, head offset) unit, the r = 1 patterns first.

    r = 1 patterns cover every row, so running them first lets the merge start
    from a plain copy.
    """
    order = sorted(range(len(segment_lengths)), key=lambda i: dilation_rates[i] != 1)
    for i in order:
        w, r = min(segment_lengths[i], n), dilation_rates[i]
        n_full, tail = divmod(n, w)
        groups = [(0, n_full, w)] if n_full else []
        if tail:
            groups.append((n_full * w, 1, tail))
        for start, nseg, seg_len in groups:
            # Batch and segment dims merge into one strided dim only if nothing lies between.
            mergeable = batch == 1 or nseg * seg_len == n
            for s in range(min(r, num_heads)):
                if s >= seg_len:
                    continue
                kept = (seg_len - s + r - 1) // r
                if mergeable:
                    yield Unit(i, start, nseg, seg_len, s, r, kept, None)
                else:
                    for b in range(batch):
                        yield Unit(i, start, nseg, seg_len, s, r, kept, b)


def unit_view(x: Tensor, u: Unit) -> Tensor:
    """View of x (B, N, H, *rest) for unit u, as (Z, H_u, kept, *rest); no copy."""
    if u.batch is not None:
        x = x[u.batch:u.batch + 1]
    x = x[:, u.start:u.start + u.nseg * u.seg_len]
    x = x.unflatten(1, (u.nseg, u.seg_len))[:, :, u.offset::u.rate, u.offset::u.rate]
    x = x.flatten(0, 1) if x.shape[0] == 1 or x.shape[1] == 1 else _merge01(x)
    return x.transpose(1, 2)


def _gathered(x: Tensor, u: Unit) -> Tensor:
    """x's kept rows for unit u as (Z, H_u, kept, D): a view for r = 1, else a contiguous copy.

    r = 1 views have the dense (B, N, H, D) layout that the flash kernels are
    tuned for; rows strided by r * H * D are read faster after one copy.
    """
    view = unit_view(x, u)
    return view if u.rate == 1 else view.contiguous()


def group_units(units: Sequence[Unit]) -> List[List[Unit]]:
    """Units of one pattern and segment group whose kept counts agree, in order.

    Their kept rows stack along the head dimension into one kernel call: a
    pattern with rate r needs at most two calls (kept count ceil or floor of
    w/r) instead of r, each with more heads to spread over threads.
    """
    groups: List[List[Unit]] = []
    index = {}
    for u in units:
        key = (u.pattern, u.start, u.nseg, u.seg_len, u.kept, u.batch)
        if key in index:
            groups[index[key]].append(u)
        else:
            index[key] = len(groups)
            groups.append([u])
    return groups


def _heads(u: Unit, num_heads: int) -> int:
    return len(range(u.offset, num_heads, u.rate))


def _stacked(x: Tensor, group: List[Unit]) -> Tensor:
    """(Z, sum of heads, kept, D): the group's kept rows; a view for a lone r = 1 unit."""
    if len(group) == 1:
        return _gathered(x, group[0])
    return torch.cat([unit_view(x, u) for u in group], dim=1)


def _adopt(t: Tensor, b: int, n: int) -> Optional[Tensor]:
    """t (Z, H, L, D) as a (B, N, H, D) tensor without a copy, if its memory allows; else None."""
    x = t.transpose(1, 2)
    if not x.is_contiguous() or x.numel() != b * n * x.shape[2] * x.shape[3]:
        return None
    return x.view(b, n, x.shape[2], x.shape[3])


def _merge01(x: Tensor) -> Tensor:
    # view() raises rather than copies, so a wrong stride assumption cannot go unnoticed.
    return x.view(x.shape[0] * x.shape[1], *x.shape[2:])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def forward_merged(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates,
                   causal: bool, scale: float, force_math: bool = False) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D) in q's dtype, lse (B, N, H)) of the mixture; no autograd."""
    b, n, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates))
    copy_pattern = units[0].pattern if units[0].rate == 1 else None
    lse_dt = kernels.lse_dtype(q.dtype)
    out = lse = None
    if copy_pattern is not None and sum(u.pattern == copy_pattern for u in units) == 1:
        # One r = 1 unit spans everything: its kernel output already is (B, N, H, D) in memory.
        u = units.pop(0)
        o_p, l_p = kernels.attn_fwd(_gathered(q, u), _gathered(k, u), _gathered(v, u), causal, scale,
                                    force_math)
        out = _adopt(o_p, b, n) if o_p.dtype == acc else None
        lse = _adopt(l_p.unsqueeze(-1), b, n) if l_p.dtype == lse_dt else None
        if out is None or lse is None:
            out = torch.empty(b, n, h, d, dtype=acc, device=q.device)
            lse = torch.empty(b, n, h, dtype=lse_dt, device=q.device)
            unit_view(out, u).copy_(o_p)
            unit_view(lse, u).copy_(l_p)
        else:
            lse = lse.squeeze(-1)
    elif copy_pattern is not None:
        # An r = 1 pattern writes every row, so its units can copy into an uninitialised buffer.
        out = torch.empty(b, n, h, d, dtype=acc, device=q.device)
        lse = torch.empty(b, n, h, dtype=lse_dt, device=q.device)
    else:
        out = torch.zeros(b, n, h, d, dtype=acc, device=q.device)
        lse = torch.full((b, n, h), float("-inf"), dtype=lse_dt, device=q.device)
    for group in group_units(units):
        o_g, l_g = kernels.attn_fwd(_stacked(q, group), _stacked(k, group), _stacked(v, group), causal,
                                    scale, force_math)
        sizes = [_heads(u, h) for u in group]
        for u, o_p, l_p in zip(group, o_g.split(sizes, dim=1), l_g.split(sizes, dim=1)):
            ov, lv = unit_view(out, u), unit_view(lse, u)
            if u.pattern == copy_pattern:
                ov.copy_(o_p)
                lv.copy_(l_p)
                continue
            new = torch.logaddexp(lv, l_p)
            # out <- out + sigmoid(l_p - lse) (o_p - out); exact when lse = -inf (weight 1).
            ov.lerp_(o_p.to(acc), torch.sigmoid(l_p - lv).unsqueeze(-1).to(acc))
            lv.copy_(new)
    return out.to(q.dtype), lse


def backward_merged(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    segment_lengths, dilation_rates, causal: bool, scale: float,
                    force_math: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (dq, dk, dv) of the mixture, summing each partial's flash backward."""
    b, n, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates))
    copy_pattern = units[0].pattern if units[0].rate == 1 else None
    grads = None
    if copy_pattern is not None and sum(u.pattern == copy_pattern for u in units) == 1:
        u = units.pop(0)
        parts = kernels.attn_bwd(_gathered(do, u), _gathered(q, u), _gathered(k, u), _gathered(v, u),
                                 _gathered(out, u), unit_view(lse, u), causal, scale, force_math)
        adopted = [_adopt(p, b, n) if p.dtype == acc else None for p in parts]
        if all(a is not None for a in adopted):
            grads = adopted
        else:
            grads = [torch.empty(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]
            for g, p in zip(grads, parts):
                unit_view(g, u).copy_(p)
    if grads is None:
        alloc = torch.empty if copy_pattern is not None else torch.zeros
        grads = [alloc(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]
    for group in group_units(units):
        lse_g = torch.cat([unit_view(lse, u) for u in group], dim=1)
        parts = kernels.attn_bwd(_stacked(do, group), _stacked(q, group), _stacked(k, group),
                                 _stacked(v, group), _stacked(out, group), lse_g, causal, scale, force_math)
        sizes = [_heads(u, h) for u in group]
        for g, p in zip(grads, parts):
            for u, p_u in zip(group, p.split(sizes, dim=1)):
                if u.pattern == copy_pattern:
                    unit_view(g, u).copy_(p_u)
                else:
                    unit_view(g, u).add_(p_u)
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_lengths, dilation_rates, causal, scale, force_math):
        out, lse = forward_merged(q, k, v, segment_lengths, dilation_rates, causal, scale, force_math)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (segment_lengths, dilation_rates, causal, scale, force_math)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        segment_lengths, dilation_rates, causal, scale, force_math = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            # d lse_p / d s_pj = P_pj, so an lse gradient adds P * dlse to dS. Append a column of
            # ones to v (dP gains dlse) and of zeros to out (the row term D is unchanged): the
            # same exact partial-by-partial backward then carries it.
            def pad(x, value):
                return torch.cat([x, torch.full_like(x[..., :1], value)], -1)
            # q and k get a zero column so all head dims agree and the scores are unchanged.
            dq, dk, dv = backward_merged(
                torch.cat([dout, dlse.unsqueeze(-1).to(dout.dtype)], -1),
                pad(q, 0.0), pad(k, 0.0), pad(v, 1.0), pad(out, 0.0),
                lse, segment_lengths, dilation_rates, causal, scale, force_math)
            dq, dk = dq[..., :-1], dk[..., :-1]
            dv = dv[..., :-1]
        else:
            dq, dk, dv = backward_merged(dout.contiguous(), q, k, v, out, lse, segment_lengths,
                                         dilation_rates, causal, scale, force_math)
        return dq, dk, dv, None, None, None, None, None


def dilated_attention_torch(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, *,
                            is_causal: bool = False, scale: float, force_math: bool = False
                            ) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse (B, N, H)); see the module docstring."""
    return _DilatedAttentionFn.apply(q, k, v, tuple(segment_lengths), tuple(dilation_rates),
                                     bool(is_causal), float(scale), bool(force_math))
