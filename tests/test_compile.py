"""torch.compile: the op's custom ops (opcheck) and a compiled LongNetLM against eager.

The torch and math backends run as ``torch.ops.longnet.dilated_attention_fwd``
/ ``_bwd`` (see longnet/backends/custom_ops.py), so a compiled model holds one
opaque op per layer instead of the Python loops over units.
"""

import pytest
import torch
import torch.nn.functional as F

import longnet
from longnet.config import LongNetConfig
from longnet.model import LongNetLM
from tests.helpers import assert_close

FWD = torch.ops.longnet.dilated_attention_fwd.default
BWD = torch.ops.longnet.dilated_attention_bwd.default

# (B, N, H, D, segment_lengths, dilation_rates, segment_phases, layout): awkward on purpose, small for speed.
OP_CASES = [
    pytest.param(2, 24, 3, 8, [8, 16], [1, 2], None, "contiguous", id="aligned"),
    pytest.param(1, 13, 2, 4, [5, 32], [1, 3], None, "contiguous", id="N%w!=0,w>N,r-not-dividing"),
    pytest.param(2, 20, 4, 6, [8, 12], [2, 3], [3, 0], "transposed", id="no-r=1,phase,(B,H,N,D)-strides"),
]


def _qkv(b, n, h, d, dtype, layout):
    """Leaf q, k, v (B, N, H, D); "transposed": views of (B, H, N, D) tensors."""
    if layout == "transposed":
        return [torch.randn(b, h, n, d, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3)]
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=True) for _ in range(3)]


# Each case once causal and once not, in fp32 and fp64 alternately: every combination appears, and opcheck
# (which compiles each op several ways) stays fast.
_FLAGS = [((False, torch.float32, "full-fp32"), (True, torch.float64, "causal-fp64")),
          ((True, torch.float32, "causal-fp32"), (False, torch.float64, "full-fp64"))]
OP_RUNS = [pytest.param(*case.values, causal, dtype, id=f"{case.id}-{name}")
           for i, case in enumerate(OP_CASES) for causal, dtype, name in _FLAGS[i % 2]]


@pytest.mark.parametrize("b, n, h, d, w, r, phases, layout, causal, dtype", OP_RUNS)
def test_opcheck_forward_and_backward(b, n, h, d, w, r, phases, layout, causal, dtype):
    """Schema, fake (shapes, dtypes, strides against the real op), autograd registration and
    AOTAutograd (static and dynamic shapes, gradients through out and lse) of both ops."""
    q, k, v = _qkv(b, n, h, d, dtype, layout)
    args = (w, r, causal, d ** -0.5, False, phases)
    torch.library.opcheck(FWD, (q, k, v, *args))
    out, lse = FWD(q, k, v, *args)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    detached = [x.detach() for x in (q, k, v, out, lse)]
    torch.library.opcheck(BWD, (do, dl, *detached, *args))
    torch.library.opcheck(BWD, (None, dl, *detached, *args))  # a gradient that only reached lse
    torch.library.opcheck(BWD, (do, None, *detached, *args))


def test_public_op_runs_the_custom_op():
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    for backend in ("torch", "math"):
        out = longnet.dilated_attention(q, q, q, 8, 1, backend=backend)
        assert "longnet_dilated_attention_fwd" in type(out.grad_fn).__name__


def _graph_recorder(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compiled_op_is_one_opaque_node_per_call():
    """Dynamo's graph holds the custom op itself: none of the per-unit kernels or merges."""
    graphs = []
    fn = torch.compile(lambda q, k, v: longnet.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True),
                       backend=_graph_recorder(graphs), fullgraph=True)
    q, k, v = _qkv(2, 32, 4, 8, torch.float32, "contiguous")
    assert_close(fn(q, k, v), longnet.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True), torch.float32)
    targets = [str(nd.target) for g in graphs for nd in g.graph.nodes if nd.op == "call_function"]
    assert targets.count("longnet.dilated_attention_fwd") == 1, targets
    assert not any("flash_attention" in t or "logaddexp" in t for t in targets), targets


def _tiny_lm() -> LongNetLM:
    torch.manual_seed(0)
    cfg = LongNetConfig(n_layers=2, d_model=64, n_heads=4, d_ffn=128, segment_lengths=(16, 32, 64),
                        dilation_rates=(1, 2, 4), xpos=True)
    return LongNetLM(cfg)


def _step(fn, model, tokens):
    """(logits, parameter grads) of a next-token loss."""
    model.zero_grad(set_to_none=True)
    logits = fn(tokens)
    F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_lm_fullgraph_dynamic_matches_eager():
    """fullgraph=True raises on any graph break; after the first length, a recompile raises too.

    Three lengths, none a multiple of the largest segment, all through one dynamic-shape graph.
    """
    model = _tiny_lm()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    try:
        for i, n in enumerate((48, 80, 131)):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            tokens = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n))
            c_logits, c_grads = _step(compiled, model, tokens)
            e_logits, e_grads = _step(model, model, tokens)
            assert_close(c_logits, e_logits, torch.float32, "out", msg=f"logits at N={n}")
            for (name, _), gc, ge in zip(model.named_parameters(), c_grads, e_grads):
                assert_close(gc, ge, torch.float32, "grad", msg=f"grad of {name} at N={n}")
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


def test_compile_with_sequence_parallel_is_refused_with_its_reason():
    # Collectives inside the sequence-parallel autograd.Function cannot be captured; data
    # parallelism alone compiles (same losses as eager, measured under torchrun).
    from longnet.config import LongNetConfig, TrainConfig
    from longnet.commands.train import _check_mesh
    from longnet.training.setup import TrainData, TrainSetup
    mcfg = LongNetConfig(n_layers=1, d_model=32, n_heads=2, d_ffn=64, segment_lengths=(16, 32),
                         dilation_rates=(1, 2))
    tcfg = TrainConfig(seq_len=64, batch_size=2)

    def setup(compile_model):
        return TrainSetup(mcfg, tcfg, "builtin", TrainData("corpus", None, ""), "out", torch.device("cpu"),
                          compile_model=compile_model)
    with pytest.raises(ValueError, match="--compile cannot be combined with --sequence-parallel"):
        _check_mesh(setup(True), (2, 1, 2))
    _check_mesh(setup(True), (1, 2, 2))
    _check_mesh(setup(False), (2, 1, 2))
