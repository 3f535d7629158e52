"""longnet.compat.torchscale against the ORIGINAL torchscale code (fixtures), and its attention's gradient.

The fixtures (tests/fixtures/torchscale, made by make_fixtures.py from a
torchscale checkout) hold random weights, inputs and the original's
float64 outputs. Loading them checks the state-dict layout (strict: no
missing or unexpected keys); the outputs check the function.
"""

import json
import os

import numpy as np
import pytest
import torch

from longnet.compat import attention as ts_attn
from longnet.compat.torchscale import (DecoderConfig, EncoderConfig, LongNetConfig, LongNetDecoder, LongNetEncoder,
                                       make_longnet_from_name)
from tests.helpers import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torchscale")
# Whole models (several layers, LayerNorms) against float64 outputs stored as float32.
MODEL_TOL = {torch.float64: (1e-6, 1e-6), torch.float32: (2e-5, 2e-5)}


def load_fixture(name):
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    meta = json.loads(str(data["meta"]))
    groups = {"param": {}, "in": {}, "out": {}}
    for key in data.files:
        if key != "meta":
            head, rest = key.split("/", 1)
            groups[head][rest] = torch.from_numpy(data[key])
    return meta, groups["param"], groups["in"], groups["out"]


def _load(model, params, dtype):
    result = model.load_state_dict(params, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype).eval()


def _close(actual, expected, dtype):
    atol, rtol = MODEL_TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["encoder_awkward", "encoder_deepnorm"])
def test_encoder_matches_original(name, dtype):
    meta, params, inputs, outputs = load_fixture(name)
    model = _load(LongNetEncoder(EncoderConfig(**meta["config"])), params, dtype)
    for n in meta["lengths"]:
        x = inputs[f"x{n}"].to(dtype)
        states = f"n{n}/state0" in outputs
        with torch.no_grad():
            out = model(None, token_embeddings=x, return_all_hiddens=states)
        _close(out["encoder_out"], outputs[f"n{n}/encoder_out"], dtype)
        assert out["encoder_padding_mask"].shape == x.shape[:2] and not out["encoder_padding_mask"].any()
        if states:
            assert len(out["encoder_states"]) == meta["config"]["encoder_layers"] + 1
            for i, s in enumerate(out["encoder_states"]):
                _close(s, outputs[f"n{n}/state{i}"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_xpos_matches_original(dtype):
    meta, params, inputs, outputs = load_fixture("decoder_xpos")
    embed = torch.nn.Embedding(meta["vocab"], meta["config"]["decoder_embed_dim"])
    model = _load(LongNetDecoder(DecoderConfig(**meta["config"]), embed_tokens=embed), params, dtype)
    for n in meta["lengths"]:
        with torch.no_grad():
            logits, extra = model(inputs[f"tokens{n}"])
        _close(logits, outputs[f"n{n}/logits"], dtype)
        _close(extra["inner_states"][1], outputs[f"n{n}/inner1"], dtype)


def test_config_parsing_and_named_configs():
    a = EncoderConfig(segment_length="[1024, 5792]", dilated_ratio="[1, 2]", block_shift=True, made_up=3)
    b = EncoderConfig(segment_length=[1024, 5792], dilated_ratio=(1, 2))
    assert a.segment_length == b.segment_length == [1024, 5792] and a.dilated_ratio == [1, 2]
    assert a.block_shift is True and a.made_up == 3
    assert EncoderConfig(deepnorm=True).encoder_normalize_before is False
    with pytest.raises(ValueError, match="segment_length"):
        EncoderConfig(segment_length="[1024, 2048]", dilated_ratio="[1]")
    with pytest.raises(ValueError, match="segment_length"):
        EncoderConfig(segment_length="__import__('os')", dilated_ratio="[1]")
    cfg = LongNetConfig.LongNet_12_layers_768_dim
    assert (cfg["encoder_layers"], cfg["encoder_embed_dim"], cfg["encoder_attention_heads"]) == (12, 768, 16)
    model = make_longnet_from_name("LongNet_3_layers_384_dim", segment_length="[64, 128]", dilated_ratio="[1, 2]")
    assert len(model.layers) == 3 and model.args.segment_length == [64, 128]
    with pytest.raises(ValueError, match="config_name"):
        make_longnet_from_name("LongNet_nope")
    with pytest.raises(NotImplementedError, match="moe_freq"):
        LongNetEncoder(EncoderConfig(segment_length="[8]", dilated_ratio="[1]", moe_freq=2, moe_expert_count=2))


def _qkv(b, n, h, d, dtype=torch.float64, requires_grad=False):
    return [torch.randn(b, n, h, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,w,r,h", [(37, (16, 40), (1, 3), 4), (9, (16, 24, 7), (1, 2, 8), 3),
                                     (29, (5, 12), (2, 4), 6)])
def test_attention_kernel_equals_dense_reference(n, w, r, h, causal):
    """Forward and exact backward (through the mixture weights) of the kernel path vs the plain-PyTorch one."""
    q, k, v = _qkv(2, n, h, 8, requires_grad=True)
    grad = torch.randn(2, n, h, 8, dtype=torch.float64)
    results = []
    for attend in (ts_attn.kernel_attend, ts_attn.dense_attend):
        out = ts_attn.torchscale_dilated_attention(q, k, v, w, r, is_causal=causal, attend=attend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, e in zip(*results):
        assert_close(a, e, torch.float64, "grad")
        assert torch.isfinite(a).all()


def test_attention_gradient_is_exact_not_torchscale_no_grad():
    """The dense reference's gradient is the true one (finite differences), and it includes the mixture weights."""
    q, k, v = _qkv(1, 7, 2, 2, requires_grad=True)

    def f(q, k, v):
        return ts_attn.torchscale_dilated_attention(q, k, v, (3, 7), (1, 2), attend=ts_attn.kernel_attend)

    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-6)


def _brute(q, k, v, w, r, causal):
    """torchscale's rules as loops over (pattern, head, segment): zero rows pad each segment to a multiple
    of r, all padded segments are laid end to end, and the first n rows of that layout are the output."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for wi, ri in zip(w, r):
        sl, group = min(wi, n), -(-h // ri)
        m = -(-sl // ri)
        o = torch.zeros_like(q)
        lse = torch.full((b, n, h), ts_attn.UNCOVERED_LSE, dtype=q.dtype)
        for head in range(h):
            off = head // group
            if off >= ri:
                continue
            for seg in range(-(-n // sl)):
                inner = [off + t * ri for t in range(m)]
                src = [seg * sl + p if p < sl and seg * sl + p < n else None for p in inner]

                def rows(x):
                    return torch.stack([x[:, i, head] if i is not None else torch.zeros_like(x[:, 0, head])
                                        for i in src], 1)
                qq, kk, vv = rows(q), rows(k), rows(v)
                for t, p in enumerate(inner):
                    row = seg * m * ri + p
                    if row >= n:
                        continue
                    s = torch.einsum("bd,bjd->bj", qq[:, t], kk) * d ** -0.5
                    if causal:
                        s = s[:, :t + 1]
                    lse[:, row, head] = torch.logsumexp(s, -1)
                    o[:, row, head] = torch.einsum("bj,bjd->bd", torch.softmax(s, -1), vv[:, :s.shape[1]])
        outs.append(o)
        lses.append(lse.masked_fill(lse == 0, ts_attn.UNCOVERED_LSE))
    weights = torch.softmax(torch.stack(lses), 0)
    return sum(wt.unsqueeze(-1) * o for wt, o in zip(weights, outs))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_loop_oracle(causal):
    q, k, v = _qkv(1, 19, 5, 4)
    w, r = (6, 10, 64), (1, 3, 2)  # 10 % 3 != 0: segments land late; r = 3 leaves H = 5 uneven
    out = ts_attn.torchscale_dilated_attention(q, k, v, w, r, is_causal=causal)
    assert_close(out, _brute(q, k, v, w, r, causal), torch.float64)


def test_head_offsets_contiguous_groups():
    assert ts_attn.head_offsets(16, 4) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert ts_attn.head_offsets(4, 3) == [0, 0, 1, 1]  # offset 2 has no head
    assert ts_attn.head_offsets(3, 16) == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_low_precision_close_to_float64(dtype):
    q, k, v = _qkv(1, 50, 4, 16)
    w, r = (16, 32, 50), (1, 2, 4)
    ref = ts_attn.torchscale_dilated_attention(q, k, v, w, r)
    out = ts_attn.torchscale_dilated_attention(*(t.to(dtype) for t in (q, k, v)), w, r)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


def test_padding_mask_equals_each_sequence_alone():
    torch.manual_seed(0)
    cfg = EncoderConfig(encoder_layers=2, encoder_embed_dim=24, encoder_attention_heads=3, encoder_ffn_embed_dim=32,
                        segment_length="[8, 20]", dilated_ratio="[1, 4]", xpos_rel_pos=True)
    model = LongNetEncoder(cfg).double().eval()
    lengths, n = [30, 7, 0, 19], 30
    x = torch.randn(len(lengths), n, 24, dtype=torch.float64)
    mask = torch.ones(len(lengths), n, dtype=torch.bool)
    mask[0] = False
    mask[1, 5:12] = False          # a middle run
    mask[3, -19:] = False          # left padding
    with torch.no_grad():
        out = model(None, token_embeddings=x, encoder_padding_mask=mask)["encoder_out"]
        assert torch.isfinite(out).all()
        for i in range(len(lengths)):
            keep = ~mask[i]
            if keep.any():
                alone = model(None, token_embeddings=x[i:i + 1, keep])["encoder_out"]
                assert_close(out[i, keep], alone[0], torch.float64)


# The CUDA path on this CPU-only machine: fake CUDA tensors (tests/test_cuda_fake.py's harness).
from tests.test_cuda_fake import (EFFICIENT_FWD, FLASH_BWD, FLASH_FWD, NOT_ON_CUDA_HALF, AtenLog, Ctx,  # noqa: E402
                                  fake_cuda, gpu_arch)  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_on_cuda_uses_the_gpu_kernels(fake_cuda, dtype):
    q, k, v = [torch.randn(1, 37, 3, 16, dtype=dtype, device="cuda") for _ in range(3)]
    with torch.no_grad(), AtenLog() as log:
        out = ts_attn.torchscale_dilated_attention(q, k, v, (16, 40), (1, 2))
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == q.shape
    assert log.of(EFFICIENT_FWD if dtype == torch.float32 else FLASH_FWD)
    assert not (log.ops() & NOT_ON_CUDA_HALF), "math or CPU kernels ran on CUDA"


def test_attention_backward_on_cuda_uses_the_flash_backward(fake_cuda, monkeypatch):
    from longnet.backends import lse_grad
    monkeypatch.setattr(lse_grad, "_any_left", lambda rest: True)  # data-dependent: take the second pass too
    q, k, v = [torch.randn(2, 3, 20, 16, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    ctx = Ctx()
    out, lse = ts_attn._KernelAttention.forward(ctx, q, k, v, False, 0.25)
    ctx.saved_tensors = (q, k, v, out, lse)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    with AtenLog() as log:
        grads = ts_attn._KernelAttention.backward(ctx, dout, dlse)
    assert log.of(FLASH_BWD) and not (log.ops() & NOT_ON_CUDA_HALF)
    assert [g.shape for g in grads[:3]] == [q.shape] * 3 and all(g.dtype == torch.bfloat16 for g in grads[:3])


def test_fractional_or_small_segment_lengths_and_rates_are_refused():
    q = torch.randn(1, 8, 2, 4)
    for w, r, name in (([4.5], [1], "segment_lengths"), ([4], [2.0], "dilation_rates"), ([0], [1], "segment_lengths"),
                       ([4], [True], "dilation_rates")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            ts_attn.torchscale_dilated_attention(q, q, q, w, r)
    # numpy integers, as a parsed config may hold, are integers
    out = ts_attn.torchscale_dilated_attention(q, q, q, [np.int64(4)], [np.int64(2)])
    assert torch.equal(out, ts_attn.torchscale_dilated_attention(q, q, q, [4], [2]))
