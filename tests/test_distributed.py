"""Sequence-parallel dilated attention on gloo: parity with one device, traffic, shape rule, mesh.

Two worlds are spawned once per module (P = 2 and P = 4 processes on this
machine, gloo, fp64); every check runs inside them (tests/_sp_worker.py) and
the tests below assert on what they measured.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from longnet.distributed import check_sequence_parallel, sequence_parallel_dilated_attention
from longnet.patterns import segment_bounds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker module next to this file
import _sp_worker as W  # noqa: E402
from tests.helpers import tol  # noqa: E402

TASKS = ([("prepare",)] + [("parity", name, causal) for name in W.CASES for causal in (False, True)]
         + [("errors",), ("plan_once",), ("phase_extras",)])
# The workers run fp64 and report max abs errors (measured ~1e-15): the table's fp64 atol applies.
TOL = {key: tol(torch.float64, kind)[0] for key, kind in
       (("out", "out"), ("lse", "lse"), ("dq", "grad"), ("dk", "grad"), ("dv", "grad"))}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    res = {}
    for p in (2, 4):
        tasks = TASKS + ([("mesh",)] if p == 4 else [])
        res[p] = W.run_world(p, tmp_path_factory.mktemp(f"world{p}"), tasks)
    return res


def _halo_rows(L, world, rank, w, r, phi, causal):
    """(rows sent, rows received) per head of one shifted pattern's forward halo, from the segments
    around this rank's block boundaries (an independent count: segment_bounds, not the op's plan)."""
    sent = received = 0
    n = L * world
    for boundary, mine_left in ((rank * L, False), ((rank + 1) * L, True)):
        if not 0 < boundary < n:
            continue
        a, e = segment_bounds(boundary, n, w, phi)
        if a == boundary:
            continue  # no segment straddles it
        before, after = (boundary - a) // r, (e - boundary) // r
        # Causal queries see only earlier keys: keys go from the left block to the right one.
        if mine_left:
            sent, received = sent + before, received + (0 if causal else after)
        else:
            sent, received = sent + (0 if causal else after), received + before
    return sent, received


def _expected_bytes(case, world, rank, causal):
    """(sent, received) of the forward: all-gathers of the cross-rank patterns, halos of the shifted ones.
    The backward moves as much the other way."""
    b, h, d, L, w, r, _, _ = W.CASES[case]
    phases = W.PHASES.get(case, (0,) * len(w))
    _, spans, _ = check_sequence_parallel(L, world, w, r, rank, segment_phases=phases)
    gathered = sum((sp.count - 1) * 2 * b * (L // sp.rate) * h * d * 8 for sp in spans)
    sent = received = gathered
    for wi, ri, phi in zip(w, r, phases):
        if phi and wi <= L:
            rows_out, rows_in = _halo_rows(L, world, rank, wi, ri, phi, causal)
            sent += 2 * b * rows_out * h * d * 8
            received += 2 * b * rows_in * h * d * 8
    return sent, received


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(W.CASES))
@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_single_device(worlds, world, case, causal):
    for rank, res in enumerate(worlds[world]):
        m = res[("parity", case, causal)]
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert m[key] < TOL[key], f"rank {rank}: {key} differs from the single-device result by {m[key]}"
        assert m["lse_inf_match"], f"rank {rank}: rows kept by no pattern differ (lse = -inf)"
        assert m["finite"], f"rank {rank}: non-finite gradient"


def test_cases_cover_rows_kept_by_no_pattern(worlds):
    # r = 4 > H = 3 and no r = 1 pattern: rows with offset 3 are empty; the parity test covers them.
    assert all(res[("parity", "r_gt_h", c)]["has_empty_rows"] for res in worlds[4] for c in (False, True))


@pytest.mark.parametrize("world", [2, 4])
def test_byte_count_matches_the_formula(worlds, world):
    for rank, res in enumerate(worlds[world]):
        for case in W.CASES:
            for causal in (False, True):
                m = res[("parity", case, causal)]
                sent, received = _expected_bytes(case, world, rank, causal)
                fwd = m["bytes"].get("forward", [0, 0, 0])
                bwd = m["bytes"].get("backward", [0, 0, 0])
                assert fwd[:2] == [sent, received], (case, causal, rank, fwd, sent, received)
                assert bwd[:2] == [received, sent], (case, causal, rank, bwd, sent, received)


def test_local_patterns_move_nothing(worlds):
    for world in (2, 4):
        for res in worlds[world]:
            assert res[("parity", "local", False)]["sent"] == 0
            assert res[("parity", "local", True)]["received"] == 0


@pytest.mark.parametrize("case", ["span2", "r_gt_h", "math_backend"])
def test_bytes_do_not_grow_with_p_at_fixed_l(worlds, case):
    # These patterns span two blocks of L = 16 at any P >= 2, so each rank's traffic is fixed.
    per_rank = {p: {(res[("parity", case, False)]["sent"], res[("parity", case, False)]["received"])
                    for res in worlds[p]} for p in (2, 4)}
    assert len(per_rank[2]) == 1 and per_rank[2] == per_rank[4], per_rank
    assert next(iter(per_rank[2]))[0] > 0


def test_bytes_bounded_by_w_over_r(worlds):
    # Per phase and rank: at most 2 * B * (w/r) * H * D elements per cross-rank or shifted pattern
    # (causal: a halo goes one way, and is shorter than a segment), whatever P.
    for world in (2, 4):
        for res in worlds[world]:
            for case, (b, h, d, L, w, r, _, _) in W.CASES.items():
                phases = W.PHASES.get(case, (0,) * len(w))
                bound = sum(2 * b * (wi // ri) * h * d * 8 for wi, ri, phi in zip(w, r, phases)
                            if wi > L or phi)
                fwd = res[("parity", case, True)]["bytes"].get("forward", [0, 0, 0])
                assert fwd[0] <= bound and fwd[1] <= bound, (case, fwd, bound)


def test_incompatible_shape_raises_inside_a_group(worlds):
    for world in (2, 4):
        for res in worlds[world]:
            msg = res[("errors",)]["straddle"]
            assert msg is not None, "no error for a segment straddling two blocks"
            assert "L = 12" in msg and "segment_lengths[0] = 8" in msg and "L % w' == 0" in msg


def test_transposed_case_has_cross_rank_patterns():
    # Guards the parity test: the strided inputs must really go through the gathers.
    _, spans, _ = check_sequence_parallel(16, 2, (8, 32, 64), (1, 2, 4))
    assert "transposed" in W.TRANSPOSED and spans


def test_split_is_checked_once_per_block_length(worlds):
    for world in (2, 4):
        for res in worlds[world]:
            m = res[("plan_once",)]
            # One shared plan for three layers, checked by apply_sequence_parallel(block_length=16).
            assert m["after_apply"] == [16]
            assert m["after_forwards"] == [16]  # three forwards and backwards: no re-check
            assert m["final"] == [16, 8]  # a new block length is checked once, on first use
            assert "SequenceParallelPlan for" in m["wrong_length"] and "L = 8" in m["wrong_length"]


def test_mesh_dp_times_sp_gives_the_single_process_gradient(worlds):
    for res in worlds[4]:
        m = res[("mesh",)]
        assert m["grad_err"] < TOL["dq"], m
        assert m["modules"] == 1
        assert m["offset"] == 8 * m["sp_rank"]
        assert "no attention module" in m["refusals"][0] and "already applied" in m["refusals"][1]


def test_prepare_creates_segment_groups_up_front(worlds):
    for world in (2, 4):
        for rank, res in enumerate(worlds[world]):
            spans = res[("prepare",)]
            if world == 2:  # w = 32 spans both ranks; w = 64 > N = 32 is one segment of N
                assert spans == [(0, 2, rank), (0, 2, rank)]
            else:
                assert spans == [(rank // 2 * 2, 2, rank % 2), (0, 4, rank)]


@pytest.mark.parametrize("L,P,w,r,needle", [
    (12, 2, (8,), (1,), "straddles two ranks' blocks"),
    (16, 4, (24,), (2,), "whole blocks"),
    (16, 2, (32,), (3,), "multiple of the dilation rate"),
    (12, 4, (4, 36), (1, 8), "multiple of the dilation rate"),
])
def test_check_rule_names_values(L, P, w, r, needle):
    with pytest.raises(ValueError, match=needle) as info:
        check_sequence_parallel(L, P, w, r)
    assert f"L = {L}" in str(info.value) and f"P = {P}" in str(info.value)


def test_check_rule_accepts_and_classifies():
    local, spans, halos = check_sequence_parallel(16, 4, (8, 16, 32, 48, 10**6), (1, 2, 4, 4, 8), rank=3)
    assert local == ((8, 1, 0), (16, 2, 0)) and halos == ()
    # w = 32 -> ranks {2, 3}; w = 48 -> ranks {3} alone (last, short segment); w > N -> all 4.
    assert [(s.first, s.count, s.position) for s in spans] == [(2, 2, 1), (3, 1, 0), (0, 4, 3)]
    assert spans[-1].segment_length == 64


def test_bad_backend_and_missing_group():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        sequence_parallel_dilated_attention(q, q, q, (8,), (1,), group=object(), scale=0.5,
                                            backend="reference")
    with pytest.raises(ValueError, match="group"):
        sequence_parallel_dilated_attention(q, q, q, (8,), (1,), group=None, scale=0.5)



# ----------------------------------------------------------------------------- shifted segments

def test_phase_cases_really_exchange_halos():
    # Guards the parity and byte tests: every shifted case straddles a block boundary at P = 2 and 4.
    for case, phases in W.PHASES.items():
        b, h, d, L, w, r, _, _ = W.CASES[case]
        for world in (2, 4):
            halos = [check_sequence_parallel(L, world, w, r, rank, segment_phases=phases)[2]
                     for rank in range(world)]
            assert any(halos), (case, world)


def test_halo_spans_by_hand():
    # L = 16, P = 4, w = 12, phase 6: segments [0,6) [6,18) [18,30) [30,42) [42,54) [54,64).
    for rank, (left, right, phase) in enumerate([(0, 10, 6), (10, 2, 2), (2, 6, 10), (6, 0, 6)]):
        local, spans, halos = check_sequence_parallel(16, 4, (12,), (2,), rank, segment_phases=(6,))
        assert local == ((12, 2, phase),) and spans == ()
        assert [(hs.left, hs.right) for hs in halos] == [(left, right)]
    # w' > L with a phase that is whole blocks: [0, 16) alone, then [16, 48) shared by ranks 1 and 2.
    _, spans, _ = check_sequence_parallel(16, 4, (32,), (4,), 2, segment_phases=(16,))
    assert [(s.first, s.count, s.position) for s in spans] == [(1, 2, 1)]


@pytest.mark.parametrize("L,P,w,r,phases,needle", [
    (16, 2, (12,), (4,), (2,), "multiples of the dilation rate"),
    (16, 2, (10,), (4,), (4,), "w' % r = 2"),
    (16, 2, (8,), (2,), (3,), "phase % r = 1"),
    (16, 4, (32,), (1,), (8,), "phase % L = 8"),
    (16, 2, (8,), (1,), (8,), "segment_phases[0] must satisfy 0 <= phase < segment_lengths[0] = 8"),
])
def test_phase_rule_names_values(L, P, w, r, phases, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_sequence_parallel(L, P, w, r, segment_phases=phases)


def test_phase_errors_and_wrapper_inside_a_group(worlds):
    for world in (2, 4):
        for res in worlds[world]:
            m = res[("phase_extras",)]
            assert "segment_phases[0] = 2" in m["halo_rate"] and "multiples of the dilation rate" in m["halo_rate"]
            assert "SequenceParallelPlan for" in m["plan_phases"] and "segment_phases = (4,)" in m["plan_phases"]
            assert m["wrapped_err"] == 0.0
            assert m["wrapped_plans"] == [(4, 0)]
