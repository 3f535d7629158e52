"""longnet.decode: one decode step against the cache, for batches of different lengths and layouts."""

import pytest
import torch

from longnet import dilated_attention
from longnet.decode import decode_attention, decode_plan


def test_decode_plan_follows_the_keep_rule():
    w, r, H = (6, 10), (2, 3), 4
    for p in range(40):
        plan = decode_plan(p, p, w, r, None, H)
        for wi, ri in zip(w, r):
            heads = [h for h in range(H) if (p % wi) % ri == h % ri]
            entry = [e for e in plan if e[3] == ri]
            if not heads:
                assert not entry
                continue
            s, first, end, rate = entry[0]
            assert list(range(s, H, rate)) == heads and end == p + 1
            expect = [j for j in range((p // wi) * wi, p + 1) if (j % wi) % ri == (p % wi) % ri]
            assert list(range(first, end, rate)) == expect


def test_decode_plan_refuses_a_dropped_key():
    with pytest.raises(ValueError, match="no longer holds"):
        decode_plan(20, 3, (16,), (1,), None, 2)  # reads key 16, which would sit at slot -1


def _reference_rows(seqs, w, r, phases, rep):
    """Row p = L - 1 of the full causal op of each sequence alone (reference backend)."""
    rows = []
    for q, k, v in seqs:
        k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
        out = dilated_attention(q[None], k[None], v[None], w, r, is_causal=True, backend="reference",
                                segment_phases=phases)
        rows.append(out[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("w,r,phases,hq,hkv", [
    ((8, 16, 32), (1, 2, 4), None, 4, 4),
    ((6, 10), (2, 3), None, 4, 2),          # rows no pattern keeps; grouped-query heads
    ((16, 12), (4, 6), (0, 5), 4, 1),       # r > H, phases, one key head
])
@pytest.mark.parametrize("layout", ["left-padded", "compacted"])
def test_batch_of_lengths_equals_each_alone(w, r, phases, hq, hkv, layout, seed):
    g = torch.Generator().manual_seed(seed)
    lengths, d = [1, 7, 33, 50, 50, 70], 8
    seqs = [tuple(torch.randn(n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)) for n in lengths]
    expect = _reference_rows(seqs, w, r, phases, hq // hkv)
    b, window = len(lengths), max(w)
    if layout == "left-padded":  # transformers' layout: every query in the last slot, junk in the padding
        s = max(lengths)
        key = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
        value = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
        for i, (_, k, v) in enumerate(seqs):
            key[i, s - len(k):], value[i, s - len(k):] = k, v
        slots = None
    else:  # LongNetLM's cache: each row keeps its last window positions from slot 0
        starts = [max(0, n - window) for n in lengths]
        cap = max(n - st for n, st in zip(lengths, starts)) + 3
        key = torch.randn(b, cap, hkv, d, generator=g, dtype=torch.float64)
        value = torch.randn(b, cap, hkv, d, generator=g, dtype=torch.float64)
        for i, ((_, k, v), st) in enumerate(zip(seqs, starts)):
            key[i, :len(k) - st], value[i, :len(k) - st] = k[st:], v[st:]
        slots = [n - 1 - st for n, st in zip(lengths, starts)]
    q = torch.stack([sq[-1] for sq, _, _ in seqs])
    out = decode_attention(q, key, value, [n - 1 for n in lengths], w, r, d ** -0.5, segment_phases=phases,
                           slots=slots)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=1e-10)
    # Each row alone gives the same as in the batch.
    for i in range(b):
        alone = decode_attention(q[i:i + 1], key[i:i + 1], value[i:i + 1], [lengths[i] - 1], w, r, d ** -0.5,
                                 segment_phases=phases, slots=None if slots is None else slots[i:i + 1])
        torch.testing.assert_close(alone[0], out[i], atol=0, rtol=0)


def test_bad_arguments_name_what_is_expected():
    q, kv = torch.randn(2, 4, 8), torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        decode_attention(q, kv, kv, [4, 4], (4,), (1,), 1.0)
    kv = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="one value per sequence"):
        decode_attention(q, kv, kv, [4], (4,), (1,), 1.0)
    with pytest.raises(ValueError, match="outside the cache"):
        decode_attention(q, kv, kv, [4, 4], (4,), (1,), 1.0, slots=[4, 5])
