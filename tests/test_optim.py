"""The one weight-decay rule (longnet.training.optim.decay_groups) on every model longnet trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longnet.config import LongNetConfig
from longnet.model import LongNetLM
from longnet.training.optim import decay_groups


def _names(model: nn.Module, groups) -> tuple:
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    kept = {by_id[id(p)] for p in groups[1]["params"]}
    return decayed, kept


def _lm(**kw) -> LongNetLM:
    cfg = LongNetConfig(n_layers=2, d_model=32, n_heads=4, d_ffn=64, segment_lengths=(64,), dilation_rates=(1,), **kw)
    return LongNetLM(cfg)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"short_conv": 4},
                                {"block": "gpt", "tie_embeddings": False, "xpos": False, "max_positions": 64}],
                         ids=["tied", "untied", "short_conv", "gpt"])
def test_linear_weights_decay_and_nothing_else(kw):
    model = _lm(**kw)
    groups = decay_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, kept = _names(model, groups)
    assert not decayed & kept
    assert decayed | kept == {n for n, _ in model.named_parameters()}  # every parameter once (tied: once)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embedding = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert decayed == {n for n in linear if n in dict(model.named_parameters())} - embedding
    assert "embed.weight" in kept  # tied or not, the embedding is never decayed
    assert all(not n.endswith("bias") for n in decayed)
    if kw.get("tie_embeddings") is False:
        assert "lm_head.weight" in decayed
    if "max_positions" in kw:
        assert "pos_embed.weight" in kept
    if "short_conv" in kw:
        assert any("kv_conv" in n for n in kept)


def test_tied_head_is_one_parameter_in_no_decay():
    model = _lm()
    assert model.lm_head.weight is model.embed.weight
    groups = decay_groups(model, 0.1)
    assert sum(p is model.embed.weight for g in groups for p in g["params"]) == 1
    assert not any(p is model.embed.weight for p in groups[0]["params"])


def test_frozen_parameters_are_left_out():
    model = _lm()
    model.embed.weight.requires_grad_(False)
    groups = decay_groups(model, 0.1)
    assert not any(p is model.embed.weight for g in groups for p in g["params"])
    torch.optim.AdamW(groups)  # AdamW accepts the groups as they are
