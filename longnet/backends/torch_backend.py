"""The fast path: strided views of each pattern's kept rows, a flash kernel, an exact merge.

No gather copies are made for r = 1: for a pattern (w, r) and head offset s,
the kept rows of all segments and of all heads with ``h mod r == s`` form the
strided view ``x.unflatten(1, (nseg, w))[:, :, s::r, s::r]``, which PyTorch's
flash kernels read directly. Inputs may have any strides (a transposed
(B, H, N, D) tensor, a slice of a fused qkv, ...): batch items and segments
share one kernel batch dimension when the strides allow it, else each batch
item is a call of its own; only a last dimension that is not contiguous is
copied, because the kernels need it. Partial outputs are merged into one output buffer
with the stable update of SPEC.md §7, and the backward calls each partial's
flash backward with the merged out and lse, which is the exact gradient of
the mixture (weights included). Saved for backward: q, k, v, out, lse.
The entry point, its autograd and its ``torch.library`` registration are in
:mod:`.custom_ops`; a gradient flowing into lse is handled in :mod:`.lse_grad`.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import heads_with_offset, kept_count, segment_groups, used_offsets
from . import kernels
from .numerics import acc_dtype

__all__ = ["iter_units", "unit_view", "group_units", "merge_patterns", "accumulate_grads", "merge_partial",
           "acc_dtype"]


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


def _mergeable(tensors: Sequence[Tensor], batch: int, n: int, nseg: int, seg_len: int) -> bool:
    """Whether batch and segment dims of every tensor (B, N, ...) merge into one strided dim.

    They do when one of them has size 1, or when the segments cover the whole
    sequence and every tensor steps from one batch item to the next by N rows
    (true of contiguous (B, N, ...) buffers, false of e.g. a transposed (B, H, N, D)).
    """
    if batch == 1 or nseg == 1:
        return True
    return nseg * seg_len == n and all(t.stride(0) == n * t.stride(1) for t in tensors)


def iter_units(batch: int, n: int, num_heads: int, segment_lengths: Sequence[int],
               dilation_rates: Sequence[int], tensors: Sequence[Tensor] = (),
               segment_phases: Optional[Sequence[int]] = None) -> Iterator[Unit]:
    """Every (pattern, segment group, head offset) unit, the r = 1 patterns first.

    ``tensors``: the (B, N, ...) tensors the units will be viewed on, when their
    strides may differ from a contiguous layout (see :func:`_mergeable`).
    r = 1 patterns cover every row, so running them first lets the merge start
    from a plain copy. A pattern with a segment phase has up to three groups
    (:func:`longnet.patterns.segment_groups`): the leading segment, the full
    ones, the tail.
    """
    phases = segment_phases or (0,) * len(segment_lengths)
    order = sorted(range(len(segment_lengths)), key=lambda i: dilation_rates[i] != 1)
    for i in order:
        r = dilation_rates[i]
        for start, nseg, seg_len in segment_groups(n, segment_lengths[i], phases[i]):
            batches = [None] if _mergeable(tensors, batch, n, nseg, seg_len) else range(batch)
            for s in used_offsets(r, num_heads):
                kept = kept_count(seg_len, s, r)
                if kept == 0:
                    continue
                for b in batches:
                    yield Unit(i, start, nseg, seg_len, s, r, kept, b)


def unit_view(x: Tensor, u: Unit) -> Tensor:
    """View of x (B, N, H, *rest), any strides, for unit u, as (Z, H_u, kept, *rest); no copy."""
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
    return len(heads_with_offset(u.offset, u.rate, num_heads))


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
                   lse: Optional[Tensor] = None, segment_phases: Optional[Sequence[int]] = None
                   ) -> Tuple[Tensor, Tensor]:
    """Merge every pattern's partial attention into out (B, N, H, D) and lse (B, N, H).

    Given buffers are merged into in place; without them, fresh ones are made
    (out in the accumulation dtype) and returned (see :func:`_first_plan`).
    ``segment_phases``: one per pattern, None for all 0 (see :func:`iter_units`).
    """
    b, n, h, d = q.shape
    acc = lse_dt = acc_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates, (q, k, v), segment_phases))
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
                     force_math: bool = False, grads: Optional[Sequence[Tensor]] = None,
                     segment_phases: Optional[Sequence[int]] = None) -> List[Tensor]:
    """Exact (dq, dk, dv) of the mixture: each partial's flash backward at the merged out and lse.

    Adds into given ``grads`` (B, N, H, D) in place, or makes and returns fresh
    ones in the accumulation dtype (see :func:`_first_plan`).
    """
    b, n, h, d = q.shape
    acc = acc_dtype(q.dtype)
    units = list(iter_units(b, n, h, segment_lengths, dilation_rates, (do, q, k, v, out, lse, *(grads or ())),
                            segment_phases))
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
