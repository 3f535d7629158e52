"""Segment phases and the local-window variant (issue 12 §1): the rule, the oracle, every backend.

A pattern (w, r, φ) cuts the positions into [0, φ), [φ, φ + w), ... (see
longnet/patterns.py). The dense reference is checked against a loop oracle
written here from that sentence alone, and by hand; the torch and math
backends are checked against the reference (the Triton kernels in
tests/test_triton.py, sequence parallelism in tests/test_distributed.py).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longnet
from longnet.backends.reference import count_matrix
from longnet.patterns import (DilatedPattern, clip_phase, clip_segment, dilated_flops, heads_with_offset,
                              keep_mask, kept_positions, row_offset, segment_bounds, segment_groups,
                              segment_start, validate_phases, visible_keys)
from tests.helpers import _segments, assert_close, loop_reference

BACKENDS = ("torch", "math")


# --------------------------------------------------------------------------- an oracle from the definition

def loop_oracle(q, k, v, segment_lengths, dilation_rates, phases, causal, scale=None):
    """docs/design.md §1-2 with shifted segments, per pattern, head and segment (tests/helpers.py)."""
    return loop_reference(q, k, v, segment_lengths, dilation_rates, is_causal=causal, scale=scale,
                          segment_phases=phases)


# --------------------------------------------------------------------------- the rule

def test_segments_by_hand():
    # N = 20, w = 8, phase 3: [0,3) [3,11) [11,19) [19,20).
    assert segment_groups(20, 8, 3) == [(0, 1, 3), (3, 2, 8), (19, 1, 1)]
    assert [segment_start(p, 8, 3) for p in (0, 2, 3, 10, 11, 19)] == [0, 0, 3, 3, 11, 19]
    assert segment_bounds(2, 20, 8, 3) == (0, 3) and segment_bounds(12, 20, 8, 3) == (11, 19)
    assert segment_bounds(19, 20, 8, 3) == (19, 20)
    # Phase 0 is docs/design.md's cut; a phase at or past N leaves one segment.
    assert segment_groups(20, 8, 0) == [(0, 2, 8), (16, 1, 4)]
    assert segment_groups(5, 8, 6) == [(0, 1, 5)] and clip_phase(6, 5) == 5
    # Head 1 of r = 2 keeps rows 1 of [0,3), 4, 6, 8, 10 of [3,11), 12 ... 18 of [11,19).
    assert kept_positions(20, 8, 2, 1, 3) == [1, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [row_offset(p, 8, 2, 3) for p in range(6)] == [0, 1, 0, 0, 1, 0]
    # Query 13 in [11, 19), r = 3: offset 2, keys 13 alone; query 17: keys 14, 17.
    assert visible_keys(13, 8, 3, 3) == (2, 13, 1) and visible_keys(17, 8, 3, 3) == (0, 11, 3)
    assert visible_keys(1, 8, 3, 3) == (1, 1, 1)


@pytest.mark.parametrize("n,h,w,r,phi", [(20, 3, 8, 2, 3), (37, 5, 8, 3, 7), (9, 2, 100, 4, 50),
                                         (9, 2, 100, 4, 5), (30, 4, 6, 6, 1), (16, 1, 16, 1, 15)])
def test_rule_forms_agree(n, h, w, r, phi):
    """keep_mask (numpy, torch), kept_positions, row_offset, visible_keys against the written-out segments."""
    wc, pc = clip_segment(w, n), clip_phase(phi, n)
    mask_np = keep_mask(np.arange(n), np.arange(h), wc, r, pc)
    mask_t = keep_mask(torch.arange(n), torch.arange(h), wc, r, pc)
    np.testing.assert_array_equal(mask_np, mask_t.numpy())
    segs = _segments(n, w, phi)
    for head in range(h):
        rows = [p for a, e in segs for p in range(a + head % r, e, r)]
        assert np.flatnonzero(mask_np[head]).tolist() == rows == kept_positions(n, w, r, head % r, phi)
        assert rows == DilatedPattern((w,), (r,), (phi,)).kept_rows(0, head, n)
    for p in range(n):
        a = next(a for a, e in segs if a <= p < e)
        assert segment_start(p, wc, pc) == a == segment_start(torch.tensor(p), wc, pc).item()
        s, first, count = visible_keys(p, w, r, phi)  # unclipped: a causal query ignores N
        assert s == row_offset(p, wc, r, pc) == (p - a) % r
        assert [hd for hd in range(h) if mask_np[hd, p]] == list(heads_with_offset(s, r, h))
        assert list(range(first, p + 1, r))[:count] == list(range(a + s, p + 1, r))
        assert count == len(range(a + s, p + 1, r))


def test_visible_keys_match_the_count_matrix():
    """The decode cache's rule (per pattern) against the dense oracle's C, for every query and head."""
    n, h = 29, 5
    w, r, ph = (8, 12, 6), (1, 3, 2), (5, 7, 3)
    c = count_matrix(n, h, w, r, is_causal=True, segment_phases=ph)
    for p in range(n):
        got = torch.zeros(h, n, dtype=torch.int64)
        for wi, ri, phi in zip(w, r, ph):
            s, first, count = visible_keys(p, wi, ri, phi)
            for hd in heads_with_offset(s, ri, h):
                got[hd, torch.arange(first, p + 1, ri)[:count]] += 1
        assert torch.equal(got, c[:, p]), p


def test_count_matrix_by_hand():
    # N = 6, H = 2, one pattern w = 4, r = 2, phase 1: segments [0,1) [1,5) [5,6).
    # Head 0 keeps 0 | 1, 3 | 5; head 1 keeps nothing of [0,1), 2, 4 | nothing of [5,6).
    c = count_matrix(6, 2, (4,), (2,), segment_phases=(1,))
    want = torch.zeros(2, 6, 6, dtype=torch.int64)
    for hd, group in ((0, [0]), (0, [1, 3]), (0, [5]), (1, [2, 4])):
        for p in group:
            for j in group:
                want[hd, p, j] = 1
    assert torch.equal(c, want)
    # Add phase 0 (w = 2, r = 1) and causality: the two patterns count separately.
    c2 = count_matrix(6, 2, (4, 2), (2, 1), segment_phases=(1, 0), is_causal=True)
    assert c2[0, 1, 0].item() == 1 and c2[0, 3, 1].item() == 1 and c2[0, 1, 1].item() == 2
    assert c2[1, 3, 2].item() == 1 and c2[1, 4, 2].item() == 1 and c2[1, 2, 4].item() == 0


def test_phase_zero_is_spec_bit_for_bit():
    n, h = 23, 3
    assert torch.equal(count_matrix(n, h, (8, 12), (1, 3)), count_matrix(n, h, (8, 12), (1, 3), segment_phases=(0, 0)))
    q, k, v = (torch.randn(2, n, h, 8) for _ in range(3))
    for backend in BACKENDS + ("reference",):
        a = longnet.dilated_attention(q, k, v, (8, 12), (1, 3), is_causal=True, return_lse=True, backend=backend)
        b = longnet.dilated_attention(q, k, v, (8, 12), (1, 3), is_causal=True, return_lse=True, backend=backend,
                                      segment_phases=(0, 0))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), backend


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("phases,exc,needle", [
    ((1,), ValueError, "one phase per segment length, got 1 phases for 2"),
    ((0, 8), ValueError, r"segment_phases\[1\] must satisfy 0 <= phase < segment_lengths\[1\] = 8, got 8"),
    ((-1, 0), ValueError, r"segment_phases\[0\] must satisfy"),
    ((0, 2.0), TypeError, r"segment_phases\[1\] must be an integer"),
    ((True, 0), TypeError, "must be an integer, got True"),
    ("0,1", TypeError, "segment_phases must be an int or a sequence of ints"),
])
def test_bad_phases_are_refused(phases, exc, needle):
    with pytest.raises(exc, match=needle):
        validate_phases(phases, (4, 8))
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(exc, match=needle):
        longnet.dilated_attention(q, q, q, (4, 8), (1, 2), segment_phases=phases)
    with pytest.raises(exc, match=needle):
        DilatedPattern((4, 8), (1, 2), phases)


def test_phases_accept_numpy_and_tensor_ints():
    assert validate_phases((np.int64(3), torch.tensor(1)), (4, 8)) == (3, 1)
    assert validate_phases(None, (4, 8)) == (0, 0)


@pytest.mark.parametrize("window", [0, 1, 3, 15, -2])
def test_local_window_must_be_even_and_at_least_2(window):
    with pytest.raises(ValueError, match=f"window must be an even integer >= 2, got {window}"):
        DilatedPattern.paper().with_local_window(window)


def test_local_window_must_be_an_int():
    with pytest.raises(TypeError, match="window must be an integer"):
        DilatedPattern.paper().with_local_window(16.0)


def test_pattern_str_parse_and_equality():
    p = DilatedPattern((128, 256), (1, 2)).with_local_window(16)
    assert p.segment_lengths == (128, 256, 16, 16) and p.dilation_rates == (1, 2, 1, 1)
    assert p.segment_phases == (0, 0, 0, 8)
    assert str(p) == "w=128,256,16,16 r=1,2,1,1 phase=0,0,0,8"
    assert DilatedPattern.parse("128,256,16,16", "1,2,1,1", "0,0,0,8") == p
    assert str(DilatedPattern((8,), (1,))) == "w=8 r=1"  # phase 0 prints as before
    assert DilatedPattern((8,), (1,)) == DilatedPattern((8,), (1,), (0,))
    with pytest.raises(ValueError, match="segment_phases must be comma-separated integers"):
        DilatedPattern.parse("8", "1", "x")


def test_huge_segment_and_phase_are_clipped():
    q, k, v = (torch.randn(1, 9, 2, 4, dtype=torch.float64) for _ in range(3))
    w, r, ph = (2**63 - 1, 4), (2, 1), (2**62, 3)
    ref = loop_oracle(q, k, v, (9, 4), r, (9, 3), True)  # w, φ >= N: one segment [0, 9)
    for backend in BACKENDS + ("reference",):
        out, lse = longnet.dilated_attention(q, k, v, w, r, segment_phases=ph, is_causal=True,
                                             return_lse=True, backend=backend)
        assert_close(out, ref[0], torch.float64)
        assert_close(lse, ref[1], torch.float64, "lse")


# --------------------------------------------------------------------------- FLOPs

def test_flops_count_the_leading_segment():
    # N = 10, H = 2, w = 4, r = 2, phase 1: segments [0,1) [1,5) [5,9) [9,10);
    # head 0 keeps 1, 2, 2, 1 rows; head 1 keeps 0, 2, 2, 0.
    f = dilated_flops(10, 2, 8, (4,), (2,), segment_phases=(1,))
    assert f == 4 * 8 * ((1 + 4 + 4 + 1) + (0 + 4 + 4 + 0))
    assert DilatedPattern((4,), (2,), (1,)).flops(10, 2, 8, causal=True) == f / 2
    assert dilated_flops(10, 2, 8, (4,), (2,)) == dilated_flops(10, 2, 8, (4,), (2,), segment_phases=(0,))


@pytest.mark.parametrize("n", [32768, 65536])
def test_local_window_costs_at_most_10_percent_at_paper_sizes(n):
    paper = DilatedPattern.paper()
    extra = paper.with_local_window(128).flops(n, 12, 64, causal=True) / paper.flops(n, 12, 64, causal=True) - 1
    assert 0 < extra <= 0.10, extra


# --------------------------------------------------------------------------- the local window links neighbours

def test_local_window_links_every_neighbour_pair():
    n, h = 300, 12
    for base in (DilatedPattern((16, 32, 64), (1, 2, 4)), DilatedPattern((64, 128), (1, 4))):
        c_base = count_matrix(n, h, base.segment_lengths, base.dilation_rates, is_causal=True)
        # The paper's pattern alone: token j + 1 never sees token j across an r = 1 boundary (docs/design.md §2.1).
        w0 = base.segment_lengths[0]
        assert (c_base[:, w0, w0 - 1] == 0).all()
        for window in (2, 8, 16):
            p = base.with_local_window(window)
            c = count_matrix(n, h, p.segment_lengths, p.dilation_rates, is_causal=True, segment_phases=p.segment_phases)
            j = torch.arange(n - 1)
            assert (c[:, j + 1, j] > 0).all(), (str(p), window)


# --------------------------------------------------------------------------- backends against the oracle

CASES = {
    # name: (B, N, H, D, segment_lengths, dilation_rates, segment_phases)
    "window": (2, 40, 3, 8, (16, 8, 8), (2, 1, 1), (0, 0, 4)),
    "n-not-multiple": (1, 37, 4, 8, (8, 12), (1, 3), (3, 5)),
    "phase-past-n": (2, 10, 3, 8, (16, 40), (1, 7), (13, 30)),
    "r-not-dividing-w": (1, 50, 2, 8, (6, 10), (4, 3), (5, 1)),
    "r-gt-h-no-r1": (2, 33, 3, 8, (12, 20), (5, 4), (7, 11)),
    "n-lt-w": (1, 7, 2, 8, (12,), (2,), (4,)),
    "n1": (1, 1, 2, 8, (4, 4), (1, 2), (2, 3)),
}


def _run(q, k, v, do, dlse, case, causal, backend):
    """(out, lse, dq, dk, dv) for loss = <out, do> + <lse, dlse> over rows with finite lse."""
    _, _, _, _, w, r, ph = case
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=causal, return_lse=True, backend=backend,
                                         segment_phases=ph)
    fin = torch.isfinite(lse)
    loss = (out * do).sum() + (torch.where(fin, lse, torch.zeros_like(lse)) * dlse).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v))]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("cid", list(CASES))
def test_reference_matches_loop_oracle(cid, causal):
    b, n, h, d, w, r, ph = CASES[cid]
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=causal, return_lse=True, backend="reference",
                                         segment_phases=ph)
    want_out, want_lse = loop_oracle(q, k, v, w, r, ph, causal)
    assert_close(out, want_out, torch.float64)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    assert_close(lse[fin], want_lse[fin], torch.float64, "lse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cid", list(CASES))
def test_backend_matches_reference(cid, backend, causal, dtype):
    case = CASES[cid]
    b, n, h, d = case[:4]
    q, k, v, do = (torch.randn(b, n, h, d, dtype=dtype) for _ in range(4))
    dlse = torch.randn(b, n, h, dtype=dtype)
    got = _run(q, k, v, do, dlse, case, causal, backend)
    # The reference in float64 on the same (dtype-rounded) inputs.
    want = _run(*(x.double() for x in (q, k, v, do, dlse)), case, causal, "reference")
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1])), "rows kept by no pattern differ"
    for name, kind, g, w in zip(("out", "lse", "dq", "dk", "dv"), ("out", "lse", "grad", "grad", "grad"), got, want):
        fin = torch.isfinite(w)
        assert torch.isfinite(g[fin]).all(), name
        assert_close(g[fin], w[fin], dtype, kind, msg=name)


def test_cases_cover_empty_rows_and_several_groups():
    # Guards the cases: rows kept by no pattern occur, and phased patterns make leading segments.
    b, n, h, d, w, r, ph = CASES["r-gt-h-no-r1"]
    assert (count_matrix(n, h, w, r, segment_phases=ph).sum(-1) == 0).any()
    assert len(segment_groups(37, 8, 3)) == 3


def test_strided_inputs_with_phases():
    # (B, H, N, D) tensors transposed to (B, N, H, D): batches cannot share the kernels' batch dim.
    q, k, v = (torch.randn(2, 3, 30, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    want = loop_oracle(q, k, v, (8, 12), (1, 2), (4, 6), True)
    for backend in BACKENDS:
        out, lse = longnet.dilated_attention(q, k, v, (8, 12), (1, 2), segment_phases=(4, 6), is_causal=True,
                                             return_lse=True, backend=backend)
        assert_close(out, want[0], torch.float64)
        assert_close(lse, want[1], torch.float64, "lse")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 40), h=st.integers(1, 4), causal=st.booleans(),
       backend=st.sampled_from(BACKENDS))
def test_hypothesis_sweep(data, n, h, causal, backend):
    k_pat = data.draw(st.integers(1, 3))
    w = tuple(data.draw(st.integers(1, 48)) for _ in range(k_pat))
    r = tuple(data.draw(st.integers(1, wi)) for wi in w)
    ph = tuple(data.draw(st.integers(0, wi - 1)) for wi in w)
    case = (1, n, h, 4, w, r, ph)
    q, k, v, do = (torch.randn(1, n, h, 4, dtype=torch.float64) for _ in range(4))
    dlse = torch.randn(1, n, h, dtype=torch.float64)
    got = _run(q, k, v, do, dlse, case, causal, backend)
    want = _run(q, k, v, do, dlse, case, causal, "reference")
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    for g, wt, kind in zip(got, want, ("out", "lse", "grad", "grad", "grad")):
        fin = torch.isfinite(wt)
        assert_close(g[fin], wt[fin], torch.float64, kind)



@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rel_pos_bias_path_with_phases(causal):
    """The score-bias backend (DilatedAttention(use_rel_pos_bias=True)) cuts the same segments."""
    from longnet.backends.biased import dilated_attention_biased
    from longnet.backends.reference import dilated_attention_reference
    b, n, h, d, w, r, ph = 2, 37, 3, 4, (8, 20), (2, 5), (3, 11)
    table = torch.randn(h, 2 * n - 1, dtype=torch.float64, requires_grad=True)

    def bias(rel):  # (m, m) position differences -> (H, m, m)
        return table[:, rel + n - 1]

    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention_biased(q, k, v, w, r, is_causal=causal, scale=0.5, bias_fn=bias,
                                        segment_phases=ph)
    pos = torch.arange(n)
    want_out, want_lse = dilated_attention_reference(q, k, v, w, r, is_causal=causal, scale=0.5,
                                                     score_bias=bias(pos[:, None] - pos[None, :]),
                                                     segment_phases=ph)
    assert_close(out, want_out, torch.float64)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    do = torch.randn_like(out)
    got = torch.autograd.grad((out * do).sum(), (q, k, v, table))
    want = torch.autograd.grad((want_out * do).sum(), (q, k, v, table))
    for a, e in zip(got, want):
        assert_close(a, e, torch.float64, "grad")
