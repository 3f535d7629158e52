"""The band (backends/band.py): short r = 1 patterns (the local window) in one pass, forward and
backward, equal to the mixture of separate patterns, against the dense reference."""

import os

import pytest
import torch

import longnet
from longnet import DilatedPattern
from longnet.backends import band, cpu_flash, kernels, torch_backend
from longnet.backends.reference import dilated_attention_reference
from helpers import assert_close

KERNEL = cpu_flash.mode() != "aten" and (cpu_flash.module() is not None or bool(os.environ.get("CI")))
needs_kernel = pytest.mark.skipif(not KERNEL, reason="LONGNET_CPU_KERNEL=aten, or no C++ compiler to build the kernel")

LW16 = DilatedPattern((128, 256), (1, 2)).with_local_window(16)
PATTERNS = {
    "lw16": LW16,
    "window-only": DilatedPattern((16,), (1,)).with_local_window(16),
    # three band patterns of different lengths and phases (c up to 3), one clipped to N below 64
    "mixed": DilatedPattern((40, 16, 24, 32), (1, 1, 1, 2), (7, 3, 0, 0)),
}
# (B, N): a sequence of two backward ranges (128 rows each), ragged N, N below the window with many batch items
SHAPES = [(1, 150), (3, 37), (64, 12)]


def _run(backend, q, k, v, do, dlse, pattern, causal):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = longnet.dilated_attention(*leaves, pattern.segment_lengths, pattern.dilation_rates, is_causal=causal,
                                         return_lse=True, backend=backend, segment_phases=pattern.segment_phases)
    torch.autograd.backward([out, lse], [do.to(out.dtype), dlse.to(lse.dtype)])
    return [out, lse] + [x.grad for x in leaves]


def _reference(q, k, v, do, dlse, pattern, causal):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = dilated_attention_reference(*leaves, pattern.segment_lengths, pattern.dilation_rates,
                                           is_causal=causal, segment_phases=pattern.segment_phases)
    torch.autograd.backward([out, lse], [do.double(), dlse.double()])
    return [out, lse] + [x.grad for x in leaves]


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_the_band_matches_the_reference(name, dtype, causal, backend):
    """Out, lse and the gradients (an lse gradient included) against the float64 reference."""
    pattern = PATTERNS[name]
    for b, n in SHAPES:
        g = torch.Generator().manual_seed(b * 1000 + n)
        q, k, v, do = (torch.randn(b, n, 2, 8, generator=g).to(dtype) for _ in range(4))
        dlse = torch.randn(b, n, 2, generator=g)
        got = _run(backend, q, k, v, do, dlse, pattern, causal)
        want = _reference(q, k, v, do, dlse, pattern, causal)
        for what, a, e in zip(("out", "lse", "grad", "grad", "grad"), got, want):
            assert_close(a, e, dtype, what, msg=f"{what} at B={b} N={n}")


def test_the_split_takes_short_rate_one_patterns():
    q = torch.zeros(1, 1000, 1, 1)
    b = band.split(1000, LW16.segment_lengths, LW16.dilation_rates, LW16.segment_phases, q, q, force_math=True)
    assert (b.windows, b.phases) == ((16, 16), (0, 8))
    assert (b.rest_lengths, b.rest_rates, b.rest_phases) == ((128, 256), (1, 2), None)
    # At N = 50 the 128-row pattern is clipped to one 50-row segment: a short one, in the band too.
    q = torch.zeros(1, 50, 1, 1)
    b = band.split(50, LW16.segment_lengths, LW16.dilation_rates, LW16.segment_phases, q, q, force_math=True)
    assert (b.windows, b.phases, b.rest_lengths) == ((50, 16, 16), (0, 0, 8), (256,))
    assert band.split(1000, (128, 256), (1, 2), None, q, q, force_math=True) is None


@needs_kernel
def test_both_window_patterns_are_one_kernel_pass(monkeypatch):
    """One band call forward and one backward for the two phased window patterns, whatever B is,
    and the paper patterns' calls are what they are without the window."""
    calls = {"band_fwd": 0, "band_bwd": 0, "attn": 0}
    for name in ("band_fwd", "band_bwd"):
        real = getattr(cpu_flash, name)
        monkeypatch.setattr(cpu_flash, name, lambda *a, _real=real, _name=name, **kw:
                            calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **kw))
    real_attn = kernels.attn_fwd
    monkeypatch.setattr(kernels, "attn_fwd", lambda *a: calls.__setitem__("attn", calls["attn"] + 1) or real_attn(*a))
    q, k, v = (torch.randn(16, 300, 4, 8, requires_grad=True) for _ in range(3))
    for pattern in (LW16, DilatedPattern((128, 256), (1, 2))):
        longnet.dilated_attention(q, k, v, pattern.segment_lengths, pattern.dilation_rates, is_causal=True,
                                  segment_phases=pattern.segment_phases).sum().backward()
    with_window, without = calls["attn"] // 2, calls["attn"] - calls["attn"] // 2
    assert calls["band_fwd"] == 1 and calls["band_bwd"] == 1 and with_window == without


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_kernel_merges_like_merge_partial_and_adds_into_gradients(dtype):
    """Into given buffers, rows never reached (-inf lse) included: the kernel's in-place merge equals
    the op's merge of the fresh band, and its backward adds to the given gradients."""
    g = torch.Generator().manual_seed(5)
    z, h, n, d = 2, 3, 90, 8
    q, k, v, do = (torch.randn(z, h, n, d, generator=g, dtype=dtype) for _ in range(4))
    b = band.Band((16, 16), (0, 8), (), (), None)
    out0 = torch.randn(z, n, h, d, generator=g, dtype=dtype)
    lse0 = torch.randn(z, n, h, generator=g, dtype=dtype) * 3
    lse0[:, ::7] = float("-inf")
    fresh_o, fresh_l = (x.transpose(1, 2) for x in band.math_fwd(q, k, v, True, 0.4, b))
    want_o, want_l = out0.clone(), lse0.clone()
    torch_backend.merge_partial(want_o, want_l, fresh_o, fresh_l)
    got_o, got_l = out0.clone(), lse0.clone()
    cpu_flash.band_fwd(q, k, v, True, 0.4, (16, 16), (0, 8), got_o.transpose(1, 2), got_l.transpose(1, 2))
    assert_close(got_o, want_o, dtype)
    assert_close(got_l, want_l, dtype, "lse")
    o, l = cpu_flash.band_fwd(q, k, v, True, 0.4, (16, 16), (0, 8))
    given = [torch.randn(z, n, h, d, generator=g, dtype=dtype) for _ in range(3)]
    start = [x.clone() for x in given]
    cpu_flash.band_bwd(do, q, k, v, o, l, True, 0.4, (16, 16), (0, 8), [x.transpose(1, 2) for x in given])
    for x, x0, p in zip(given, start, band.math_bwd(do, q, k, v, o, l, True, 0.4, b)):
        assert_close(x - x0, p.transpose(1, 2), dtype, "grad")


@needs_kernel
def test_strided_inputs_and_half_precision_on_the_kernel():
    """(B, H, N, D) tensors seen as (B, N, H, D), and float16, through the op's band."""
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16):
        q, k, v, do = (torch.randn(3, 4, 77, 16, generator=g).to(dtype).transpose(1, 2) for _ in range(4))
        dlse = torch.zeros(3, 77, 4)
        got = _run("torch", q, k, v, do, dlse, LW16, True)
        want = _reference(q, k, v, do, dlse, LW16, True)
        for what, a, e in zip(("out", "lse", "grad", "grad", "grad"), got, want):
            assert_close(a, e, dtype, what, msg=what)
