"""longnet viz and the reach analysis: masks/C against the reference, hand-checked reach, PNGs, errors."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from longnet.backends.reference import count_matrix as ref_count_matrix, keep_mask as ref_keep_mask
from longnet.cli import main
from longnet.patterns import DilatedPattern
from longnet.analysis.reach import dead_rows, depth_matrix, depth_vs_n, paper_depth_estimate, reach
from longnet.analysis.counting import block_count_matrix, count_stats, keep_masks
from longnet.analysis.plotting import png_size


@st.composite
def small_case(draw):
    k = draw(st.integers(1, 3))
    w = tuple(draw(st.integers(1, 12)) for _ in range(k))
    r = tuple(draw(st.integers(1, wi)) for wi in w)
    return w, r, draw(st.integers(1, 40)), draw(st.integers(1, 5)), draw(st.booleans())


def brute_depth(w, r, n, heads, causal):
    """Oracle: BFS by boolean matrix products on the reference's dense C (edge j -> i iff some C_h[i, j] > 0)."""
    adj = (ref_count_matrix(n, heads, w, r, is_causal=causal) > 0).any(0).numpy()
    np.fill_diagonal(adj, True)  # residual: a token keeps what it had
    x = np.eye(n, dtype=bool)
    d = np.where(x, 0, -1)
    for step in range(1, n + 1):
        y = (adj.astype(np.int64) @ x.astype(np.int64)) > 0
        new = y & ~x
        if not new.any():
            break
        d[new] = step
        x = y
    return d


# --------------------------------------------------------------------------- same definition as the reference

@settings(max_examples=60, deadline=None)
@given(small_case())
def test_masks_and_count_matrix_match_reference(case):
    w, r, n, heads, causal = case
    masks = keep_masks((w, r), n, heads)
    for k in range(len(w)):
        np.testing.assert_array_equal(masks[k], ref_keep_mask(n, heads, w[k], r[k]).numpy())
    ref = ref_count_matrix(n, heads, w, r, is_causal=causal).numpy()
    np.testing.assert_array_equal(block_count_matrix((w, r), n, heads, causal=causal), ref)
    np.testing.assert_array_equal(block_count_matrix((w, r), n, heads, causal=causal, head=heads - 1), ref[-1])
    stats = count_stats((w, r), n, heads, causal=causal)
    for s in stats:
        assert s["nnz"] == (ref[s["head"]] > 0).sum()
        assert s["total"] == ref[s["head"]].sum()
        assert s["dead"] == (ref[s["head"]].sum(1) == 0).sum()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [2, 3, 7, 64])
def test_block_sums_match_reference(block, causal):
    # Awkward sizes: N not a multiple of w, w not a multiple of r, block not dividing N.
    w, r, n, heads = (5, 12, 40), (1, 3, 6), 45, 4
    ref = ref_count_matrix(n, heads, w, r, is_causal=causal).numpy()
    nb = -(-n // block)
    pad = nb * block - n
    want = np.pad(ref, ((0, 0), (0, pad), (0, pad))).reshape(heads, nb, block, nb, block).sum((2, 4))
    np.testing.assert_array_equal(block_count_matrix((w, r), n, heads, causal=causal, block=block), want)


def test_sum_of_c_is_the_flop_count():
    # Non-causal: dilated_flops = 4 * D * sum over heads of (kept rows per segment)^2 = 4 * D * sum(C).
    pat = DilatedPattern((6, 16, 32), (1, 3, 8))
    n, heads, d = 100, 5, 16
    total = sum(s["total"] for s in count_stats(pat, n, heads))
    assert 4 * d * total == pat.flops(n, heads, d)


def test_analysis_functions_take_a_pattern_object():
    pat = DilatedPattern((2, 4, 8), (1, 2, 4))
    assert keep_masks(pat, 8, 4).shape == (3, 4, 8)
    np.testing.assert_array_equal(block_count_matrix(pat, 8, 4, causal=True),
                                  ref_count_matrix(8, 4, pat.segment_lengths, pat.dilation_rates,
                                                   is_causal=True).numpy())
    assert reach(pat, 8, 4).max_depth == 3
    assert depth_matrix(pat, 8, 4).shape == (8, 8)


# --------------------------------------------------------------------------- reach, hand-checked

def test_reach_hypercube():
    # w=(2,4,8), r=(1,2,4), N=8, H=4 (every offset used). Cliques:
    #   w=2,r=1: {0,1} {2,3} {4,5} {6,7}   -> flips bit 0 of the position
    #   w=4,r=2: {0,2} {1,3} {4,6} {5,7}   -> flips bit 1
    #   w=8,r=4: {0,4} {1,5} {2,6} {3,7}   -> flips bit 2
    # so the graph is the 3-cube: depth(j -> i) = popcount(i xor j), at most 3;
    # pairs per depth = 8 * C(3, d) = 24, 24, 8.
    d = depth_matrix(((2, 4, 8), (1, 2, 4)), 8, 4)
    want = np.array([[bin(i ^ j).count("1") for j in range(8)] for i in range(8)])
    np.testing.assert_array_equal(d, want)
    res = reach(((2, 4, 8), (1, 2, 4)), 8, 4)
    assert res.max_depth == 3 and res.depth_histogram == [24, 24, 8] and res.never_connected == 0
    j, i = res.witness
    assert i ^ j == 7
    assert res.paper_estimate == pytest.approx(2.0)  # log2(8 * 1 / 2)


def test_reach_path_and_causal():
    # w=(2,4), r=(1,2), N=4, H=1: cliques {0,1} {2,3} (w=2) and {0,2} (w=4, offset 0 only;
    # {1,3} needs head 1). Undirected path 1-0-2-3: depth(1 -> 3) = 3.
    res = reach(((2, 4), (1, 2)), 4, 1)
    assert res.max_depth == 3 and res.never_connected == 0 and set(res.witness) == {1, 3}
    # Causal, edges only forward: 0->1, 2->3, 0->2. Pairs j<i: (0,1)=1, (0,2)=1, (0,3)=2 via 2,
    # (2,3)=1; 1 has no forward edge, so (1,2) and (1,3) are never connected.
    res = reach(((2, 4), (1, 2)), 4, 1, causal=True)
    assert res.max_depth == 2 and res.witness == (0, 3)
    assert res.pairs == 6 and res.never_connected == 2 and res.depth_histogram == [3, 1]
    d = depth_matrix(((2, 4), (1, 2)), 4, 1, causal=True)
    assert d[2, 1] == -1 and d[3, 1] == -1 and d[1, 3] == -1  # and nothing flows backwards
    # H=2 adds {1,3}: the 4-cycle 0-1-3-2-0, so depth 2 at most.
    assert reach(((2, 4), (1, 2)), 4, 2).max_depth == 2


def test_reach_flags_dead_rows_and_blocks():
    # w=8, r=4, H=2: offsets 0, 1 used, so rows 2,3,6,7 are kept by no head (r > H).
    # Kept cliques {0,4}, {1,5}: 4 connected ordered pairs of 56.
    res = reach(((8,), (4,)), 8, 2)
    np.testing.assert_array_equal(res.dead_rows, [2, 3, 6, 7])
    assert res.max_depth == 1 and res.never_connected == 56 - 4
    assert "never connected" in res.summary() and "kept by no pattern" in res.summary()
    # w=4, r=1, N=10: segments [0,4) [4,8) [8,10) never talk: lcm(w)=4 < N.
    # Connected ordered pairs 12 + 12 + 2 = 26 of 90.
    res = reach(((4,), (1,)), 10, 1)
    assert res.block_length == 4 and res.max_depth == 1 and res.never_connected == 90 - 26
    assert "lcm(w) = 4" in res.summary()
    np.testing.assert_array_equal(dead_rows(DilatedPattern((8, 16), (2, 4)), 16, 1), [1, 3, 5, 7, 9, 11, 13, 15])


def test_causal_segment_boundary_is_a_blind_spot():
    # Causal paths only move forward, so 7 -> 8 has no intermediate token; 7 and 8 share a
    # segment only in patterns with r >= 2, where 7 and 8 have different offsets.
    pat = DilatedPattern.geometric(8, 4)  # w=8..64, r=1..8
    d = depth_matrix(pat, 64, 8, causal=True)
    assert d[8, 7] == -1 and d[9, 7] >= 1
    assert reach(pat, 64, 8, causal=True).never_connected > 0
    assert reach(pat, 64, 8).never_connected == 0  # non-causal goes 7 -> 9 -> 8


@settings(max_examples=60, deadline=None)
@given(small_case(), st.integers(1, 70))
def test_reach_matches_brute_force(case, batch):
    w, r, n, heads, causal = case
    want = brute_depth(w, r, n, heads, causal)
    np.testing.assert_array_equal(depth_matrix((w, r), n, heads, causal=causal), want)
    res = reach((w, r), n, heads, causal=causal, batch_sources=batch)
    off = ~np.eye(n, dtype=bool)
    if causal:
        off &= np.tri(n, dtype=bool, k=-1)
    depths = want[off]
    assert res.never_connected == int((depths == -1).sum())
    assert res.max_depth == (int(depths.max()) if (depths > 0).any() else None)
    assert res.depth_histogram == [int((depths == k).sum()) for k in range(1, (res.max_depth or 0) + 1)]
    if res.witness is not None:
        j, i = res.witness
        assert want[i, j] == res.max_depth


def test_reach_multiword_bits():
    # 200 sources = 4 uint64 words per position; compare with the dense depth matrix.
    pat = DilatedPattern((16, 32, 64, 128), (1, 2, 4, 8))
    n, heads = 200, 3
    d = depth_matrix(pat, n, heads)
    res = reach(pat, n, heads, batch_sources=200)
    off = ~np.eye(n, dtype=bool)
    assert res.max_depth == d[off].max() and res.never_connected == (d[off] == -1).sum()


def test_depth_vs_n_and_estimate():
    assert paper_depth_estimate(16, 4, 2) == pytest.approx(2.0)  # log2(16 * 1 / 4)
    assert paper_depth_estimate(27 * 3, 6, 3) == pytest.approx(3.0)  # log3(81 * 2 / 6)
    rows = depth_vs_n(4, [4, 8, 16, 32, 64], None)
    assert [r["pattern"].segment_lengths[-1] for r in rows] == [4, 8, 16, 32, 64]
    assert all(r["never_connected"] == 0 for r in rows)
    depths = [r["max_depth"] for r in rows]
    assert depths == sorted(depths) and depths[0] == 1
    # N=8: geometric w=(4,8), r=(1,2), H=2 -> {0..3},{4..7} and evens, odds of [0,8): depth 2.
    assert depths[1] == 2
    for r in rows:
        assert r["max_depth"] == reach(r["pattern"], r["n"], r["heads"]).max_depth


# --------------------------------------------------------------------------- CLI and images

def test_cli_writes_pngs_of_stated_size(tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "viz"
    rc = main(["viz", "--segment-lengths", "8,16,32", "--dilation-rates", "1,2,4", "--n", "48",
               "--heads", "3", "--causal", "--reach", "--reach-max-n", "64", "--image-size", "640x480",
               "--out", str(out), "--head", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    names = {"patterns.png", "count_head2.png", "count_sum.png", "reach_depth.png", "reach_vs_n.png"}
    assert set(os.listdir(out)) == names
    for name in names:
        path = out / name
        assert path.stat().st_size > 1000
        assert png_size(str(path)) == (640, 480)
        img = mpimg.imread(str(path))
        assert img.shape[:2] == (480, 640) and img.std() > 0  # not a blank canvas
    for needle in ("density of C", "FLOPs", "rows kept by no pattern", "max depth", "never connected",
                   "paper estimate", "depth vs N"):
        assert needle in text


def test_cli_large_n_is_downsampled(tmp_path, capsys):
    rc = main(["viz", "--paper", "--n", "65536", "--heads", "12", "--max-pixels", "64",
               "--image-size", "400x300", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "downsampled" in text and "1024x1024 block" in text
    assert png_size(str(tmp_path / "count_sum.png")) == (400, 300)
    assert png_size(str(tmp_path / "patterns.png")) == (400, 300)


@pytest.mark.parametrize("argv, needle", [
    ([], "--segment-lengths"),
    (["--segment-lengths", "8,16"], "--dilation-rates"),
    (["--segment-lengths", "8,16", "--dilation-rates", "1"], "same length"),
    (["--segment-lengths", "8,x", "--dilation-rates", "1,2"], "--segment-lengths must be comma-separated"),
    (["--segment-lengths", "8", "--dilation-rates", "16"], "--dilation-rates[0] = 16"),
    (["--segment-lengths", "8", "--dilation-rates", "0"], "--dilation-rates[0] must be a positive"),
    (["--paper", "--segment-lengths", "8", "--dilation-rates", "1"], "--paper cannot be combined"),
    (["--paper", "--heads", "4", "--head", "4"], "--head must be in [0, 4)"),
    (["--paper", "--max-pixels", "8"], "--max-pixels must be >= 16"),
])
def test_cli_bad_options(argv, needle, tmp_path, capsys):
    rc = main(["viz", "--n", "64", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--n", "0"], "--n: expected a positive integer"),
    (["--n", "64", "--heads", "two"], "--heads: expected a positive integer"),
    (["--n", "64", "--image-size", "640"], "--image-size: expected WIDTHxHEIGHT"),
    (["--n", "64", "--image-size", "50x50"], "--image-size: width and height must be in"),
    (["--paper"], "--n"),
    (["--paper", "--n", "1000000000"], "--n: expected an integer <= 4194304 (the largest N viz draws)"),
    (["--paper", "--n", "-5"], "--n: expected a positive integer"),
    (["--paper", "--n", "64", "--heads", "0"], "--heads: expected a positive integer, got 0"),
    (["--paper", "--n", "64", "--head-dim", "0"], "--head-dim: expected a positive integer"),
    (["--paper", "--n", "64", "--max-pixels", "-1"], "--max-pixels: expected a positive integer"),
    (["--paper", "--n", "64", "--reach-max-n", "1000000"], "--reach-max-n: expected an integer <= 131072"),
    (["--paper", "--n", "64", "--out", "{file}"], "--out: expected a folder, but"),
    (["--paper", "--n", "64", "--out", "{file}/sub"], "--out: expected a folder, but"),
])
def test_cli_argparse_errors(argv, needle, capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        main(["viz", *[a.format(file=tmp_path / "a_file") for a in argv]])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a_file"]


@pytest.mark.parametrize("argv, needle", [
    (["--n", "200000", "--reach"], "--reach needs --n <= 131072"),
    (["--n", "4194304", "--heads", "64"], "--n 4194304 x --heads 64 = 268435456 kept-row entries"),
])
def test_cli_refuses_sizes_too_large_before_any_work(argv, needle, tmp_path, capsys, monkeypatch):
    import longnet.analysis.viz as viz
    monkeypatch.setattr(viz, "count_stats", lambda *a, **k: pytest.fail("worked despite a bad argument"))
    assert main(["viz", "--paper", "--out", str(tmp_path / "x"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("longnet viz: error: ") and needle in captured.err, captured.err
    assert captured.out == "" and not (tmp_path / "x").exists()


def test_api_errors(tmp_path):
    with pytest.raises(ValueError, match="head must be an integer in"):
        block_count_matrix(((4,), (1,)), 8, 2, head=2)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        reach(((4,), (1,)), 0, 2)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        keep_masks(((4,), (1,)), 8, 0)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        block_count_matrix(((4,), (1,)), 8, 2, block=0)
    with pytest.raises(ValueError, match="dilation_rates"):
        reach(((4,), (8,)), 8, 1)
    with pytest.raises(TypeError, match="pattern must be"):
        reach([4, 1], 8, 1)
    with pytest.raises(ValueError, match="alpha must be > 1"):
        paper_depth_estimate(8, 2, 1)
    bad = tmp_path / "not.png"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(str(bad))


# ---- segment phases in reach -------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", [37, 64])
def test_reach_with_phases_matches_the_count_matrix_closure(causal, n):
    # Oracle: the union-of-heads adjacency from the reference count matrix (docs/design.md §2, with
    # phases), closed under paths by repeated boolean products; reach must agree on every pair.
    from longnet.analysis.reach import depth_matrix
    from longnet.backends.reference import count_matrix as ref_count
    pat = DilatedPattern((8, 16, 32), (1, 2, 4)).with_local_window(4)
    pat = DilatedPattern(pat.segment_lengths, pat.dilation_rates, (0, 3, 5, 0, 2))
    c = ref_count(n, 4, pat.segment_lengths, pat.dilation_rates, is_causal=causal,
                  segment_phases=pat.segment_phases)
    adj = (c.sum(0) > 0).numpy() | np.eye(n, dtype=bool)  # adj[i, j]: j reaches i in one layer
    expect = np.where(np.eye(n, dtype=bool), 0, -1)
    reach_l = np.eye(n, dtype=bool)
    for layer in range(1, n + 1):
        nxt = (adj.astype(np.int64) @ reach_l.astype(np.int64)) > 0
        expect[nxt & ~reach_l] = layer
        if (nxt == reach_l).all():
            break
        reach_l = nxt
    np.testing.assert_array_equal(depth_matrix(pat, n, 4, causal=causal), expect)


def test_reach_sees_the_local_window_link_every_neighbour_pair():
    from longnet.analysis.reach import depth_matrix, reach
    base = DilatedPattern((8, 16, 32), (1, 2, 4))
    n = 64
    plain = depth_matrix(base, n, 4, causal=True)
    fixed = depth_matrix(base.with_local_window(4), n, 4, causal=True)
    j = np.arange(n - 1)
    assert (fixed[j + 1, j] == 1).all()
    assert plain[8, 7] != 1  # the blind spot at the first w0 boundary (here: never linked at all)
    res = reach(base.with_local_window(4), n, 4, causal=True)
    assert res.segment_phases == (0, 0, 0, 0, 2) and res.block_length is None


def test_viz_count_drawings_refuse_phased_patterns():
    with pytest.raises(ValueError, match="segment_phases"):
        count_stats(DilatedPattern((8, 16), (1, 2)).with_local_window(4), 32, 2)
