"""longnet's CPU flash kernel (backends/cpu_flash.py, csrc/flash_cpu.cpp) against PyTorch's and the math path.

It must honour aten's CPU kernel contract exactly (values, lse, and the memory layout of every
output), be chosen only where it is meant to be, and let the op match the reference either way.
"""

import os
import warnings

import pytest
import torch

import helpers
import longnet
from longnet.backends import cpu_flash, kernels

aten = torch.ops.aten
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}

# Off by request, or (outside CI) no compiler; in CI (.ci/run installs g++) a failed build must fail these.
pytestmark = pytest.mark.skipif(
    cpu_flash.mode() == "aten" or (cpu_flash.module() is None and not os.environ.get("CI")),
    reason="LONGNET_CPU_KERNEL=aten, or no C++ compiler to build the kernel")

# (L, S, D): equal lengths, both ragged against the 128 x 256 / 128 x 512 blocks, L < S, L > S, single rows,
# a head dim of 96.
SHAPES = [(100, 100, 16), (300, 300, 8), (37, 53, 16), (530, 37, 8), (1, 5, 4), (64, 64, 32), (129, 600, 16),
          (70, 90, 96)]


def _inputs(z, h, l, s, d, dtype, seed, strided):
    g = torch.Generator().manual_seed(seed)

    def make(n):
        if strided:  # a (Z, N, H, D) buffer seen as (Z, H, N, D), every other row: the op's views
            return torch.randn(z, 2 * n, h, d, generator=g, dtype=dtype)[:, ::2].transpose(1, 2)
        return torch.randn(z, h, n, d, generator=g, dtype=dtype)
    return make(l), make(s), make(s), make(l)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("l, s, d", SHAPES)
def test_forward_and_backward_match_aten_exactly_in_contract(dtype, causal, l, s, d):
    for strided in (False, True):
        q, k, v, do = _inputs(2, 3, l, s, d, dtype, seed=l * 7 + s, strided=strided)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=0.3)
        mine_out, mine_lse = cpu_flash.fwd(q, k, v, causal, 0.3)
        torch.testing.assert_close(mine_out, out, **TOL[dtype])
        torch.testing.assert_close(mine_lse, lse, **TOL[dtype])
        assert mine_lse.dtype == lse.dtype and mine_lse.stride() == lse.stride()
        if strided:  # aten lays out a strided input's output (Z, L, H, D) in memory, and so do we
            assert mine_out.stride() == out.stride()
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, causal,
                                                                           scale=0.3)
        mine = cpu_flash.bwd(do, q, k, v, out, lse, causal, 0.3)
        for a, b in zip(mine, grads):
            torch.testing.assert_close(a, b, **TOL[dtype])
            assert a.stride() == b.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_and_fp16_are_computed_in_float_at_least_as_accurately_as_aten(dtype, causal):
    """Half-precision inputs: aten's layouts and dtypes (out in the input dtype, lse in float32), and
    errors against the float64 math path within twice aten's own (plus its rounding of the output)."""
    eps = torch.finfo(dtype).eps
    for l, s, d in [(300, 300, 16), (37, 53, 16), (530, 37, 8)]:
        q, k, v, do = _inputs(2, 3, l, s, d, dtype, seed=l + s, strided=True)
        ref = kernels.math_fwd(q.double(), k.double(), v.double(), causal, 0.3)[0]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=0.3)
        mine, mine_lse = cpu_flash.fwd(q, k, v, causal, 0.3)
        assert mine.dtype == dtype and mine_lse.dtype == torch.float32
        assert mine.stride() == out.stride() and mine_lse.stride() == lse.stride()
        assert (mine.double() - ref).abs().max() <= 2 * (out.double() - ref).abs().max() + eps
        grads_ref = kernels.math_bwd(do.double(), q.double(), k.double(), v.double(), out.double(),
                                     lse.double(), causal, 0.3)
        theirs = aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0,
                                                                            causal, scale=0.3)
        for a, b, r in zip(cpu_flash.bwd(do, q, k, v, out, lse, causal, 0.3), theirs, grads_ref):
            assert a.dtype == dtype and a.stride() == b.stride()
            assert (a.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + eps


@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_math_path_and_its_gradient(causal):
    q, k, v, do = _inputs(1, 2, 200, 200, 8, torch.float64, seed=3, strided=True)
    out, lse = kernels.math_fwd(q, k, v, causal, 0.25)
    mine_out, mine_lse = cpu_flash.fwd(q, k, v, causal, 0.25)
    torch.testing.assert_close(mine_out, out, **TOL[torch.float64])
    torch.testing.assert_close(mine_lse, lse, **TOL[torch.float64])
    for a, b in zip(cpu_flash.bwd(do, q, k, v, out, lse, causal, 0.25),
                    kernels.math_bwd(do, q, k, v, out, lse, causal, 0.25)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_large_scores_stay_finite():
    """Scores of +-1e4 (the kernel is built with -ffast-math, so it must never form inf itself)."""
    q, k, v, do = _inputs(1, 1, 130, 130, 8, torch.float32, seed=1, strided=False)
    q = q * 300
    out, lse = cpu_flash.fwd(q, k, v, True, 1.0)
    ref_out, ref_lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=1.0)
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-5)


def _op_and_reference(q, k, v, do, pattern, causal, scale):
    """[out, lse, dq, dk, dv] of the op on longnet's kernel (backend torch) and of the float64 reference
    on the same (rounded) inputs."""
    results = []
    for backend, cast in (("torch", lambda x: x), ("reference", torch.Tensor.double)):
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        out, lse = longnet.dilated_attention(*leaves, pattern.segment_lengths, pattern.dilation_rates,
                                             is_causal=causal, scale=scale, return_lse=True, backend=backend,
                                             segment_phases=pattern.segment_phases)
        out.backward(cast(do))
        results.append([out.detach(), lse.detach()] + [x.grad for x in leaves])
    return results


@pytest.mark.parametrize("causal", [True, False])
def test_a_large_non_power_of_two_scale_gives_the_exact_output(causal):
    """The scaled scores are computed once and their own max subtracted: under -ffast-math
    ``score * scale - max`` became one fma, whose value at the max element was the product's rounding
    error, and exp of it overflowed (368 non-finite outputs here at scale 3e8)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(4))
    ours, ref = _op_and_reference(q, k, v, do, longnet.DilatedPattern((64,), (1,)), causal, 3e8)
    assert all(x.isfinite().all() for x in ours)
    torch.testing.assert_close(ours[0].double(), ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[1].double(), ref[1], atol=0, rtol=1e-6)
    torch.testing.assert_close(ours[4].double(), ref[4], atol=1e-5, rtol=1e-5)  # p is one-hot: dv exact


FUZZ_PATTERNS = {"one": longnet.DilatedPattern((64,), (1,)),
                 "band": longnet.DilatedPattern((32,), (2,)).with_local_window(16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", sorted(FUZZ_PATTERNS))
def test_scales_and_magnitudes_fuzz_against_the_reference(dtype, pattern):
    """Scales 1e-8 .. 1e30 and tiny to huge q, k (while scaled scores fit the compute type): out and
    lse match the reference, every gradient is finite, and the gradients' error is within the
    dtype's rounding plus that of a softmax taken of scores this large (p = e^{s - lse} carries
    lse's rounding, about |s| eps of the compute type, which at huge |s| no lse-based backward, aten's
    included, can avoid; the same rounding weighs patterns merged by lse, see the "band" case)."""
    eps_out = torch.finfo(dtype).eps
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    eps_acc, big = torch.finfo(acc).eps, torch.finfo(acc).max / 1e3
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 64, 2, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    for i, scale in enumerate((1e-8, 1e-3, 0.3, 7.3, 3e8, 1e10, 1e20, 1e30)):
        for j, amp in enumerate((1e-6, 1.0, 1e3)):
            q, k, v, do = (x.to(dtype) for x in (base[0] * amp, base[1] * amp, base[2], base[3]))
            top = (q.double().abs().amax() * k.double().abs().amax() * 16 * scale).item()  # >= max |s|
            if top > big:
                continue
            for causal in ((i + j) % 2 == 0,):  # each (scale, magnitude) once, causal or not in turn
                ours, ref = _op_and_reference(q, k, v, do, FUZZ_PATTERNS[pattern], causal, scale)
                where = f"scale {scale}, |q|, |k| ~ {amp}, causal {causal}"
                # finite wherever the exact value fits the dtype (a gradient of 1e20 does not fit float16)
                fits = [r.abs().amax() < torch.finfo(dtype).max / 16 for r in ref]
                assert all(x.isfinite().all() for x, f in zip(ours, fits) if f), where
                # The scores' own rounding (|s| eps) moves the output that much; patterns merged by lse are
                # weighed with lse's rounding, the same size. Out stays a convex combination of values.
                atol, rtol = helpers.tol(dtype)
                torch.testing.assert_close(ours[0].double(), ref[0], atol=atol + 16 * eps_acc * top, rtol=rtol, msg=where)
                assert ours[0].abs().amax() <= v.abs().amax() * (1 + eps_out), where
                torch.testing.assert_close(ours[1].double(), ref[1], atol=1e-5, rtol=8 * eps_acc, msg=where)
                slack = 16 * (eps_out + eps_acc * top)
                nat = (do.double().abs().amax() * v.double().abs().amax() * 16 * scale).item()
                for x, r, other, f in zip(ours[2:], ref[2:], (k, q, None), fits[2:]):
                    if not f:
                        continue
                    size = r.abs().amax().item() + (nat * other.double().abs().amax().item() if other is not None
                                                    else do.double().abs().amax().item())
                    err = (x.double() - r).abs().amax().item()
                    assert err <= slack * size + 2 * torch.finfo(dtype).tiny, f"{where}: {err} > {slack} * {size}"


def _which(monkeypatch):
    calls = []
    for name in ("fwd", "bwd"):
        original = getattr(cpu_flash, name)
        monkeypatch.setattr(cpu_flash, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


# (dtype, causal, rows, chosen with oneDNN's float32 products, chosen without them)
CHOICES = [
    (torch.float32, True, 300, True, True), (torch.float64, True, cpu_flash.MAX_ROWS, True, True),
    (torch.float32, False, 300, True, False), (torch.float32, True, cpu_flash.MAX_ROWS + 1, True, False),
    (torch.float64, False, 300, True, True), (torch.float64, True, cpu_flash.MAX_ROWS + 1, False, False),
    (torch.bfloat16, True, 300, True, False), (torch.float16, False, 300, True, False),
    # fewer rows than MIN_ROWS (a decode step) stay with aten whatever else holds
    (torch.float32, False, cpu_flash.MIN_ROWS - 1, False, False), (torch.float32, True, 1, False, False),
    (torch.float32, True, cpu_flash.MIN_ROWS, True, True),
]


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype, causal, n, with_onednn, without", CHOICES)
def test_the_kernel_is_chosen_only_where_it_is_meant_to_be(dtype, causal, n, with_onednn, without, onednn,
                                                             monkeypatch):
    monkeypatch.setattr(cpu_flash, "onednn_products", lambda: onednn)
    calls = _which(monkeypatch)
    q, k, v, do = (x.to(dtype) for x in _inputs(1, 1, n, n, 4, torch.float32, seed=0, strided=False))
    out, lse = kernels.attn_fwd(q, k, v, causal, 0.5)
    kernels.attn_bwd(do, q, k, v, out, lse, causal, 0.5)
    assert calls == (["fwd", "bwd"] if (with_onednn if onednn else without) else [])


def test_onednn_products_are_detected_on_this_machine(monkeypatch):
    """On x86 with AVX2 or better and oneDNN (PyTorch's x86 wheels), float32 takes the fast products."""
    import platform
    x86_avx2 = (platform.machine().lower() in ("x86_64", "amd64")
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    assert cpu_flash.onednn_products() == (x86_avx2 and torch.backends.mkldnn.is_available())
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not cpu_flash.onednn_products()


def test_fake_tensors_never_reach_it(monkeypatch):
    """Under FakeTensorMode (torch.compile's tracing) there is no data to read: aten's fake kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = _which(monkeypatch)
    with FakeTensorMode():
        q = torch.empty(1, 2, 50, 4)
        out, lse = kernels.attn_fwd(q, q, q, True, 0.5)
        kernels.attn_bwd(q, q, q, q, out, lse, True, 0.5)
    assert calls == [] and out.shape == q.shape


def test_environment_turns_it_off_and_rejects_bad_values(monkeypatch):
    calls = _which(monkeypatch)
    q = torch.randn(1, 2, 50, 4)
    monkeypatch.setenv(cpu_flash.ENV, "aten")
    kernels.attn_fwd(q, q, q, True, 0.5)
    assert calls == [] and cpu_flash.module() is None
    monkeypatch.setenv(cpu_flash.ENV, "bogus")
    with pytest.raises(ValueError, match="LONGNET_CPU_KERNEL must be one of .* got 'bogus'"):
        kernels.attn_fwd(q, q, q, True, 0.5)
    monkeypatch.setenv(cpu_flash.ENV, "longnet")
    kernels.attn_fwd(q, q, q, True, 0.5)
    assert calls == ["fwd"]


def test_a_failed_build_warns_once_and_falls_back_or_raises_when_required(monkeypatch):
    def no_compiler():
        raise OSError("g++: not found")
    monkeypatch.setattr(cpu_flash, "_module", None)
    monkeypatch.setattr(cpu_flash, "_failed", None)
    monkeypatch.setattr(cpu_flash, "_build", no_compiler)
    q = torch.randn(1, 2, 50, 4)
    with pytest.warns(RuntimeWarning, match="did not build .*g\\+\\+: not found.*using PyTorch's kernel"):
        out, _ = kernels.attn_fwd(q, q, q, True, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again, _ = kernels.attn_fwd(q, q, q, True, 0.5)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    monkeypatch.setenv(cpu_flash.ENV, "longnet")
    with pytest.raises(RuntimeError, match="LONGNET_CPU_KERNEL=longnet but the CPU attention kernel did not build"):
        kernels.attn_fwd(q, q, q, True, 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_op_matches_the_reference_with_either_kernel(dtype, monkeypatch):
    """The whole op, forward and backward, with longnet's kernel and with aten's."""
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(2, 333, 6, 8, generator=g, dtype=dtype) for _ in range(4))
    w, r = [64, 128, 256], [1, 2, 4]

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = longnet.dilated_attention(*leaves, w, r, is_causal=True, backend=backend)
        out.backward(do)
        return [out.detach()] + [x.grad for x in leaves]

    expect = run("reference")
    calls = _which(monkeypatch)
    ours = run("torch")
    assert "fwd" in calls and "bwd" in calls
    monkeypatch.setenv(cpu_flash.ENV, "aten")
    calls.clear()
    theirs = run("torch")
    assert calls == []
    for a, b, c in zip(ours, theirs, expect):
        torch.testing.assert_close(a, c, **TOL[dtype])
        torch.testing.assert_close(b, c, **TOL[dtype])
