"""Sequence-parallel dilated attention (docs/design.md §4): one sequence split over P ranks.

Rank i of ``group`` (P ranks) holds positions [i*L, (i+1)*L) of a sequence of
N = P*L positions; q, k, v, out are (B, L, H, D) and lse is (B, L, H). The
result on each rank is its block of the single-device result (docs/design.md §2,
with segment phases if given, see :mod:`longnet.patterns`): out and lse, and
the gradients of q, k, v.

Per pattern (w, r, φ), with w' = min(w, N) and φ' = min(φ, N):

* Local: every segment lies inside one block (φ = 0 and L % w' == 0).
  Computed locally, no traffic.
* Cross-rank (w' > L): every segment is whole blocks, so the ranks
  [a/L, e/L) share the segment [a, e). Each rank packs its kept k and v rows
  (B, L/r, H, D) — row ``t*r + h mod r`` for head h — and all-gathers them
  within those ranks. Its kept queries attend to the gathered kept keys; when
  causal, keys of later ranks are skipped and the own block is attended
  causally. In the backward, the gradients of the gathered keys and values
  are reduce-scattered back.
* Halo (φ > 0 and w' <= L): a shifted segment may straddle the boundary of
  two neighbouring blocks (at most one segment per boundary, as w' <= L).
  Each rank computes its own rows of the pattern locally, with the segments
  cut at its block's ends (phase ``(φ - i*L) mod w'`` inside the block), and
  exchanges the kept k and v rows of a straddling segment with the neighbour
  point-to-point: its kept queries there attend to the neighbour's kept keys
  of that segment too (all visible: earlier positions, or when not causal
  later ones; causal attention needs only the left neighbour's rows). In the
  backward, the gradients of the received rows are sent back to their owner.

Traffic per rank and phase (forward; the backward moves as much):
cross-rank patterns (m - 1) * 2 * B * (L/r) * H * D elements each way, m =
ranks sharing the segment, at most 2 * B * (w/r) * H * D; halo patterns
2 * B * (rows/r) * H * D per message, rows < w' the straddling segment's rows
on the sending rank, at most one message per neighbour. Neither grows with N.

The patterns are merged with the stable update of docs/design.md §7, and the
backward calls each partial's flash backward with the merged out and lse,
which is the exact gradient of the mixture. A gradient flowing into lse is
supported too, carried in extra head-dim columns (:func:`.lse_grad.lse_columns`).

Compatibility rule (checked by :func:`check_sequence_parallel`): for every
pattern, with w' = min(w, P*L) and φ' = min(φ, P*L),

* φ = 0 (docs/design.md): if w' <= L: L % w' == 0 (segments do not straddle two
  blocks); if w' > L: w' % L == 0 (a segment is whole blocks) and L % r == 0
  (every block starts at a kept-row phase of 0, so all ranks keep the same
  local rows);
* φ > 0: if w' <= L (halo exchange, P > 1): L, w' and φ are multiples of r
  (the pieces of a straddling segment keep the rows of whole groups of r);
  if w' > L: w' % L == 0, φ' % L == 0 and L % r == 0 (whole blocks again).

All ranks of ``group`` must call the op together with the same B, L, H, D,
dtype, patterns and flags (collectives do not re-check shapes).

Validation happens once per split: :func:`plan_sequence_parallel` checks the
rule and creates the segment sub-groups, and the op takes the resulting
:class:`SequenceParallelPlan` in place of a group without checking again
(:func:`longnet.distributed.apply_sequence_parallel` keeps one per block length).
q, k and v may have any strides, like on one device.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..patterns import clip_phase, clip_segment, head_offset, segment_bounds, segment_start, used_offsets, \
    validate_phases
from . import kernels
from .numerics import acc_dtype, last_dim_contiguous
from .lse_grad import lse_columns
from .torch_backend import accumulate_grads, merge_partial, merge_patterns
from .collectives import Message, all_gather_chunks, exchange, init_communicator, reduce_scatter_chunks, \
    segment_groups

__all__ = ["sequence_parallel_dilated_attention", "check_sequence_parallel", "plan_sequence_parallel",
           "SequenceParallelPlan", "SegmentSpan", "HaloSpan"]


class SegmentSpan(NamedTuple):
    """A cross-rank pattern as seen from one rank.

    ``first``/``count``: group ranks sharing this rank's segment; ``position``:
    this rank's index among them.
    """

    pattern: int
    segment_length: int
    rate: int
    first: int
    count: int
    position: int


class HaloSpan(NamedTuple):
    """A shifted pattern whose segments straddle this rank's block boundaries.

    ``left``: rows of the previous rank in the segment that straddles this
    block's start (0: none); ``right``: rows of this block in the segment that
    straddles its end (0: none). The segment is ``segment_length`` (w') long, so
    this block holds its first ``segment_length - left`` rows on the left and
    the next rank holds ``segment_length - right`` rows on the right.
    """

    pattern: int
    segment_length: int
    rate: int
    left: int
    right: int


_RULE = ("sequence parallelism needs, for every pattern with w' = min(w, N) and phase φ' = min(φ, N): "
         "with phase 0, L % w' == 0 when w' <= L, else w' % L == 0 and L % r == 0; with a phase, "
         "L, w' and φ multiples of r when w' <= L, else w' % L == 0, φ' % L == 0 and L % r == 0")


def _check_one(i: int, w: int, r: int, phi: int, L: int, P: int) -> str:
    """How pattern i is split ("local", "halo" or "span"), or a ValueError stating the rule."""
    n = L * P
    we, pe = clip_segment(w, n), clip_phase(phi, n)
    where = (f"segment_lengths[{i}] = {w}, dilation_rates[{i}] = {r}"
             + (f", segment_phases[{i}] = {phi}" if phi else "")
             + f" with block length L = {L} per rank, P = {P} ranks, N = P*L = {n}")
    if we <= L and pe == 0:
        if L % we:
            raise ValueError(f"{where}: a segment of {we} positions straddles two ranks' blocks "
                             f"(L % w = {L % we}); {_RULE}")
        return "local"
    if we <= L:
        if P > 1 and (L % r or we % r or pe % r):
            raise ValueError(f"{where}: a shifted segment that straddles two blocks is exchanged with the "
                             f"neighbouring rank, which needs L, w' and the phase to be multiples of the "
                             f"dilation rate (L % r = {L % r}, w' % r = {we % r}, phase % r = {pe % r}); {_RULE}")
        return "halo"
    if we % L:
        raise ValueError(f"{where}: a segment of {we} positions must be made of whole blocks "
                         f"(w' % L = {we % L}); {_RULE}")
    if pe % L:
        raise ValueError(f"{where}: with a phase and w' > L, the leading segment of {pe} positions must be "
                         f"made of whole blocks too (phase % L = {pe % L}); {_RULE}")
    if L % r:
        raise ValueError(f"{where}: the block length must be a multiple of the dilation rate so "
                         f"every rank keeps the same local rows (L % r = {L % r}); {_RULE}")
    return "span"


def _segment_span(i: int, we: int, r: int, pe: int, L: int, P: int, rank: int) -> SegmentSpan:
    """The ranks sharing this rank's segment of a cross-rank pattern (segments are whole blocks)."""
    a, e = segment_bounds(rank * L, L * P, we, pe)
    return SegmentSpan(i, we, int(r), a // L, (e - a) // L, rank - a // L)


def _halo_span(i: int, we: int, r: int, pe: int, L: int, P: int, rank: int) -> Optional[HaloSpan]:
    """This rank's straddling segments of a pattern with w' <= L, or None when no boundary is straddled."""
    left = rank * L - segment_start(rank * L, we, pe) if rank > 0 else 0
    right = (rank + 1) * L - segment_start((rank + 1) * L, we, pe) if rank < P - 1 else 0
    return HaloSpan(i, we, int(r), left, right) if left or right else None


def check_sequence_parallel(block_length: int, world_size: int, segment_lengths: Sequence[int],
                            dilation_rates: Sequence[int], rank: int = 0,
                            segment_phases: Optional[Sequence[int]] = None):
    """Validate the split and classify the patterns.

    Returns ``(local, spans, halos)``: ``local`` holds (w', r, phase inside
    the block) of every pattern computed within the block (local and halo
    patterns), ``spans`` the :class:`SegmentSpan` of the cross-rank patterns
    and ``halos`` the :class:`HaloSpan` of the halo patterns that straddle
    ``rank``'s boundaries. Raises ``ValueError`` stating the rule when a pattern
    does not fit (on every rank alike: the rule does not depend on the rank).
    """
    return _classify(block_length, world_size, segment_lengths, dilation_rates, rank, segment_phases)


def _classify(block_length, world_size, segment_lengths, dilation_rates, rank, segment_phases):
    """What :func:`check_sequence_parallel` returns; a plan also runs it for the other ranks."""
    L, P = int(block_length), int(world_size)
    local: List[Tuple[int, int, int]] = []
    spans: List[SegmentSpan] = []
    halos: List[HaloSpan] = []
    phases = validate_phases(segment_phases, tuple(segment_lengths))
    for i, (w, r, phi) in enumerate(zip(segment_lengths, dilation_rates, phases)):
        kind = _check_one(i, int(w), int(r), phi, L, P)
        we, pe = clip_segment(int(w), L * P), clip_phase(phi, L * P)
        if kind == "span":
            spans.append(_segment_span(i, we, r, pe, L, P, rank))
            continue
        local.append((we, int(r), (pe - rank * L) % we))  # the next segment boundary, inside the block
        halo = _halo_span(i, we, r, pe, L, P, rank) if kind == "halo" else None
        if halo is not None:
            halos.append(halo)
    return tuple(local), tuple(spans), tuple(halos)


class SequenceParallelPlan(NamedTuple):
    """A validated split of one pattern over a process group, for one block length L.

    Made by :func:`plan_sequence_parallel`; pass it as ``group=`` to the op
    (or :func:`longnet.dilated_attention`) to skip the checks on every call.
    ``local``, ``spans``, ``halos``: as :func:`check_sequence_parallel` returns
    them for this rank; ``groups``: the (process group, order) of each span;
    ``rank``: this rank in ``group``.
    """

    group: object
    block_length: int
    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    local: Tuple[Tuple[int, int, int], ...]
    spans: Tuple[SegmentSpan, ...]
    groups: tuple
    halos: Tuple[HaloSpan, ...] = ()
    segment_phases: Optional[Tuple[int, ...]] = None
    rank: int = 0


def plan_sequence_parallel(group, block_length: int, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int],
                           segment_phases: Optional[Sequence[int]] = None) -> SequenceParallelPlan:
    """Validate the split of blocks of ``block_length`` over ``group`` and create its segment sub-groups.

    Call it on every rank of ``group`` together, e.g. right after building the
    mesh so that no process group is created inside a forward pass (the op
    does the same lazily otherwise); ``.spans`` are this rank's cross-rank
    spans. Sub-group creation is collective (over every rank of the default
    group when a device id is bound to it, see :func:`.collectives.segment_groups`),
    and with halo patterns one barrier on ``group`` creates its communicator
    before any partial point-to-point batch (:func:`.collectives.init_communicator`).
    """
    if group is None or not dist.is_initialized():
        raise ValueError("group must be a process group of an initialised torch.distributed, got "
                         f"{group!r} (initialized={dist.is_initialized()})")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    w, r = tuple(segment_lengths), tuple(dilation_rates)
    phases = validate_phases(segment_phases, w)
    local, spans, halos = check_sequence_parallel(block_length, world, w, r, rank, segment_phases=phases)
    every = [_classify(block_length, world, w, r, rk, phases) for rk in range(world)]
    groups = _span_groups(group, every, spans)
    if any(h for _, _, h in every):  # the same answer on every rank
        init_communicator(group)
    return SequenceParallelPlan(group, int(block_length), w, r, local, spans, groups, halos, phases, rank)


def _span_groups(group, every, spans) -> tuple:
    """(pg, order) of this rank's segment of each cross-rank pattern; ``every``: the
    (local, spans, halos) of every rank of ``group``, in rank order.

    Every rank creates the sub-groups of all segments of every span pattern,
    in pattern then segment order (:func:`.collectives.segment_groups`), so
    the creation calls line up on every rank even when they are NCCL splits.
    """
    groups = []
    for j, sp in enumerate(spans):
        segments = sorted({(other[1][j].first, other[1][j].count) for other in every})
        made = dict(zip(segments, segment_groups(group, segments)))
        groups.append(made[(sp.first, sp.count)])
    return tuple(groups)


def _offset_view(x: Tensor, r: int, s: int) -> Tensor:
    """x (B, L, H, *rest), any strides -> (B, H_s, L/r, *rest) view of rows t*r + s of heads s, s+r, ..."""
    x = x.unflatten(1, (x.shape[1] // r, r))[:, :, s, s::r]
    return x.transpose(1, 2)


def _pack(k: Tensor, v: Tensor, r: int) -> Tensor:
    """Kept rows of k, v (B, L, H, D) per head: (2, B, L/r, H, D), row t of head h = t*r + h mod r."""
    heads = torch.arange(k.shape[2], device=k.device)
    rows = head_offset(heads, r)
    return torch.stack([x.unflatten(1, (x.shape[1] // r, r))[:, :, rows, heads] for x in (k, v)])


def _unpack_add(dk: Tensor, dv: Tensor, packed: Tensor, r: int) -> None:
    """Inverse of :func:`_pack`: add packed (2, B, L/r, H, D) gradients into dk, dv (B, L, H, D)."""
    heads = torch.arange(dk.shape[2], device=dk.device)
    rows = head_offset(heads, r)
    for g, p in zip((dk, dv), packed):
        g.unflatten(1, (g.shape[1] // r, r))[:, :, rows, heads] += p.to(g.dtype)


def _partials(kv: Tensor, s: int, r: int, span: SegmentSpan, causal: bool, lr: int):
    """(k, v, causal, key slice) of the partial attentions of offset s against gathered kv.

    kv is (2, B, H, m*L/r, D) in position order. Causal: keys of earlier ranks
    are all visible (non-causal partial), the own block is causal, later ranks
    are skipped. Rows of the own block share the query rows' phase, so its
    local causal mask is exactly "key position <= query position".
    """
    if not causal:
        sl = slice(0, span.count * lr)
        yield kv[0, :, s::r, sl], kv[1, :, s::r, sl], False, sl
        return
    p = span.position
    if p > 0:
        sl = slice(0, p * lr)
        yield kv[0, :, s::r, sl], kv[1, :, s::r, sl], False, sl
    sl = slice(p * lr, (p + 1) * lr)
    yield kv[0, :, s::r, sl], kv[1, :, s::r, sl], True, sl


# ---------------------------------------------------------------- halo exchange

def _halo_sides(h: HaloSpan, L: int, causal: bool):
    """(own rows, neighbour rank step, neighbour's row count) of each side that exchanges keys.

    Left: this block's first w' - left rows share a segment with the previous
    rank's last ``left`` rows. Right (not causal: a causal query never sees
    later keys): this block's last ``right`` rows, with the next rank's first
    w' - right rows.
    """
    if h.left:
        yield slice(0, h.segment_length - h.left), -1, h.left
    if h.right and not causal:
        yield slice(L - h.right, L), +1, h.segment_length - h.right


def _own_rows_seen(h: HaloSpan, L: int, causal: bool):
    """(own rows, rate, neighbour step) of this block's rows that a neighbour's queries attend to:
    the mirror of :func:`_halo_sides` on the neighbours."""
    if h.right:
        yield slice(L - h.right, L), h.rate, +1
    if h.left and not causal:
        yield slice(0, h.segment_length - h.left), h.rate, -1


def _halo_forward_messages(k: Tensor, v: Tensor, halos, rank: int, causal: bool):
    """(sends, recvs) of the forward halo exchange, tagged by pattern.

    This rank sends the kept k, v rows of its own that a neighbour's queries
    see, packed as (2, B, rows/r, H, D) (see :func:`_pack`), and receives the
    neighbours' rows that its own queries see.
    """
    b, L, nh, d = k.shape
    sends, recvs = [], []
    for h in halos:
        for rows, r, step in _own_rows_seen(h, L, causal):
            sends.append(Message(_pack(k[:, rows], v[:, rows], r), rank + step, h.pattern))
        for _, step, count in _halo_sides(h, L, causal):
            recvs.append(Message(k.new_empty(2, b, count // h.rate, nh, d), rank + step, h.pattern))
    return sends, recvs


def _halo_kv(received: Sequence[Tensor]) -> List[Tensor]:
    """Received packed (2, B, T, H, D) halos as (2, B, H, T, D): keys of head h at ``[:, :, h]``."""
    return [x.permute(0, 1, 3, 2, 4) for x in received]


def _halo_forward(q, out, lse, halos, halo_kv, causal, scale, force_math) -> None:
    """Merge each straddling segment's neighbour keys into the own rows' (out, lse), in place."""
    nh = q.shape[2]
    it = iter(halo_kv)
    for h in halos:
        r = h.rate
        for rows, _, _ in _halo_sides(h, q.shape[1], causal):
            kv = next(it)
            for s in used_offsets(r, nh):
                o_p, l_p = kernels.attn_fwd(_offset_view(q[:, rows], r, s), kv[0, :, s::r], kv[1, :, s::r],
                                            False, scale, force_math)
                merge_partial(_offset_view(out[:, rows], r, s), _offset_view(lse[:, rows], r, s), o_p, l_p)


def _halo_backward(do, q, out, lse, dq, halos, halo_kv, rank, causal, scale, force_math, d_keep):
    """Each straddling segment's share of dq (added in place) and the messages of the backward
    exchange: the gradients of the received rows go back to their owner, and this rank
    receives those of its own rows that the neighbours' queries saw."""
    b, L, nh, _ = q.shape
    sends, recvs = [], []
    it = iter(halo_kv)
    for h in halos:
        r = h.rate
        for rows, step, _ in _halo_sides(h, L, causal):
            kv = next(it)  # (2, B, H, T, D)
            dkv = torch.zeros(kv.shape, dtype=acc_dtype(q.dtype), device=q.device)
            for s in used_offsets(r, nh):
                views = [_offset_view(x[:, rows], r, s) for x in (do, q, out, lse)]
                gq, gk, gv = kernels.attn_bwd(views[0], views[1], kv[0, :, s::r], kv[1, :, s::r], views[2],
                                              views[3], False, scale, force_math)
                _offset_view(dq[:, rows], r, s).add_(gq)
                dkv[0, :, s::r] += gk
                dkv[1, :, s::r] += gv
            sends.append(Message(dkv[..., :d_keep].permute(0, 1, 3, 2, 4), rank + step, h.pattern))
        for own, _, step in _own_rows_seen(h, L, causal):
            count = own.stop - own.start
            recvs.append(Message(dq.new_empty(2, b, count // r, nh, d_keep), rank + step, h.pattern))
    return sends, recvs


def _halo_unpack(dk, dv, halos, received, L, causal, d_keep) -> None:
    """Add the gradients the neighbours sent back into this block's rows of dk, dv."""
    it = iter(received)
    for h in halos:
        for rows, r, _ in _own_rows_seen(h, L, causal):
            _unpack_add(dk[:, rows, :, :d_keep], dv[:, rows, :, :d_keep], next(it), r)


# ---------------------------------------------------------------- the op

def _forward(q, k, v, plan: SequenceParallelPlan, causal, scale, force_math):
    """(out, lse, saved): ``saved`` holds the gathered and the received keys and values, as
    (2, B, H, rows, D) each, spans first, then halos."""
    b, L, h, d = q.shape
    # Start every exchange first, so traffic overlaps the local patterns' compute.
    pending = [all_gather_chunks(_pack(k, v, sp.rate), pg, order, "forward")
               for sp, (pg, order) in zip(plan.spans, plan.groups)]
    halo_msgs = exchange(*_halo_forward_messages(k, v, plan.halos, plan.rank, causal), plan.group, "forward")
    w, r, phases = zip(*plan.local) if plan.local else ((), (), ())
    out, lse = merge_patterns(q, k, v, w, r, causal, scale, force_math,
                              segment_phases=phases if any(phases) else None)
    gathered = []
    for sp, work in zip(plan.spans, pending):
        r, lr = sp.rate, L // sp.rate
        # (m, 2, B, L/r, H, D) -> (2, B, H, m*L/r, D): keys in position order, per head.
        kv = work.wait().permute(1, 2, 4, 0, 3, 5).reshape(2, b, h, sp.count * lr, d)
        gathered.append(kv)
        for s in used_offsets(r, h):
            qs, ov, lv = _offset_view(q, r, s), _offset_view(out, r, s), _offset_view(lse, r, s)
            for ks, vs, c, _ in _partials(kv, s, r, sp, causal, lr):
                o_p, l_p = kernels.attn_fwd(qs, ks, vs, c, scale, force_math)
                merge_partial(ov, lv, o_p, l_p)
    halo_kv = _halo_kv(halo_msgs.wait())
    _halo_forward(q, out, lse, plan.halos, halo_kv, causal, scale, force_math)
    return out.to(q.dtype), lse, gathered + halo_kv


def _span_backward(do, q, out, lse, dq, plan, gathered, causal, scale, force_math, d_keep):
    """The cross-rank patterns' share of dq (added in place); starts and returns their reduce-scatters."""
    b, L, h, d = q.shape
    pending = []
    for sp, (pg, order), kv in zip(plan.spans, plan.groups, gathered):
        r, lr = sp.rate, L // sp.rate
        dkv = torch.zeros(kv.shape, dtype=acc_dtype(q.dtype), device=q.device)  # (2, B, H, m*L/r, D)
        for s in used_offsets(r, h):
            qs, dos = _offset_view(q, r, s), _offset_view(do, r, s)
            os_, ls = _offset_view(out, r, s), _offset_view(lse, r, s)
            dqs = _offset_view(dq, r, s)
            for ks, vs, c, sl in _partials(kv, s, r, sp, causal, lr):
                gq, gk, gv = kernels.attn_bwd(dos, qs, ks, vs, os_, ls, c, scale, force_math)
                dqs.add_(gq)
                dkv[0, :, s::r, sl] += gk
                dkv[1, :, s::r, sl] += gv
        # Back to (m, 2, B, L/r, H, D) chunks, one per segment position; drop the lse column.
        chunks = dkv[..., :d_keep].view(2, b, h, sp.count, lr, d_keep).permute(3, 0, 1, 4, 2, 5)
        pending.append((sp, reduce_scatter_chunks(chunks, pg, order, "backward")))
    return pending


def _backward(do, q, k, v, out, lse, saved, plan, causal, scale, force_math, d_keep):
    """Exact (dq, dk, dv); ``d_keep`` head-dim columns are real (the rest carry the lse gradient)."""
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=q.device) for x in (q, k, v))
    gathered, halo_kv = saved[:len(plan.spans)], saved[len(plan.spans):]
    # Cross-rank and halo patterns first, so their traffic overlaps the local patterns' backward.
    pending = _span_backward(do, q, out, lse, dq, plan, gathered, causal, scale, force_math, d_keep)
    sends, recvs = _halo_backward(do, q, out, lse, dq, plan.halos, halo_kv, plan.rank, causal, scale,
                                  force_math, d_keep)
    halo_msgs = exchange(sends, recvs, plan.group, "backward")
    w, r, phases = zip(*plan.local) if plan.local else ((), (), ())
    accumulate_grads(do, q, k, v, out, lse, w, r, causal, scale, force_math, grads=(dq, dk, dv),
                     segment_phases=phases if any(phases) else None)
    for sp, work in pending:
        _unpack_add(dk[..., :d_keep], dv[..., :d_keep], work.wait(), sp.rate)
    _halo_unpack(dk, dv, plan.halos, halo_msgs.wait(), q.shape[1], causal, d_keep)
    return dq, dk, dv


class _SequenceParallelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, causal, scale, force_math):
        out, lse, saved = _forward(q, k, v, plan, causal, scale, force_math)
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.args = (plan, causal, scale, force_math)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        plan, causal, scale, force_math = ctx.args
        d, dtype = q.shape[-1], q.dtype
        # Extra columns, not lse_grad's second pass: the same collectives on every rank, the same bytes.
        do, q, k, v, out, saved = lse_columns(dout, dlse, q, k, v, out, saved)
        grads = _backward(do, q, k, v, out, lse, saved, plan, causal, scale, force_math, d)
        return (*(g[..., :d].to(dtype) for g in grads), None, None, None, None)


def _checked_plan(group, q: Tensor, segment_lengths, dilation_rates, segment_phases) -> SequenceParallelPlan:
    """``group`` itself when it is a plan made for q's block length and this pattern, else a new plan."""
    if not isinstance(group, SequenceParallelPlan):
        return plan_sequence_parallel(group, q.shape[1], segment_lengths, dilation_rates, segment_phases)
    phases = validate_phases(segment_phases, tuple(segment_lengths))
    made_for = (group.block_length, group.segment_lengths, group.dilation_rates,
                validate_phases(group.segment_phases, group.segment_lengths))
    if made_for != (q.shape[1], tuple(segment_lengths), tuple(dilation_rates), phases):
        raise ValueError(f"group is a SequenceParallelPlan for (L, segment_lengths, dilation_rates, "
                         f"segment_phases) = {made_for}, but the call has L = {q.shape[1]}, segment_lengths = "
                         f"{tuple(segment_lengths)}, dilation_rates = {tuple(dilation_rates)}, "
                         f"segment_phases = {phases}")
    return group


def sequence_parallel_dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                        dilation_rates: Sequence[int], *, group, is_causal: bool = False,
                                        scale: float, backend: Optional[str] = None,
                                        segment_phases: Optional[Sequence[int]] = None
                                        ) -> Tuple[Tensor, Tensor]:
    """This rank's block of dilated attention over a sequence split across ``group``.

    Args:
        q, k, v: (B, L, H, D), any strides, this rank's positions [rank*L, (rank+1)*L)
            (rank = ``dist.get_rank(group)``).
        segment_lengths, dilation_rates: validated int tuples (see
            :func:`longnet.patterns.validate_pattern`); must satisfy the rule of
            :func:`check_sequence_parallel`.
        group: the sequence-parallel process group (P ranks), or a
            :class:`SequenceParallelPlan` made for this L and pattern (then nothing is re-checked).
        is_causal, scale: as in :func:`longnet.dilated_attention`.
        backend: None or "torch" (flash kernels) or "math" (plain matmuls).
        segment_phases: one per pattern, None for all 0 (see :mod:`longnet.patterns`).

    Returns:
        (out (B, L, H, D), lse (B, L, H)): this rank's block of the
        single-device result; differentiable in q, k, v, through out and lse.
    """
    if backend not in (None, "torch", "math"):
        raise ValueError(f"backend must be None, 'torch' or 'math' with group=..., got {backend!r}: "
                         "sequence parallelism runs the torch backend's kernels (flash or plain matmuls)")
    plan = _checked_plan(group, q, segment_lengths, dilation_rates, segment_phases)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    return _SequenceParallelFn.apply(q, k, v, plan, bool(is_causal), float(scale), backend == "math")
