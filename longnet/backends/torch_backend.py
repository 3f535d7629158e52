"""The fast path: strided views of each pattern's kept rows, a flash kernel, an exact merge.

No gather copies are made for r = 1: for a pattern (w, r) and head offset s,
the kept rows of all segments and of all heads with ``h mod r == s`` form the
strided view ``x.unflatten(1, (nseg, w))[:, :, s::r, s::r]``, which PyTorch's
flash kernels read directly. For r > 1 the head offsets of a pattern share one
kernel call, fed by one copy that reads x in order (:func:`_diagonal_pairs`).
Inputs may have any strides (a transposed (B, H, N, D) tensor, a slice of a
fused qkv, ...): batch items and segments share one kernel batch dimension when
the strides allow it, else each batch item is a call of its own; only a last
dimension that is not contiguous is copied, because the kernels need it. Large
groups are split over several calls (:func:`_calls`), which bounds the memory of
copies and kernel outputs. Partial outputs are merged into one output buffer
with the stable update of docs/design.md §7, and the backward calls each partial's
flash backward with the merged out and lse, which is the exact gradient of
the mixture (weights included). Saved for backward: q, k, v, out, lse.
The entry point, its autograd and its ``torch.library`` registration are in
:mod:`.custom_ops`; a gradient flowing into lse is handled in :mod:`.lse_grad`.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import heads_with_offset, kept_count, segment_groups, used_offsets
from . import band as _band, kernels
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


def _segments(x: Tensor, u: Unit) -> Tensor:
    """View of x (B, N, H, *rest), any strides, as (Z, seg_len, H, *rest): u's segments; no copy."""
    if u.batch is not None:
        x = x[u.batch:u.batch + 1]
    x = x[:, u.start:u.start + u.nseg * u.seg_len].unflatten(1, (u.nseg, u.seg_len))
    return x.flatten(0, 1) if x.shape[0] == 1 or x.shape[1] == 1 else _merge01(x)


def unit_view(x: Tensor, u: Unit) -> Tensor:
    """View of x (B, N, H, *rest), any strides, for unit u, as (Z, H_u, kept, *rest); no copy."""
    return _segments(x, u)[:, u.offset::u.rate, u.offset::u.rate].transpose(1, 2)


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


# Bytes of one gathered tensor or kernel output per kernel call; see :func:`_calls`.
_CALL_BYTES = 256 * 2**20


def _heads(u: Unit, num_heads: int) -> int:
    return len(heads_with_offset(u.offset, u.rate, num_heads))


def _diagonal(group: List[Unit], num_heads: int) -> bool:
    """Whether the group's kept rows are diagonals of (row mod r, head mod r) blocks (see :func:`_pairs`)."""
    r = group[0].rate
    offsets = [u.offset for u in group]
    return (r > 1 and (num_heads % r == 0 or r >= num_heads)
            and offsets == list(range(offsets[0], offsets[0] + len(offsets))))


def _diagonal_pairs(x: Tensor, part: Tensor, group: List[Unit], num_heads: int,
                    zs: slice) -> List[Tuple[Tensor, Tensor]]:
    """(view of x, view of part) pairs covering the group, as strided diagonals; see :func:`_pairs`.

    Row j*r + s of a segment is kept by heads t*c + s (t < T), with c = r and T = H / r when
    r divides H, else (r >= H) c = H and T = 1. Viewing the segment's rows as (j, s) and its
    heads as (t, s'), the kept rows are the diagonal s = s' < c. Read in that order, each
    block of r rows is streamed once for all offsets together, instead of once per offset
    with a stride of r rows. Offsets s < seg_len mod r keep one more row, from the segment's
    last, partial block.
    """
    u0, r = group[0], group[0].rate
    c = min(r, num_heads)
    t = num_heads // c
    full, extra = divmod(u0.seg_len, r)
    s0, s1 = u0.offset, group[-1].offset + 1
    seg = _segments(x, u0)[zs]  # (Z, w, H, *rest)
    p = part.transpose(1, 2).unflatten(2, (s1 - s0, t))  # (Z, kept, offsets, T, *rest)
    pairs = []
    if full:
        main = seg[:, :full * r].unflatten(1, (full, r)).narrow(2, 0, c).unflatten(3, (t, c))
        main = main.diagonal(0, 2, 4).movedim(-1, 2)  # (Z, full, c, T, *rest)
        pairs.append((main[:, :, s0:s1], p[:, :full]))
    if u0.kept > full:
        e = min(extra, c)  # this group's offsets are 0 .. e - 1
        last = seg[:, full * r:full * r + e].unflatten(2, (t, c)).narrow(3, 0, e).diagonal(0, 1, 3).movedim(-1, 1)
        pairs.append((last, p[:, full]))  # (Z, e, T, *rest)
    return pairs


def _pairs(x: Tensor, part: Tensor, group: List[Unit], num_heads: int,
           zs: slice = slice(None)) -> List[Tuple[Tensor, Tensor]]:
    """Equal-shaped (view of x, view of part) pairs that together cover the group's kept rows.

    x is (B, N, H, *rest), part (Z', sum of heads, kept, *rest) with the group's units
    stacked along heads, for the slice ``zs`` of the group's Z (batch x segment) items.
    Gathering copies each x view into its part view; merging goes the other way.
    No copies are made here.
    """
    if _diagonal(group, num_heads):
        return _diagonal_pairs(x, part, group, num_heads, zs)
    sizes = [_heads(u, num_heads) for u in group]
    return list(zip((unit_view(x, u)[zs] for u in group), part.split(sizes, dim=1)))


def _calls(units: Sequence[Unit], batch: int, num_heads: int, row_bytes: int) -> List[Tuple[List[Unit], slice]]:
    """(group, slice of its Z items) per kernel call: one call per group unless it is large.

    A group whose gathered tensors would exceed ``_CALL_BYTES`` (``row_bytes``: bytes of
    one row of one head) is split over its Z (batch x segment) items, which bounds the
    copies and kernel outputs alive at once (at 1M tokens, the r = 1 group's kernel
    outputs alone would be 1.5 GiB each in bf16).
    """
    calls = []
    for group in group_units(units):
        u0 = group[0]
        z = u0.nseg * (batch if u0.batch is None else 1)
        per_z = u0.kept * sum(_heads(u, num_heads) for u in group) * row_bytes
        step = max(1, _CALL_BYTES // max(1, per_z))
        calls += [(group, slice(i, min(i + step, z))) for i in range(0, z, step)]
    return calls


def _gather(x: Tensor, group: List[Unit], num_heads: int, zs: slice = slice(None)) -> Tensor:
    """(Z, sum of heads, kept, *rest): the group's kept rows of x (B, N, H, *rest).

    A lone r = 1 unit is a view: it has the dense (B, N, H, D) layout that the
    flash kernels are tuned for. Otherwise one copy into a buffer laid out
    (Z, kept, heads, *rest), which the kernels read as fast as a dense input.
    """
    u0 = group[0]
    if len(group) == 1 and u0.rate == 1:
        return unit_view(x, u0)[zs]
    z = len(range(u0.nseg * (x.shape[0] if u0.batch is None else 1))[zs])
    heads = sum(_heads(u, num_heads) for u in group)
    part = torch.empty((z, u0.kept, heads, *x.shape[3:]), dtype=x.dtype, device=x.device).transpose(1, 2)
    for xv, pv in _pairs(x, part, group, num_heads, zs):
        pv.copy_(xv)
    return part


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
    """Merge one partial (o_p, l_p) into views (out, lse) in place: the stable update of docs/design.md §7.

    out <- out + sigmoid(l_p - lse) (o_p - out); the weight is 1 where lse = -inf.
    """
    new = torch.logaddexp(lse, l_p)
    out.lerp_(o_p.to(out.dtype), torch.sigmoid(l_p - lse).unsqueeze(-1).to(out.dtype))
    lse.copy_(new)


def _first_plan(calls: List[Tuple[List[Unit], slice]], fresh: bool) -> Tuple[Optional[int], bool]:
    """(copy_pattern, adopt) for filling fresh buffers.

    The first r = 1 pattern (``iter_units`` puts them first) writes every row,
    so into fresh buffers it copies instead of merging; when it is a single
    kernel call, its output is laid out as the whole buffer and is adopted.
    """
    if not fresh or not calls or calls[0][0][0].rate != 1:
        return None, False
    first = calls[0][0][0].pattern
    return first, sum(g[0].pattern == first for g, _ in calls) == 1


def _run_mixture(inputs: Sequence[Tensor], num_heads: int, units: Sequence[Unit], kernel: Callable, acc: torch.dtype,
                 targets: Optional[List[Tensor]], fresh: Callable[[bool], List[Tensor]],
                 combine: Callable[[Sequence[Tensor], Sequence[Tensor]], None]) -> Optional[List[Tensor]]:
    """The skeleton of the forward merge and the backward sum: one kernel call per group of units.

    ``inputs`` (B, N, H, ...) are gathered per call and passed to ``kernel``, which returns
    one part per target; each part is (Z, heads, kept, D) or, for per-row quantities like
    lse, (Z, heads, kept). Parts go into ``targets`` (B, N, H, ...) through ``combine(target
    views, part views)``, or, with no targets given, into fresh ones: the first r = 1 pattern
    is copied (or its single call's parts, in ``acc``, adopted as the buffers; see :func:`_first_plan`),
    into ``fresh(copy)``'s buffers, which need no initial value when ``copy`` is true.
    Returns the targets, None when there was no unit at all.
    """
    b, n = inputs[0].shape[:2]
    calls = _calls(list(units), b, num_heads, inputs[0].shape[-1] * 4)
    copy_pattern, adopt = _first_plan(calls, fresh=targets is None)
    for group, zs in calls:
        parts = kernel(*(_gather(x, group, num_heads, zs) for x in inputs))
        if targets is None:
            if adopt:
                adopted = [_adopt(p if p.dim() == 4 else p.unsqueeze(-1), b, n, acc) for p in parts]
                if all(a is not None for a in adopted):
                    targets = [a if p.dim() == 4 else a.squeeze(-1) for a, p in zip(adopted, parts)]
                    continue
            targets = fresh(copy_pattern is not None)
        views = [_pairs(t, p, group, num_heads, zs) for t, p in zip(targets, parts)]
        for pairs in zip(*views):  # the same rows of every target
            dst, src = [d for d, _ in pairs], [s for _, s in pairs]
            if group[0].pattern == copy_pattern:
                for d, s in zip(dst, src):
                    d.copy_(s)
            else:
                combine(dst, src)
    return targets


def merge_patterns(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, causal: bool,
                   scale: float, force_math: bool = False, out: Optional[Tensor] = None,
                   lse: Optional[Tensor] = None, segment_phases: Optional[Sequence[int]] = None
                   ) -> Tuple[Tensor, Tensor]:
    """Merge every pattern's partial attention into out (B, N, H, D) and lse (B, N, H).

    Given buffers are merged into in place; without them, fresh ones are made
    (out in the accumulation dtype) and returned (see :func:`_run_mixture`).
    ``segment_phases``: one per pattern, None for all 0 (see :func:`iter_units`).
    Short r = 1 patterns (the local window) go last, together, as one band (:mod:`.band`).
    """
    b, n, h, d = q.shape
    band = _band.split(n, segment_lengths, dilation_rates, segment_phases, q, k, force_math)
    if band is not None:
        segment_lengths, dilation_rates, segment_phases = band.rest_lengths, band.rest_rates, band.rest_phases
    acc = acc_dtype(q.dtype)

    def fresh(copy: bool) -> List[Tensor]:
        if copy:
            return [q.new_empty((b, n, h, d), dtype=acc), q.new_empty((b, n, h), dtype=acc)]
        return [q.new_zeros((b, n, h, d), dtype=acc), q.new_full((b, n, h), float("-inf"), dtype=acc)]

    units = iter_units(b, n, h, segment_lengths, dilation_rates, (q, k, v), segment_phases)
    merged = _run_mixture((q, k, v), h, units, lambda *x: kernels.attn_fwd(*x, causal, scale, force_math), acc,
                          None if out is None else [out, lse], fresh, lambda dst, src: merge_partial(*dst, *src))
    out, lse = merged if merged is not None else (None, None)
    if band is not None:
        out, lse = _band.merge_into(q, k, v, causal, scale, band, force_math, out, lse, merge_partial)
    if out is None:  # no pattern at all (sequence parallelism with only cross-rank patterns)
        out, lse = fresh(False)
    return out, lse


def accumulate_grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     segment_lengths, dilation_rates, causal: bool, scale: float,
                     force_math: bool = False, grads: Optional[Sequence[Tensor]] = None,
                     segment_phases: Optional[Sequence[int]] = None) -> List[Tensor]:
    """Exact (dq, dk, dv) of the mixture: each partial's flash backward at the merged out and lse.

    Adds into given ``grads`` (B, N, H, D) in place, or makes and returns fresh
    ones in the accumulation dtype (see :func:`_run_mixture`); the band last, as in :func:`merge_patterns`.
    """
    b, n, h, d = q.shape
    band = _band.split(n, segment_lengths, dilation_rates, segment_phases, q, k, force_math)
    if band is not None:
        segment_lengths, dilation_rates, segment_phases = band.rest_lengths, band.rest_rates, band.rest_phases
    acc = acc_dtype(q.dtype)

    def fresh(copy: bool) -> List[Tensor]:
        return [(torch.empty if copy else torch.zeros)(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]

    def add(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
        for g, p in zip(dst, src):
            g.add_(p)

    units = iter_units(b, n, h, segment_lengths, dilation_rates, (do, q, k, v, out, lse, *(grads or ())),
                       segment_phases)
    summed = _run_mixture((do, q, k, v, out, lse), h, units,
                          lambda *x: kernels.attn_bwd(*x, causal, scale, force_math), acc,
                          None if grads is None else list(grads), fresh, add)
    if band is not None:
        summed = _band.add_grads(do, q, k, v, out, lse, causal, scale, band, force_math, summed)
    return list(summed) if summed is not None else fresh(False)
