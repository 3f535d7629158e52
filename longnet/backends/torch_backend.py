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

__all__ = ["dilated_attention_torch", "iter_units", "unit_view", "group_units", "merge_patterns",
           "accumulate_grads", "merge_partial", "pad_last", "acc_dtype"]


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


def _adopt(t: Tensor, b: int, n: int, dtype: torch.dtype) -> Optional[Tensor]:
    """t (Z, H, L, *rest) as (B, N, H, *rest) without a copy, if its dtype and memory allow."""
    x = t.transpose(1, 2)
    if x.dtype != dtype or not x.is_contiguous() or x.shape[0] * x.shape[1] != b * n:
        return None
    return x.view(b, n, *x.shape[2:])


def _merge01(x: Tensor) -> Tensor:
    # view() raises rather than copies, so a wrong stride assumption cannot go unnoticed.
    return x.view(x.shape[0] * x.shape[1], *x.shape[2:])


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of outputs and gradients: fp32 for half types."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def pad_last(x: Tensor, value: float) -> Tensor:
    """x with one more column of ``value`` in its last dimension."""
    return torch.cat([x, torch.full_like(x[..., :1], value)], -1)


def merge_partial(out: Tensor, lse: Tensor, o_p: Tensor, l_p: Tensor) -> None:
    """Merge one partial (o_p, l_p) into views (out, lse) in place: the stable update of SPEC.md §7.

    out <- out + sigmoid(l_p - lse) (o_p - out); the weight is 1 where lse = -inf.
    """
    new = torch.logaddexp(lse, l_p)
    out.lerp_(o_p.to(out.dtype), torch.sigmoid(l_p - lse).unsqueeze(-1).to(out.dtype))
    lse.copy_(new)


def _first_plan(units: List[Unit], fresh: bool) -> Tuple[Optional[int], bool]:
    """(copy_pattern, adopt) for filling fresh buffers.

    The first r = 1 pattern (``iter_units`` puts them first) writes every row,
    so into fresh buffers it copies instead of merging; when it is a single
    unit, its kernel output is laid out as the whole buffer and is adopted.
    """
    if not fresh or not units or units[0].rate != 1:
        return None, False
    first = units[0].pattern
    return first, sum(u.pattern == first for u in units) == 1


def merge_patterns(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, causal: bool,
                   scale: float, force_math: bool = False, out: Optional[Tensor] = None,
                   lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Merge every pattern's partial attention into out (B, N, H, D) and lse (B, N, H).

    Given buffers are merged into in place; without them, fresh ones are made
    (out in the accumulation dtype) and returned (see :func:`_first_plan`).
    """
    b, n, h, d = q.shape
    acc, lse_dt = acc_dtype(q.dtype), kernels.lse_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates))
    copy_pattern, adopt = _first_plan(units, fresh=out is None)
    for group in group_units(units):
        o_g, l_g = kernels.attn_fwd(_stacked(q, group), _stacked(k, group), _stacked(v, group), causal,
                                    scale, force_math)
        if out is None:
            if adopt:
                out, lse = _adopt(o_g, b, n, acc), _adopt(l_g.unsqueeze(-1), b, n, lse_dt)
                if out is not None and lse is not None:
                    lse = lse.squeeze(-1)
                    continue
            alloc = torch.empty if copy_pattern is not None else torch.zeros
            out = alloc(b, n, h, d, dtype=acc, device=q.device)
            lse = torch.empty((b, n, h), dtype=lse_dt, device=q.device) if copy_pattern is not None \
                else torch.full((b, n, h), float("-inf"), dtype=lse_dt, device=q.device)
        sizes = [_heads(u, h) for u in group]
        for u, o_p, l_p in zip(group, o_g.split(sizes, dim=1), l_g.split(sizes, dim=1)):
            if u.pattern == copy_pattern:
                unit_view(out, u).copy_(o_p)
                unit_view(lse, u).copy_(l_p)
            else:
                merge_partial(unit_view(out, u), unit_view(lse, u), o_p, l_p)
    if out is None:  # no pattern at all (sequence parallelism with only cross-rank patterns)
        out = torch.zeros(b, n, h, d, dtype=acc, device=q.device)
        lse = torch.full((b, n, h), float("-inf"), dtype=lse_dt, device=q.device)
    return out, lse


def accumulate_grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     segment_lengths, dilation_rates, causal: bool, scale: float,
                     force_math: bool = False, grads: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """Exact (dq, dk, dv) of the mixture: each partial's flash backward at the merged out and lse.

    Adds into given ``grads`` (B, N, H, D) in place, or makes and returns fresh
    ones in the accumulation dtype (see :func:`_first_plan`).
    """
    b, n, h, d = q.shape
    acc = acc_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates))
    copy_pattern, adopt = _first_plan(units, fresh=grads is None)
    for group in group_units(units):
        parts = kernels.attn_bwd(_stacked(do, group), _stacked(q, group), _stacked(k, group),
                                 _stacked(v, group), _stacked(out, group), _stacked(lse, group), causal,
                                 scale, force_math)
        if grads is None:
            if adopt:
                adopted = [_adopt(p, b, n, acc) for p in parts]
                if all(a is not None for a in adopted):
                    grads = adopted
                    continue
            alloc = torch.empty if copy_pattern is not None else torch.zeros
            grads = [alloc(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]
        sizes = [_heads(u, h) for u in group]
        for g, p in zip(grads, parts):
            for u, p_u in zip(group, p.split(sizes, dim=1)):
                if u.pattern == copy_pattern:
                    unit_view(g, u).copy_(p_u)
                else:
                    unit_view(g, u).add_(p_u)
    if grads is None:
        grads = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]
    return list(grads)


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_lengths, dilation_rates, causal, scale, force_math):
        out, lse = merge_patterns(q, k, v, segment_lengths, dilation_rates, causal, scale, force_math)
        out = out.to(q.dtype)
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
        d = q.shape[-1]
        if dlse is not None:
            # d lse_p / d s_pj = P_pj, so an lse gradient adds P * dlse to dS. A column of ones on
            # v (dP gains dlse) and of zeros on out (the row term is unchanged) let the same exact
            # backward carry it; q and k get zero columns so head dims agree and scores are unchanged.
            dout = torch.cat([dout, dlse.unsqueeze(-1).to(dout.dtype)], -1)
            q, k, v, out = pad_last(q, 0.0), pad_last(k, 0.0), pad_last(v, 1.0), pad_last(out, 0.0)
        # contiguous(): autograd may hand over an expanded (stride-0) gradient.
        grads = accumulate_grads(dout.contiguous(), q, k, v, out, lse, segment_lengths, dilation_rates,
                                 causal, scale, force_math)
        dq, dk, dv = (g[..., :d].to(q.dtype) for g in grads)
        return dq, dk, dv, None, None, None, None, None


def dilated_attention_torch(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, *,
                            is_causal: bool = False, scale: float, force_math: bool = False
                            ) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, D), lse (B, N, H)); see the module docstring."""
    return _DilatedAttentionFn.apply(q, k, v, tuple(segment_lengths), tuple(dilation_rates),
                                     bool(is_causal), float(scale), bool(force_math))
