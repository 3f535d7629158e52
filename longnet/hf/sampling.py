"""Sampling in ``generate`` where each prompt's tokens do not depend on its batch.

transformers' ``do_sample=True`` draws every row of a batch from one random stream, so a
prompt's sampled tokens change with the prompts batched beside it. :class:`PerSequenceSampler`
is a logits processor that samples row b from its own ``torch.Generator`` and leaves only that
token possible; run it under ``do_sample=False`` and every prompt gets, for a fixed seed, the
tokens it gets alone (the logits being equal, as longnet's attention makes them under padding).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from ..checks import check_int

__all__ = ["PerSequenceSampler"]


class PerSequenceSampler(LogitsProcessor):
    """Row b of the scores (B, V) -> a one-hot choice (0 for the drawn token, -inf elsewhere).

    The token is drawn from softmax(scores / temperature), restricted to the ``top_k`` most
    likely, with ``generators[b]``. Use with ``generate(..., do_sample=False,
    logits_processor=LogitsProcessorList([PerSequenceSampler(gens, 0.8, 40)]))``.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float = 1.0,
                 top_k: Optional[int] = None):
        self.generators = list(generators)
        if not self.generators or not all(isinstance(g, torch.Generator) for g in self.generators):
            raise ValueError(f"generators must be one torch.Generator per prompt, got {generators!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.temperature, self.top_k = float(temperature), None if top_k is None else check_int("top_k", top_k)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"PerSequenceSampler has {len(self.generators)} generators for a batch of "
                             f"{scores.shape[0]} rows; pass one per prompt (times num_return_sequences)")
        logits = scores.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        picks = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)
