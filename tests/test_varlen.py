"""Variable-length batches: every sequence of a packed or padded batch equals that sequence run alone.

The oracle is the dense reference backend run on each sequence by itself (forward, lse and
the gradients, through out and lse). Layouts: packed (T, H, D) with cu_seqlens, padded
(B, N, H, D) with key_padding_mask (left, right, both-side padding, all-padding rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import longnet
from longnet.backends import kernels
from longnet.backends.varlen_ops import varlen_fwd_op
from longnet.varlen import cu_seqlens_from_lengths, pad, unpad
from tests.helpers import assert_close

BACKENDS = ("torch", "math", "reference")
# (segment_lengths, dilation_rates, segment_phases): r = 1 first or not, r > H, r not dividing w,
# a local window with phases, w longer than most sequences.
PATTERNS = {
    "mix": ((8, 16), (1, 2), None),
    "awkward": ((6, 20), (5, 3), None),
    "window": ((16, 4, 4), (2, 1, 1), (0, 0, 2)),
    "phases": ((8, 12), (1, 3), (3, 5)),
}


def _inputs(t, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(5)] + \
        [torch.randn(t, h, generator=g, dtype=torch.float64)]


def _loss_grads(q, k, v, do, dlse, **kw):
    """(out, lse, dq, dk, dv) for loss <out, do> + <lse, dlse> over rows with finite lse."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = longnet.dilated_attention(q, k, v, return_lse=True, **kw)
    used = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.double() * do.double()).sum() + (used.double() * dlse.reshape(used.shape).double()).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads)]
    return [out.detach(), lse.detach()] + grads


def _check_packed(lengths, pattern, causal, backend, dtype=torch.float64, h=3, d=8, seed=0):
    w, r, phases = pattern
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v, do, _, dlse = _inputs(sum(lengths), h, d, dtype, seed)
    got = _loss_grads(q, k, v, do, dlse, segment_lengths=w, dilation_rates=r, segment_phases=phases,
                      is_causal=causal, backend=backend, cu_seqlens=cu)
    for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == e:
            continue
        # The oracle in float64 on the same (dtype-rounded) inputs, as the tolerance table assumes.
        alone = _loss_grads(*(x[None, a:e].double() for x in (q, k, v, do, dlse)), segment_lengths=w,
                            dilation_rates=r,
                            segment_phases=phases, is_causal=causal, backend="reference")
        for name, kind, x, y in zip(("out", "lse", "dq", "dk", "dv"), ("out", "lse", "grad", "grad", "grad"),
                                    got, alone):
            assert_close(x[a:e], y[0], dtype, kind, msg=f"{name} of sequence {b} (length {e - a}), {backend}")
    for x in got:
        assert not torch.isnan(x).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_each_sequence_alone(backend, pattern, causal):
    # Lengths 0 and 1, shorter than every w, one segment plus a tail, several segments.
    _check_packed([0, 1, 5, 17, 0, 40, 3, 16], PATTERNS[pattern], causal, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_low_precision(dtype):
    _check_packed([30, 1, 64, 9], PATTERNS["mix"], True, "torch", dtype=dtype, h=4, d=16)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(lengths=st.lists(st.one_of(st.integers(0, 3), st.integers(4, 15), st.integers(16, 90)), min_size=1,
                        max_size=64),
       pattern=st.sampled_from(sorted(PATTERNS)), causal=st.booleans(), backend=st.sampled_from(("torch", "math")))
def test_hypothesis_length_mixes(lengths, pattern, causal, backend):
    _check_packed(lengths, PATTERNS[pattern], causal, backend, h=2, d=4)


def _mask(layout):
    """(B, N) = (5, 24) masks: left, right, both-side padding, an all-padding row, a full row."""
    m = torch.zeros(5, 24, dtype=torch.bool)
    spans = {"left": [(7, 24), (20, 24), (0, 24), (23, 24), (0, 0)],
             "right": [(0, 17), (0, 4), (0, 24), (0, 1), (0, 0)],
             "both": [(3, 21), (10, 11), (0, 24), (5, 9), (0, 0)]}[layout]
    for b, (s, e) in enumerate(spans):
        m[b, s:e] = True
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["left", "right", "both"])
def test_padded_equals_each_row_alone(backend, layout):
    w, r, phases = PATTERNS["window"]
    mask = _mask(layout)
    b, n, h, d = 5, 24, 3, 8
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    dlse = torch.randn(b, n, h, generator=g, dtype=torch.float64)
    kw = dict(segment_lengths=w, dilation_rates=r, segment_phases=phases, is_causal=True)
    got = _loss_grads(q, k, v, do, dlse, backend=backend, key_padding_mask=mask, **kw)
    out, lse, *grads = got
    pad_rows = ~mask
    assert (out[pad_rows] == 0).all() and (lse[pad_rows] == float("-inf")).all()
    for g_ in grads:
        assert (g_[pad_rows] == 0).all() and not torch.isnan(g_).any()
    for row in range(b):
        idx = mask[row].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        alone = _loss_grads(*(x[row:row + 1, idx] for x in (q, k, v, do, dlse)), backend="reference", **kw)
        for name, kind, x, y in zip(("out", "lse", "dq", "dk", "dv"), ("out", "lse", "grad", "grad", "grad"),
                                    got, alone):
            assert_close(x[row, idx], y[0], torch.float64, kind, msg=f"{name} of row {row} ({layout})")


def test_padded_equals_packed_via_unpad_pad():
    mask = _mask("both")
    x = torch.randn(5, 24, 2, 8, dtype=torch.float64)
    packed, idx, cu, max_len = unpad(x, mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 18, 19, 43, 47, 47] and max_len == 24
    assert torch.equal(pad(packed, idx, 5, 24), torch.where(mask[..., None, None], x, 0))
    out_p = longnet.dilated_attention(packed, packed, packed, [8, 16], [1, 2], cu_seqlens=cu)
    out_m = longnet.dilated_attention(x, x, x, [8, 16], [1, 2], key_padding_mask=mask)
    torch.testing.assert_close(pad(out_p, idx, 5, 24), out_m, rtol=0, atol=0)


def test_equal_lengths_take_the_dense_path_bitwise():
    q, k, v = (torch.randn(3, 40, 4, 16) for _ in range(3))
    dense = longnet.dilated_attention(q, k, v, [16, 32], [1, 2], is_causal=True)
    packed = longnet.dilated_attention(*(x.flatten(0, 1) for x in (q, k, v)), [16, 32], [1, 2], is_causal=True,
                                       cu_seqlens=cu_seqlens_from_lengths([40, 40, 40]))
    assert torch.equal(packed.view(3, 40, 4, 16), dense)


def test_all_padding_batch_and_empty_packed_batch():
    q = torch.randn(2, 6, 2, 4, requires_grad=True)
    out, lse = longnet.dilated_attention(q, q, q, [4], [1], key_padding_mask=torch.zeros(2, 6, dtype=torch.bool),
                                         return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    e = torch.randn(0, 2, 4)
    out, lse = longnet.dilated_attention(e, e, e, [4], [1], cu_seqlens=cu_seqlens_from_lengths([0, 0]),
                                         return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (0, 2)


def test_cost_is_the_sum_over_sequences(monkeypatch):
    """The kernel work (Z x H x queries x keys summed over calls) equals that of separate calls."""
    work = []
    real = kernels.attn_fwd

    def counting(q, k, v, *args, **kw):
        work.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, *args, **kw)
    monkeypatch.setattr(kernels, "attn_fwd", counting)
    lengths = [300, 17, 129, 64, 1, 250]
    # The band (backends/band.py) computes short r = 1 segments outside attn_fwd in the dense
    # path, and short sequences clip every segment: turn it off so both paths count alike.
    from longnet.backends import band
    monkeypatch.setattr(band, "split", lambda *a, **k: None)
    w, r = (32, 64, 128), (1, 2, 4)
    x = torch.randn(sum(lengths), 4, 8)
    longnet.dilated_attention(x, x, x, w, r, cu_seqlens=cu_seqlens_from_lengths(lengths), backend="torch")
    packed, packed_calls = sum(work), len(work)
    work.clear()
    cu = cu_seqlens_from_lengths(lengths).tolist()
    for a, e in zip(cu[:-1], cu[1:]):
        longnet.dilated_attention(*(x[None, a:e] for _ in range(3)), w, r, backend="torch")
    assert packed == sum(work)
    assert packed_calls < len(work)  # segments of one length share a call across sequences
    padded = len(lengths) * max(lengths)
    assert packed < 0.5 * padded * sum(work) / sum(lengths)  # far below padding to the longest


@pytest.mark.parametrize("force_math", [False, True])
def test_custom_op_opcheck(force_math):
    cu = cu_seqlens_from_lengths([5, 0, 19, 8])
    q, k, v = (torch.randn(32, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(varlen_fwd_op, (q, k, v, cu, None, [8, 16], [1, 2], True, 0.3, force_math, None))
    mask = _mask("left")[:, :16]
    qp, kp, vp = (torch.randn(5, 16, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(varlen_fwd_op, (qp, kp, vp, None, mask, [8], [2], False, 0.3, force_math, [3]))


def test_compiled_packed_op_no_recompile_per_length_mix():
    w, r = (8, 16), (1, 2)
    fn = torch.compile(lambda q, k, v, cu: longnet.dilated_attention(q, k, v, (8, 16), (1, 2), cu_seqlens=cu,
                                                                     is_causal=True),
                       fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    try:
        for i, lengths in enumerate(([5, 30, 12], [40, 1, 6, 0, 9], [3, 3], [70, 2, 2, 2, 2, 2, 9])):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            x = torch.randn(sum(lengths), 2, 8, requires_grad=True)
            cu = cu_seqlens_from_lengths(lengths)
            got = fn(x, x, x, cu)
            got.sum().backward()
            g_c, x.grad = x.grad, None
            want = longnet.dilated_attention(x, x, x, w, r, cu_seqlens=cu, is_causal=True)
            want.sum().backward()
            assert_close(got, want, torch.float32, "out")
            assert_close(g_c, x.grad, torch.float32, "grad")
        # The padded form reads its mask inside the op too: new masks, same graph.
        masked = torch.compile(lambda q, mask: longnet.dilated_attention(q, q, q, (8,), (2,), key_padding_mask=mask),
                               fullgraph=True, dynamic=True)
        torch.compiler.set_stance("default")
        for n in (12, 20):
            if n == 20:
                torch.compiler.set_stance("fail_on_recompile")
            x = torch.randn(3, n, 2, 8)
            mask = torch.arange(n)[None, :] >= torch.tensor([0, n - 5, n])[:, None]  # full, left-padded, empty
            assert_close(masked(x, mask), longnet.dilated_attention(x, x, x, (8,), (2,), key_padding_mask=mask),
                         torch.float32)
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input

def _bad(**kw):
    x = torch.randn(20, 2, 4)
    return lambda: longnet.dilated_attention(x, x, x, [4], [1], **kw)


@pytest.mark.parametrize("kw, error, match", [
    (dict(cu_seqlens=torch.tensor([1, 20], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 9, 3, 20], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 5, 19], dtype=torch.int32)), ValueError, "end at T = 20"),
    (dict(cu_seqlens=torch.tensor([0, 20])), TypeError, "dtype torch.int32"),
    (dict(cu_seqlens=torch.tensor([[0, 20]], dtype=torch.int32)), ValueError, "1-D"),
    (dict(cu_seqlens=torch.tensor([0, 20], dtype=torch.int32, device="meta")), ValueError, "device"),
    (dict(cu_seqlens=[0, 20]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(cu_seqlens=torch.tensor([0, 20], dtype=torch.int32), max_seqlen=-1), ValueError, "max_seqlen"),
    (dict(cu_seqlens=torch.tensor([0, 20], dtype=torch.int32), group=object()), ValueError, "sequence parallel"),
])
def test_bad_packed_input(kw, error, match):
    with pytest.raises(error, match=match):
        _bad(**kw)()


def test_bad_padded_input():
    x = torch.randn(2, 6, 2, 4)
    call = (lambda m, **kw: longnet.dilated_attention(x, x, x, [4], [1], key_padding_mask=m, **kw))
    with pytest.raises(TypeError, match="bool"):
        call(torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"shape \(B, N\) = \(2, 6\)"):
        call(torch.ones(2, 5, dtype=torch.bool))
    holes = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="row 1 has padding between real tokens"):
        call(holes)
    with pytest.raises(ValueError, match="only meaningful with cu_seqlens"):
        longnet.dilated_attention(x, x, x, [4], [1], max_seqlen=4)
    with pytest.raises(ValueError, match="not both"):
        longnet.dilated_attention(x[0], x[0], x[0], [4], [1], key_padding_mask=torch.ones(2, 6, dtype=torch.bool),
                                  cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"3 dimensions \(T, H, D\)"):
        longnet.dilated_attention(x, x, x, [4], [1], cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))


def test_cu_seqlens_from_lengths_checks():
    assert cu_seqlens_from_lengths(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]
    assert cu_seqlens_from_lengths([]).tolist() == [0]
    with pytest.raises(ValueError, match=r"lengths\[1\] must be a non-negative integer"):
        cu_seqlens_from_lengths([3, -1])


# --------------------------------------------------------------------------- triton (interpreter)

_TRITON_SCRIPT = r"""
import json, torch, longnet
from longnet.varlen import cu_seqlens_from_lengths
torch.set_num_threads(1)
lengths = [0, 9, 1, 21, 9]
cu = cu_seqlens_from_lengths(lengths)
g = torch.Generator().manual_seed(0)
q, k, v, do = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(4))
res = {}
for backend in ("triton", "reference"):
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = longnet.dilated_attention(*x, [8, 16], [1, 2], cu_seqlens=cu, is_causal=True, backend=backend)
    grads = torch.autograd.grad((out * do).sum(), x)
    res[backend] = [out] + list(grads)
print(json.dumps([float((a - b).abs().max()) for a, b in zip(res["triton"], res["reference"])]))
"""


def test_triton_varlen_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-4, errors


def test_bench_varlen_quick_writes_its_table(tmp_path):
    from longnet.bench import varlen as bench
    path = tmp_path / "varlen.csv"
    assert bench.main(["--quick", "--warmup", "0", "--heads", "2", "--head-dim", "8", "--csv", str(path)]) == 0
    lines = path.read_text().splitlines()
    assert lines[0].startswith("impl,") and [ln.split(",")[0] for ln in lines[1:]] == list(bench.IMPLS)
    lengths = bench.draw_lengths(16, 256, 16384, 0)
    assert len(lengths) == 16 and min(lengths) >= 256 and max(lengths) <= 16384
    assert lengths == bench.draw_lengths(16, 256, 16384, 0)  # seeded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_packed_bf16_equals_each_sequence_alone(backend):
    """On CUDA in bf16 (flash kernels; triton per distinct length) against the fp64 reference per sequence."""
    lengths = [0, 1, 700, 33, 2500, 64]
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(sum(lengths), 4, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    w, r = (256, 512, 1024), (1, 2, 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = longnet.dilated_attention(*leaves, w, r, cu_seqlens=cu, is_causal=True, backend=backend)
    grads = torch.autograd.grad((out.float() * do.float()).sum(), leaves)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == e:
            continue
        ref_leaves = [x[None, a:e].double().cpu().requires_grad_() for x in (q, k, v)]
        ref = longnet.dilated_attention(*ref_leaves, w, r, is_causal=True, backend="reference")
        ref_grads = torch.autograd.grad((ref * do[None, a:e].double().cpu()).sum(), ref_leaves)
        assert_close(out[a:e].cpu(), ref[0], torch.bfloat16)
        for x, y in zip(grads, ref_grads):
            assert_close(x[a:e].cpu(), y[0], torch.bfloat16, "grad")
