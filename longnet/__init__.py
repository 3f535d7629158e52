"""longnet: exact, fast dilated attention (LongNet, Ding et al. 2023)."""

from .functional import available_backends, dilated_attention
from .patterns import DilatedPattern, dense_flops, dilated_flops, validate_pattern

__version__ = "0.1.0"

_LAZY = {
    "MultiheadDilatedAttention": "longnet.modules",
    "DilatedAttention": "longnet.modules",
    "XPOS": "longnet.modules",
    "LongNetConfig": "longnet.config",
    "LongNetLM": "longnet.model",
    "LongNetTransformer": "longnet.model",
    "LongNetEncoder": "longnet.encoder",
    "LongNetEncoderConfig": "longnet.encoder",
}


def __getattr__(name):
    # Modules load on first use so ``import longnet`` for the op stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longnet' has no attribute {name!r}")


__all__ = ["dilated_attention", "available_backends", "DilatedPattern", "validate_pattern",
           "dilated_flops", "dense_flops", *_LAZY]
