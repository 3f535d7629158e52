"""The Triton backend against the dense reference: forward, lse and gradients (incl. through lse).

CPU: the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be
set before Triton is imported and it switches every kernel decorated afterwards
to the interpreter, so the CPU cases run in ONE worker subprocess (this file
run as a script) instead of in the pytest process: other test files and the
GPU tests below keep compiled kernels. Each case is still its own test.

GPU (``@pytest.mark.gpu``): the same checks in fp16/bf16 at larger sizes, with
flash-attention's tolerance rule: the error against an fp32 reference is at
most twice that of a same-dtype PyTorch computation, plus a small floor.

Tolerances are the table of tests/helpers.py, shared with every backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for the worker
from tests.helpers import tolerance_ratio  # noqa: E402

# id: (B, N, H, D, segment_lengths, dilation_rates, causal, dtype, extra)
# extra: "config" (LONGNET_TRITON_CONFIG string), "strided" (q, k, v as views of one qkv
# tensor), "transposed" (views of (B, H, N, D) tensors), "scale" (custom score scale),
# "phases" (segment_phases: shifted segments, see longnet/patterns.py).
CASES = {
    "mix-r1-noncausal-f32": (1, 40, 3, 32, (16, 32), (1, 2), False, "float32", {}),
    "mix-r1-causal-f32": (1, 40, 3, 32, (16, 32), (1, 2), True, "float32", {}),
    # No r = 1 pattern (buffers start at 0 / -inf), r not dividing w, r > H, tails, empty rows.
    "awkward-causal-f32": (2, 50, 3, 32, (12, 20), (5, 3), True, "float32", {}),
    "awkward-noncausal-f32": (2, 50, 3, 32, (12, 20), (5, 3), False, "float32", {}),
    # w >= N (one short segment), duplicated pattern (count 2), r > H.
    "wide-dup-f32": (1, 37, 2, 16, (8, 100, 8), (3, 4, 3), True, "float32", {}),
    "strided-scale-f32": (2, 33, 2, 32, (16, 8), (2, 1), False, "float32",
                          {"strided": True, "scale": -0.4}),
    "transposed-causal-f32": (2, 40, 3, 16, (8, 16, 64), (1, 2, 4), True, "float32", {"transposed": True}),
    "transposed-bf16": (2, 33, 2, 32, (16, 8), (2, 1), False, "bfloat16", {"transposed": True}),
    "tiles-16-f32": (1, 48, 2, 32, (48, 24), (1, 3), True, "float32",
                     {"config": "16,16,1,1;16,16,1,1;16,16,1,1"}),
    "tiles-64-f32": (1, 70, 2, 32, (70, 35), (1, 2), False, "float32",
                     {"config": "64,32,1,1;64,16,1,1;64,32,1,1"}),
    "n1-f32": (1, 1, 2, 16, (4,), (1,), True, "float32", {}),
    "mix-noncausal-f16-d64": (1, 45, 2, 64, (16, 32), (1, 2), False, "float16", {}),
    "awkward-causal-f16": (1, 50, 3, 32, (12, 20), (5, 3), True, "float16", {}),
    "mix-causal-f16-d128": (1, 24, 1, 128, (16, 24), (1, 2), True, "float16", {}),
    "mix-causal-bf16": (1, 40, 3, 32, (16, 32), (1, 2), True, "bfloat16", {}),
    "awkward-noncausal-bf16": (2, 50, 2, 32, (12, 20), (5, 3), False, "bfloat16", {}),
    # One pattern: results are written in the input dtype directly (no fp32 merge buffer).
    "single-r1-causal-bf16": (1, 40, 2, 32, (16,), (1,), True, "bfloat16", {}),
    "single-r3-f16": (1, 37, 2, 32, (100,), (3,), False, "float16", {}),
    # Shifted segments: a leading short segment per pattern, N not a multiple of w, r not dividing w.
    "phase-window-causal-f32": (2, 45, 3, 16, (16, 8, 8), (2, 1, 1), True, "float32", {"phases": (0, 0, 4)}),
    "phase-awkward-noncausal-f32": (1, 50, 3, 32, (12, 20), (5, 3), False, "float32", {"phases": (7, 13)}),
    "phase-awkward-causal-f32": (2, 37, 3, 16, (8, 12), (1, 3), True, "float32", {"phases": (3, 5)}),
    # Phase >= N (one segment), N < w, several blocks per segment with small tiles.
    "phase-past-n-f32": (1, 10, 2, 16, (16, 40), (1, 7), True, "float32", {"phases": (13, 30)}),
    "phase-tiles-16-f32": (1, 70, 2, 32, (40, 16), (2, 1), False, "float32",
                           {"phases": (17, 8), "config": "16,16,1,1;16,16,1,1;16,16,1,1"}),
    "phase-transposed-bf16": (2, 33, 2, 32, (16, 8), (2, 1), True, "bfloat16",
                              {"phases": (5, 3), "transposed": True}),
}


# --------------------------------------------------------------------------- one case (both sides)

def _make_inputs(case, device, generator_seed=0):
    b, n, h, d, w, r, causal, dtype, extra = case
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    dt = getattr(torch, dtype)
    if extra.get("strided"):
        qkv = torch.randn(b, n, 3, h, d, generator=g).to(device=device, dtype=dt)
        q, k, v = qkv.unbind(2)
    elif extra.get("transposed"):
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dt).transpose(1, 2)
                   for _ in range(3))
    else:
        q, k, v = (torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dt) for _ in range(3))
    do = torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dt)
    dlse = torch.randn(b, n, h, generator=g).to(device=device)
    return q, k, v, do, dlse


def _run(q, k, v, do, dlse, w, r, causal, scale, backend, compute_dtype=None, phases=None):
    """(out, lse, dq, dk, dv) in fp32; loss = <out, do> + <lse, dlse> over rows with finite lse."""
    from longnet import dilated_attention
    if compute_dtype is not None:
        q, k, v = (x.detach().to(compute_dtype) for x in (q, k, v))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = dilated_attention(q, k, v, w, r, is_causal=causal, scale=scale, return_lse=True,
                                 backend=backend, segment_phases=phases)
    lse_used = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.float() * do.float()).sum() + (lse_used.float() * dlse.float()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return [out.detach().float(), lse.detach().float()] + [g.float() for g in grads]


def _compare(case, device):
    """Max abs errors of the triton backend and of a same-dtype PyTorch run, against fp32."""
    b, n, h, d, w, r, causal, dtype, extra = case
    q, k, v, do, dlse = _make_inputs(case, device)
    scale, ph = extra.get("scale"), extra.get("phases")
    tri = _run(q, k, v, do, dlse, w, r, causal, scale, "triton", phases=ph)
    ref = _run(q, k, v, do, dlse, w, r, causal, scale, "reference", torch.float32, phases=ph)
    # Same-dtype PyTorch baseline (flash-attention's yardstick): the dense reference in q's dtype.
    low = _run(q, k, v, do, dlse, w, r, causal, scale, "reference", phases=ph)
    names = ("out", "lse", "dq", "dk", "dv")
    fin_t, fin_r = torch.isfinite(tri[1]), torch.isfinite(ref[1])

    def err(a, c):
        a = torch.where(torch.isfinite(c), a, torch.zeros_like(a))
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        return (a - c).abs().max().item()

    kinds = ("out", "lse", "grad", "grad", "grad")
    return {
        "ratio": {nm: tolerance_ratio(a, c, dtype, kind) for nm, kind, a, c in zip(names, kinds, tri, ref)},
        "err": {nm: err(a, c) for nm, a, c in zip(names, tri, ref)},
        "base": {nm: err(a, c) for nm, a, c in zip(names, low, ref)},
        "lse_inf_match": bool((fin_t == fin_r).all()),
        "n_empty": int((~fin_r).sum()),
        "finite": all(bool(torch.isfinite(x).all()) for i, x in enumerate(tri) if i != 1),
        "empty_out_zero": bool((tri[0][~fin_r] == 0).all()),
        "empty_grads_zero": all(bool((g[~fin_r] == 0).all()) for g in tri[2:]),
    }


def _worker() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    from longnet.backends import triton_backend as tb
    ids = json.loads(sys.stdin.read())
    results = {"__interpret__": tb.INTERPRET, "__triton__": tb.TRITON_VERSION}
    for cid in ids:
        case = CASES[cid]
        cfg = case[-1].get("config")
        if cfg:
            os.environ["LONGNET_TRITON_CONFIG"] = cfg
        else:
            os.environ.pop("LONGNET_TRITON_CONFIG", None)
        try:
            results[cid] = _compare(case, "cpu")
        except Exception:  # reported per case by the parent
            results[cid] = {"exception": traceback.format_exc()}
    print("@@RESULTS@@" + json.dumps(results))


# --------------------------------------------------------------------------- CPU (interpreter) tests

@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("LONGNET_TRITON_CONFIG", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"],
                          input=json.dumps(list(CASES)), capture_output=True, text=True, env=env,
                          timeout=600)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    assert proc.returncode == 0 and marker, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(marker[-1][len("@@RESULTS@@"):])


def test_worker_ran_interpreted(interp_results):
    assert interp_results["__interpret__"] is True


@pytest.mark.parametrize("cid", list(CASES))
def test_matches_reference_interpreted(interp_results, cid):
    res = interp_results[cid]
    assert "exception" not in res, res.get("exception")
    err = res["err"]
    assert res["lse_inf_match"], "rows with lse = -inf differ from the reference's empty rows"
    assert res["finite"], "NaN/inf in out or gradients"
    assert res["empty_out_zero"] and res["empty_grads_zero"], "rows kept by no pattern must get 0"
    # Each quantity within the shared table's (atol, rtol), elementwise.
    assert all(x <= 1.0 for x in res["ratio"].values()), (res["ratio"], err)
    if CASES[cid][7] != "float32":
        # Flash-attention's rule: no worse than 2x a same-dtype PyTorch computation.
        for nm in ("out", "dq", "dk", "dv"):
            assert err[nm] <= 2 * res["base"][nm] + 1e-5, (nm, err, res["base"])


def test_awkward_cases_have_empty_rows(interp_results):
    # Guards the test itself: the "empty row" path must really be exercised.
    assert interp_results["awkward-causal-f32"]["n_empty"] > 0
    assert interp_results["awkward-noncausal-bf16"]["n_empty"] > 0
    assert interp_results["phase-awkward-noncausal-f32"]["n_empty"] > 0


# --------------------------------------------------------------------------- in-process checks

def test_backend_none_never_picks_triton_on_cpu():
    from longnet.backends.registry import pick_backend, available_backends
    assert "triton" in available_backends()
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert pick_backend(torch.zeros(1, 8, 2, 32, dtype=dt)).name != "triton"


@pytest.mark.parametrize("d,dtype", [(8, torch.float32), (8, torch.float64), (48, torch.float16)])
def test_refusal_names_the_head_dim(d, dtype):
    # Whatever else is wrong with the input, an unsupported head dim is named as the reason.
    from longnet import dilated_attention
    q = torch.randn(1, 8, 2, d).to(dtype)
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this input: it needs head dim D in "
                                         rf"\(16, 32, 64, 128\), got D={d}"):
        dilated_attention(q, q, q, 4, 1, backend="triton")


def test_supports_predicate():
    from longnet.backends import triton_backend as tb
    q = torch.zeros(1, 8, 2, 32, dtype=torch.float16)
    assert tb.supports(q) == tb.INTERPRET
    assert not tb.supports(torch.zeros(1, 8, 2, 48, dtype=torch.float16))  # head dim 48
    assert not tb.supports(torch.zeros(1, 8, 2, 32, dtype=torch.float64))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted error")
def test_cpu_without_interpreter_is_a_clear_error():
    from longnet import dilated_attention
    from longnet.backends.triton_backend import dilated_attention_triton
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="triton"):
        dilated_attention(q, q, q, 4, 1, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dilated_attention_triton(q, q, q, (4,), (1,))


def test_block_config_validation():
    from longnet.backends.triton_backend import BlockConfig
    ok = (64, 32, 4, 2)
    BlockConfig(ok, ok, ok)
    with pytest.raises(ValueError, match="divide"):
        BlockConfig((32, 64, 4, 2), ok, ok)
    with pytest.raises(ValueError, match="powers of two"):
        BlockConfig(ok, (48, 16, 4, 2), ok)


def test_bench_parses_and_needs_cuda():
    from longnet.bench import triton_kernel as triton_bench
    args = triton_bench.parse_args(["--csv", "x.csv", "--dims", "12x64,16x128", "--seq-lens", "16k,1M"])
    assert args.seq_lens == [16384, 1 << 20] and args.dims == [(12, 64), (16, 128)]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            triton_bench.main(["--csv", "x.csv"])


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = {
    "paper-like-causal-bf16-d64": (1, 3000, 4, 64, (512, 1024, 2048), (1, 2, 4), True, "bfloat16", {}),
    "paper-like-bf16-d128": (2, 1500, 3, 128, (256, 512, 1024), (1, 2, 4), False, "bfloat16", {}),
    "awkward-causal-bf16-d32": (2, 777, 3, 32, (100, 300), (7, 5), True, "bfloat16", {}),
    "awkward-f16-d64": (1, 999, 5, 64, (96, 250, 4096), (1, 6, 9), False, "float16", {}),
    "strided-bf16-d64": (2, 640, 4, 64, (128, 640), (1, 4), True, "bfloat16", {"strided": True}),
    "local-window-causal-bf16-d64": (2, 1000, 4, 64, (256, 512, 64, 64), (1, 2, 1, 1), True, "bfloat16",
                                     {"phases": (0, 0, 0, 32)}),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cid", list(GPU_CASES))
def test_gpu_matches_reference(cid):
    res = _compare(GPU_CASES[cid], "cuda")
    assert res["lse_inf_match"] and res["finite"]
    assert res["empty_out_zero"] and res["empty_grads_zero"]
    assert res["err"]["lse"] <= 1e-3, res["err"]
    for nm in ("out", "dq", "dk", "dv"):
        assert res["err"][nm] <= 2 * res["base"][nm] + 1e-4, (nm, res["err"], res["base"])


@pytest.mark.gpu
@gpu
def test_gpu_backend_none_picks_triton():
    from longnet.backends.registry import pick_backend
    assert pick_backend(torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda")).name == "triton"
    assert pick_backend(torch.zeros(1, 8, 2, 64, dtype=torch.float32, device="cuda")).name != "triton"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
