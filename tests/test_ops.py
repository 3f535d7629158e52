"""dilated_attention: every backend against the dense reference, forward, lse and gradients."""


import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longnet
from longnet.backends.reference import count_matrix, dilated_attention_reference
from tests.helpers import assert_close, loop_reference

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
    # r divides H: kept rows are gathered as diagonals, with partial last blocks (w mod r > 0) and w < r.
    pytest.param(2, 70, 12, 4, (8, 20, 32, 70), (6, 4, 12, 12), id="r|H-diagonals"),
    pytest.param(1, 75, 4, 4, (16, 40, 75), (2, 6, 32), id="r>=H-diagonals"),
]


def _inputs(b, n, h, d, dtype, requires_grad=True):
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _compare(backend, b, n, h, d, w, r, causal, dtype, lse_grad=False, inputs=None):
    """One backend against the float64 reference on the same inputs: out, lse, and the gradients
    (through lse too with ``lse_grad``). ``inputs``: leaf q, k, v to use (any strides)."""
    q, k, v = inputs if inputs is not None else _inputs(b, n, h, d, dtype)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=causal, return_lse=True, backend=backend)
    r_out, r_lse = dilated_attention_reference(*ref_in, w, r, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, n, h)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, r_out, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), "rows kept by no pattern differ"
    assert_close(lse.nan_to_num(neginf=0), r_lse.nan_to_num(neginf=0), dtype, "lse")
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
        assert_close(g, rg, dtype, "grad", msg=f"d{name} mismatch")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("b,n,h,d,w,r", SHAPES)
def test_fast_matches_reference(seed, backend, causal, dtype, b, n, h, d, w, r):
    _compare(backend, b, n, h, d, w, r, causal, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,n,h,d,w,r", [SHAPES[1], SHAPES[4], SHAPES[6]])
def test_half_precision_matches_reference(seed, backend, causal, dtype, b, n, h, d, w, r):
    # The same table as fp64/fp32, at its half-precision rows (fp32 accumulation inside).
    _compare(backend, b, n, h, d, w, r, causal, dtype, lse_grad=True)


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
    assert_close(out, l_out, torch.float64)
    assert_close(lse.nan_to_num(neginf=0), l_lse.nan_to_num(neginf=0), torch.float64, "lse")
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
    assert_close(out, ref, torch.bfloat16)


def test_default_scale_and_custom_scale():
    q, k, v = _inputs(1, 20, 2, 8, torch.float64, requires_grad=False)
    a = longnet.dilated_attention(q, k, v, [8], [2])
    b = longnet.dilated_attention(q, k, v, [8], [2], scale=8 ** -0.5)
    c = longnet.dilated_attention(q, k, v, [8], [2], scale=0.3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, dilated_attention_reference(q, k, v, [8], [2], scale=0.3)[0])
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_backend_none_picks_torch_on_cpu_and_matches_the_reference(dtype):
    from longnet.backends.registry import pick_backend
    q, k, v = _inputs(2, 40, 3, 8, dtype, requires_grad=False)
    assert pick_backend(q).name == "torch"
    w, r = (8, 16), (1, 2)
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=True, return_lse=True)
    ref_out, ref_lse = dilated_attention_reference(q.double(), k.double(), v.double(), w, r, is_causal=True)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")
    # backend=None ran exactly what backend="torch" runs
    assert torch.equal(out, longnet.dilated_attention(q, k, v, w, r, is_causal=True, backend="torch"))


def test_backend_none_picks_by_priority_among_those_that_accept(monkeypatch):
    from longnet.backends import registry
    # Undone after the test, with the loading state (a meta input below loads optional backends).
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    monkeypatch.setattr(registry, "_optional_loaded", registry._optional_loaded)
    calls = []

    def fp64_only(q, k, v, w, r, *, is_causal, scale):
        calls.append(q.dtype)
        return registry.BACKENDS["reference"].fn(q, k, v, w, r, is_causal=is_causal, scale=scale)

    registry.register_backend("fp64-only", fp64_only,
                              lambda q: q.dtype == torch.float64 or "it only runs float64", priority=100)
    q64 = torch.randn(1, 12, 2, 4, dtype=torch.float64)
    assert registry.pick_backend(q64).name == "fp64-only"
    assert registry.pick_backend(q64.float()).name == "torch"
    # The torch backend refuses devices other than cpu/cuda; then math (which runs anything) is picked.
    assert registry.pick_backend(torch.empty(1, 12, 2, 4, device="meta")).name == "math"
    out = longnet.dilated_attention(q64, q64, q64, 4, 2)
    assert calls == [torch.float64]
    assert_close(out, dilated_attention_reference(q64, q64, q64, (4,), (2,))[0], torch.float64)
    with pytest.raises(ValueError, match="it only runs float64"):
        longnet.dilated_attention(q64.float(), q64.float(), q64.float(), 4, 2, backend="fp64-only")


def test_batch_items_are_independent():
    q, k, v = _inputs(3, 27, 2, 4, torch.float64, requires_grad=False)
    full = longnet.dilated_attention(q, k, v, [8, 16], [2, 4], is_causal=True)
    for i in range(3):
        one = longnet.dilated_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], [8, 16], [2, 4], is_causal=True)
        torch.testing.assert_close(full[i:i + 1], one)


# ---- any strides ----------------------------------------------------------------------------

def _hf_layout(b, n, h, d, dtype):
    """(B, N, H, D) views of (B, H, N, D) tensors, as Hugging Face models pass them."""
    return torch.randn(b, h, n, d, dtype=dtype).transpose(1, 2)


LAYOUTS = {
    "hf-transposed": _hf_layout,
    "fused-qkv-slice": lambda b, n, h, d, dt: torch.randn(b, n, 3, h, d, dtype=dt)[:, :, 1],
    "strided-last-dim": lambda b, n, h, d, dt: torch.randn(b, n, h, 2 * d, dtype=dt)[..., ::2],
    "sequence-slice": lambda b, n, h, d, dt: torch.randn(b, n + 5, h, d, dtype=dt)[:, 2:2 + n],
    "permuted": lambda b, n, h, d, dt: torch.randn(n, d, b, h, dtype=dt).permute(2, 0, 3, 1),
    "expanded-batch": lambda b, n, h, d, dt: torch.randn(1, n, h, d, dtype=dt).expand(b, n, h, d),
}


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_strides_match_reference(seed, backend, causal, dtype, layout):
    # Several segments per batch item (nseg > 1) and B > 1: batch and segment dims cannot share
    # one strided dim for most of these layouts. Leaves keep their strides (detach of a view).
    q, k, v = (LAYOUTS[layout](3, 45, 4, 8, dtype).detach().requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    _compare(backend, 3, 45, 4, 8, (8, 16, 64), (1, 2, 4), causal, dtype, lse_grad=True, inputs=(q, k, v))


def test_hugging_face_layout_from_the_issue():
    q = torch.randn(2, 4, 64, 16).transpose(1, 2)
    out = longnet.dilated_attention(q, q, q, (16, 32), (1, 2))
    ref = dilated_attention_reference(q.double(), q.double(), q.double(), (16, 32), (1, 2))[0]
    assert_close(out, ref, torch.float32)


def test_strided_inputs_reach_the_kernel_without_a_copy(monkeypatch):
    # r = 1 units are strided views of the caller's tensors: the kernel must read q, k, v's own memory
    # (w = 16 runs as a band on longnet's CPU kernel, as a segment call where that is not built).
    from longnet.backends import cpu_flash, kernels
    q, k, v = (_hf_layout(2, 48, 3, 8, torch.float32) for _ in range(3))
    seen = []

    def spy(real):
        def call(a, b, c, *rest, **kw):
            seen.append([x.untyped_storage().data_ptr() for x in (a, b, c)])
            return real(a, b, c, *rest, **kw)
        return call

    monkeypatch.setattr(kernels, "_attn_fwd", spy(kernels._attn_fwd))
    monkeypatch.setattr(cpu_flash, "band_fwd", spy(cpu_flash.band_fwd))
    longnet.dilated_attention(q, k, v, (16,), (1,), backend="torch")
    own = [x.untyped_storage().data_ptr() for x in (q, k, v)]
    assert seen and all(ptrs == own for ptrs in seen), "a strided input was copied before the kernel"


def test_diagonal_gather_is_used_when_r_divides_h(monkeypatch):
    # The paper's rates all divide H = 12, and r >= H keeps one head per offset: every r > 1 group
    # must take the one-pass diagonal gather.
    from longnet.backends import torch_backend
    calls = []
    real = torch_backend._diagonal_pairs
    monkeypatch.setattr(torch_backend, "_diagonal_pairs", lambda *a: calls.append(a[2][0].rate) or real(*a))
    q, k, v = _inputs(1, 96, 12, 4, torch.float64, requires_grad=False)
    longnet.dilated_attention(q, k, v, (16, 32, 64, 96), (1, 2, 6, 12), is_causal=True, backend="torch")
    longnet.dilated_attention(q, k, v, (96,), (32,), is_causal=True, backend="torch")
    assert sorted(set(calls)) == [2, 6, 12, 32]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_groups_split_over_several_calls_match_reference(monkeypatch, seed, causal):
    # At long N a group's segments go through several kernel calls to bound transient memory;
    # a tiny budget forces that split (and disables adopting the first output) at test size.
    from longnet.backends import kernels, torch_backend
    monkeypatch.setattr(torch_backend, "_CALL_BYTES", 3 * 8 * 4 * 8)
    calls = []
    real = kernels._attn_fwd
    monkeypatch.setattr(kernels, "_attn_fwd", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    _compare("torch", 2, 70, 12, 4, (8, 20, 32, 70), (1, 4, 12, 12), causal, torch.float64, lse_grad=True)
    assert max(calls) <= 3 and len(calls) > 12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_runs_in_row_blocks_and_matches_one_block(monkeypatch, seed, dtype):
    # bf16/fp16 accumulate in fp32; long inputs are computed in blocks of whole periods of the
    # pattern so that only one block's fp32 accumulators are alive. A tiny budget forces blocks.
    from longnet.backends import custom_ops
    w, r = (8, 16, 24), (1, 2, 4)  # period lcm = 48; N = 100 leaves a partial last block
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in _inputs(2, 100, 4, 8, torch.float32, False))

    def run():
        out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=True, return_lse=True, backend="torch")
        grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, 8)).sum() + lse.sum(), (q, k, v))
        return (out, lse, *grads)

    one = run()
    monkeypatch.setattr(custom_ops, "_BLOCK_BYTES", 1)
    assert [s.stop for s in custom_ops._row_blocks(q, w, None)] == [48, 96, 100]
    blocked = run()
    for a, b in zip(blocked, one):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert custom_ops._row_blocks(q, w, (0, 8, 0)) == [slice(0, 100)]  # phases: segments cross any period


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
    # A bool is not a length, however it is spelled (Python, numpy, a 0-d tensor), alone or in a list.
    (dict(segment_lengths=True), TypeError, "segment_lengths must be an integer, got True"),
    (dict(segment_lengths=np.bool_(True)), TypeError, "segment_lengths must be an integer, got True"),
    (dict(segment_lengths=torch.tensor(True)), TypeError, "segment_lengths must be an integer, got True"),
    (dict(segment_lengths=[np.bool_(True)]), TypeError, "segment_lengths[0] must be an integer, got True"),
    (dict(dilation_rates=[torch.tensor(True)]), TypeError, "dilation_rates[0] must be an integer, got True"),
    (dict(dilation_rates=torch.tensor([True])), TypeError, "dilation_rates[0] must be an integer, got True"),
    (dict(segment_lengths=[np.float64(4.0)]), TypeError, "segment_lengths[0] must be an integer"),
    (dict(segment_lengths=[2**63]), ValueError, "segment_lengths[0] must fit in int64"),
    (dict(segment_lengths=[10**30]), ValueError, "segment_lengths[0] must fit in int64"),
    (dict(segment_lengths=[2**64], dilation_rates=[2**63]), ValueError, "segment_lengths[0] must fit in int64"),
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
    # numpy and 0-d tensor integers are integers
    for w, r in ((np.int64(4), torch.tensor(2)), ([np.int32(4)], torch.tensor([2]))):
        torch.testing.assert_close(longnet.dilated_attention(q, q, q, w, r), out)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("huge", [2**63 - 1, 2**62, 10**12])
def test_huge_segment_lengths_are_one_segment(backend, huge):
    # w >= N is one segment whatever w is, up to int64's limit (no overflow in any backend).
    q, k, v = _inputs(2, 30, 3, 4, torch.float64, requires_grad=False)
    out, lse = longnet.dilated_attention(q, k, v, (8, huge), (1, 3), is_causal=True, return_lse=True,
                                         backend=backend)
    ref_out, ref_lse = dilated_attention_reference(q, k, v, (8, 30), (1, 3), is_causal=True)
    assert_close(out, ref_out, torch.float64)
    assert_close(lse, ref_lse, torch.float64, "lse")


# ---- a backend that refuses an input says why ------------------------------------------------

def test_torch_backend_names_the_device_it_refuses():
    q = torch.empty(1, 8, 2, 4, device="meta")
    with pytest.raises(ValueError, match="backend 'torch' cannot run this input: it runs on cpu and cuda "
                                         "tensors, got a tensor on meta"):
        longnet.dilated_attention(q, q, q, 4, 1, backend="torch")


def test_missing_optional_backend_names_the_import_error(monkeypatch):
    from longnet.backends import registry
    monkeypatch.setattr(registry, "BACKENDS", {k: b for k, b in registry.BACKENDS.items() if k != "triton"})
    monkeypatch.setattr(registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(registry, "_optional_loaded", False)
    # As if triton were not installed: importing the backend raises ImportError.
    import longnet.backends
    monkeypatch.delattr(longnet.backends, "triton_backend", raising=False)
    monkeypatch.setitem(sys.modules, "longnet.backends.triton_backend", None)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"backend 'triton' is not available: importing it failed \(\w*Error"):
        longnet.dilated_attention(q, q, q, 4, 1, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        longnet.MultiheadDilatedAttention(32, 2, [4], [1], backend="triton")


def test_sequence_parallel_names_why_it_refuses_a_backend():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="sequence parallelism runs the torch backend's kernels"):
        longnet.dilated_attention(q, q, q, 4, 1, backend="reference", group=object())


# ---- non-finite inputs never leak into rows that cannot see them (reference) -----------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_keeps_non_finite_keys_out_of_rows_that_cannot_see_them(seed, causal):
    b, n, h, d, w, r = 2, 24, 3, 4, (8, 24), (1, 2)
    q, k, v = _inputs(b, n, h, d, torch.float64, requires_grad=False)
    bad_k, bad_v = 13, 17  # in the middle: earlier rows (causal) and other segments cannot see them
    k_bad, v_bad, q_bad = k.clone(), v.clone(), q.clone()
    k_bad[:, bad_k, :, 0] = float("inf")
    v_bad[:, bad_v, :, 1] = float("nan")
    q_bad[:, bad_k, :, 2] = float("-inf")
    c = count_matrix(n, h, w, r, is_causal=causal)  # (H, N, N)
    clean_rows = ((c[:, :, bad_k] == 0) & (c[:, :, bad_v] == 0)).T  # (N, H)
    clean_rows[bad_k] = False  # its own q is -inf
    assert clean_rows.any() and (~clean_rows).any()

    def run(q, k, v):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = dilated_attention_reference(*xs, w, r, is_causal=causal)
        # A loss on the clean rows only: its gradient must not see the bad entries either.
        loss = (out * clean_rows[None, :, :, None]).sum() + lse.masked_fill(~clean_rows[None], 0).sum()
        return (out, lse, *torch.autograd.grad(loss, xs))

    bad = run(q_bad, k_bad, v_bad)
    good = run(q, k, v)  # finite inputs, same values elsewhere
    keep = clean_rows[None].expand(b, n, h)
    torch.testing.assert_close(bad[0][keep], good[0][keep])
    torch.testing.assert_close(bad[1][keep], good[1][keep])
    # Gradients of the clean rows' queries, and of keys/values that only clean rows see, are the
    # finite-input ones: no 0 * inf is formed for a pair with C = 0. (A row that does see a bad
    # entry is NaN, and autograd carries 0 * NaN from it, as any attention does.)
    dirty_sees = ((c > 0) & ~clean_rows.T[:, :, None]).any(dim=1).T  # (N, H): seen by a dirty row
    clean_keys = (~dirty_sees)[None].expand(b, n, h)
    for g_bad, g_good, rows in zip(bad[2:], good[2:], (keep, clean_keys, clean_keys)):
        assert torch.isfinite(g_bad[rows]).all()
        torch.testing.assert_close(g_bad[rows], g_good[rows])
    assert clean_keys.any() and (~clean_keys).any()
    # Rows that do see the NaN value get NaN there, not a silently finite result.
    sees_nan = (c[:, :, bad_v] > 0).T.clone()
    sees_nan[bad_k] = False  # its -inf query may give key bad_v probability 0
    assert sees_nan.any() and torch.isnan(bad[0][..., 1][sees_nan[None].expand(b, n, h)]).all()


@pytest.mark.parametrize("max_elements,max_bh", [(700, 65535), (10**9, 3), (150, 2)])
def test_kernel_calls_are_chunked_under_limits(monkeypatch, max_elements, max_bh):
    # Kernels that index with 32 bits or launch per (batch, head) are called in chunks; lowering
    # the limits makes the chunked path run here and it must not change any result.
    from longnet.backends import band, kernels
    monkeypatch.setattr(band, "MAX_SEGMENT", 0)  # every pattern as segment calls (a band is one call, not chunked)
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
