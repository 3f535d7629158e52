"""Module tests: shapes, causality, seed-name API, XPOS, relative position bias."""

import pytest
import torch

import longnet
from longnet.backends.biased import dilated_attention_biased
from longnet.backends.reference import dilated_attention_reference
from longnet.modules import XPOS, RelativePositionBias
from tests.helpers import assert_close


@pytest.mark.parametrize("xpos", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_multihead_shapes(xpos, qk_norm):
    m = longnet.MultiheadDilatedAttention(64, 4, [8, 16], [1, 2], causal=True, xpos=xpos, qk_norm=qk_norm)
    x = torch.randn(2, 37, 64)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(xpos=True),
    dict(qk_norm=True, xpos=True),
])
def test_multihead_causality(kwargs):
    torch.manual_seed(0)
    m = longnet.MultiheadDilatedAttention(32, 4, [4, 8, 16], [1, 2, 4], causal=True, **kwargs).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    y = m(x)
    for t in (0, 7, 15, 22):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = m(x2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1])
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_seed_name_api_keeps_shape():
    # The seed package returned N/r rows; ours keeps (B, N, dim).
    m = longnet.DilatedAttention(64, 8, 2, 16)
    x = torch.randn(2, 50, 64)
    assert m(x).shape == (2, 50, 64)
    m = longnet.DilatedAttention(64, 8, dilation_rate=[1, 2, 4], segment_size=[8, 16, 32], causal=True,
                                 use_xpos=True, qk_norm=True, dropout=0.1)
    assert m(x).shape == (2, 50, 64)
    m = longnet.DilatedAttention(64, 8, dilation_rate=2, segment_size=[16, 32])  # int broadcast
    assert m.dilation_rates == (2, 2)


def test_seed_name_api_causal_does_not_crash_and_is_causal():
    torch.manual_seed(1)
    m = longnet.DilatedAttention(32, 4, 2, 8, causal=True, use_rel_pos_bias=True).double()
    torch.nn.init.normal_(m.rel_pos_bias.embedding.weight)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 11:] += 1.0
    torch.testing.assert_close(m(x2)[:, :11], y[:, :11])


@pytest.mark.parametrize("causal", [False, True])
def test_rel_pos_bias_path_matches_reference(causal):
    torch.manual_seed(2)
    b, n, h, d, w, r = 2, 37, 3, 4, (8, 20), (2, 5)
    rb = RelativePositionBias(h, causal=causal).double()
    torch.nn.init.normal_(rb.embedding.weight)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64).transpose(1, 2).detach().requires_grad_()
               for _ in range(3))  # any strides: a transposed (B, H, N, D) layout
    out, lse = dilated_attention_biased(q, k, v, w, r, is_causal=causal, scale=0.5, bias_fn=rb)
    pos = torch.arange(n)
    r_out, r_lse = dilated_attention_reference(q, k, v, w, r, is_causal=causal, scale=0.5,
                                               score_bias=rb(pos[:, None] - pos[None, :]))
    assert_close(out, r_out, torch.float64)
    assert_close(lse.nan_to_num(neginf=0), r_lse.nan_to_num(neginf=0), torch.float64, "lse")
    do = torch.randn_like(out)
    g = torch.autograd.grad((out * do).sum(), (q, k, v, rb.embedding.weight))
    rg = torch.autograd.grad((r_out * do).sum(), (q, k, v, rb.embedding.weight))
    for a, e in zip(g, rg):
        assert_close(a, e, torch.float64, "grad")


def test_xpos_is_relative():
    torch.manual_seed(3)
    xp = XPOS(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk, center):
        qq, _ = xp(q, q, torch.tensor([pq]), center)
        _, kk = xp(k, k, torch.tensor([pk]), center)
        return (qq * kk).sum()

    s1 = score(10, 3, center=0.0)
    s2 = score(110, 103, center=50.0)
    s3 = score(1010, 1003, center=1005.0)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s3, atol=1e-4, rtol=1e-4)


def test_xpos_overflow_is_a_clear_error():
    xp = XPOS(16)
    with pytest.raises(ValueError, match="XPOS decay overflows"):
        xp.decay(torch.arange(0, 200000), 0.0)


def test_sub_layernorm_and_magneto_gain():
    m = longnet.MultiheadDilatedAttention(32, 4, [8], [1], sub_layernorm=True, magneto_gain=2.0)
    ref = longnet.MultiheadDilatedAttention(32, 4, [8], [1], sub_layernorm=False)
    assert m.sub_ln is not None and ref.sub_ln is None
    assert m.v_proj.weight.std() > 1.5 * ref.v_proj.weight.std()


@pytest.mark.parametrize("kwargs,words", [
    (dict(embed_dim=30, num_heads=4), "divisible"),
    (dict(embed_dim=32, num_heads=0), "num_heads"),
    (dict(embed_dim=32, num_heads=4, dropout=1.5), "dropout"),
    (dict(embed_dim=32, num_heads=4, dilation_rates=[9]), "dilation_rates"),
])
def test_module_bad_args(kwargs, words):
    args = dict(segment_lengths=[8], dilation_rates=[1])
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        longnet.MultiheadDilatedAttention(**args)


def test_module_bad_input_shape():
    m = longnet.MultiheadDilatedAttention(32, 4, [8], [1])
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\)"):
        m(torch.randn(2, 10, 16))


def test_xpos_cached_range_equals_general_path():
    torch.manual_seed(4)
    xp = XPOS(16)
    q, k = torch.randn(2, 30, 3, 16), torch.randn(2, 30, 3, 16)
    for start, center in ((0, None), (100, None), (100, 7.0)):
        pos = torch.arange(start, start + 30)
        want = xp(q, k, pos, center)
        for _ in range(2):  # the second call is served from the cache
            got = xp.forward_range(q, k, start, center)
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
    with pytest.raises(ValueError, match="XPOS decay overflows"):
        xp.forward_range(torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16), 10**6, 0.0)


def test_pattern_is_validated_once_at_construction(monkeypatch):
    import longnet.functional as F_
    m = longnet.MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], causal=True)
    d = longnet.DilatedAttention(32, 4, 2, 8)
    calls = []

    def counting(*a):
        calls.append(a)
        raise AssertionError("validate_pattern called on a forward")

    monkeypatch.setattr(F_, "validate_pattern", counting)
    x = torch.randn(2, 20, 32)
    for mod in (m, d):
        for _ in range(2):
            mod(x).sum().backward()
    assert calls == []
    # The public op still validates every call.
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(AssertionError, match="validate_pattern called"):
        longnet.dilated_attention(q, q, q, 4, 1)


def test_module_checks_its_pattern_and_backend_at_construction():
    with pytest.raises(TypeError, match=r"segment_lengths\[0\] must be an integer, got True"):
        longnet.MultiheadDilatedAttention(32, 4, [True], [1])
    with pytest.raises(ValueError, match="backend must be one of"):
        longnet.MultiheadDilatedAttention(32, 4, [8], [1], backend="bogus")


def test_module_output_equals_the_op_on_its_projections():
    torch.manual_seed(5)
    m = longnet.MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], causal=True, sub_layernorm=False).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    q, k, v = m.project(x)
    want = m.out_proj(longnet.dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True).reshape(2, 30, 32))
    torch.testing.assert_close(m(x), want)


def test_xpos_length_limit_has_one_owner():
    from longnet.config import xpos_max_length
    from longnet.modules import xpos_max_distance
    for base in (64.0, 512.0, 3000.0):
        assert xpos_max_length(base) == int(2 * xpos_max_distance(base))
        xp = XPOS(16, scale_base=base)
        limit = int(xpos_max_distance(base))
        xp.decay(torch.tensor([0, limit]), 0.0)  # at the limit: accepted, finite
        assert torch.isfinite(xp.decay(torch.tensor([0, limit]), 0.0)).all()
        with pytest.raises(ValueError, match=f"must stay below {limit}"):
            xp.decay(torch.tensor([0, limit + 1]), 0.0)
