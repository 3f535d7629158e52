"""The CUDA path, checked on a CPU-only machine.

No GPU is available, so the CUDA branch runs under ``FakeTensorMode`` with
fake CUDA tensors: PyTorch's meta kernels give every aten op its output
shapes, dtypes and strides, and a ``TorchDispatchMode`` records which aten
ops run with which arguments. The autograd engine needs a real GPU for CUDA
tensors, so backward functions are called directly. Triton kernels are not
launched: the launches are intercepted and their host-side arguments checked.
"""


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import longnet
from longnet.backends import collectives, custom_ops, kernels, lse_grad, registry
from longnet.backends import sequence_parallel as sp
from longnet.backends.reference import dilated_attention_reference
from tests.helpers import assert_close

aten = torch.ops.aten
FLASH_FWD = aten._scaled_dot_product_flash_attention.default
FLASH_BWD = aten._scaled_dot_product_flash_attention_backward.default
# What the math path (kernels.math_fwd/math_bwd) or the CPU kernels would show up as.
NOT_ON_CUDA_HALF = {aten.mm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
                    aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
HALF = [torch.bfloat16, torch.float16]


def _named(op, args, kwargs):
    """{argument name: value} of one call of ``op`` (the dispatcher drops arguments left at their default)."""
    named = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            named[a.name] = args[i]
        else:
            named[a.name] = kwargs.get(a.name, a.default_value if a.has_default_value() else None)
    return named


class AtenLog(TorchDispatchMode):
    """Records (op, args, kwargs, result) of every aten call below it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, result))
        return result

    def of(self, op):
        """Calls of ``op`` as (args by schema name, defaults filled in; result)."""
        return [(_named(c[0], c[1], c[2]), c[3]) for c in self.calls if c[0] is op]

    def ops(self):
        return {c[0] for c in self.calls}


class Ctx:
    """Stands in for an autograd ctx, so forward/backward of an autograd.Function run without the engine."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        self.materialize_grads = value


def _index(x, idx):
    """x[idx] for ints, slices, None, Ellipsis and index tensors, spelled with aten view/index ops."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        pos = idx.index(Ellipsis)
        real = sum(i is not None and i is not Ellipsis for i in idx)
        idx = idx[:pos] + (slice(None),) * (x.dim() - real) + idx[pos + 1:]
    dim, advanced = 0, []
    for i in idx:
        if i is None:
            x = x.unsqueeze(dim)
        elif isinstance(i, slice):
            x = aten.slice.Tensor(x, dim, i.start, i.stop, i.step or 1)
        elif isinstance(i, torch.Tensor):
            advanced.append((dim, i))
        else:
            x = x.select(dim, i)
            continue
        dim += 1
    return x, advanced


def _getitem(x, idx):
    x, advanced = _index(x, idx)
    if not advanced:
        return x
    return aten.index.Tensor(x, [dict(advanced).get(d) for d in range(x.dim())])


def _setitem(x, idx, value):
    view, advanced = _index(x, idx)
    if advanced:
        aten.index_put_.default(view, [dict(advanced).get(d) for d in range(view.dim())], value)
    elif isinstance(value, torch.Tensor):
        aten.copy_.default(view, value)
    else:
        aten.fill_.Scalar(view, value)


class NoGuardIndexing(TorchFunctionMode):
    """Python bindings that need a CUDA device guard, for fake CUDA tensors on a CPU-only build.

    A few hand-written bindings (``Tensor.__getitem__``, ``__setitem__``,
    ``copy_``, ``contiguous``, ...) open a CUDA device guard in C++ before
    any op runs, which a build without CUDA cannot create. This mode spells
    indexing with the aten ops it runs (slice, select, unsqueeze, index,
    index_put_) and calls the others as the aten op of the same name, so
    views and strides are PyTorch's own.
    """

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        try:
            return func(*args, **(kwargs or {}))
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e) or not hasattr(aten, func.__name__):
                raise
        return getattr(aten, func.__name__)(*args, **(kwargs or {}))


@pytest.fixture
def gpu_arch(monkeypatch):
    """The compute capability the fake CUDA device reports (an H100's, sm90); set ``.value`` to change it."""
    class Arch:
        value = (9, 0)
    monkeypatch.setattr(kernels, "cuda_capability", lambda device: Arch.value)
    return Arch


@pytest.fixture
def fake_cuda(gpu_arch):
    with FakeTensorMode() as mode, NoGuardIndexing():
        yield mode


def _cuda(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device="cuda")


def _meta(t):
    return (tuple(t.shape), t.dtype, t.device.type, tuple(t.stride()))


def _check_flash_forward(log, dtype, causal, scale):
    """Every forward call is the dense CUDA flash kernel at a head dim that is a multiple of 8.

    ``causal`` None: any (sequence parallelism mixes causal and full partials)."""
    calls = log.of(FLASH_FWD)
    assert calls, "the CUDA flash kernel never ran"
    assert not (log.ops() & NOT_ON_CUDA_HALF), f"math or CPU kernels ran on CUDA {dtype}"
    for a, res in calls:
        q, k, v = a["query"], a["key"], a["value"]
        assert q.device.type == "cuda" and q.dtype == dtype and q.shape[-1] % 8 == 0
        assert all(x.stride(-1) == 1 for x in (q, k, v))
        assert a["dropout_p"] == 0.0 and a["scale"] == scale and causal in (None, a["is_causal"])
        assert res[2] is None and res[3] is None, "a dense call must not return cum_seq tensors"
    return calls


def _check_flash_backward(log, forward_calls, dtype, causal, scale):
    """Every backward call gets exactly what a forward call on the same rows returned.

    (Sequence parallelism carries an lse gradient in 8 extra head-dim columns, hence rows, not D.)"""
    calls = log.of(FLASH_BWD)
    assert calls, "the CUDA flash backward never ran"
    assert not (log.ops() & NOT_ON_CUDA_HALF), f"math or CPU kernels ran on CUDA {dtype}"
    by_shape = {(tuple(a["query"].shape[:-1]), tuple(a["key"].shape[:-1])): res for a, res in forward_calls}
    for a, _ in calls:
        q, k, do, out, lse = a["query"], a["key"], a["grad_out"], a["out"], a["logsumexp"]
        assert q.shape[-1] % 8 == 0 and do.shape == q.shape == out.shape
        assert do.dtype == out.dtype == q.dtype == dtype and lse.dtype == torch.float32 and lse.is_contiguous()
        res = by_shape[(tuple(q.shape[:-1]), tuple(k.shape[:-1]))]
        assert a["cum_seq_q"] is res[2] and a["cum_seq_k"] is res[3]  # None: the dense kernel, not varlen
        assert (a["max_q"], a["max_k"]) == (res[4], res[5]) == (q.shape[-2], k.shape[-2])
        assert a["dropout_p"] == 0.0 and a["scale"] == scale and causal in (None, a["is_causal"])
        for got, want in zip((a["philox_seed"], a["philox_offset"]), res[6:8]):
            assert (got.dtype, got.shape) == (want.dtype, want.shape)


# (B, N, H, D, segment_lengths, dilation_rates, layout)
CUDA_CASES = [
    pytest.param(2, 96, 4, 64, [32, 64, 128], [1, 2, 4], "contiguous", id="paper-like"),
    pytest.param(1, 100, 6, 32, [24, 40], [2, 3], "transposed", id="no-r=1,N%w!=0,(B,H,N,D)"),
    pytest.param(1, 128, 4, 64, [16, 32, 64], [1, 2, 4], "contiguous", id="two-periods"),
]


def _inputs(b, n, h, d, dtype, layout):
    if layout == "transposed":
        return [_cuda(b, h, n, d, dtype=dtype).transpose(1, 2) for _ in range(3)]
    return [_cuda(b, n, h, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("small_budgets", [False, True], ids=["one-call", "row-blocks+split-calls"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b, n, h, d, w, r, layout", CUDA_CASES)
def test_torch_backend_on_cuda(fake_cuda, b, n, h, d, w, r, layout, causal, dtype, small_budgets, monkeypatch):
    """Forward and backward (with an lse gradient, both of its passes) run the flash kernels at D.

    ``small_budgets``: the long-N paths at test size, row blocks of whole pattern periods
    (custom_ops._row_blocks) and groups split over several kernel calls (torch_backend._calls)."""
    if small_budgets:
        from longnet.backends import torch_backend
        monkeypatch.setattr(custom_ops, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(torch_backend, "_CALL_BYTES", 1)
    q, k, v = _inputs(b, n, h, d, dtype, layout)
    if small_budgets and n == 128:
        assert len(custom_ops._row_blocks(q, w, None)) == 2
    scale = d ** -0.5
    args = (w, r, causal, scale, False, None)
    with AtenLog() as log:
        out, lse = custom_ops.mixture_forward(q, k, v, *args)
    fwd_calls = _check_flash_forward(log, dtype, causal, scale)
    # The real body returns what the op's fake (used by torch.compile) says it returns.
    f_out, f_lse = torch.ops.longnet.dilated_attention_fwd(q, k, v, *args)
    assert (_meta(out), _meta(lse)) == (_meta(f_out), _meta(f_lse))
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous()

    dout, dlse = _cuda(b, n, h, d, dtype=dtype), _cuda(b, n, h, dtype=torch.float32)
    monkeypatch.setattr(lse_grad, "_any_left", lambda rest: True)  # data-dependent: take the second pass too
    for grads_in in ((dout, None), (None, dlse), (dout, dlse)):
        with AtenLog() as log:
            grads = custom_ops.mixture_backward(*grads_in, q, k, v, out, lse, *args)
        _check_flash_backward(log, fwd_calls, dtype, causal, scale)
        assert {a["query"].shape[-1] for a, _ in log.of(FLASH_BWD)} == {d}, "the lse gradient changed the head dim"
        fake = torch.ops.longnet.dilated_attention_bwd(*grads_in, q, k, v, out, lse, *args)
        assert [_meta(g) for g in grads] == [_meta(g) for g in fake]
        assert [g.shape for g in grads] == [q.shape] * 3 and all(g.dtype == dtype for g in grads)


def test_custom_op_autograd_formula_on_cuda(fake_cuda):
    """setup_context saves (q, k, v, out, lse); the backward calls the backward op with both gradients."""
    q, k, v = _inputs(1, 64, 2, 64, torch.bfloat16, "contiguous")
    inputs = (q, k, v, [16, 32], [1, 2], True, 0.125, False, None)
    output = torch.ops.longnet.dilated_attention_fwd(*inputs)
    ctx = Ctx()
    custom_ops._setup_context(ctx, inputs, output)
    assert ctx.materialize_grads is False and len(ctx.saved_tensors) == 5
    dout, dlse = torch.randn_like(output[0]), torch.randn_like(output[1])
    with AtenLog() as log:
        grads = custom_ops._backward(ctx, dout, dlse)
    (a, _), = log.of(torch.ops.longnet.dilated_attention_bwd.default)
    assert a["dout"] is dout and a["dlse"] is dlse and a["q"] is q and a["out"] is output[0]
    assert [g.shape for g in grads[:3]] == [q.shape] * 3 and grads[3:] == (None,) * 6


def _plan(L, P, rank, w, r, phases):
    local, spans, halos = sp.check_sequence_parallel(L, P, w, r, rank, segment_phases=phases)
    return sp.SequenceParallelPlan(group=None, block_length=L, segment_lengths=tuple(w), dilation_rates=tuple(r),
                                   local=local, spans=spans, groups=tuple((None, list(range(s.count))) for s in spans),
                                   halos=halos, segment_phases=phases, rank=rank)


def _no_transport(monkeypatch):
    """Collectives keep their shapes, copies and byte counts; only the transport is skipped."""
    monkeypatch.setattr(collectives, "_all_gather", lambda out, inp, group, async_op: None)
    monkeypatch.setattr(collectives, "_reduce_scatter", lambda out, inp, group, async_op: None)
    monkeypatch.setattr(collectives.dist, "P2POp", lambda op, tensor, group, tag, group_peer: (op, tensor))
    monkeypatch.setattr(collectives.dist, "batch_isend_irecv", lambda ops: [])


def _capture_apply(monkeypatch, fn_cls):
    ctxs = []

    def apply(*args):
        ctxs.append(Ctx())
        return fn_cls.forward(ctxs[-1], *args)
    monkeypatch.setattr(fn_cls, "apply", apply)
    return ctxs


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sequence_parallel_on_cuda(fake_cuda, monkeypatch, causal, rank):
    """The op's local computation on rank 0 or 1 of 2: local, cross-rank and halo patterns."""
    L, P, b, h, d, dtype = 64, 2, 2, 4, 64, torch.bfloat16
    w, r, phases = (32, 128, 32), (1, 2, 2), (0, 0, 16)
    plan = _plan(L, P, rank, w, r, phases)
    assert plan.spans and plan.halos and plan.local
    _no_transport(monkeypatch)
    ctxs = _capture_apply(monkeypatch, sp._SequenceParallelFn)
    q, k, v = _inputs(b, L, h, d, dtype, "contiguous")
    with AtenLog() as log:
        out, lse = sp.sequence_parallel_dilated_attention(q, k, v, w, r, group=plan, is_causal=causal, scale=0.125,
                                                          segment_phases=phases)
    fwd_calls = _check_flash_forward(log, dtype, None, 0.125)
    assert (_meta(out)[:3], _meta(lse)[:3]) == (((b, L, h, d), dtype, "cuda"), ((b, L, h), torch.float32, "cuda"))
    for dlse in (None, torch.randn_like(lse)):
        with AtenLog() as log:
            grads = sp._SequenceParallelFn.backward(ctxs[-1], torch.randn_like(out), dlse)
        _check_flash_backward(log, fwd_calls, dtype, None, 0.125)
        assert [g.shape for g in grads[:3]] == [q.shape] * 3 and all(g.dtype == dtype for g in grads[:3])


# ---------------------------------------------------------------- Triton dispatch

class CurrentDevice:
    """Stands in for ``torch.cuda.device``: a context manager that sets ``CurrentDevice.now``."""

    now = "cuda:0"

    def __init__(self, device):
        self.device = str(device)

    def __enter__(self):
        self.prev, CurrentDevice.now = CurrentDevice.now, self.device

    def __exit__(self, *exc):
        CurrentDevice.now = self.prev


@pytest.fixture
def triton_as_on_gpu(monkeypatch):
    """The Triton backend registered as on a GPU machine (not the interpreter), restored afterwards."""
    tb = pytest.importorskip("longnet.backends.triton_backend")
    monkeypatch.setattr(tb, "INTERPRET", False)
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    monkeypatch.setattr(registry, "_optional_loaded", False)
    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    monkeypatch.setattr(CurrentDevice, "now", "cuda:0")
    return tb


class Launches:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not run
    (with the current device, which Triton launches on)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), args, dict(kwargs, current_device=CurrentDevice.now)))
        return launch


def test_registry_picks_triton_for_cuda_half(fake_cuda, triton_as_on_gpu):
    assert registry.pick_backend(_cuda(1, 8, 2, 64, dtype=torch.bfloat16)).name == "triton"
    assert registry.pick_backend(_cuda(1, 8, 2, 64, dtype=torch.float16)).name == "triton"
    # Outside what the kernels take, the torch backend (flash or math) runs instead.
    assert registry.pick_backend(_cuda(1, 8, 2, 8, dtype=torch.bfloat16)).name == "torch"
    assert registry.pick_backend(_cuda(1, 8, 2, 64, dtype=torch.float32)).name == "torch"
    assert registry.pick_backend(torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)).name == "torch"


def test_triton_launches_on_cuda(fake_cuda, triton_as_on_gpu, monkeypatch):
    """Grids, strides and flags of every launch, forward and backward, through the public op."""
    tb = triton_as_on_gpu
    launches = []
    for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(tb, name, Launches(name, launches))
    ctxs = _capture_apply(monkeypatch, tb._TritonDilatedAttentionFn)
    b, n, h, d = 2, 256, 4, 64
    q, k, v = _inputs(b, n, h, d, torch.bfloat16, "contiguous")
    out, lse = longnet.dilated_attention(q, k, v, (64, 128, 256), (1, 2, 4), is_causal=True, return_lse=True)
    assert _meta(out)[:3] == ((b, n, h, d), torch.bfloat16, "cuda") and lse.dtype == torch.float32
    # Every pattern keeps 64 rows per segment and head: one 64-row block; 4, 2, 1 segments.
    fwd = [x for x in launches if x[0] == "_fwd_kernel"]
    assert [g for _, g, _, _ in fwd] == [(4, b * h), (2, b * h), (1, b * h)]
    for i, (_, _, args, kw) in enumerate(fwd):
        assert _meta(args[0]) == _meta(q) and args[5:8] == q.stride()[:3]  # q itself (one batch chunk)
        assert (kw["HEAD_DIM"], kw["BLOCK_M"], kw["CAUSAL"], kw["MERGE"]) == (d, 64, True, i > 0)
    launches.clear()
    grads = tb._TritonDilatedAttentionFn.backward(ctxs[-1], torch.randn_like(out), torch.randn_like(lse))
    names = [x[0] for x in launches]
    assert names == ["_bwd_preprocess"] + ["_bwd_dkdv_kernel", "_bwd_dq_kernel"] * 3
    assert launches[0][1] == (-(-b * n * h // 64),) and launches[0][3]["HAS_DLSE"] is True
    assert [g.shape for g in grads[:3]] == [q.shape] * 3 and all(g.dtype == torch.bfloat16 for g in grads[:3])


def _triton_round_trip(tb, monkeypatch, device, d, pattern=((64, 128, 256), (1, 2, 4))):
    launches = []
    for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(tb, name, Launches(name, launches))
    ctxs = _capture_apply(monkeypatch, tb._TritonDilatedAttentionFn)
    q, k, v = (torch.randn(1, 256, 2, d, dtype=torch.bfloat16, device=device) for _ in range(3))
    out, lse = longnet.dilated_attention(q, k, v, *pattern, is_causal=True, return_lse=True)
    tb._TritonDilatedAttentionFn.backward(ctxs[-1], torch.randn_like(out), torch.randn_like(lse))
    return launches


def test_triton_launches_on_the_tensors_gpu(fake_cuda, triton_as_on_gpu, monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: every launch runs with cuda:1 current (Triton
    launches on the current device), and the current device is restored afterwards."""
    launches = _triton_round_trip(triton_as_on_gpu, monkeypatch, "cuda:1", 64)
    assert len(launches) == 3 + 1 + 6
    assert {kw["current_device"] for _, _, _, kw in launches} == {"cuda:1"}
    assert CurrentDevice.now == "cuda:0"


def test_triton_tiles_follow_the_architecture(fake_cuda, gpu_arch, triton_as_on_gpu, monkeypatch):
    """D = 128: the launch tiles are default_config's for the GPU's compute capability."""
    tb = triton_as_on_gpu
    for cap in ((9, 0), (8, 0)):
        gpu_arch.value = cap
        launches = _triton_round_trip(tb, monkeypatch, "cuda", 128, pattern=((256,), (1,)))
        cfg = tb.default_config(128, cap)
        by_name = {name: kw for name, _, _, kw in launches}
        assert (by_name["_fwd_kernel"]["BLOCK_M"], by_name["_fwd_kernel"]["BLOCK_N"]) == cfg.fwd[:2]
        assert (by_name["_bwd_dq_kernel"]["BLOCK_M"], by_name["_bwd_dq_kernel"]["num_stages"]) == \
            (cfg.dq[0], cfg.dq[3])
    assert tb.default_config(128, (8, 0)) != tb.default_config(128, (9, 0))


@pytest.mark.parametrize("cap", [(7, 0), (7, 5)], ids=["V100", "T4"])
def test_gpus_older_than_sm80_fall_back(fake_cuda, gpu_arch, triton_as_on_gpu, cap):
    """Triton refuses them with the reason, backend=None takes the torch backend, and the torch
    backend's flash kernel is not called: fp16 runs efficient attention, bf16 the math path."""
    gpu_arch.value = cap
    tb = triton_as_on_gpu
    q = _cuda(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "compute capability >= 8.0" in tb.why_not(q) and f"{cap[0]}.{cap[1]}" in tb.why_not(q)
    assert registry.pick_backend(q).name == "torch"
    with pytest.raises(ValueError, match="compute capability"):
        longnet.dilated_attention(q, q, q, (8,), (1,), backend="triton")
    for dtype, want in ((torch.float16, "efficient"), (torch.bfloat16, "math")):
        z = _cuda(1, 2, 40, 64, dtype=dtype)
        assert kernels.cuda_kernel(z) == want
        with AtenLog() as log:
            kernels.attn_fwd(z, z, z, True, 0.125)
        assert FLASH_FWD not in log.ops()
        assert (EFFICIENT_FWD in log.ops()) == (want == "efficient")


EFFICIENT_FWD = aten._scaled_dot_product_efficient_attention.default
EFFICIENT_BWD = aten._scaled_dot_product_efficient_attention_backward.default


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_on_cuda_runs_efficient_attention(fake_cuda, causal):
    """fp32 (any GPU): efficient attention, its lse (padded to 64 rows for L = 40) sliced to L and
    padded again for the backward; no chunked math (matmuls) anywhere, through the whole op."""
    z = [_cuda(2, 3, 40, 32, dtype=torch.float32) for _ in range(3)]
    with AtenLog() as log:
        out, lse = kernels.attn_fwd(*z, causal, 0.125)
    (a, res), = log.of(EFFICIENT_FWD)
    assert a["compute_log_sumexp"] is True and a["is_causal"] == causal and a["scale"] == 0.125
    assert res[1].shape == (2, 3, 64) and lse.shape == (2, 3, 40) and out.shape == (2, 3, 40, 32)
    with AtenLog() as log:
        grads = kernels.attn_bwd(torch.randn_like(out), *z, out, lse, causal, 0.125)
    (a, _), = log.of(EFFICIENT_BWD)
    assert a["logsumexp"].shape == (2, 3, 64) and a["logsumexp"].is_contiguous()
    assert a["logsumexp"].dtype == torch.float32 and a["dropout_p"] == 0.0 and a["is_causal"] == causal
    assert list(a["grad_input_mask"]) == [True, True, True, False] and a["attn_bias"] is None
    assert [g.shape for g in grads] == [z[0].shape] * 3 and all(g.dtype == torch.float32 for g in grads)
    q, k, v = _inputs(1, 96, 4, 32, torch.float32, "contiguous")
    with AtenLog() as log:
        out, lse = custom_ops.mixture_forward(q, k, v, (32, 64), (1, 2), causal, 0.125, False, None)
        custom_ops.mixture_backward(torch.randn_like(out), None, q, k, v, out, lse, (32, 64), (1, 2), causal,
                                    0.125, False, None)
    assert EFFICIENT_FWD in log.ops() and EFFICIENT_BWD in log.ops()
    assert not (log.ops() & NOT_ON_CUDA_HALF), "math or CPU kernels ran on CUDA float32"


def test_cuda_kernel_choice_can_be_moved_to_efficient_or_math(fake_cuda, monkeypatch):
    """LONGNET_CUDA_KERNEL (used by ``longnet selftest --gpu`` to validate efficient attention on half
    inputs) skips the kernels before it; a bad value is an error naming the variable."""
    z = _cuda(1, 2, 40, 64, dtype=torch.bfloat16)
    assert kernels.cuda_kernel(z) == "flash"
    for value in ("efficient", "math"):
        monkeypatch.setenv("LONGNET_CUDA_KERNEL", value)
        assert kernels.cuda_kernel(z) == value
        with AtenLog() as log:
            kernels.attn_fwd(z, z, z, True, 0.125)
        assert FLASH_FWD not in log.ops() and (EFFICIENT_FWD in log.ops()) == (value == "efficient")
    monkeypatch.setenv("LONGNET_CUDA_KERNEL", "fast")
    with pytest.raises(ValueError, match="LONGNET_CUDA_KERNEL"):
        kernels.cuda_kernel(z)


def test_misaligned_views_are_copied_for_the_cuda_kernels(fake_cuda):
    """A view starting 1 element into its rows (2 bytes: not 16-byte aligned) reaches FlashAttention-2
    as an aligned copy; an aligned view goes as it is."""
    base = _cuda(1, 2, 64, 72, dtype=torch.bfloat16)
    for view, copied in ((base[..., 1:65], True), (base[..., 8:72], False)):
        assert view.stride(-1) == 1
        with AtenLog() as log:
            out, lse = kernels.attn_fwd(view, view, view, True, 0.125)
            kernels.attn_bwd(view, view, view, view, out, lse, True, 0.125)
        for op in (FLASH_FWD, FLASH_BWD):
            (a, _), = log.of(op)
            q = a["query"]
            assert (q.storage_offset() * 2) % 16 == 0 and all((st * 2) % 16 == 0 for st in q.stride()[:-1])
            assert (q is not view) == copied
    assert kernels.aligned16(base) is base


def test_causal_calls_must_be_square():
    """FlashAttention-2 aligns a non-square causal mask bottom-right, the other kernels top-left, so
    the kernels refuse non-square causal calls; non-square full attention is fine."""
    q = torch.randn(1, 2, 8, 16)
    kv = torch.randn(1, 2, 12, 16)
    for call in (lambda: kernels.attn_fwd(q, kv, kv, True, 0.25),
                 lambda: kernels.attn_bwd(q, q, kv, kv, q, q[..., 0], True, 0.25)):
        with pytest.raises(ValueError, match="as many keys as queries"):
            call()
    out, lse = kernels.attn_fwd(q, kv, kv, False, 0.25)
    ref_out, ref_lse = kernels.math_fwd(q, kv, kv, False, 0.25)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


# ---------------------------------------------------------------- sequence parallelism over NCCL (plan)

class FakeGroup:
    def __init__(self, ranks):
        self.ranks = list(ranks)


class FakeDist:
    """What plan_sequence_parallel asks torch.distributed, for one rank of a world of ``world`` ranks,
    with group creation and barriers recorded instead of run."""

    def __init__(self, rank, world, split):
        self.rank, self.world, self.split = rank, world, split
        self.created, self.barriers = [], []

    def install(self, monkeypatch):
        d = collectives.dist
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "get_rank", lambda group=None: self.rank)
        monkeypatch.setattr(d, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(d, "get_process_group_ranks", lambda g: g.ranks)
        monkeypatch.setattr(d, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(d, "new_group", self.new_group)
        monkeypatch.setattr(d, "barrier", lambda group=None, device_ids=None: self.barriers.append(group))
        monkeypatch.setattr(collectives, "_split_mode", lambda: self.split)
        monkeypatch.setattr(collectives, "_SUBGROUPS", {})  # each rank is its own process
        monkeypatch.setattr(collectives.torch.cuda, "is_available", lambda: False)

    def new_group(self, ranks, use_local_synchronization=False):
        self.created.append((tuple(ranks), use_local_synchronization))
        if use_local_synchronization and self.rank not in ranks:
            return None
        return FakeGroup(ranks)


def test_halo_plans_initialise_the_group_on_every_rank(monkeypatch):
    """w = 8, phase 4, L = 12, P = 4: only the boundary at 24 is straddled, so ranks 0 and 3 send
    nothing, yet every rank joins the one barrier that creates the group's communicator."""
    world = FakeGroup(range(4))
    halos = []
    for rank in range(4):
        fake = FakeDist(rank, 4, split=False)
        fake.install(monkeypatch)
        plan = sp.plan_sequence_parallel(world, 12, (8,), (1,), (4,))
        halos.append(bool(plan.halos))
        assert fake.barriers == [world] and fake.created == []
    assert halos == [False, True, True, False]
    fake = FakeDist(0, 4, split=False)
    fake.install(monkeypatch)
    sp.plan_sequence_parallel(world, 16, (8,), (1,), (0,))  # no halo pattern: nothing to initialise
    assert fake.barriers == []


@pytest.mark.parametrize("split", [True, False], ids=["nccl-split", "local-sync"])
def test_sub_groups_are_created_alike_on_every_rank(monkeypatch, split):
    """Patterns (2L, phase L) and (3L, phase 0) on P = 4 give segments {0}, {1, 2}, {3} and {0, 1, 2},
    {3}. Every rank makes the same new_group calls in the same order; under NCCL splits (a bound
    device id) non-members take part too (no use_local_synchronization), and each rank gets its own
    segment's group with the positions of its members."""
    world, L = FakeGroup(range(4)), 16
    calls = []
    for rank in range(4):
        fake = FakeDist(rank, 4, split)
        fake.install(monkeypatch)
        plan = sp.plan_sequence_parallel(world, L, (2 * L, 3 * L), (1, 1), (L, 0))
        calls.append(fake.created)
        for span, (pg, order) in zip(plan.spans, plan.groups):
            members = list(range(span.first, span.first + span.count))
            if span.count == 1:
                assert pg is None and order == [0]
            else:
                assert pg.ranks == members and order == list(range(span.count))
        again = sp.plan_sequence_parallel(world, L, (2 * L, 3 * L), (1, 1), (L, 0))
        assert again.groups == plan.groups and fake.created == calls[-1]  # cached alike on every rank
    assert all(c == calls[0] for c in calls)
    assert calls[0] == [((1, 2), not split), ((0, 1, 2), not split)]
