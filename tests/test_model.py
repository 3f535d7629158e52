"""LongNetConfig, LongNetLM (causality, cached decoding, init, options) and LongNetTransformer."""

import math
import subprocess
import sys

import pytest
import torch

import longnet
from longnet.config import (LongNetConfig)
from longnet.model import LongNetLM, LongNetTransformer, magneto_gain


def micro(**kw):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(8, 16), dilation_rates=(1, 2))
    cfg.update(kw)
    return LongNetLM(**cfg)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("w,r", [((8, 16), (1, 2)), ((6, 10), (2, 3)), ((5,), (2,)), ((16, 12), (4, 6))])
def test_logits_shape_and_causality(w, r, seed):
    torch.manual_seed(seed)
    model = micro(segment_lengths=w, dilation_rates=r).eval()
    n, t = 37, 20
    x = torch.randint(0, 256, (2, n))
    logits = model(x)
    assert logits.shape == (2, n, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 256, (2, n - t - 1))
    logits2 = model(y)
    torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-6, rtol=0)
    # ...and the change is visible afterwards (the test can fail).
    assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_forward_rejects_bad_tokens():
    model = micro()
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_gradients_reach_every_parameter_and_training_reduces_loss():
    torch.manual_seed(0)
    model = micro(tie_embeddings=False)
    x = torch.randint(0, 256, (2, 24))
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = float(loss.detach())
    for _ in range(15):
        opt.zero_grad()
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 1.0


def test_activation_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    a = micro()
    b = micro(activation_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 20))
    la, lb = a.loss(x[:, :-1], x[:, 1:]), b.loss(x[:, :-1], x[:, 1:])
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_tied_and_untied_embeddings():
    tied, untied = micro(), micro(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_parameters() == tied.num_parameters() + 256 * 32
    for m in (tied, untied):
        assert m.num_parameters() == m.config.num_parameters()


def test_magneto_structure_and_init():
    model = micro(n_layers=6, d_model=64, d_ffn=256)
    gain = magneto_gain(6)
    assert gain == pytest.approx(math.sqrt(math.log(12)))
    blk = model.blocks[0]
    assert blk.attn.sub_ln is not None and blk.attn.causal and blk.attn.xpos is not None
    assert isinstance(blk.ffn.sub_ln, torch.nn.LayerNorm) and blk.ffn.sub_ln.normalized_shape == (256,)

    def xavier_std(w, g=1.0):
        return g * math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
    for lin, g in ((blk.attn.q_proj, 2 ** -0.5), (blk.attn.v_proj, 2 ** -0.5 * gain),
                   (blk.attn.out_proj, gain), (blk.ffn.fc1, gain), (blk.ffn.fc2, gain)):
        assert float(lin.weight.detach().std()) == pytest.approx(xavier_std(lin.weight, g), rel=0.1)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = micro(dropout=0.5)
    x = torch.randint(0, 256, (1, 16))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


# ----------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("w,r,prompt", [
    ((8, 16, 32), (1, 2, 4), 13),   # geometric, prompt not a multiple of any w
    ((6, 10), (2, 3), 7),           # r does not divide w, no r = 1 pattern: rows kept by no pattern
    ((5,), (2,), 1),                # one pattern, prompt of one token
    ((16, 12), (4, 6), 16),         # r = 6 > H = 4: offsets no head uses
])
def test_cached_decoding_equals_full_forward(w, r, prompt, seed):
    torch.manual_seed(seed)
    model = micro(segment_lengths=w, dilation_rates=r).eval()
    n = 45
    x = torch.randint(0, 256, (2, n))
    full = model(x)
    logits, cache = model.prefill(x[:, :prompt], capacity=n)
    torch.testing.assert_close(logits, full[:, :prompt], atol=1e-5, rtol=1e-5)
    for t in range(prompt, n):
        step = model.decode_step(x[:, t], cache)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5, msg=f"position {t}")
    assert cache.length == n


@pytest.mark.parametrize("kw", [dict(xpos=False), dict(qk_norm=True, bias=False), dict(activation="silu")])
def test_cached_decoding_options(kw, seed):
    torch.manual_seed(seed)
    model = micro(segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), **kw).eval()
    x = torch.randint(0, 256, (1, 30))
    full = model(x)
    _, cache = model.prefill(x[:, :5], capacity=30)
    for t in range(5, 30):
        torch.testing.assert_close(model.decode_step(x[:, t], cache), full[:, t], atol=1e-5, rtol=1e-5)


def test_generate_cache_matches_no_cache_and_checks_inputs():
    torch.manual_seed(0)
    model = micro(segment_lengths=(4, 8), dilation_rates=(1, 2))
    prompt = torch.randint(0, 256, (11,))
    threads = torch.get_num_threads()
    a = model.generate(prompt, 20, temperature=0)
    assert torch.get_num_threads() == threads
    b = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert a.shape == (31,) and torch.equal(a[:11], prompt)
    assert torch.equal(a, b)
    assert model.training  # restored
    g = torch.Generator().manual_seed(3)
    s1 = model.generate(prompt[None].repeat(2, 1), 10, top_k=5, generator=g)
    assert s1.shape == (2, 21)
    g = torch.Generator().manual_seed(3)
    s2 = model.generate(prompt[None].repeat(2, 1), 10, top_k=5, generator=g, use_cache=False)
    assert torch.equal(s1, s2)
    assert torch.equal(model.generate([1, 2, 3], 0), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.generate(torch.tensor([1, 300]), 2)
    _, cache = model.prefill(prompt[None], capacity=11)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(1,\)"):
        model.decode_step(torch.tensor([1, 2]), cache)
    with pytest.raises(ValueError, match="capacity"):
        model.prefill(prompt[None], capacity=0)


# ----------------------------------------------------------------------------- seed API


def test_longnet_transformer_seed_api(seed):
    torch.manual_seed(seed)
    model = longnet.LongNetTransformer(dim=64, depth=2, num_tokens=100, dim_head=16, heads=4,
                                       dilation_rate=2, segment_size=8)
    assert isinstance(model, LongNetLM)
    cfg = model.config
    assert (cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ffn) == (100, 2, 64, 4, 256)
    assert cfg.segment_lengths == (8,) and cfg.dilation_rates == (2,)
    x = torch.randint(0, 100, (2, 30))
    out = model(x)
    assert out.shape == (2, 30, 100)
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % 100
    torch.testing.assert_close(model(y)[:, :15], out[:, :15], atol=1e-6, rtol=0)
    multi = LongNetTransformer(64, 1, 50, dim_head=32, heads=2, dilation_rate=(1, 2), segment_size=16)
    assert multi.config.segment_lengths == (16, 16) and multi.config.dilation_rates == (1, 2)
    with pytest.raises(ValueError, match="heads \\* dim_head"):
        LongNetTransformer(dim=256, depth=2, num_tokens=256)
    with pytest.raises(ValueError, match="depth"):
        LongNetTransformer(dim=512, depth=0, num_tokens=256)
    assert longnet.LongNetConfig is LongNetConfig


def test_model_module_does_not_load_distributed():
    code = ("import sys, torch, longnet; from longnet.model import LongNetLM; "
            "m = LongNetLM(n_layers=1, d_model=16, n_heads=2, d_ffn=16, segment_lengths=(4,), dilation_rates=(1,)); "
            "m(torch.zeros(1, 5, dtype=torch.long)); m.generate([1, 2], 2); "
            "print([k for k in sys.modules if k.startswith('longnet.distributed')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    src = open(longnet.model.__file__).read()
    assert "import torch.distributed" not in src and "from torch.distributed" not in src
    assert "from torch import distributed" not in src
