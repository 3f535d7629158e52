"""Variable-length batches for the torch and math backends, as ``torch.library`` custom ops.

Two layouts (docs/design.md §1-2 applied to each sequence on its own):

* packed: q, k, v (T, H, D) with ``cu_seqlens`` (B + 1,) int32, cumulative from 0 to T;
  sequence b is rows [cu[b], cu[b + 1]); out (T, H, D), lse (T, H);
* padded: q, k, v (B, N, H, D) with ``key_padding_mask`` (B, N) bool, True = a real token;
  each row's real tokens must be one contiguous run (left, right or both-side padding);
  out (B, N, H, D) with 0 on padding, lse (B, N, H) with -inf on padding.

Both become a list of sequences (start, length) over the rows of a flat (rows, H, D) view.
Each sequence is segmented from its own first row, so its output is what it would be if
run alone. The cost is the sum over sequences, not B x the longest: for each pattern, the
segments of one length of *all* sequences share one kernel call (a sequence's full segments
and every equally long tail), fed by one copy of their kept rows from the strided views of
:mod:`.torch_backend` (heads of one kept count stacked as there; a lone r = 1 run is a view,
no copy); partial outputs merge into the output through the same views with the update of
docs/design.md §7, and the backward adds each call's gradients the same way. Rows of no sequence (padding, gaps) get out 0,
lse -inf and gradient 0, and never reach a kernel, so they cost nothing and cannot be NaN.

A single sequence covering every row, or equally long sequences without gaps, take the dense
path (:func:`.custom_ops.mixture_forward`) unchanged, so batching changes no kernel call there.
The values of ``cu_seqlens`` / the mask are read (one device-to-host copy) inside the op, so
under ``torch.compile`` the op stays opaque: any mix of lengths reuses one graph.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patterns import heads_with_offset, kept_count, segment_groups, used_offsets
from . import kernels
from .lse_grad import backward_grads, backward_inputs
from .numerics import acc_dtype, last_dim_contiguous
from .torch_backend import Unit, _gather as _dense_gather, _pairs, merge_partial

__all__ = ["sequences", "check_cu_seqlens", "dilated_attention_varlen_torch", "varlen_forward",
           "varlen_backward", "VarlenCall", "plan_calls"]

# Bytes of one gathered tensor per kernel call (as ``torch_backend._CALL_BYTES``).
_CALL_BYTES = 256 * 2**20


def check_cu_seqlens(cu: Sequence[int], total: int) -> None:
    """One-line ``ValueError`` unless ``cu`` (values of cu_seqlens) starts at 0, never decreases and ends at T."""
    if len(cu) == 0:
        raise ValueError("cu_seqlens must hold at least one value (B + 1 for B sequences), got an empty tensor")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i - 1}] = {cu[i - 1]} > "
                             f"cu_seqlens[{i}] = {cu[i]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (the rows of q), got cu_seqlens[-1] = {cu[-1]}")


def _mask_runs(mask: Tensor) -> Tuple[List[int], List[int]]:
    """(first real position, count) per row of a (B, N) bool mask; a one-line error for holes."""
    n = mask.shape[1]
    m = mask.to(torch.int64)
    count = m.sum(1)
    first = torch.where(count > 0, m.argmax(1), 0)
    last = torch.where(count > 0, n - 1 - m.flip(1).argmax(1), -1)
    holes = (count > 0) & (last - first + 1 != count)
    if bool(holes.any()):
        b = int(holes.nonzero()[0, 0])
        raise ValueError(f"key_padding_mask row {b} has padding between real tokens (positions "
                         f"{int(first[b])}..{int(last[b])} hold {int(count[b])} real ones); expected left, right "
                         "or both-side padding, one contiguous run of True per row (for other layouts pack the "
                         "tokens with longnet.varlen.unpad and pass cu_seqlens)")
    return first.tolist(), count.tolist()


def sequences(q: Tensor, cu_seqlens: Optional[Tensor], key_padding_mask: Optional[Tensor]
              ) -> Tuple[List[int], List[int]]:
    """(starts, lengths) of the sequences over the flat rows of q ((T, H, D) packed, (B, N, H, D) padded)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        check_cu_seqlens(cu, q.shape[0])
        return cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:])]
    n = q.shape[1]
    first, count = _mask_runs(key_padding_mask)
    return [i * n + f for i, f in enumerate(first)], count


class VarlenCall(NamedTuple):
    """One kernel call: the head offsets of one kept count of pattern ``pattern``, over ``runs``.

    ``runs`` [(start row, count), ...]: runs of ``count`` consecutive segments of ``seg_len``
    rows (each within one sequence), over all sequences; Z = the sum of the counts.
    """

    pattern: int
    seg_len: int
    rate: int
    offsets: Tuple[int, ...]
    kept: int
    runs: Tuple[Tuple[int, int], ...]

    def group(self, start: int, count: int) -> List[Unit]:
        """The dense path's units (:class:`.torch_backend.Unit`) of one run, on a (1, rows, H, D) view."""
        return [Unit(self.pattern, start, count, self.seg_len, s, self.rate, self.kept, None) for s in self.offsets]

    @property
    def z(self) -> int:
        return sum(c for _, c in self.runs)


def _segment_runs(starts: Sequence[int], lengths: Sequence[int], w: int, phase: int) -> Dict[int, List]:
    """{segment length: [(first row, count), ...]}: every sequence's segments of one pattern, by length."""
    runs: Dict[int, List] = {}
    for s, n in zip(starts, lengths):
        if n == 0:
            continue
        for g_start, nseg, seg_len in segment_groups(n, w, phase):
            runs.setdefault(seg_len, []).append((s + g_start, nseg))
    return runs


def _split_runs(runs: List[Tuple[int, int]], seg_len: int, step: int) -> List[List[Tuple[int, int]]]:
    """The runs cut into consecutive pieces of at most ``step`` segments in all (one per kernel call)."""
    calls, cur, used = [], [], 0
    for start, count in runs:
        while count:
            take = min(count, step - used)
            cur.append((start, take))
            start, count, used = start + take * seg_len, count - take, used + take
            if used == step:
                calls.append(cur)
                cur, used = [], 0
    return calls + ([cur] if cur else [])


def plan_calls(starts: Sequence[int], lengths: Sequence[int], num_heads: int, segment_lengths: Sequence[int],
               dilation_rates: Sequence[int], segment_phases: Optional[Sequence[int]],
               row_bytes: int) -> List[VarlenCall]:
    """Every kernel call of the varlen mixture, the r = 1 patterns first.

    For pattern (w, r, φ), the segments of one length over all sequences and the head
    offsets of one kept count form a call (as :func:`.torch_backend.group_units` stacks
    them for one sequence). Calls larger than ``_CALL_BYTES`` (``row_bytes`` per row and
    head) are split over their segments.
    """
    phases = segment_phases or (0,) * len(segment_lengths)
    order = sorted(range(len(segment_lengths)), key=lambda i: dilation_rates[i] != 1)
    calls: List[VarlenCall] = []
    for i in order:
        r = dilation_rates[i]
        for seg_len, runs in _segment_runs(starts, lengths, segment_lengths[i], phases[i]).items():
            by_kept: Dict[int, List[int]] = {}
            for s in used_offsets(r, num_heads):
                kept = kept_count(seg_len, s, r)
                if kept:
                    by_kept.setdefault(kept, []).append(s)
            for kept, offsets in by_kept.items():
                heads = sum(len(heads_with_offset(s, r, num_heads)) for s in offsets)
                step = max(1, _CALL_BYTES // max(1, kept * heads * row_bytes))
                calls += [VarlenCall(i, seg_len, r, tuple(offsets), kept, tuple(piece))
                          for piece in _split_runs(runs, seg_len, step)]
    return calls


def _pieces(x: Tensor, part: Tensor, c: VarlenCall, num_heads: int) -> List[Tuple[Tensor, Tensor]]:
    """(view of x (1, rows, H, *rest), view of part (Z, heads, kept, *rest)) pairs covering the call; no copies."""
    pairs, z0 = [], 0
    for start, count in c.runs:
        pairs += _pairs(x, part[z0:z0 + count], c.group(start, count), num_heads)
        z0 += count
    return pairs


def _gather(x: Tensor, c: VarlenCall, num_heads: int) -> Tensor:
    """(Z, heads, kept, *rest): the call's kept rows of x (1, rows, H, *rest); a view for one r = 1 run."""
    if len(c.runs) == 1:
        return _dense_gather(x, c.group(*c.runs[0]), num_heads)
    heads = sum(len(heads_with_offset(s, c.rate, num_heads)) for s in c.offsets)
    part = torch.empty((c.z, c.kept, heads, *x.shape[3:]), dtype=x.dtype, device=x.device).transpose(1, 2)
    for xv, pv in _pieces(x, part, c, num_heads):
        pv.copy_(xv)
    return part


def _dense_shape(q: Tensor, starts: Sequence[int], lengths: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(B, L) when the sequences are B equal runs of L tiling every row in order (the dense path), else None."""
    rows = q.shape[0] * (q.shape[1] if q.ndim == 4 else 1)
    b = len(lengths)
    if b == 0 or lengths[0] == 0 or any(n != lengths[0] for n in lengths) or b * lengths[0] != rows:
        return None
    if any(s != i * lengths[0] for i, s in enumerate(starts)):
        return None
    return b, lengths[0]


def _flat(x: Tensor, trailing: int = 2) -> Tensor:
    """x ((T, *tail) or (B, N, *tail), ``trailing`` dims in tail) as (1, rows, *tail); copies only when the
    strides need it. Tail (H, D) for q, k, v, out; (H,) for lse."""
    return x.reshape(1, -1, *x.shape[x.ndim - trailing:])


def _mixture(q: Tensor, k: Tensor, v: Tensor, calls: List[VarlenCall], causal: bool, scale: float,
             force_math: bool) -> Tuple[Tensor, Tensor]:
    """(out (1, rows, H, D) acc dtype, lse (1, rows, H)) of the planned calls; rows of no call stay 0 / -inf.

    An r = 1 pattern covers every row of every sequence once, so the first one (``plan_calls``
    puts them first) is copied in rather than merged.
    """
    acc = acc_dtype(q.dtype)
    h = q.shape[-2]
    fq, fk, fv = (_flat(x) for x in (q, k, v))
    out = torch.zeros(fq.shape, dtype=acc, device=q.device)
    lse = torch.full(fq.shape[:3], float("-inf"), dtype=acc, device=q.device)
    first = calls[0].pattern if calls and calls[0].rate == 1 else None
    for c in calls:
        o_g, l_g = kernels.attn_fwd(*(_gather(x, c, h) for x in (fq, fk, fv)), causal, scale, force_math)
        for (ov, o_p), (lv, l_p) in zip(_pieces(out, o_g, c, h), _pieces(lse, l_g, c, h)):
            if c.pattern == first:
                ov.copy_(o_p)
                lv.copy_(l_p)
            else:
                merge_partial(ov, lv, o_p, l_p)
    return out, lse


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], segment_lengths: List[int], dilation_rates: List[int],
                   is_causal: bool, scale: float, force_math: bool = False,
                   segment_phases: Optional[List[int]] = None) -> Tuple[Tensor, Tensor]:
    """(out, lse) of the varlen mixture (see the module docstring), no autograd: the op's body."""
    from .custom_ops import mixture_forward
    starts, lengths = sequences(q, cu_seqlens, key_padding_mask)
    dense = _dense_shape(q, starts, lengths)
    if dense is not None:
        shape = (*dense, *q.shape[-2:])
        o, l = mixture_forward(q.reshape(shape), k.reshape(shape), v.reshape(shape), segment_lengths,
                               dilation_rates, is_causal, scale, force_math, segment_phases)
        return o.reshape(q.shape), l.reshape(q.shape[:-1])
    h, d = q.shape[-2:]
    calls = plan_calls(starts, lengths, h, segment_lengths, dilation_rates, segment_phases, d * 4)
    out, lse = _mixture(q, k, v, calls, is_causal, scale, force_math)
    return out.to(q.dtype).view(q.shape), lse.view(q.shape[:-1])


def _grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, calls: List[VarlenCall],
           causal: bool, scale: float, force_math: bool) -> List[Tensor]:
    """(dq, dk, dv) as (1, rows, H, D) in the acc dtype: each call's flash backward, added in."""
    acc = acc_dtype(q.dtype)
    h = q.shape[-2]
    flats = [_flat(x) for x in (do, q, k, v, out)] + [_flat(lse, 1)]
    grads = [torch.zeros(flats[1].shape, dtype=acc, device=q.device) for _ in range(3)]
    for c in calls:
        parts = kernels.attn_bwd(*(_gather(x, c, h) for x in flats), causal, scale, force_math)
        for dst, p in zip(grads, parts):
            for gv, pv in _pieces(dst, p, c, h):
                gv.add_(pv)
    return grads


def varlen_backward(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                    out: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    segment_lengths: List[int], dilation_rates: List[int], is_causal: bool, scale: float,
                    force_math: bool = False, segment_phases: Optional[List[int]] = None
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (dq, dk, dv) for gradients dout and dlse (either may be None) of the varlen (out, lse)."""
    from .custom_ops import mixture_backward
    starts, lengths = sequences(q, cu_seqlens, key_padding_mask)
    dense = _dense_shape(q, starts, lengths)
    if dense is not None:
        shape = (*dense, *q.shape[-2:])

        def view(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x.reshape(shape if x.ndim == q.ndim else shape[:3])
        grads = mixture_backward(view(dout), view(dlse), view(q), view(k), view(v), view(out), view(lse),
                                 segment_lengths, dilation_rates, is_causal, scale, force_math, segment_phases)
        return tuple(g.reshape(q.shape) for g in grads)
    h, d = q.shape[-2:]
    calls = plan_calls(starts, lengths, h, segment_lengths, dilation_rates, segment_phases, d * 4)

    def run(do: Tensor, o: Tensor, zero_values: bool):
        values = torch.zeros_like(v) if zero_values else v
        return [g.view(q.shape) for g in _grads(do, q, k, values, o, lse, calls, is_causal, scale, force_math)]
    return backward_grads(run, backward_inputs(dout, dlse, out), q.dtype)


varlen_fwd_op = torch.library.custom_op("longnet::dilated_attention_varlen_fwd", mutates_args=())(varlen_forward)
varlen_bwd_op = torch.library.custom_op("longnet::dilated_attention_varlen_bwd", mutates_args=())(varlen_backward)


@varlen_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
              force_math=False, segment_phases=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))


@varlen_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens, key_padding_mask, segment_lengths, dilation_rates,
              is_causal, scale, force_math=False, segment_phases=None):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu, mask, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, mask)
    ctx.args = args
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor]):
    q, k, v, out, lse, cu, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.longnet.dilated_attention_varlen_bwd(dout, dlse, q, k, v, out, lse, cu, mask,
                                                                *ctx.args)
    return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dilated_attention_varlen_torch(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                                   dilation_rates: Sequence[int], *, cu_seqlens: Optional[Tensor] = None,
                                   key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                                   scale: float, force_math: bool = False,
                                   segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable varlen (out, lse): packed (T, H, D) with cu_seqlens, or padded (B, N, H, D) with a mask."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    phases = [int(p) for p in segment_phases] if segment_phases is not None and any(segment_phases) else None
    return torch.ops.longnet.dilated_attention_varlen_fwd(
        q, k, v, cu_seqlens, key_padding_mask, [int(w) for w in segment_lengths],
        [int(r) for r in dilation_rates], bool(is_causal), float(scale), bool(force_math), phases)


VarlenFn = Callable[..., Tuple[Tensor, Tensor]]


def varlen_by_length(fn: VarlenFn, q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                     dilation_rates: Sequence[int], *, cu_seqlens: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], is_causal: bool, scale: float,
                     segment_phases: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Varlen (out, lse) through a dense backend ``fn`` on (B, N, H, D): one call per distinct length.

    Sequences of one length are gathered into a (count, L, H, D) batch, so each runs exactly
    as alone and the cost is the sum over sequences (plus one launch per distinct length).
    Differentiable through ``fn`` and the index ops; rows of no sequence get 0 / -inf.
    """
    starts, lengths = sequences(q, cu_seqlens, key_padding_mask)
    h, d = q.shape[-2:]
    fq, fk, fv = (x.reshape(-1, h, d) for x in (q, k, v))
    acc = acc_dtype(q.dtype)
    out = fq.new_zeros(fq.shape)
    lse = torch.full(fq.shape[:2], float("-inf"), dtype=acc, device=q.device)
    by_len: Dict[int, List[int]] = {}
    for s, n in zip(starts, lengths):
        if n:
            by_len.setdefault(n, []).append(s)
    extra = {"segment_phases": tuple(segment_phases)} if segment_phases is not None and any(segment_phases) else {}
    for n, firsts in by_len.items():
        idx = (torch.tensor(firsts, dtype=torch.int64)[:, None] + torch.arange(n)).reshape(-1).to(q.device)
        o, l = fn(*(x.index_select(0, idx).view(len(firsts), n, h, d) for x in (fq, fk, fv)), segment_lengths,
                  dilation_rates, is_causal=is_causal, scale=scale, **extra)
        out = out.index_copy(0, idx, o.reshape(-1, h, d).to(out.dtype))
        lse = lse.index_copy(0, idx, l.reshape(-1, h).to(acc))
    return out.view(q.shape), lse.view(q.shape[:-1])
