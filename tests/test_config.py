"""LongNetConfig and TrainConfig: presets, validation, overrides, JSON, the lr schedule."""


import pytest

from longnet.config import (PRESETS, LongNetConfig, TrainConfig, apply_overrides, check_compatible, lr_factor,
                            preset, xpos_max_length)
from longnet.model import LongNetLM


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "paper-base"}
    m, t = preset("paper-base")
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ffn) == (12, 768, 12, 3072)
    assert m.segment_lengths == (2048, 4096, 8192, 16384, 32768) and m.dilation_rates == (1, 2, 4, 6, 12)
    assert (t.beta1, t.beta2, t.lr, t.warmup_steps, t.grad_clip, t.weight_decay) == (0.9, 0.98, 6e-4, 750, 2.0, 0.01)
    assert m.dropout == 0.0
    for name in PRESETS:
        m, t = preset(name)
        check_compatible(m, t)
    m, t = preset("tiny")
    m.n_layers = 99  # presets hand out copies
    assert PRESETS["tiny"][0].n_layers == 4
    assert LongNetLM(preset("tiny")[0]).num_parameters() == preset("tiny")[0].num_parameters()
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("huge")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(d_model=30, n_heads=4), ValueError, "divisible by n_heads"),
    (dict(segment_lengths=(8, 16), dilation_rates=(1,)), ValueError, "same length"),
    (dict(segment_lengths=(4,), dilation_rates=(8,)), ValueError, "must be <="),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(d_model=12, n_heads=4), ValueError, "even head dim"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(vocab_size=1), ValueError, "vocab_size"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings"),
])
def test_bad_model_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        LongNetConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=0.0), "lr"), (dict(beta2=1.0), "beta2"), (dict(batch_size=0), "batch_size"),
    (dict(precision="fp8"), "precision"), (dict(grad_clip=-1.0), "grad_clip"), (dict(seq_len=2.5), "seq_len"),
])
def test_bad_train_config(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**kw)


def test_overrides():
    m, t = preset("tiny")
    m2, t2 = apply_overrides(m, t, ["model.n_layers=2", "d_model=64", "n_heads=2", "train.lr=1e-3",
                                    "segment_lengths=32,64", "dilation_rates=1,2", "tie_embeddings=false",
                                    "attention_backend=none", "max-steps=7"])
    assert (m2.n_layers, m2.d_model, m2.n_heads, m2.segment_lengths, m2.dilation_rates) == (2, 64, 2, (32, 64), (1, 2))
    assert m2.tie_embeddings is False and m2.attention_backend is None
    assert (t2.lr, t2.max_steps) == (1e-3, 7)
    assert (m.n_layers, t.lr) == (4, 3e-3)  # inputs untouched
    with pytest.raises(ValueError, match="unknown config field 'n_layer'.*model.n_layers"):
        apply_overrides(m, t, ["n_layer=2"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(m, t, ["n_layers"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(m, t, ["n_layers=two"])
    with pytest.raises(ValueError, match="true/false"):
        apply_overrides(m, t, ["xpos=maybe"])
    with pytest.raises(ValueError, match="section must be"):
        apply_overrides(m, t, ["optim.lr=1"])
    with pytest.raises(ValueError, match="divisible"):
        apply_overrides(m, t, ["n_heads=3"])
    with pytest.raises(ValueError, match="XPOS"):
        check_compatible(*apply_overrides(m, t, [f"seq_len={xpos_max_length(512.0) + 2}"]))


def test_config_json_round_trip():
    m, t = preset("small")
    assert LongNetConfig.from_dict(m.to_dict()) == m
    assert TrainConfig.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown model config field"):
        LongNetConfig.from_dict({**m.to_dict(), "colour": 1})


def test_lr_schedule():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, lr_power=1.0)
    assert t.lr_at(0) == pytest.approx(0.1) and t.lr_at(9) == pytest.approx(1.0)
    assert t.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert t.lr_at(110) == pytest.approx(0.1) and t.lr_at(500) == pytest.approx(0.1)
    assert lr_factor(5, 0, 10, 2.0, 0.0) == pytest.approx(0.25)


