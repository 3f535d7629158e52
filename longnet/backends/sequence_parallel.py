"""Sequence-parallel dilated attention (SPEC.md §4): one sequence split over P ranks.

Rank i of ``group`` (P ranks) holds positions [i*L, (i+1)*L) of a sequence of
N = P*L positions; q, k, v, out are (B, L, H, D) and lse is (B, L, H). The
result on each rank is its block of the single-device result (SPEC.md §2):
out and lse, and the gradients of q, k, v.

Per pattern (w, r), with w' = min(w, N) (w >= N is one segment, SPEC.md §1):

* w' <= L: every segment lies inside one block. Computed locally, no traffic.
* w' > L: a segment is made of w'/L whole blocks, so the ranks
  [j*w'/L, (j+1)*w'/L) share segment j (the last segment may have fewer).
  Each rank packs its kept k and v rows (B, L/r, H, D) — row ``t*r + h mod r``
  for head h — and all-gathers them within those ranks. Its kept queries
  attend to the gathered kept keys; when causal, keys of later ranks are
  skipped and the own block is attended causally. In the backward, the
  gradients of the gathered keys and values are reduce-scattered back.

Per rank and pattern that is (m - 1) * 2 * B * (L/r) * H * D elements each
way in the forward and as many in the backward, m = ranks sharing the
segment: at most 2 * B * (w/r) * H * D, whatever N and P are.

The patterns are merged with the stable update of SPEC.md §7, and the
backward calls each partial's flash backward with the merged out and lse,
which is the exact gradient of the mixture. A gradient flowing into lse is
supported too (same column trick as the torch backend).

Compatibility rule (checked by :func:`check_sequence_parallel`): for every
pattern, with w' = min(w, P*L),

* if w' <= L: L % w' == 0 (segments do not straddle two blocks);
* if w' >  L: w' % L == 0 (a segment is whole blocks) and L % r == 0 (every
  block starts at a kept-row phase of 0, so all ranks keep the same local rows).

All ranks of ``group`` must call the op together with the same B, L, H, D,
dtype, patterns and flags (collectives do not re-check shapes).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .torch_backend import accumulate_grads, acc_dtype, merge_partial, merge_patterns, pad_last
from .collectives import all_gather_chunks, reduce_scatter_chunks, segment_group

__all__ = ["sequence_parallel_dilated_attention", "check_sequence_parallel", "prepare_sequence_parallel",
           "SegmentSpan"]


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


def check_sequence_parallel(block_length: int, world_size: int, segment_lengths: Sequence[int],
                            dilation_rates: Sequence[int], rank: int = 0
                            ) -> Tuple[Tuple[Tuple[int, int], ...], Tuple[SegmentSpan, ...]]:
    """Validate the split and classify the patterns.

    Returns ``(local, spans)``: ``local`` holds (w', r) of the patterns computed
    inside the block, ``spans`` the :class:`SegmentSpan` of the others for
    ``rank``. Raises ``ValueError`` stating the rule when a pattern does not fit.
    """
    L, P = int(block_length), int(world_size)
    n = L * P
    local: List[Tuple[int, int]] = []
    spans: List[SegmentSpan] = []
    rule = ("sequence parallelism needs, for every pattern with w' = min(w, N): "
            "L % w' == 0 when w' <= L, else w' % L == 0 and L % r == 0")
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        we = min(int(w), n)
        where = (f"segment_lengths[{i}] = {w}, dilation_rates[{i}] = {r} with block length "
                 f"L = {L} per rank, P = {P} ranks, N = P*L = {n}")
        if we <= L:
            if L % we:
                raise ValueError(f"{where}: a segment of {we} positions straddles two ranks' blocks "
                                 f"(L % w = {L % we}); {rule}")
            local.append((we, int(r)))
            continue
        if we % L:
            raise ValueError(f"{where}: a segment of {we} positions must be made of whole blocks "
                             f"(w' % L = {we % L}); {rule}")
        if L % r:
            raise ValueError(f"{where}: the block length must be a multiple of the dilation rate so "
                             f"every rank keeps the same local rows (L % r = {L % r}); {rule}")
        m = we // L
        first = (rank // m) * m
        spans.append(SegmentSpan(i, we, int(r), first, min(m, P - first), rank - first))
    return tuple(local), tuple(spans)


def prepare_sequence_parallel(group, block_length: int, segment_lengths: Sequence[int],
                              dilation_rates: Sequence[int]) -> Tuple[SegmentSpan, ...]:
    """Validate and create the segment sub-groups now rather than on the first call.

    Call it on every rank of ``group`` (e.g. right after building the mesh) so
    that no process group is created inside a forward pass; returns this
    rank's cross-rank spans. The op does the same lazily if this is skipped.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _, spans = check_sequence_parallel(block_length, world, segment_lengths, dilation_rates, rank)
    for sp in spans:
        segment_group(group, sp.first, sp.count)
    return spans


def _offset_view(x: Tensor, r: int, s: int) -> Tensor:
    """x (B, L, H, *rest) -> (B, H_s, L/r, *rest) view of rows t*r + s of heads s, s+r, ..."""
    b, L, h = x.shape[:3]
    x = x.view(b, L // r, r, h, *x.shape[3:])[:, :, s, s::r]
    return x.transpose(1, 2)


def _pack(k: Tensor, v: Tensor, r: int) -> Tensor:
    """Kept rows of k, v (B, L, H, D) per head: (2, B, L/r, H, D), row t of head h = t*r + h % r."""
    b, L, h, d = k.shape
    heads = torch.arange(h, device=k.device)
    rows = heads % r
    return torch.stack([x.view(b, L // r, r, h, d)[:, :, rows, heads] for x in (k, v)])


def _unpack_add(dk: Tensor, dv: Tensor, packed: Tensor, r: int) -> None:
    """Inverse of :func:`_pack`: add packed (2, B, L/r, H, D) gradients into dk, dv (B, L, H, D)."""
    b, L, h, d = dk.shape
    heads = torch.arange(h, device=dk.device)
    rows = heads % r
    for g, p in zip((dk, dv), packed):
        g.view(b, L // r, r, h, d)[:, :, rows, heads] += p.to(g.dtype)


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


def _forward(q, k, v, local, spans, groups, causal, scale, force_math):
    b, L, h, d = q.shape
    # Start every gather first, so traffic overlaps the local patterns' compute.
    pending = [all_gather_chunks(_pack(k, v, sp.rate), pg, order, "forward")
               for sp, (pg, order) in zip(spans, groups)]
    out, lse = merge_patterns(q, k, v, [w for w, _ in local], [r for _, r in local], causal, scale,
                              force_math)
    gathered = []
    for sp, work in zip(spans, pending):
        r, lr = sp.rate, L // sp.rate
        # (m, 2, B, L/r, H, D) -> (2, B, H, m*L/r, D): keys in position order, per head.
        kv = work.wait().permute(1, 2, 4, 0, 3, 5).reshape(2, b, h, sp.count * lr, d)
        gathered.append(kv)
        for s in range(min(r, h)):
            qs, ov, lv = _offset_view(q, r, s), _offset_view(out, r, s), _offset_view(lse, r, s)
            for ks, vs, c, _ in _partials(kv, s, r, sp, causal, lr):
                o_p, l_p = kernels.attn_fwd(qs, ks, vs, c, scale, force_math)
                merge_partial(ov, lv, o_p, l_p)
    return out.to(q.dtype), lse, gathered


def _backward(do, q, k, v, out, lse, gathered, local, spans, groups, causal, scale, force_math, d_keep):
    """Exact (dq, dk, dv); ``d_keep`` head-dim columns are real (the rest carry the lse gradient)."""
    b, L, h, d = q.shape
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    pending = []
    # Cross-rank patterns first, so their reduce-scatters overlap the local patterns' backward.
    for sp, (pg, order), kv in zip(spans, groups, gathered):
        r, lr = sp.rate, L // sp.rate
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # (2, B, H, m*L/r, D)
        for s in range(min(r, h)):
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
    accumulate_grads(do, q, k, v, out, lse, [w for w, _ in local], [r for _, r in local], causal, scale,
                     force_math, grads=(dq, dk, dv))
    for sp, work in pending:
        _unpack_add(dk[..., :d_keep], dv[..., :d_keep], work.wait(), sp.rate)
    return dq, dk, dv


class _SequenceParallelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, local, spans, groups, causal, scale, force_math):
        out, lse, gathered = _forward(q, k, v, local, spans, groups, causal, scale, force_math)
        ctx.save_for_backward(q, k, v, out, lse, *gathered)
        ctx.args = (local, spans, groups, causal, scale, force_math)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *gathered = ctx.saved_tensors
        local, spans, groups, causal, scale, force_math = ctx.args
        d = q.shape[-1]
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            # d lse / d score = P, so an lse gradient adds P * dlse to dS: a column of ones in v
            # (dP gains dlse) and of zeros in out, q, k leaves everything else unchanged.
            dout = torch.cat([dout, dlse.unsqueeze(-1).to(dout.dtype)], -1)
            q, k, v, out = pad_last(q, 0.0), pad_last(k, 0.0), pad_last(v, 1.0), pad_last(out, 0.0)
            gathered = [torch.cat([kv, torch.stack([torch.zeros_like(kv[0, ..., :1]),
                                                    torch.ones_like(kv[1, ..., :1])])], -1)
                        for kv in gathered]
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, gathered, local, spans, groups,
                               causal, scale, force_math, d)
        dq, dk, dv = (g[..., :d].to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v)))
        return dq, dk, dv, None, None, None, None, None, None


def sequence_parallel_dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                        dilation_rates: Sequence[int], *, group, is_causal: bool = False,
                                        scale: float, backend: Optional[str] = None
                                        ) -> Tuple[Tensor, Tensor]:
    """This rank's block of dilated attention over a sequence split across ``group``.

    Args:
        q, k, v: (B, L, H, D), this rank's positions [rank*L, (rank+1)*L)
            (rank = ``dist.get_rank(group)``).
        segment_lengths, dilation_rates: validated int tuples (see
            :func:`longnet.patterns.validate_pattern`); must satisfy the rule of
            :func:`check_sequence_parallel`.
        group: the sequence-parallel process group (P ranks).
        is_causal, scale: as in :func:`longnet.dilated_attention`.
        backend: None or "torch" (flash kernels) or "math" (plain matmuls).

    Returns:
        (out (B, L, H, D), lse (B, L, H)): this rank's block of the
        single-device result; differentiable in q, k, v, through out and lse.
    """
    if backend not in (None, "torch", "math"):
        raise ValueError(f"backend must be None, 'torch' or 'math' with group=..., got {backend!r}")
    if group is None or not dist.is_initialized():
        raise ValueError("group must be a process group of an initialised torch.distributed, got "
                         f"{group!r} (initialized={dist.is_initialized()})")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    local, spans = check_sequence_parallel(q.shape[1], world, segment_lengths, dilation_rates, rank)
    groups = tuple(segment_group(group, sp.first, sp.count) for sp in spans)
    return _SequenceParallelFn.apply(q, k, v, local, spans, groups, bool(is_causal), float(scale),
                                     backend == "math")
