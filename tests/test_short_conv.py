"""The short convolution of keys and values (``short_conv``), an opt-in variant for recall.

It sits in the module, before the op, so the op and its backends are untouched; these tests
check the convolution itself, that packed and padded rows stay inside their own sequence, that
every backend agrees on a model with it, and the paths it refuses.
"""

import pytest
import torch
import torch.nn.functional as F

from longnet import MultiheadDilatedAttention
from longnet.config import LongNetConfig
from longnet.model import LongNetLM
from longnet.modules import causal_short_conv
from longnet.varlen import cu_seqlens_from_lengths


def _cfg(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(8, 16), dilation_rates=(1, 2),
                short_conv=4)
    return LongNetConfig(**{**base, **kw})


def _randomise_conv(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiheadDilatedAttention) and m.kv_conv is not None:
                m.kv_conv.copy_(torch.randn(m.kv_conv.shape, generator=g))


@pytest.mark.parametrize("width,n", [(2, 7), (4, 13), (5, 3)])
def test_causal_short_conv_equals_a_padded_depthwise_conv1d(width, n):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, n, 6, generator=g), torch.randn(width, 6, generator=g)
    # conv1d correlates: out[t] = sum_j weight[j] x[t - (W - 1) + j], so lag l is weight[W - 1 - l].
    want = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), w.flip(0).t()[:, None, :], groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_short_conv(x, w), want)


def test_identity_at_initialisation_so_the_model_starts_as_without_it():
    torch.manual_seed(0)
    plain = LongNetLM(_cfg(short_conv=0))
    conv = LongNetLM(_cfg())
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("kv_conv") for k in missing)
    tokens = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(conv(tokens), plain(tokens), rtol=0, atol=0)


def test_causal_and_every_lag_gets_a_gradient():
    torch.manual_seed(0)
    model = LongNetLM(_cfg())
    _randomise_conv(model)
    tokens = torch.randint(0, 256, (1, 24))
    later = tokens.clone()
    later[0, 11:] = (later[0, 11:] + 7) % 256
    torch.testing.assert_close(model(tokens)[0, :11], model(later)[0, :11])
    model(tokens).square().mean().backward()
    grad = model.blocks[0].attn.kv_conv.grad
    assert grad.shape == (2, 4, 32) and (grad.abs().sum(-1) > 0).all()


def test_packed_and_padded_rows_see_only_their_own_sequence():
    torch.manual_seed(0)
    model = LongNetLM(_cfg())
    _randomise_conv(model)
    lengths = [5, 11, 3]
    seqs = [torch.randint(0, 256, (n,)) for n in lengths]
    alone = [model(s[None])[0] for s in seqs]
    packed = model(torch.cat(seqs)[None], cu_seqlens=cu_seqlens_from_lengths(lengths))[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)

    attn = model.blocks[0].attn
    x = torch.randn(3, 11, 32)
    mask = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    out = attn(x, key_padding_mask=mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], attn(x[b:b + 1, :n])[0], rtol=1e-5, atol=1e-5)
        assert (out[b, n:] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "math"])
def test_every_backend_computes_the_same_model(backend):
    torch.manual_seed(0)
    model = LongNetLM(_cfg(local_window=4))
    _randomise_conv(model)
    other = LongNetLM(_cfg(local_window=4, attention_backend=backend))
    other.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 37))
    a, b = model(tokens), other(tokens)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_recomputes_and_the_cache_is_refused():
    torch.manual_seed(0)
    model = LongNetLM(_cfg()).eval()
    _randomise_conv(model)
    prompt = torch.randint(0, 256, (2, 6))
    out = model.generate(prompt, 5, temperature=0)
    assert torch.equal(out, model.generate(prompt, 5, temperature=0, use_cache=False))
    # Greedy tokens are the argmax of a full forward over what came before.
    assert torch.equal(out[:, 6], model(prompt)[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="short_conv has no KV cache"):
        model.prefill(prompt)


def test_sequence_parallel_hooks_are_refused():
    attn = MultiheadDilatedAttention(32, 4, [8], [1], short_conv=3)
    attn.attention_fn = lambda *a, **k: None  # what sequence parallelism installs
    with pytest.raises(ValueError, match="short_conv is not supported with sequence parallelism"):
        attn(torch.randn(1, 8, 32))


@pytest.mark.parametrize("bad", [1, -2, True, 2.5])
def test_bad_widths_are_named(bad):
    with pytest.raises(ValueError, match="short_conv"):
        _cfg(short_conv=bad)
    with pytest.raises(ValueError, match="short_conv"):
        MultiheadDilatedAttention(32, 4, [8], [1], short_conv=bad)


def test_parameter_count_and_config_round_trip():
    cfg = _cfg(short_conv=3)
    assert LongNetLM(cfg).num_parameters() == cfg.num_parameters()
    assert LongNetConfig.from_dict(cfg.to_dict()) == cfg
    assert LongNetConfig.from_dict(_cfg(short_conv=0).to_dict()).short_conv == 0


def test_training_command_refuses_sequence_parallel_before_any_process_group():
    import dataclasses
    from longnet.commands.train import _check_mesh
    from longnet.config import TrainConfig
    from longnet.training.setup import TrainData, TrainSetup
    mcfg = _cfg(n_layers=1)
    tcfg = TrainConfig(seq_len=64, batch_size=2)

    def setup(cfg):
        return TrainSetup(cfg, tcfg, "builtin", TrainData("corpus", None, ""), "out", torch.device("cpu"))
    with pytest.raises(ValueError, match="model.short_conv = 4 cannot run with --sequence-parallel 2"):
        _check_mesh(setup(mcfg), (2, 1, 2))
    _check_mesh(setup(mcfg), (1, 2, 2))  # data parallelism is fine
    _check_mesh(setup(dataclasses.replace(mcfg, short_conv=0)), (2, 1, 2))
