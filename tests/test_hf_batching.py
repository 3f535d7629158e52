"""longnet.hf with real batches: padding anywhere, batched generation, packed sequences, refused masks.

Batching changes nothing: each sequence's logits, gradients and generated tokens equal those
of the sequence run alone.
"""

import pytest
import torch
from transformers import LogitsProcessorList

import longnet.hf as lh
from test_hf import FAMILIES, dilated, tiny, tokens

LENGTHS = [40, 25, 9]  # past w = 8, 16, 32, and shorter


def _left_padded(seqs, pad=0):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = s, 1
    return ids, mask


def _prompts():
    return [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("family,cache", [(f, "dynamic") for f in sorted(FAMILIES)] + [("llama", "static")] + [
    pytest.param(f, "static", marks=pytest.mark.slow) for f in ("mistral", "qwen2")])
def test_batched_greedy_generate_equals_each_prompt_alone(family, cache):
    model = dilated(tiny(family))
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    out = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        assert torch.equal(out[i, ids.shape[1] - len(p):], alone[0]), f"prompt {i}"


def test_batched_sampling_with_one_generator_per_prompt_equals_each_alone():
    model = dilated(tiny("qwen2"))
    prompts = _prompts()
    ids, mask = _left_padded(prompts)

    def sampler(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return LogitsProcessorList([lh.PerSequenceSampler(gens, temperature=0.9, top_k=30)])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, logits_processor=sampler([1, 2, 3]), **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               logits_processor=sampler([i + 1]), **kw)
        assert torch.equal(out[i, ids.shape[1] - len(p):], alone[0]), f"prompt {i}"
    greedy = model.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(out, greedy)  # it did sample
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        lh.PerSequenceSampler([])


@pytest.mark.parametrize("where", ["left", "right", "both", "gaps"])
def test_any_padding_mask_gives_each_row_its_logits_and_gradients_alone(where):
    model = dilated(tiny("mistral"))
    x = tokens(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    real = {"left": slice(13, 40), "right": slice(0, 27), "both": slice(5, 30), "gaps": None}[where]
    if real is None:
        mask[1, [3, 4, 20, 33]] = 0
    else:
        mask[1] = 0
        mask[1, real] = 1
    keep = mask[1].bool()
    # Positions count real tokens, as generate() makes them: rotary positions are then those alone.
    pos = dict(position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    padded = model(x, attention_mask=mask, **pos).logits
    alone = model(x[1:, keep]).logits
    torch.testing.assert_close(padded[1, keep], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], model(x[:1]).logits[0], atol=1e-5, rtol=1e-5)
    # Training: the gradient through the real positions' logits is the sum of the rows' alone.
    model.train()
    wts = torch.randn(padded.shape, generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    out = model(x, attention_mask=mask, **pos).logits
    ((out[1, keep] * wts[1, keep]).sum() + (out[0] * wts[0]).sum()).backward()
    batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ((model(x[1:, keep]).logits[0] * wts[1, keep]).sum() + (model(x[:1]).logits[0] * wts[0]).sum()).backward()
    for g, p in zip(batch, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["position_ids", "flash_kwargs"])
def test_packed_sequences_become_varlen(how):
    model = dilated(tiny("llama"))
    seqs = [tokens(1, n, seed=20 + i)[0] for i, n in enumerate([30, 1, 17, 12])]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    kw = dict(position_ids=position_ids, use_cache=False)
    if how == "flash_kwargs":
        cu = torch.tensor([0, 30, 31, 48, 60], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=30, max_length_k=30)
    packed = model(ids, **kw).logits[0]
    alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # ...and it is not one sequence of 60 in disguise.
    assert (packed - model(ids).logits[0]).abs().max() > 1e-3
    model.train()
    model.zero_grad()
    model(ids, labels=ids, **kw).logits.square().sum().backward()
    batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for s in seqs:
        model(s[None]).logits.square().sum().backward()
    for g, p in zip(batch, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_masks_that_are_not_padding_are_refused_naming_what_is_supported():
    model = dilated(tiny())
    x = tokens(2, 20)
    with pytest.raises(ValueError, match="prepared 4-D attention mask.*2-D padding attention_mask"):
        model(x, attention_mask=torch.ones(2, 1, 20, 20, dtype=torch.bool))
    from longnet.hf.attention import dilated_mask
    with pytest.raises(ValueError, match="custom mask functions are not supported.*packed sequences"):
        dilated_mask(2, 20, mask_function=lambda b, h, q, kv: q >= kv, q_length=20, q_offset=0)
    cu = torch.tensor([0, 10, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k"):
        model(x[:1], cu_seq_lens_q=cu, use_cache=False)
