"""A built sliding-window model switches to dilated attention when asked (issue 24): the window
is fixed in the modules when the model is built, so the config alone cannot undo it. Also
output_attentions=True, which would otherwise return an empty tuple without a word."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import longnet.hf as lh  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, attn_implementation="sdpa")
W, R = [8, 16, 32], [1, 2, 4]


def _built(cls, config_cls, **kw):
    torch.manual_seed(0)
    return cls(config_cls(**TINY, **kw)).eval()


@pytest.mark.parametrize("family", ["qwen2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_a_sliding_window_model_switches_when_asked(family, tmp_path):
    if family == "qwen2":
        win = _built(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, max_window_layers=0, sliding_window=8)
        full = _built(Qwen2ForCausalLM, Qwen2Config)
        assert all(t == "sliding_attention" for t in win.config.layer_types)
    else:
        win = _built(MistralForCausalLM, MistralConfig, sliding_window=8)
        full = _built(MistralForCausalLM, MistralConfig, sliding_window=None)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (win(x).logits - full(x).logits).abs().max() > 1e-3  # the window matters at 40 tokens
    with pytest.raises(ValueError, match="pass replace_sliding_window=True to use_dilated_attention"):
        lh.use_dilated_attention(copy.deepcopy(win), W, R)
    switched = lh.use_dilated_attention(copy.deepcopy(win), W, R, replace_sliding_window=True)
    want = lh.use_dilated_attention(copy.deepcopy(full), W, R)
    with torch.no_grad():
        got = switched(x).logits
        torch.testing.assert_close(got, want(x).logits, atol=1e-6, rtol=1e-5)
        assert (got - full(x).logits).abs().max() > 1e-3  # dilated, not dense
        gen = switched.generate(x[:1, :20], max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, want.generate(x[:1, :20], max_new_tokens=5, do_sample=False))
    switched.save_pretrained(tmp_path / "m")
    loaded = type(win).from_pretrained(tmp_path / "m", attn_implementation="longnet").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, got, atol=1e-6, rtol=1e-5)


def test_output_attentions_is_refused_not_an_empty_tuple():
    model = _built(Qwen2ForCausalLM, Qwen2Config)
    lh.use_dilated_attention(model, W, R)
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="output_attentions=True: longnet attention never forms"):
        model(x, output_attentions=True)
    assert model(x).logits.shape == (1, 20, 256)
