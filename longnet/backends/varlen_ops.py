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
and every equally long tail), fed by one gather of their kept rows (index_select on the
(rows x H, D) view, heads of one kept count stacked as in :mod:`.torch_backend`); partial
outputs merge into the (rows x H, D) output with the update of docs/design.md §7, and the
backward index-adds each call's gradients. Rows of no sequence (padding, gaps) get out 0,
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
from .torch_backend import merge_partial

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
    """One kernel call of pattern ``pattern``: ``index`` (Z, kept, G) into x viewed as (rows x H / width, width, D).

    ``width`` is H for an r = 1 pattern (whole rows, every head: G = 1) and 1 otherwise (one
    head's row per index, G = the stacked heads); the call's input is (Z, G x width, kept, D).
    """

    pattern: int
    index: Tensor
    width: int


def _segment_starts(starts: Sequence[int], lengths: Sequence[int], w: int, phase: int) -> Dict[int, List]:
    """{segment length: [(first start, count), ...]}: every sequence's segments of one pattern, by length."""
    runs: Dict[int, List] = {}
    for s, n in zip(starts, lengths):
        if n == 0:
            continue
        for g_start, nseg, seg_len in segment_groups(n, w, phase):
            runs.setdefault(seg_len, []).append((s + g_start, nseg))
    return runs


def _run_starts(runs: List, seg_len: int, device) -> Tensor:
    """(Z,) int64 segment starts of runs [(first, count), ...] of equally long segments."""
    firsts = torch.tensor([f for f, _ in runs], dtype=torch.int64)
    counts = torch.tensor([c for _, c in runs], dtype=torch.int64)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return (torch.repeat_interleave(firsts, counts) + within * seg_len).to(device)


def plan_calls(starts: Sequence[int], lengths: Sequence[int], num_heads: int, segment_lengths: Sequence[int],
               dilation_rates: Sequence[int], segment_phases: Optional[Sequence[int]], row_bytes: int,
               device) -> List[VarlenCall]:
    """Every kernel call of the varlen mixture, the r = 1 patterns first.

    For pattern (w, r, φ), the segments of one length over all sequences and the head
    offsets of one kept count form a call: index[z, j, c] = (a_z + s_c + j r) H + h_c for
    segment start a_z and the c-th stacked head h_c with offset s_c (for r = 1, whole rows:
    index[z, j, 0] = a_z + j). Calls larger than ``_CALL_BYTES`` (``row_bytes`` per row and
    head) are split over Z.
    """
    phases = segment_phases or (0,) * len(segment_lengths)
    order = sorted(range(len(segment_lengths)), key=lambda i: dilation_rates[i] != 1)
    calls: List[VarlenCall] = []
    for i in order:
        r = dilation_rates[i]
        for seg_len, runs in _segment_starts(starts, lengths, segment_lengths[i], phases[i]).items():
            seg_starts = _run_starts(runs, seg_len, device)
            by_kept: Dict[int, List[int]] = {}
            for s in used_offsets(r, num_heads):
                kept = kept_count(seg_len, s, r)
                if kept:
                    by_kept.setdefault(kept, []).append(s)
            for kept, offsets in by_kept.items():
                heads = [h for s in offsets for h in heads_with_offset(s, r, num_heads)]
                step = max(1, _CALL_BYTES // max(1, kept * len(heads) * row_bytes))
                if r == 1:
                    rows = torch.arange(kept, device=device)[None, :, None]
                    calls += [VarlenCall(i, seg_starts[z:z + step, None, None] + rows, num_heads)
                              for z in range(0, seg_starts.numel(), step)]
                    continue
                head_t = torch.tensor(heads, dtype=torch.int64, device=device)
                rows = (head_t % r)[None, None, :] + r * torch.arange(kept, device=device)[None, :, None]
                calls += [VarlenCall(i, (seg_starts[z:z + step, None, None] + rows) * num_heads + head_t, 1)
                          for z in range(0, seg_starts.numel(), step)]
    return calls


def _units(flat: Tensor, width: int) -> Tensor:
    """flat (rows x H, *rest) viewed as (rows x H / width, width, *rest): the units a call's index counts."""
    return flat.view(-1, width, *flat.shape[1:])


def _gather(flat: Tensor, c: VarlenCall) -> Tensor:
    """(Z, G x width, kept, *rest) kernel input from flat (rows x H, *rest); one copy."""
    z, kept, g = c.index.shape
    picked = _units(flat, c.width).index_select(0, c.index.reshape(-1))
    return picked.view(z, kept, g * c.width, *flat.shape[1:]).transpose(1, 2)


def _rows(t: Tensor, width: int) -> Tensor:
    """A kernel output (Z, G x width, kept, *rest) as (Z x kept x G, width, *rest): units in the index's order."""
    t = t.transpose(1, 2)
    return t.reshape(-1, width, *t.shape[3:])


def _dense_shape(q: Tensor, starts: Sequence[int], lengths: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(B, L) when the sequences are B equal runs of L tiling every row in order (the dense path), else None."""
    rows = q.shape[0] * (q.shape[1] if q.ndim == 4 else 1)
    b = len(lengths)
    if b == 0 or lengths[0] == 0 or any(n != lengths[0] for n in lengths) or b * lengths[0] != rows:
        return None
    if any(s != i * lengths[0] for i, s in enumerate(starts)):
        return None
    return b, lengths[0]


def _flat(x: Tensor) -> Tensor:
    """x ((T, H, D) or (B, N, H, D)) as (rows x H, D); copies only when the strides do not allow a view."""
    return x.reshape(-1, x.shape[-1])


def _mixture(q: Tensor, k: Tensor, v: Tensor, calls: List[VarlenCall], causal: bool, scale: float,
             force_math: bool) -> Tuple[Tensor, Tensor]:
    """(out (rows x H, D) acc dtype, lse (rows x H,)) of the planned calls; rows of no call stay 0 / -inf.

    An r = 1 pattern covers every row of every sequence once, so the first one (``plan_calls``
    puts them first) is copied in rather than merged.
    """
    acc = acc_dtype(q.dtype)
    fq, fk, fv = (_flat(x) for x in (q, k, v))
    out = torch.zeros(fq.shape, dtype=acc, device=q.device)
    lse = torch.full(fq.shape[:1], float("-inf"), dtype=acc, device=q.device)
    first = calls[0].pattern if calls and calls[0].width == q.shape[-2] else None
    for c in calls:
        o_g, l_g = kernels.attn_fwd(*(_gather(x, c) for x in (fq, fk, fv)), causal, scale, force_math)
        idx = c.index.reshape(-1)
        o_p, l_p = _rows(o_g, c.width), _rows(l_g, c.width)
        uo, ul = _units(out, c.width), _units(lse, c.width)
        if c.pattern == first:
            uo.index_copy_(0, idx, o_p.to(acc))
            ul.index_copy_(0, idx, l_p.to(acc))
            continue
        cur_o, cur_l = uo.index_select(0, idx), ul.index_select(0, idx)
        merge_partial(cur_o, cur_l, o_p, l_p)
        uo.index_copy_(0, idx, cur_o)
        ul.index_copy_(0, idx, cur_l)
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
    calls = plan_calls(starts, lengths, h, segment_lengths, dilation_rates, segment_phases, d * 4, q.device)
    out, lse = _mixture(q, k, v, calls, is_causal, scale, force_math)
    return out.to(q.dtype).view(q.shape), lse.view(q.shape[:-1])


def _grads(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, calls: List[VarlenCall],
           causal: bool, scale: float, force_math: bool) -> List[Tensor]:
    """(dq, dk, dv) as (rows x H, D) in the acc dtype: each call's flash backward, index-added."""
    acc = acc_dtype(q.dtype)
    flats = [_flat(x) for x in (do, q, k, v, out)] + [lse.reshape(-1)]
    grads = [torch.zeros(flats[1].shape, dtype=acc, device=q.device) for _ in range(3)]
    for c in calls:
        parts = kernels.attn_bwd(*(_gather(x, c) for x in flats), causal, scale, force_math)
        idx = c.index.reshape(-1)
        for dst, p in zip(grads, parts):
            _units(dst, c.width).index_add_(0, idx, _rows(p, c.width).to(acc))
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
    calls = plan_calls(starts, lengths, h, segment_lengths, dilation_rates, segment_phases, d * 4, q.device)

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
