"""The ``"longnet"`` attention implementation for ``transformers`` models.

Contracts followed (transformers >= 4.53):

- Attention function (``AttentionInterface``): ``fn(module, query, key, value,
  attention_mask, *, dropout, scaling, **kwargs) -> (out, None)`` with query
  (B, Hq, Nq, D), key and value (B, Hkv, S, D), Hq a multiple of Hkv (grouped-query
  attention: query head h reads key/value head h // (Hq / Hkv)), and out
  (B, Nq, Hq, D). With a cache, key and value hold every position seen so far
  and the queries are the last positions.
- Mask function (``AttentionMaskInterface``): called once per forward with the
  sizes, the mask rule and the 2-D padding mask; it returns a :class:`DilatedMask`
  (an offset and a flag) instead of an N x N mask, which the model hands to every
  layer's attention function.

The dilated pattern lives on the model config (``longnet_segment_lengths``,
``longnet_dilation_rates``, ``longnet_segment_phases``, ``longnet_backend``), so
``save_pretrained`` / ``from_pretrained`` carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("longnet.hf needs transformers >= 4.53: pip install 'longnet[hf]' "
                      f"(or pip install -e '.[hf]' in a checkout); import failed with: {e}") from e
if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 53):  # pragma: no cover
    raise ImportError(f"longnet.hf needs transformers >= 4.53 (its attention and mask interfaces), "
                      f"found {transformers.__version__}: pip install -U 'transformers>=4.53'")

from ..backends import kernels
from ..backends.numerics import acc_dtype, default_scale
from ..backends.reference import count_matrix
from ..backends.torch_backend import merge_partial
from ..functional import available_backends, dilated_attention
from ..patterns import DilatedPattern, segment_start, used_offsets, visible_keys

# Bidirectional masks go through the mask interface from transformers 4.56 on.
_BIDIRECTIONAL = getattr(masking_utils, "bidirectional_mask_function", None)
# Older transformers (4.53) wrap every cache-free causal mask in the packed-sequence rule,
# packed or not; newer ones only when position_ids really restart.
_ALWAYS_WRAPS_PACKED = masking_utils.find_packed_sequence_indices(torch.arange(2)[None]) is not None

__all__ = ["ATTENTION_NAME", "DilatedMask", "dilated_attention_forward", "dilated_mask", "use_dilated_attention"]

ATTENTION_NAME = "longnet"
_CONFIG_KEYS = ("longnet_segment_lengths", "longnet_dilation_rates", "longnet_segment_phases", "longnet_backend")
# Keyword arguments some model families pass that change the attention itself; the dilated
# pattern does not combine with them, so a non-None value is refused rather than ignored.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")
_SUPPORTED = ("supported: causal self-attention with no mask or a right-padding 2-D attention_mask "
              "(1s then 0s in every row), and bidirectional self-attention without padding")


@dataclass(frozen=True)
class DilatedMask:
    """What the ``"longnet"`` mask function hands to every layer instead of an N x N mask.

    ``q_offset``: position of the first query (tokens already in the cache).
    ``causal``: causal or bidirectional self-attention. Right padding needs no
    mask at all under causal attention: valid positions come first, and a query
    never sees a later key, so their outputs are exact; outputs at padded
    positions are not meaningful.
    """

    q_offset: int
    causal: bool = True

    # Generation with a compileable cache (StaticCache) prepares the mask up front, calls
    # .contiguous() on it and passes it back in as the model's attention_mask; these two
    # tensor attributes let it make that round trip (ndim 0: not a padding mask).
    ndim = 0

    def contiguous(self) -> "DilatedMask":
        return self


# ----------------------------------------------------------------------------- mask function


def _check_padding(attention_mask: Optional[Tensor], causal: bool) -> None:
    """attention_mask (B, L) bool: only right padding (each row 1s then 0s), and none when bidirectional."""
    if attention_mask is None:
        return
    m = attention_mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("longnet attention got an attention_mask with padding before a valid token "
                         "(left padding, or a gap): dilated segments are aligned to the first position "
                         f"of each row, so pad on the right (tokenizer.padding_side = 'right'); {_SUPPORTED}")
    if not causal and not bool(m.all()):
        raise ValueError(f"longnet attention got padding with bidirectional attention; {_SUPPORTED}")


def _unpacked_causal(mask_function, batch_size: int, q_offset: int, q_length: int) -> bool:
    """On transformers that always add the packed-sequence rule: whether this mask is plain causal.

    The rule and-ed with causality lets query q see key 0 exactly when q's sequence starts
    at 0, so one probe per query (B x Nq, never N x N) tells an unpacked batch.
    """
    if not _ALWAYS_WRAPS_PACKED or not getattr(mask_function, "__qualname__", "").startswith("and_masks"):
        return False
    b = torch.arange(batch_size)[:, None]
    q = torch.arange(q_offset, q_offset + q_length)[None, :]
    return bool(torch.as_tensor(mask_function(b, 0, q, torch.zeros_like(q))).all())


def dilated_mask(batch_size: int = 1, kv_length: int = 0, kv_offset: int = 0, mask_function=causal_mask_function,
                 attention_mask: Optional[Tensor] = None, q_length: Optional[int] = None,
                 q_offset=None, cache_position: Optional[Tensor] = None, local_size=None,
                 **kwargs) -> DilatedMask:
    """The ``"longnet"`` entry of ``AttentionMaskInterface``; returns a :class:`DilatedMask`.

    Accepts the keyword arguments of transformers 5 (``q_length``, ``q_offset``)
    and of 4.53 (``cache_position``). Refuses, with the reason, masks that are
    not plain causal/bidirectional attention with right padding: packed
    sequences, sliding windows, chunked or custom mask rules, left padding.
    """
    if q_offset is None:
        q_offset = int(cache_position[0]) if cache_position is not None and cache_position.numel() else 0
    if q_length is None:
        q_length = cache_position.numel() if cache_position is not None else kv_length
    if mask_function is causal_mask_function or _unpacked_causal(mask_function, batch_size, int(q_offset), q_length):
        causal = True
    elif mask_function is _BIDIRECTIONAL and _BIDIRECTIONAL is not None:
        causal = False
    else:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(f"longnet attention cannot apply the mask rule {name} (packed sequences, sliding "
                         f"windows, chunked attention and custom mask functions are not supported); {_SUPPORTED}")
    if local_size is not None or kv_offset:
        raise ValueError(f"longnet attention does not support sliding-window caches (kv_offset={kv_offset}); "
                         f"{_SUPPORTED}")
    if not isinstance(attention_mask, DilatedMask):  # a prepared one was checked when it was made
        _check_padding(attention_mask, causal)
    return DilatedMask(int(q_offset), causal)


# ----------------------------------------------------------------------------- attention function


def _layer_pattern(module) -> Tuple[DilatedPattern, Optional[str]]:
    """(pattern, backend) from the layer's config; phases all 0 when unset."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, _CONFIG_KEYS[0], None) is None:
        raise ValueError(f"{type(module).__name__} runs with attn_implementation='{ATTENTION_NAME}' but its config "
                         "holds no dilated pattern (longnet_segment_lengths, longnet_dilation_rates): switch "
                         "the model with longnet.hf.use_dilated_attention(model, segment_lengths, dilation_rates)")
    # Configs saved before phases existed have no longnet_segment_phases: all 0.
    pattern = DilatedPattern(tuple(config.longnet_segment_lengths), tuple(config.longnet_dilation_rates),
                             getattr(config, "longnet_segment_phases", None))
    return pattern, getattr(config, "longnet_backend", None)


def _span(attention_mask, query: Tensor, key: Tensor, module, is_causal) -> DilatedMask:
    if isinstance(attention_mask, DilatedMask):
        return attention_mask
    if attention_mask is not None:
        raise ValueError(f"longnet attention got a prepared {attention_mask.ndim}-D attention mask; pass the "
                         f"model a 2-D attention_mask (or none) so that it builds its own; {_SUPPORTED}")
    # No mask function ran: a cache (DynamicCache) appends, so the queries are the last positions.
    q_offset = key.shape[2] - query.shape[2]
    if q_offset < 0:
        raise ValueError(f"longnet attention supports self-attention only; got {query.shape[2]} queries "
                         f"and {key.shape[2]} keys")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return DilatedMask(q_offset, bool(causal))


def _bnhd(x: Tensor, rep: int) -> Tensor:
    """x (B, Hkv, S, D) -> (B, S, Hkv * rep, D); head h reads head h // rep (grouped-query attention)."""
    x = x.transpose(1, 2)
    if rep == 1:
        return x  # a view: the op takes any strides
    b, s, h, d = x.shape
    return x.unsqueeze(3).expand(b, s, h, rep, d).reshape(b, s, h * rep, d)


def _aligned_start(q_offset: int, segment_lengths: Sequence[int], phases: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    """(start, phases relative to start) for running the op on positions start.. only.

    Every segment that holds a position >= q_offset must begin at or after ``start``,
    so that the op, cutting its positions from ``start`` on, sees those segments whole.
    With every phase 0 the start is a multiple of lcm(w_i), where all patterns begin a
    segment, and the phases stay 0 (the op's fastest path). Otherwise (patterns with
    phases need not share any start) it is the earliest of the segments holding
    q_offset, and each phase is re-measured from there.
    """
    if not any(phases):
        period = math.lcm(*segment_lengths)
        return (q_offset // period) * period, tuple(phases)
    start = min(int(segment_start(q_offset, w, phi)) for w, phi in zip(segment_lengths, phases))
    return start, tuple((phi - start) % w for w, phi in zip(segment_lengths, phases))


def _dense_with_dropout(q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, causal: bool,
                        scale: float, dropout: float, segment_phases=None) -> Tensor:
    """q, k, v (B, N, H, D) -> (B, N, H, D): docs/design.md §2's softmax(q k^T scale + log C), dropout on its
    probabilities. Dense (H, N, N) scores: the training path when attention dropout is on."""
    n, h = q.shape[1], q.shape[2]
    c = count_matrix(n, h, segment_lengths, dilation_rates, is_causal=causal, device=q.device,
                     segment_phases=segment_phases)
    empty = (c == 0).all(-1)  # (H, N): rows no pattern keeps; their output is 0
    # log 0 = -inf removes the keys a row does not share a pattern with; empty rows get a
    # finite dummy row (zeroed below) so that no softmax is taken over nothing.
    bias = c.to(q.dtype).log().masked_fill(empty[..., None], 0.0)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).masked_fill(empty.T[None, :, :, None], 0.0)


def _attend(query: Tensor, key: Tensor, value: Tensor, span: DilatedMask, pattern: DilatedPattern,
            backend: Optional[str], scale: float, dropout: float) -> Tensor:
    """query (B, Hq, Nq, D) at positions q_offset.., key/value (B, Hkv, q_offset + Nq, D) -> (B, Nq, Hq, D).

    The op runs from a position at or before the start of every segment that holds a
    query (:func:`_aligned_start`), so its segments and head offsets are those of the
    whole sequence; the earlier queries there are zeros (not cached) and their outputs
    are dropped, while causality keeps every real query's output exact.
    """
    w, r = pattern.segment_lengths, pattern.dilation_rates
    if span.q_offset and not span.causal:
        raise ValueError(f"longnet attention with a cache needs causal attention; {_SUPPORTED}")
    start, phases = _aligned_start(span.q_offset, w, pattern.segment_phases)
    rep = query.shape[1] // key.shape[1]
    q = query.transpose(1, 2)
    if start < span.q_offset:
        q = torch.cat([q.new_zeros(q.shape[0], span.q_offset - start, *q.shape[2:]), q], 1)
    k, v = _bnhd(key[:, :, start:], rep), _bnhd(value[:, :, start:], rep)
    if dropout > 0:
        out = _dense_with_dropout(q, k, v, w, r, span.causal, scale, dropout, phases)
    else:
        out = dilated_attention(q, k, v, w, r, is_causal=span.causal, scale=scale, backend=backend,
                                segment_phases=phases)
    return out[:, span.q_offset - start:].contiguous()


def _decode_plan(p: int, segment_lengths, dilation_rates, num_heads: int,
                 phases: Sequence[int]) -> Iterator[Tuple[slice, int, int]]:
    """For query position p: (heads, first key, rate) of each pattern that keeps p in some head.

    The heads with p's offset see keys first, first + r, ..., p (:func:`visible_keys`).
    """
    for w, r, phi in zip(segment_lengths, dilation_rates, phases):
        s, first, _ = visible_keys(p, w, r, phi)
        if s in used_offsets(r, num_heads):
            yield slice(s, num_heads, r), first, r


def _kv_heads(x: Tensor, heads: slice, num_heads: int, rep: int) -> Tensor:
    """x (B, Hkv, m, D) -> (B, len(heads), m, D) for query heads ``heads``: a view when rep = 1."""
    if rep == 1:
        return x[:, heads]
    idx = torch.arange(num_heads, device=x.device)[heads] // rep
    return x.index_select(1, idx)


def _decode(query: Tensor, key: Tensor, value: Tensor, pattern: DilatedPattern, scale: float) -> Tensor:
    """One query (B, Hq, 1, D) at position p = S - 1 against key/value (B, Hkv, S, D) -> (B, 1, Hq, D).

    Each pattern reads only its kept keys, as strided slices of the cache, and the
    partials merge by log-sum-exp (docs/design.md §2); heads no pattern keeps output 0.
    """
    b, hq, _, d = query.shape
    p, rep = key.shape[2] - 1, hq // key.shape[1]
    acc = acc_dtype(query.dtype)
    out = torch.zeros(b, hq, d, dtype=acc, device=query.device)
    lse = torch.full((b, hq), float("-inf"), dtype=acc, device=query.device)
    for heads, first, rate in _decode_plan(p, pattern.segment_lengths, pattern.dilation_rates, hq,
                                             pattern.segment_phases):
        k_i, v_i = (_kv_heads(x[:, :, first:p + 1:rate], heads, hq, rep) for x in (key, value))
        o_i, l_i = kernels.attn_fwd(query[:, heads], k_i, v_i, False, scale)
        merge_partial(out[:, heads], lse[:, heads], o_i[:, :, 0], l_i[:, :, 0])
    return out.to(query.dtype).unsqueeze(1)


def dilated_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """The ``"longnet"`` entry of ``AttentionInterface``: dilated attention on one layer's q, k, v.

    query (B, Hq, Nq, D), key/value (B, Hkv, S, D) -> (out (B, Nq, Hq, D), None).
    The pattern comes from ``module.config``. ``scaling`` (default D^-1/2) scales
    the scores. ``dropout`` > 0 (the model passes its attention dropout in
    training mode) runs the dense form of the same mixture with dropout on its
    probabilities, O(N^2) memory. A single query with a cache and no gradient
    takes the decode path, which reads only the kept keys.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"longnet attention cannot combine the dilated pattern with {name}="
                             f"{kwargs[name]!r} from {type(module).__name__}; {_SUPPORTED}")
    pattern, backend = _layer_pattern(module)
    span = _span(attention_mask, query, key, module, is_causal)
    scale = default_scale(query.shape[-1]) if scaling is None else float(scaling)
    end = span.q_offset + query.shape[2]
    key, value = key[:, :, :end], value[:, :, :end]  # a static cache is longer than what it holds
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.shape[2] == 1 and span.causal and dropout == 0 and not needs_grad:
        return _decode(query, key, value, pattern, scale), None
    return _attend(query, key, value, span, pattern, backend, scale, dropout), None


# ----------------------------------------------------------------------------- switching a model


def _check_no_sliding_window(model, replace: bool) -> None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = any("sliding" in str(t) for t in layer_types) if layer_types else window is not None
    if sliding and replace:
        _replace_sliding_window(model)
    elif sliding:
        raise ValueError(f"{type(model).__name__} uses sliding-window attention (config.sliding_window={window}, "
                         f"layer_types={layer_types}); the dilated pattern replaces full causal attention. To let "
                         "it replace the window too, pass replace_sliding_window=True to use_dilated_attention")


def _replace_sliding_window(model) -> None:
    """Turn every sliding-window layer of a built model into a full-attention one, for the dilated
    pattern to replace. The window is fixed when the model is built, in three places besides the
    config: each attention module's ``sliding_window`` (and layer type), each decoder layer's
    ``attention_type``, and the base model's ``has_sliding_layers`` (which builds the window mask)."""
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention" if "sliding" in str(t) else t for t in config.layer_types]
    config.sliding_window = None
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    for module in model.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = None
        for name in ("layer_type", "attention_type"):
            if "sliding" in str(getattr(module, name, "")):
                setattr(module, name, "full_attention")
        if getattr(module, "has_sliding_layers", False):
            module.has_sliding_layers = False


def _check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in available_backends():
        raise ValueError(f"backend must be None or one of {available_backends()}, got {backend!r}")


def use_dilated_attention(model, segment_lengths, dilation_rates, *, segment_phases=None, local_window: int = 0,
                          backend: Optional[str] = None, replace_sliding_window: bool = False):
    """Switch a ``transformers`` ``PreTrainedModel`` to dilated attention, in place; returns the model.

    Every attention layer then computes :func:`longnet.dilated_attention` with this
    pattern on its own q, k and v (grouped-query heads expanded), causally, with the
    layer's own scaling. Generation with the model's cache decodes each token
    against the keys its pattern keeps.

    ``segment_phases`` (one φ_i per pattern, default all 0) and ``local_window``
    (0, or an even l >= 2: :meth:`longnet.DilatedPattern.with_local_window`, the
    variant without the causal blind spot that ``longnet``'s own LM presets use)
    are the op's opt-in extensions; the stored pattern is the expanded one.

    A model with sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``) is
    refused unless ``replace_sliding_window=True``: then the dilated pattern replaces the
    window too, in every layer (the config is rewritten to full attention, so a saved copy
    loads that way).

    The pattern is stored on ``model.config`` (``longnet_segment_lengths``,
    ``longnet_dilation_rates``, ``longnet_segment_phases``, ``longnet_backend``) together with
    ``attn_implementation="longnet"``, so a saved copy loads dilated again after
    ``import longnet.hf``: ``from_pretrained(path, attn_implementation="longnet")``
    (transformers 5 also does it when not told; pass ``attn_implementation="sdpa"``
    to load it dense instead).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    pattern = DilatedPattern(segment_lengths, dilation_rates, segment_phases)
    if local_window:
        try:
            pattern = pattern.with_local_window(local_window)
        except ValueError as e:
            raise ValueError(f"local_window must be 0 (off) or an even length >= 2, got {local_window!r}") from e
    _check_backend(backend)
    _check_no_sliding_window(model, replace_sliding_window)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # transformers < 4.54
        model.config._attn_implementation = ATTENTION_NAME
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} does not dispatch through transformers' AttentionInterface, "
                         "so its attention cannot be replaced (tested: Llama, Qwen2, Mistral)")
    values = (list(pattern.segment_lengths), list(pattern.dilation_rates), list(pattern.segment_phases), backend)
    for key, value in zip(_CONFIG_KEYS, values):
        setattr(model.config, key, value)
    # A config key that PreTrainedConfig.__init__ reads back as the attention implementation.
    model.config.attn_implementation = ATTENTION_NAME
    return model


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, dilated_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, dilated_mask)


_register()
