"""The one weight-decay rule of every optimiser longnet builds.

Decay applies to the weight matrices of linear layers (``nn.Linear``: the projections, the FFN
and an untied output head). Embeddings are never decayed, including an output head tied to the
embedding (the tied matrix is one parameter, and it is an embedding). Norms, biases, positional
tables, the short convolution's taps and every other parameter are not decayed either.
This is minGPT's rule, stated by module type rather than by parameter name, so it holds for
longnet's models and for Hugging Face models alike.
"""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

__all__ = ["decay_groups"]


def decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW parameter groups: linear weights get ``weight_decay``, every other parameter 0.
    A tied parameter appears once; frozen parameters are left out."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embedding
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    return [{"params": [p for p in params if id(p) in linear], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in linear], "weight_decay": 0.0}]

