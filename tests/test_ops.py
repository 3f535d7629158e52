"""dilated_attention: every backend against the dense reference, forward, lse and gradients."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longnet
from longnet.backends.reference import count_matrix, dilated_attention_reference
from tests.helpers import TOL, loop_reference

FAST = ["torch", "math"]

# (B, N, H, D, segment_lengths, dilation_rates): awkward on purpose.
SHAPES = [
    pytest.param(1, 64, 4, 8, (16, 32), (1, 2), id="aligned"),
    pytest.param(2, 50, 3, 5, (16, 32, 64), (1, 3, 4), id="N%w!=0,odd-D,w>N"),
    pytest.param(2, 37, 2, 4, (8, 20), (2, 5), id="r>H,no-r=1,empty-rows"),
    pytest.param(1, 1, 1, 4, (8,), (1,), id="N=1"),
    pytest.param(3, 29, 5, 6, (7, 13, 100), (2, 3, 6), id="r-not-dividing-w"),
    pytest.param(1, 40, 1, 3, (12, 40), (3, 4), id="H=1"),
    pytest.param(2, 33, 6, 16, (4, 8, 16, 32), (1, 2, 4, 8), id="geometric-tail"),
    pytest.param(1, 9, 3, 2, (64,), (1,), id="N<w"),
]


def _inputs(b, n, h, d, dtype, requires_grad=True):
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _compare(backend, b, n, h, d, w, r, causal, dtype, lse_grad=False):
    q, k, v = _inputs(b, n, h, d, dtype)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=causal, return_lse=True, backend=backend)
    r_out, r_lse = dilated_attention_reference(*ref_in, w, r, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, n, h)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=rtol)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), "rows kept by no pattern differ"
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), r_lse.nan_to_num(neginf=0),
                               atol=atol, rtol=rtol)
    do = torch.randn_like(out)
    dl = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)

    def objective(o, l):
        val = (o * do.to(o.dtype)).sum()
        if lse_grad:
            val = val + (l.masked_fill(torch.isinf(l), 0.0) * dl.to(l.dtype)).sum()
        return val

    grads = torch.autograd.grad(objective(out, lse), (q, k, v))
    r_grads = torch.autograd.grad(objective(r_out, r_lse), ref_in)
    for name, g, rg in zip("qkv", grads, r_grads):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(g.double(), rg, atol=atol * 5, rtol=rtol * 5, msg=f"d{name} mismatch")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("b,n,h,d,w,r", SHAPES)
def test_fast_matches_reference(seed, backend, causal, dtype, b, n, h, d, w, r):
    _compare(backend, b, n, h, d, w, r, causal, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,n,h,d,w,r", SHAPES[:3] + SHAPES[4:5])
def test_gradient_through_lse(seed, causal, b, n, h, d, w, r):
    _compare("torch", b, n, h, d, w, r, causal, torch.float64, lse_grad=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 90),
    h=st.integers(1, 6),
    d=st.integers(1, 12),
    b=st.integers(1, 3),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    backend=st.sampled_from(FAST),
)
def test_hypothesis_sweep(data, n, h, d, b, causal, dtype, backend):
    k_pat = data.draw(st.integers(1, 5), label="num_patterns")
    w = [data.draw(st.integers(1, 100), label=f"w{i}") for i in range(k_pat)]
    r = [data.draw(st.integers(1, min(wi, 12)), label=f"r{i}") for i, wi in enumerate(w)]
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    _compare(backend, b, n, h, d, tuple(w), tuple(r), causal, dtype,
             lse_grad=data.draw(st.booleans(), label="lse_grad"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,n,h,d,w,r", SHAPES)
def test_reference_matches_loop_over_segments(seed, causal, b, n, h, d, w, r):
    q, k, v = _inputs(b, n, h, d, torch.float64, requires_grad=False)
    out, lse = dilated_attention_reference(q, k, v, w, r, is_causal=causal)
    l_out, l_lse = loop_reference(q, k, v, w, r, is_causal=causal)
    torch.testing.assert_close(out, l_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse.nan_to_num(neginf=0), l_lse.nan_to_num(neginf=0), atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(l_lse))


def test_count_matrix_by_hand():
    # N=4, H=2, one pattern w=4 r=2: head 0 keeps {0, 2}, head 1 keeps {1, 3}.
    c = count_matrix(4, 2, (4,), (2,))
    assert c[0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert c[1].tolist() == [[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
    # Adding w=2 r=1 gives every row its pair; shared entries count twice.
    c2 = count_matrix(4, 2, (4, 2), (2, 1), is_causal=True)
    assert c2[0].tolist() == [[2, 0, 0, 0], [1, 1, 0, 0], [1, 0, 2, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_rows_kept_by_no_pattern_are_zero_and_finite(backend):
    # r=4 > H=2: offsets 2 and 3 are never used, so rows 2, 3, 6, 7, ... get nothing.
    q, k, v = _inputs(1, 16, 2, 4, torch.float64)
    out, lse = longnet.dilated_attention(q, k, v, [8], [4], return_lse=True, backend=backend)
    empty = torch.zeros(16, 2, dtype=torch.bool)
    for p in range(16):
        for h in range(2):
            empty[p, h] = (p % 8) % 4 != h
    assert torch.equal(torch.isinf(lse[0]), empty)
    assert (out[0][empty] == 0).all()
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def test_bfloat16_close_to_fp32():
    q, k, v = (torch.randn(1, 96, 4, 16) for _ in range(3))
    w, r = (32, 64), (1, 2)
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), w, r, is_causal=True)[0]
    out = longnet.dilated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w, r, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_default_scale_and_custom_scale():
    q, k, v = _inputs(1, 20, 2, 8, torch.float64, requires_grad=False)
    a = longnet.dilated_attention(q, k, v, [8], [2])
    b = longnet.dilated_attention(q, k, v, [8], [2], scale=8 ** -0.5)
    c = longnet.dilated_attention(q, k, v, [8], [2], scale=0.3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, dilated_attention_reference(q, k, v, [8], [2], scale=0.3)[0])
    assert not torch.allclose(a, c)


def test_backend_none_picks_a_fast_backend():
    q, k, v = _inputs(1, 20, 2, 8, torch.float32, requires_grad=False)
    a = longnet.dilated_attention(q, k, v, [8, 16], [1, 2])
    b = longnet.dilated_attention(q, k, v, [8, 16], [1, 2], backend="torch")
    torch.testing.assert_close(a, b)
    assert {"reference", "torch", "math"} <= set(longnet.available_backends())


def test_batch_items_are_independent():
    q, k, v = _inputs(3, 27, 2, 4, torch.float64, requires_grad=False)
    full = longnet.dilated_attention(q, k, v, [8, 16], [2, 4], is_causal=True)
    for i in range(3):
        one = longnet.dilated_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], [8, 16], [2, 4], is_causal=True)
        torch.testing.assert_close(full[i:i + 1], one)


def test_non_contiguous_inputs():
    base = torch.randn(1, 4, 30, 8, dtype=torch.float64)
    q = base.transpose(1, 2)  # (B, N, H, D) view with unusual strides
    out = longnet.dilated_attention(q, q, q, [8, 16], [1, 2], backend="torch")
    ref = dilated_attention_reference(q.contiguous(), q.contiguous(), q.contiguous(), [8, 16], [1, 2])[0]
    torch.testing.assert_close(out, ref)


# ---- bad input -------------------------------------------------------------------------------

def _ok(**over):
    args = dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 4),
                segment_lengths=[4], dilation_rates=[1])
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,words", [
    (dict(q=torch.randn(8, 2, 4)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(1, 9, 2, 4)), ValueError, "same shape"),
    (dict(v=torch.randn(1, 8, 2, 4, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(q=torch.randn(1, 0, 2, 4), k=torch.randn(1, 0, 2, 4), v=torch.randn(1, 0, 2, 4)), ValueError,
     "empty sequence length"),
    (dict(q=torch.ones(1, 8, 2, 4, dtype=torch.long)), TypeError, "floating-point"),
    (dict(q="x"), TypeError, "q must be a torch.Tensor"),
    (dict(segment_lengths=[4, 8]), ValueError, "same length"),
    (dict(segment_lengths=[], dilation_rates=[]), ValueError, "at least one"),
    (dict(segment_lengths=[0]), ValueError, "segment_lengths[0] must be a positive integer"),
    (dict(dilation_rates=[-1]), ValueError, "dilation_rates[0] must be a positive integer"),
    (dict(segment_lengths=[4.0]), TypeError, "segment_lengths[0] must be an integer"),
    (dict(dilation_rates=[1.5]), TypeError, "dilation_rates[0] must be an integer"),
    (dict(dilation_rates=[5]), ValueError, "must be <= segment_lengths[0]"),
    (dict(segment_lengths="48"), TypeError, "segment_lengths must be an int or a sequence"),
])
def test_bad_input_errors(over, exc, words):
    args = _ok(**over)
    with pytest.raises(exc) as info:
        longnet.dilated_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert words in str(info.value)


@pytest.mark.parametrize("scale,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                       ("0.5", TypeError), (True, TypeError)])
def test_bad_scale(scale, exc):
    args = _ok()
    with pytest.raises(exc, match="scale"):
        longnet.dilated_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args, scale=scale)


def test_bad_backend_name():
    args = _ok()
    with pytest.raises(ValueError, match="backend must be one of"):
        longnet.dilated_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args, backend="nope")


def test_int_arguments_accepted():
    q = torch.randn(1, 10, 2, 4)
    out = longnet.dilated_attention(q, q, q, 4, 2)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("max_elements,max_bh", [(700, 65535), (10**9, 3), (150, 2)])
def test_kernel_calls_are_chunked_under_limits(monkeypatch, max_elements, max_bh):
    # Kernels that index with 32 bits or launch per (batch, head) are called in chunks; lowering
    # the limits makes the chunked path run here and it must not change any result.
    from longnet.backends import kernels
    q, k, v = _inputs(2, 45, 5, 4, torch.float64)
    w, r = (8, 16, 45), (1, 2, 3)
    ref = longnet.dilated_attention(q, k, v, w, r, is_causal=True, return_lse=True)
    ref_g = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (q, k, v))
    calls = []
    real = kernels._attn_fwd

    def counting(*a):
        calls.append(a[0].shape)
        return real(*a)

    monkeypatch.setattr(kernels, "MAX_ELEMENTS", max_elements)
    monkeypatch.setattr(kernels, "MAX_BATCH_HEADS", max_bh)
    monkeypatch.setattr(kernels, "_attn_fwd", counting)
    out = longnet.dilated_attention(q, k, v, w, r, is_causal=True, return_lse=True)
    g = torch.autograd.grad(out[0].sum() + out[1].sum(), (q, k, v))
    assert all(s[0] * s[1] <= max_bh and s.numel() <= max(max_elements, s[2] * s[3]) for s in calls)
    assert len(calls) > 7  # more calls than the unchunked 7 (or fewer) groups
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bfloat16_gradients_within_twice_same_dtype_error(causal):
    # bf16 rule as flash-attention states it: error against an fp64 reference no more than about
    # twice that of a plain bf16 PyTorch computation of the same function.
    torch.manual_seed(5)
    b, n, h, d, w, r = 1, 80, 4, 16, (16, 32, 64), (1, 2, 4)
    base = [torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3)]
    do = torch.randn(b, n, h, d, dtype=torch.float64)

    def grads(backend, dtype):
        xs = [x.to(dtype).requires_grad_() for x in base]
        out = longnet.dilated_attention(*xs, w, r, is_causal=causal, backend=backend)
        gs = torch.autograd.grad(out, xs, do.to(dtype))
        return [out.double()] + [g.double() for g in gs]

    exact = grads("reference", torch.float64)
    fast = grads("torch", torch.bfloat16)
    plain = grads("reference", torch.bfloat16)
    for name, e, f, p in zip(["out", "dq", "dk", "dv"], exact, fast, plain):
        err_fast, err_plain = (f - e).abs().max().item(), (p - e).abs().max().item()
        assert err_fast <= 2 * err_plain + 1e-3, f"{name}: {err_fast:.3g} vs bf16 reference {err_plain:.3g}"
