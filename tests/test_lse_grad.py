"""The gradient through the returned log-sum-exp, at head dim D, on CPU.

``lse`` is an output users differentiate (sequence parallelism merges partial
results through it), so its gradient is checked against the float64 reference
for every backend and dtype, including rows of ``dout`` that are zero or tiny.
"""

import pytest
import torch

import longnet
from longnet.backends import lse_grad
from longnet.backends.reference import dilated_attention_reference
from tests.helpers import assert_close


def _lse_grad_case(backend, dtype, dout_rows, n=40, causal=True):
    """Gradients of sum(out * do) + sum(lse * dl) against the float64 reference.

    ``dout_rows``: "none" (out unused: no gradient reaches it), "some-zero" (a
    third of the rows of do are 0), or "tiny" (a third are 1e-6: folding dlse
    into them would overflow float16).
    """
    q, k, v = (torch.randn(2, n, 3, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    w, r = (8, 16), (1, 2)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = longnet.dilated_attention(q, k, v, w, r, is_causal=causal, return_lse=True, backend=backend)
    r_out, r_lse = dilated_attention_reference(*ref_in, w, r, is_causal=causal)
    dl = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    do = torch.randn_like(out)
    pick = torch.arange(n) % 3 == 0
    do[:, pick] = 0.0 if dout_rows == "some-zero" else do[:, pick] * 1e-6

    def objective(o, l):
        total = (l.nan_to_num(neginf=0) * dl.to(l.dtype)).sum()
        return total if dout_rows == "none" else total + (o * do.to(o.dtype)).sum()
    grads = torch.autograd.grad(objective(out, lse), (q, k, v))
    # lse does not depend on v: the reference leaves dv unset, the op returns zeros.
    r_grads = torch.autograd.grad(objective(r_out, r_lse), ref_in, allow_unused=True, materialize_grads=True)
    for name, g, rg in zip("qkv", grads, r_grads):
        assert_close(g, rg, dtype, "grad", msg=f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dout_rows", ["none", "some-zero", "tiny"])
def test_lse_gradient_exact(backend, dtype, dout_rows):
    _lse_grad_case(backend, dtype, dout_rows)


def test_lse_gradient_float16_rows_that_cannot_fold():
    _lse_grad_case("torch", torch.float16, "tiny")


@pytest.mark.parametrize("dout_rows, second_pass", [("dense", False), ("some-zero", True), ("tiny16", True)])
def test_lse_gradient_passes(dout_rows, second_pass, monkeypatch):
    """The fold takes every row it can; only rows it cannot take cost a second pass."""
    ran = []
    real = lse_grad._lse_pass
    monkeypatch.setattr(lse_grad, "_lse_pass", lambda rest, out: ran.append(rest) or real(rest, out))
    dtype = torch.float16 if dout_rows == "tiny16" else torch.float32
    out = torch.randn(2, 10, 3, 8, dtype=dtype)
    dlse = torch.randn(2, 10, 3).sign() * (0.5 + torch.rand(2, 10, 3))
    dout = torch.randn_like(out)
    if dout_rows != "dense":
        # 1e-7 in float16: |dlse| / |dout| > 65504 (float16's largest), so these rows cannot fold.
        dout[:, 3] = 0.0 if dout_rows == "some-zero" else 1e-7
    passes = lse_grad.backward_inputs(dout, dlse, out)
    assert passes.out.shape == out.shape and passes.do.shape == out.shape  # still head dim D
    assert bool(ran) == second_pass
    if second_pass:
        assert torch.equal(ran[0] != 0, torch.arange(10).view(1, 10, 1).expand(2, 10, 3) == 3)
    # Folded rows: rowsum(do * out') = rowsum(do * out) - dlse.
    left = ran[0] if ran else torch.zeros_like(dlse)
    delta = (passes.do.double() * passes.out.double()).sum(-1)
    want = (dout.double() * out.double()).sum(-1) - (dlse - left).double()
    assert_close(delta, want, dtype, "out")
