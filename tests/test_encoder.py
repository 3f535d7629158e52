"""LongNetEncoder and the modules' variable-length forms: batching changes nothing.

Every sequence of a padded or packed batch is encoded as if alone (against the same module run
on that sequence by itself, and the attention op against the dense reference per sequence).
"""

from __future__ import annotations

import pytest
import torch

from longnet.encoder import ENCODER_PRESETS, LongNetEncoder, LongNetEncoderConfig, encoder_preset
from longnet.modules import MultiheadDilatedAttention
from longnet.varlen import cu_seqlens_from_lengths
from tests.helpers import assert_close


def _slides(lengths, d_in, layout, seed=0):
    """x (B, N, d_in) and a mask with each slide's tokens placed per ``layout``."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, d_in, generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        start = {"right": 0, "left": n - length, "both": (n - length) // 2}[layout]
        mask[b, start:start + length] = True
    return x, mask


@pytest.mark.parametrize("positions, pooling, layout, lengths", [
    ("sincos", "cls", "left", [300, 5000, 1234, 4097]),  # 4 slides of 300 to 5,000 tiles
    ("learned", "mean", "both", [300, 1500, 64, 900]),
    ("none", "cls", "right", [700, 300, 1100, 5])])
def test_batch_of_slides_equals_each_slide_alone(positions, pooling, layout, lengths):
    cfg = encoder_preset("tiny", positions=positions, max_positions=5001, pooling=pooling)
    enc = LongNetEncoder(cfg).eval()
    x, mask = _slides(lengths, cfg.d_in, layout)
    n = max(lengths)
    with torch.no_grad():
        out = enc(x, mask)
        assert out.hidden_states.shape == (4, n + 1, cfg.d_model) and out.pooled.shape == (4, cfg.d_model)
        for b in range(4):
            idx = mask[b].nonzero().squeeze(1)
            alone = enc(x[b:b + 1, idx])
            assert_close(out.pooled[b], alone.pooled[0], torch.float32, msg=f"slide {b} pooled")
            assert_close(out.hidden_states[b, 1 + idx], alone.hidden_states[0, 1:], torch.float32,
                         msg=f"slide {b} hidden")
            assert_close(out.hidden_states[b, 0], alone.hidden_states[0, 0], torch.float32, msg=f"slide {b} CLS")
            pad_rows = 1 + (~mask[b]).nonzero().squeeze(1)
            assert (out.hidden_states[b, pad_rows] == 0).all()


def test_packed_form_and_gradients_equal_alone():
    cfg = encoder_preset("tiny", positions="sincos", cls_token=False, pooling="mean",
                         activation_checkpointing=True)
    enc = LongNetEncoder(cfg).double().train()
    lengths = [0, 37, 1, 90]
    cu = cu_seqlens_from_lengths(lengths)
    x = torch.randn(sum(lengths), cfg.d_in, dtype=torch.float64)
    out = enc.forward_packed(x, cu)
    assert out.hidden_states.shape == (sum(lengths), cfg.d_model) and torch.equal(out.cu_seqlens, cu)
    assert (out.pooled[0] == 0).all()  # an empty sequence pools to 0, not NaN
    weights = torch.randn(len(lengths), cfg.d_model, dtype=torch.float64)
    grads = torch.autograd.grad((out.pooled * weights).sum(), list(enc.parameters()))
    alone_grads = [torch.zeros_like(g) for g in grads]
    for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == e:
            continue
        alone = enc(x[None, a:e])
        assert_close(out.pooled[b], alone.pooled[0], torch.float64)
        for acc, g in zip(alone_grads, torch.autograd.grad((alone.pooled[0] * weights[b]).sum(),
                                                           list(enc.parameters()))):
            acc += g
    for g, ga in zip(grads, alone_grads):
        assert_close(g, ga, torch.float64, "grad")


def test_bf16_encoder_runs_close_to_fp32():
    cfg = encoder_preset("tiny", positions="sincos")
    enc = LongNetEncoder(cfg).eval()
    x, mask = _slides([200, 700], cfg.d_in, "left")
    with torch.no_grad():
        ref = enc(x, mask).pooled
        low = enc.to(torch.bfloat16)(x.bfloat16(), mask).pooled
    assert low.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(low.float(), ref, dim=-1)
    assert (cos > 0.98).all(), cos


def test_config_validation_and_presets():
    g = LongNetEncoderConfig()
    assert (g.n_layers, g.d_model, g.n_heads, g.d_in) == (12, 768, 16, 1536)
    assert g.segment_lengths == (1024, 5792, 32768, 185363, 1048576) and g.dilation_rates == (1, 2, 4, 8, 16)
    assert encoder_preset("gigapath") == g and set(ENCODER_PRESETS) >= {"gigapath", "tiny"}
    assert LongNetEncoderConfig.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="pooling='cls' needs cls_token=True"):
        LongNetEncoderConfig(cls_token=False)
    with pytest.raises(ValueError, match="max_positions"):
        LongNetEncoderConfig(positions="learned")
    with pytest.raises(ValueError, match="positions must be one of"):
        LongNetEncoderConfig(positions="rope")
    with pytest.raises(ValueError, match="divisible"):
        LongNetEncoderConfig(d_model=100, n_heads=16)
    with pytest.raises(ValueError, match="dilation_rates"):
        LongNetEncoderConfig(dilation_rates=(1, 2))
    with pytest.raises(ValueError, match="unknown LongNetEncoderConfig fields"):
        LongNetEncoderConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="encoder preset must be one of"):
        encoder_preset("huge")
    enc = LongNetEncoder(encoder_preset("tiny", positions="learned", max_positions=10))
    with pytest.raises(ValueError, match="longer than max_positions"):
        enc(torch.randn(1, 10, 32))  # 10 tokens + [CLS]
    with pytest.raises(ValueError, match=r"shape \(B, N, 32\)"):
        enc(torch.randn(1, 10, 31))


@pytest.mark.parametrize("xpos, causal", [(False, False), (True, True)])
def test_attention_module_padded_and_packed_forms(xpos, causal):
    m = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], causal=causal, xpos=xpos, qk_norm=True).double()
    x, mask = _slides([30, 11, 27, 1], 32, "both")
    x = x.double()
    y = m(x, key_padding_mask=mask)
    assert (y[~mask] == 0).all()
    for b in range(4):
        idx = mask[b].nonzero().squeeze(1)
        assert_close(y[b, idx], m(x[b:b + 1, idx])[0], torch.float64)
    packed = x[mask]
    cu = cu_seqlens_from_lengths(mask.sum(1))
    assert_close(m.forward_packed(packed, cu), y[mask], torch.float64)
    with pytest.raises(ValueError, match=r"shape \(T, 32\)"):
        m.forward_packed(x, cu)
