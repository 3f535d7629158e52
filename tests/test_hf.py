"""longnet.hf: dilated attention as a drop-in for Hugging Face transformers models."""

import copy

import pytest
import torch
import transformers
import torch.nn.functional as F
from transformers import (AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import longnet
import longnet.hf as lh
from longnet.backends.reference import count_matrix
from longnet.hf.attention import DilatedMask, _dense_with_dropout, dilated_attention_forward

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**{**TINY, **kw})),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**{**TINY, **kw})),
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**{**TINY, "sliding_window": None, **kw})),
}
W, R = [8, 16, 32], [1, 2, 4]  # a pattern that differs from dense attention at N > 8


def tiny(family="llama", **kw):
    torch.manual_seed(0)
    return FAMILIES[family](attn_implementation="sdpa", **kw).eval()


def dilated(model, w=W, r=R, **kw):
    return lh.use_dilated_attention(copy.deepcopy(model), w, r, **kw)


def tokens(b, n, seed=1):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


class _Module:
    """The attributes of an attention layer that the attention function reads."""

    def __init__(self, w, r, backend=None):
        self.config = type("Cfg", (), dict(longnet_segment_lengths=w, longnet_dilation_rates=r,
                                           longnet_backend=backend))()
        self.is_causal = True


def _expand(x, rep):
    """(B, Hkv, S, D) -> contiguous (B, S, Hkv * rep, D): query head h reads key/value head h // rep."""
    return x.repeat_interleave(rep, dim=1).transpose(1, 2).contiguous()


def _cached_tensors(cache):
    """Every layer's cached keys and values (B, Hkv, S, D), in transformers 5 and 4.x layouts."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [*cache.key_cache, *cache.value_cache]


def _bnhd(q):
    return q.transpose(1, 2).contiguous()


def _greedy_by_full_forwards(model, prompt, steps):
    """Greedy decoding by a full forward over the whole sequence at every step: no cache."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_full_segment_equals_sdpa(family):
    model = tiny(family)
    x = tokens(2, 40)
    ref = model(x).logits
    out = dilated(model, [64], [1])(x).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_layer_computes_dilated_attention(family, monkeypatch):
    model = dilated(tiny(family))
    calls = []

    def spy(module, query, key, value, attention_mask, **kw):
        out, weights = dilated_attention_forward(module, query, key, value, attention_mask, **kw)
        calls.append((module, query, key, value, out, kw["scaling"]))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "longnet", spy)
    x = tokens(2, 45)
    logits = model(x).logits
    assert len(calls) == model.config.num_hidden_layers
    for module, q, k, v, out, scaling in calls:
        assert scaling == module.scaling
        rep = q.shape[1] // k.shape[1]
        assert rep == 2  # grouped-query attention is exercised
        args = (_bnhd(q), _expand(k, rep), _expand(v, rep), W, R)
        expect = longnet.dilated_attention(*args, is_causal=True, scale=scaling)
        torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)
        oracle = longnet.dilated_attention(*args, is_causal=True, scale=scaling, backend="reference")
        torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    # ...and it is not dense attention in disguise.
    assert (logits - tiny(family)(x).logits).abs().max() > 1e-3


def test_backend_is_stored_and_used():
    model = tiny()
    x = tokens(1, 30)
    ref = dilated(model, backend="reference")
    assert ref.config.longnet_backend == "reference"
    torch.testing.assert_close(ref(x).logits, dilated(model)(x).logits, atol=1e-5, rtol=1e-5)


def test_scaling_is_honoured():
    model = tiny()
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.37
    x = tokens(2, 30)
    torch.testing.assert_close(dilated(model, [32], [1])(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_matches_repeated_full_forwards(family):
    # Prompt of 20 > w = 8, 16; 20 new tokens cross the boundaries at 24 and 32.
    model = dilated(tiny(family))
    prompt = tokens(2, 20)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, _greedy_by_full_forwards(model, prompt, 20))


def test_generate_with_static_cache():
    model = dilated(tiny())
    prompt = tokens(1, 13)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0)
    dyn = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, dyn)


@pytest.mark.parametrize("rates", [[1, 2, 4], [8, 8, 8]])
def test_decode_step_is_the_ops_row(rates):
    """Every position p, one query at a time against the cache, equals row p of the full op.

    With r = 8 > 4 heads, most positions are kept by no head: their output is 0."""
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 40, 16
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    module = _Module(W, rates)
    full = longnet.dilated_attention(_bnhd(q), _expand(k, 2), _expand(v, 2), W, rates, is_causal=True,
                                     scale=0.3)
    with torch.no_grad():
        for p in range(n):
            out, _ = dilated_attention_forward(module, q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1],
                                               DilatedMask(p), scaling=0.3)
            torch.testing.assert_close(out[:, 0], full[:, p], atol=1e-6, rtol=1e-6)
    if rates == [8, 8, 8]:
        assert (full == 0).all(-1).any()


def test_decode_reads_only_the_kept_keys():
    """Keys and values no head keeps for the next position are set to NaN in the cache: the step is unchanged."""
    model = dilated(tiny())
    x = tokens(1, 30)
    p = 29
    with torch.no_grad():
        cache = DynamicCache()
        model(x[:, :p], past_key_values=cache, use_cache=True)
        clean = model(x[:, p:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
        kept = count_matrix(p + 1, 4, W, R, is_causal=True)[:, p] > 0  # (Hq, N): query head h keeps key j
        kept_kv = kept.view(2, 2, p + 1).any(1)  # kv head g serves query heads 2g, 2g + 1
        assert not kept_kv.all()
        for t in _cached_tensors(cache):
            t[0].masked_fill_(~kept_kv[:, :p, None], float("nan"))
        poisoned = model(x[:, p:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)


def test_chunked_prefill_with_cache_is_exact():
    model = dilated(tiny())
    x = tokens(2, 45)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache()
        parts = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 13), (13, 22), (22, 23), (23, 45))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- phases and the local window

LW = 6  # adds (6, 1, phase 0) and (6, 1, phase 3) to W, R
LW_PATTERN = longnet.DilatedPattern(W, R).with_local_window(LW)


def test_local_window_is_stored_and_each_layer_computes_the_phased_op(monkeypatch):
    model = dilated(tiny(), local_window=LW)
    cfg = model.config
    assert (cfg.longnet_segment_lengths, cfg.longnet_dilation_rates, cfg.longnet_segment_phases) == (
        [8, 16, 32, 6, 6], [1, 2, 4, 1, 1], [0, 0, 0, 0, 3])
    calls = []

    def spy(module, query, key, value, attention_mask, **kw):
        out, weights = dilated_attention_forward(module, query, key, value, attention_mask, **kw)
        calls.append((query, key, value, out, kw["scaling"]))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "longnet", spy)
    x = tokens(2, 37)
    logits = model(x).logits
    assert len(calls) == cfg.num_hidden_layers
    w, r, phases = LW_PATTERN.segment_lengths, LW_PATTERN.dilation_rates, LW_PATTERN.segment_phases
    for q, k, v, out, scaling in calls:
        oracle = longnet.dilated_attention(_bnhd(q), _expand(k, 2), _expand(v, 2), w, r, is_causal=True,
                                           scale=scaling, segment_phases=phases, backend="reference")
        torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert (logits - dilated(tiny())(x).logits).abs().max() > 1e-3  # the window changes the model


def test_phased_decode_step_is_the_ops_row():
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 40, 16
    w, r, phases = [8, 16, 6, 6], [1, 2, 1, 1], [3, 5, 0, 3]
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    module = _Module(w, r)
    module.config.longnet_segment_phases = phases
    full = longnet.dilated_attention(_bnhd(q), _expand(k, 2), _expand(v, 2), w, r, is_causal=True, scale=0.3,
                                     segment_phases=phases)
    with torch.no_grad():
        for p in range(n):
            out, _ = dilated_attention_forward(module, q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1],
                                               DilatedMask(p), scaling=0.3)
            torch.testing.assert_close(out[:, 0], full[:, p], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("phases", [None, [3, 5, 30]])
def test_phased_chunked_prefill_and_generation_are_exact(phases):
    """Chunks that start inside segments of some patterns and not others; 97 is just past
    lcm(w) = 96, where the phased segments [93, 99) and (phase 30) [94, 126) straddle 96."""
    model = dilated(tiny(), segment_phases=phases, local_window=LW)
    x = tokens(2, 110)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache()
        parts = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 13), (13, 22), (22, 23), (23, 97), (97, 98), (98, 110))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    prompt = x[:, :20]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, _greedy_by_full_forwards(model, prompt, 12))


def test_phased_dropout_path_and_save_round_trip(tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 30, 4, 8) for _ in range(3))
    w, r, phases = [8, 16, 6, 6], [1, 2, 1, 1], [3, 5, 0, 3]
    exact = longnet.dilated_attention(q, k, v, w, r, is_causal=True, scale=0.4, segment_phases=phases)
    torch.testing.assert_close(_dense_with_dropout(q, k, v, w, r, True, 0.4, 0.0, phases), exact,
                               atol=1e-6, rtol=1e-6)
    model = dilated(tiny("qwen2"), local_window=LW)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longnet").eval()
    assert loaded.config.longnet_segment_phases == [0, 0, 0, 0, 3]
    x = tokens(1, 30)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_bad_phases_and_windows_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="local_window must be 0 .* got 5"):
        lh.use_dilated_attention(copy.deepcopy(model), W, R, local_window=5)
    with pytest.raises(ValueError, match="segment_phases must have one phase per segment length"):
        lh.use_dilated_attention(copy.deepcopy(model), W, R, segment_phases=[1, 2])
    with pytest.raises(ValueError, match=r"segment_phases\[1\]"):
        lh.use_dilated_attention(copy.deepcopy(model), W, R, segment_phases=[0, 16, 0])


# ----------------------------------------------------------------------------- masks


def test_right_padding_keeps_valid_positions_exact():
    model = dilated(tiny())
    x = tokens(2, 40)
    mask = torch.ones_like(x)
    mask[1, 25:] = 0
    padded = model(x, attention_mask=mask).logits
    alone = model(x[1:, :25]).logits
    torch.testing.assert_close(padded[1, :25], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], model(x[:1]).logits[0], atol=1e-5, rtol=1e-5)


def test_prepared_masks_are_refused():
    # Padding anywhere and packed sequences work (tests/test_hf_batching.py); prepared masks do not.
    model = dilated(tiny())
    x = tokens(2, 20)
    with pytest.raises(ValueError, match="prepared 4-D attention mask"):
        model(x, attention_mask=torch.ones(2, 1, 20, 20, dtype=torch.bool))


# ----------------------------------------------------------------------------- dropout


def test_dropout_path_is_the_mixture_with_dropout_on_its_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 30, 4, 8) for _ in range(3))
    exact = longnet.dilated_attention(q, k, v, W, [1, 2, 8], is_causal=True, scale=0.4)
    torch.testing.assert_close(_dense_with_dropout(q, k, v, W, [1, 2, 8], True, 0.4, 0.0), exact,
                               atol=1e-6, rtol=1e-6)
    torch.manual_seed(5)
    out = _dense_with_dropout(q, k, v, W, [1, 2, 8], True, 0.4, 0.3)
    # By hand: softmax(q k^T scale + log C), dropout (same RNG stream), times v; empty rows 0.
    c = count_matrix(30, 4, W, [1, 2, 8], is_causal=True)
    scores = torch.einsum("bphd,bjhd->bhpj", q, k) * 0.4 + c.log()
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    torch.manual_seed(5)
    expect = torch.einsum("bhpj,bjhd->bphd", F.dropout(probs, 0.3), v)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_model_attention_dropout_applies_in_training_only():
    model = dilated(tiny(attention_dropout=0.4))
    x = tokens(2, 30)
    eval_logits = model(x).logits
    model.train()
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(1)
    b = model(x).logits
    torch.manual_seed(2)
    c = model(x).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3 and (a - eval_logits).abs().max() > 1e-3
    a.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    model.eval()
    torch.testing.assert_close(model(x).logits, dilated(tiny())(x).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- config, save and load


def test_save_pretrained_round_trips_the_pattern(tmp_path):
    model = dilated(tiny("qwen2"), backend="torch")
    x = tokens(1, 30)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longnet").eval()
    assert loaded.config.longnet_segment_lengths == W and loaded.config.longnet_dilation_rates == R
    assert loaded.config.longnet_backend == "torch"
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x picks sdpa unless told
        assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "longnet"
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert dense.config._attn_implementation == "sdpa"
    assert (dense(x).logits - model(x).logits).abs().max() > 1e-3


def test_bad_arguments_are_refused():
    model = tiny()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lh.use_dilated_attention(torch.nn.Linear(2, 2), W, R)
    with pytest.raises(ValueError, match="same length"):
        lh.use_dilated_attention(copy.deepcopy(model), [8, 16], [1])
    with pytest.raises(ValueError, match="backend must be"):
        lh.use_dilated_attention(copy.deepcopy(model), W, R, backend="bogus")
    with pytest.raises(ValueError, match="replace_sliding_window=True"):
        lh.use_dilated_attention(tiny("mistral", sliding_window=16), W, R)
    torch.manual_seed(0)
    no_pattern = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="longnet"))
    with pytest.raises(ValueError, match="use_dilated_attention"):
        no_pattern(tokens(1, 5))
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="softcap"):
        dilated_attention_forward(_Module(W, R), q, q, q, None, softcap=30.0)


# ----------------------------------------------------------------------------- the seed README's spelling


def test_dilated_attention_accepts_the_seed_readme_spelling():
    torch.manual_seed(0)
    seed_style = longnet.DilatedAttention(d_model=512, num_heads=8, dilation_rate=2, segment_size=64, dropout=0.2)
    torch.manual_seed(0)
    ours = longnet.DilatedAttention(dim=512, heads=8, dilation_rate=2, segment_size=64, dropout=0.2)
    assert (seed_style.embed_dim, seed_style.num_heads, seed_style.dropout) == (512, 8, 0.2)
    x = torch.randn(1, 100, 512)
    seed_style.eval(), ours.eval()
    torch.testing.assert_close(seed_style(x), ours(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match="both dim=512 and d_model=512"):
        longnet.DilatedAttention(dim=512, d_model=512, heads=8)
    with pytest.raises(TypeError, match="both heads=8 and num_heads=8"):
        longnet.DilatedAttention(512, 8, num_heads=8)
    with pytest.raises(TypeError, match="needs heads"):
        longnet.DilatedAttention(d_model=512)
    with pytest.raises(TypeError, match="needs dim"):
        longnet.DilatedAttention(num_heads=8)


# ----------------------------------------------------------------------------- the fine-tuning example


def _tiny_finetune(steps_dense, steps_ft, tmp_path, **kw):
    from longnet.hf.finetune import FinetuneConfig, run
    from longnet.training.data import open_builtin
    corpus = open_builtin(cache_dir=str(tmp_path / "cache"), max_files=60, verbose=False)
    cfg = FinetuneConfig(dense_steps=steps_dense, finetune_steps=steps_ft, **kw)
    return cfg, corpus, run(cfg, corpus=corpus, log=lambda *_: None, save=str(tmp_path / "model"))


def test_finetune_example_runs_and_saves_a_dilated_model(tmp_path):
    from longnet.hf.finetune import evaluate
    cfg, corpus, res = _tiny_finetune(5, 5, tmp_path, context=16, batch_size=4, eval_windows=2, layers=2,
                                      hidden=32, controls=True)
    assert {"dense_at_C", "dense_at_4C", "dilated_at_4C_before", "dilated_at_4C_after", "control_dense_at_C",
            "control_dense_4C_at_4C"} <= set(res)
    assert all(v == v and v < 10 for v in res.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="longnet")
    assert loaded.config.longnet_segment_lengths == [16, 32, 64] and loaded.config.longnet_dilation_rates == [1, 2, 4]
    again = evaluate(loaded, corpus.valid, 64, windows=2, window_len=64)
    assert again == pytest.approx(res["dilated_at_4C_after"], rel=1e-6)


def test_finetune_command_line_checks_its_arguments_before_any_work(tmp_path):
    from longnet.hf.finetune import build_parser, main
    args = build_parser().parse_args(["--context", "64", "--dense-steps", "0", "--lr", "1e-3"])
    assert (args.context, args.dense_steps, args.lr) == (64, 0, 1e-3)
    for bad in (["--context", "0"], ["--lr", "-1"], ["--factor", "3"], ["--heads", "3"]):
        with pytest.raises(SystemExit):
            main(bad)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        main(["--save", str(tmp_path / "taken")])


@pytest.mark.slow
def test_finetune_example_short_run_improves_the_long_context_loss(tmp_path):
    _, _, res = _tiny_finetune(200, 80, tmp_path, eval_windows=8, layers=2)
    assert res["dilated_at_4C_after"] < res["dilated_at_4C_before"]
    assert res["dilated_at_4C_after"] < res["dense_at_4C"]
