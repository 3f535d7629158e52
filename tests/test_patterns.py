import pytest

from longnet.patterns import (PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS, DilatedPattern, dense_flops,
                              dilated_flops, validate_pattern)


def test_paper_preset():
    p = DilatedPattern.paper()
    assert p.segment_lengths == PAPER_SEGMENT_LENGTHS == (2048, 4096, 8192, 16384, 32768)
    assert p.dilation_rates == PAPER_DILATION_RATES == (1, 2, 4, 6, 12)


def test_geometric_keeps_ratio():
    p = DilatedPattern.geometric(128, 4, alpha=2)
    assert p.segment_lengths == (128, 256, 512, 1024)
    assert p.dilation_rates == (1, 2, 4, 8)
    assert len({w // r for w, r in p}) == 1
    with pytest.raises(ValueError, match="alpha"):
        DilatedPattern.geometric(128, 3, alpha=1)


def test_flop_count_matches_issue_ratio():
    # The issue quotes a dense/dilated FLOP ratio of 3.95 at N=16384 for the paper pattern.
    assert DilatedPattern.paper().flop_ratio(16384, 12, 64, causal=True) == pytest.approx(3.95, abs=0.01)


def test_flop_count_by_hand():
    # N=10, H=2, w=4, r=2: segments [0,4) [4,8) [8,10); each head keeps 2, 2, 1 rows.
    f = dilated_flops(10, 2, 8, [4], [2])
    assert f == 4 * 8 * 2 * (2 * 2 + 2 * 2 + 1 * 1)
    assert dilated_flops(10, 2, 8, [4], [2], causal=True) == f / 2
    assert dense_flops(10, 2, 8) == 4 * 100 * 2 * 8


def test_linear_in_n_for_constant_ratio():
    p = DilatedPattern.geometric(64, 3)
    f1 = p.flops(4096, 4, 16)
    f2 = p.flops(8192, 4, 16)
    assert f2 == pytest.approx(2 * f1, rel=1e-9)


def test_kept_rows():
    p = DilatedPattern((4, 8), (2, 4))
    assert p.kept_rows(0, 1, 10) == [1, 3, 5, 7, 9]
    assert p.kept_rows(1, 5, 10) == [1, 5, 9]


def test_parse_and_errors():
    assert DilatedPattern.parse("8,16", "1,2").segment_lengths == (8, 16)
    with pytest.raises(ValueError, match="segment_lengths must be comma-separated"):
        DilatedPattern.parse("8,x", "1,2")
    with pytest.raises(ValueError, match="same length"):
        validate_pattern([8, 16], [1])
