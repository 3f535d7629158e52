"""Dilated attention as a drop-in for Hugging Face ``transformers`` models (``pip install -e ".[hf]"``).

``import longnet.hf`` registers the attention implementation ``"longnet"`` with
``transformers.AttentionInterface`` and its compact mask function with
``AttentionMaskInterface``; :func:`use_dilated_attention` switches a model to it.

>>> import longnet.hf                                                   # doctest: +SKIP
>>> model = longnet.hf.use_dilated_attention(model, [2048, 4096], [1, 2])  # doctest: +SKIP
"""

from .attention import (ATTENTION_NAME, DilatedMask, dilated_attention_forward, dilated_mask,
                        use_dilated_attention)
from .sampling import PerSequenceSampler

__all__ = ["ATTENTION_NAME", "DilatedMask", "PerSequenceSampler", "dilated_attention_forward", "dilated_mask",
           "use_dilated_attention"]
