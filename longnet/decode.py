"""One decode step of causal dilated attention against a key/value cache: the one home of it.

A new query at position p of its sequence computes exactly row p of the full causal op
(docs/design.md §1-2): for each pattern (w, r, φ) p lies in segment a with offset
s = (p - a) mod r; the heads h with h mod r = s keep it and attend to the keys
a + s, a + s + r, ..., p of their own sequence, a strided slice of the cache (no gather).
The patterns' partial outputs merge by log-sum-exp; heads that no pattern keeps output 0.
Work per query is O(sum_i w_i / r_i), whatever the context length.

Layouts: q (B, Hq, D); key, value (B, S, Hkv, D), slot-major (the cache's own layout, or a
transposed view of transformers' (B, Hkv, S, D)), Hq a multiple of Hkv (grouped-query
attention: query head h reads key head h // (Hq / Hkv)). Each sequence b of the batch has
its own query position ``positions[b]`` and the slot ``slots[b]`` that holds it (its key is
stored there already); position j of sequence b lives in slot j - positions[b] + slots[b].
So a batch of different lengths, left-padded or compacted per sequence, decodes in one call,
and each row equals that sequence decoded alone. Sequences that share a plan in slot terms
(the same slices) share their kernel calls.

Used by :meth:`longnet.LongNetLM.decode_step` and by the ``"longnet"`` attention of
:mod:`longnet.hf`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import kernels
from .backends.numerics import acc_dtype
from .backends.torch_backend import merge_partial
from .patterns import used_offsets, visible_keys

__all__ = ["decode_plan", "decode_attention"]

# One pattern's work for one query, in slot terms: (head offset s, first slot, end slot, rate).
# The heads s, s + r, ... read slots first, first + r, ... < end.
Step = Tuple[int, int, int, int]


def decode_plan(position: int, slot: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                segment_phases: Optional[Sequence[int]], num_heads: int) -> Tuple[Step, ...]:
    """The :data:`Step` of each pattern that keeps ``position`` in some head, its key at ``slot``."""
    phases = segment_phases or (0,) * len(segment_lengths)
    plan = []
    for w, r, phi in zip(segment_lengths, dilation_rates, phases):
        s, first, _ = visible_keys(position, w, r, phi)
        if s not in used_offsets(r, num_heads):  # only heads h = s mod r would keep p, and there are none
            continue
        first_slot = first - position + slot
        if first_slot < 0:
            raise ValueError(f"the query at position {position} (slot {slot}) reads key position {first}, "
                             "which the cache no longer holds")
        plan.append((s, first_slot, slot + 1, r))
    return tuple(plan)


def _heads(x: Tensor, s: int, r: int, num_heads: int) -> Tensor:
    """x (b, m, Hkv, D) -> (b, m, Hs, D) for query heads s, s + r, ...: a view without grouped heads."""
    rep = num_heads // x.shape[2]
    if rep == 1:
        return x[:, :, s::r]
    idx = torch.arange(s, num_heads, r, device=x.device) // rep
    return x.index_select(2, idx)


def _attend_group(q: Tensor, key: Tensor, value: Tensor, rows, plan: Tuple[Step, ...], scale: float,
                  decay: Optional[Tensor]) -> Tensor:
    """Rows ``rows`` (a slice or an index tensor) of q (B, Hq, D), key, value (B, S, Hkv, D), which share
    ``plan`` -> (b, Hq, D) in q's accumulation dtype."""
    q = q[rows]
    b, hq, d = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=acc, device=q.device)
    for s, first, end, r in plan:
        # A strided view for a slice of rows; an index tensor copies only these slots.
        k_i = _heads(key[rows, first:end:r], s, r, hq)
        v_i = _heads(value[rows, first:end:r], s, r, hq)
        q_i = q[:, s::r]
        if decay is not None:
            # XPOS's key factor by distance to the query (at slot end - 1), in key order.
            dist = torch.arange(end - 1 - first, -1, -r, device=decay.device)
            k_i = k_i.to(acc) * decay[dist][None, :, None, :].to(device=k_i.device, dtype=acc)
            q_i, v_i = q_i.to(acc), v_i.to(acc)
        o_i, l_i = kernels.attn_fwd(q_i[:, :, None], k_i.transpose(1, 2), v_i.transpose(1, 2), False, scale)
        merge_partial(out[:, s::r], lse[:, s::r], o_i[:, :, 0], l_i[:, :, 0])
    return out


def decode_attention(q: Tensor, key: Tensor, value: Tensor, positions: Sequence[int], segment_lengths,
                     dilation_rates, scale: float, *, segment_phases=None, slots: Optional[Sequence[int]] = None,
                     decay: Optional[Tensor] = None) -> Tensor:
    """One query per sequence against its cache: q (B, Hq, D), key/value (B, S, Hkv, D) -> (B, Hq, D).

    ``positions`` (B ints): the query's position in its own sequence; ``slots`` (B ints, default
    S - 1 for every row): the cache slot holding that position. ``decay`` (window, D) or None:
    XPOS's key factor by distance to the query, for caches of rotated, undecayed keys. The
    result is in q's accumulation dtype (float32 for half inputs); rows equal row p of the full
    causal op of each sequence alone.
    """
    b, hq, _ = q.shape
    if key.ndim != 4 or value.shape != key.shape or key.shape[0] != b or hq % key.shape[2]:
        raise ValueError(f"key and value must be (B, S, Hkv, D) with B = {b} and Hkv dividing Hq = {hq}, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    positions = [int(p) for p in positions]
    slots = [key.shape[1] - 1] * b if slots is None else [int(x) for x in slots]
    if len(positions) != b or len(slots) != b:
        raise ValueError(f"positions and slots must hold one value per sequence (B = {b}), got "
                         f"{len(positions)} and {len(slots)}")
    groups: Dict[Tuple[Step, ...], List[int]] = {}
    for i, (p, slot) in enumerate(zip(positions, slots)):
        if not 0 <= slot < key.shape[1] or p < 0:
            raise ValueError(f"sequence {i}: position {p} at slot {slot} is outside the cache of {key.shape[1]} slots")
        plan = decode_plan(p, slot, segment_lengths, dilation_rates, segment_phases, hq)
        groups.setdefault(plan, []).append(i)
    if len(groups) == 1:  # the common case of one length: no gather at all
        return _attend_group(q, key, value, slice(None), next(iter(groups)), scale, decay)
    out = torch.zeros(b, hq, q.shape[2], dtype=acc_dtype(q.dtype), device=q.device)
    for plan, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        out[idx] = _attend_group(q, key, value, idx, plan, scale, decay)
    return out
