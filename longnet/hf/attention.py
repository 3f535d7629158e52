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
  (an offset, a flag, the padding and the packed sequences) instead of an N x N
  mask, which the model hands to every layer's attention function.

Batching changes nothing: with padding (left, right or gaps, as a 2-D
``attention_mask``) or packed sequences (``position_ids`` restarting at 0, or the
``cu_seq_lens_q``/``cu_seq_lens_k`` keywords of transformers' flash-attention path),
each sequence is attended exactly as if it ran alone (:mod:`longnet.varlen`), in
prefill, in decoding (:mod:`longnet.decode`) and in training.

The dilated pattern lives on the model config (``longnet_segment_lengths``,
``longnet_dilation_rates``, ``longnet_segment_phases``, ``longnet_backend``), so
``save_pretrained`` / ``from_pretrained`` carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

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

from ..backends.numerics import default_scale
from ..backends.reference import mixture_bias
from ..decode import decode_attention
from ..functional import available_backends, dilated_attention
from ..patterns import DilatedPattern, segment_start
from ..varlen import cu_seqlens_from_lengths, pad, unpad

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
_SUPPORTED = ("supported: causal or bidirectional self-attention with no mask or a 2-D padding attention_mask "
              "(0 = padding, anywhere in a row: left, right or gaps), and packed sequences (position_ids "
              "restarting at 0, or flash-attention's cu_seq_lens_q/cu_seq_lens_k)")


@dataclass(frozen=True, eq=False)
class DilatedMask:
    """What the ``"longnet"`` mask function hands to every layer instead of an N x N mask.

    ``q_offset``: position of the first query (tokens already in the cache).
    ``causal``: causal or bidirectional self-attention.
    ``key_padding_mask``: (B, L) bool, True = a real token, over the positions seen so far
    (L >= q_offset + Nq; None: no padding). Each row's real tokens form its sequence, which is
    segmented from its own first token; padded positions output 0.
    ``sequence_ids``: (B, N) packed sequences (transformers' packed-sequence indices: equal
    ids = one sequence) for a cache-free forward, or None.
    """

    q_offset: int
    causal: bool = True
    key_padding_mask: Optional[Tensor] = None
    sequence_ids: Optional[Tensor] = None

    # Generation with a compileable cache (StaticCache) prepares the mask up front, calls
    # .contiguous() on it and passes it back in as the model's attention_mask; these two
    # tensor attributes let it make that round trip (ndim 0: not a padding mask).
    ndim = 0

    def contiguous(self) -> "DilatedMask":
        return self


# ----------------------------------------------------------------------------- mask function


def _padding(attention_mask) -> Optional[Tensor]:
    """attention_mask (B, L) -> bool (B, L), or None when nothing is padding (or no mask)."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, DilatedMask):
        return attention_mask.key_padding_mask
    m = attention_mask.bool()
    return None if bool(m.all()) else m


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))


def _packed_ids(mask_function) -> Optional[Tensor]:
    """transformers' packed-sequence indices (B, N) if the rule is causal within packed sequences, else None.

    transformers builds that rule as and_masks(causal (remapped to positions), packed sequences); its
    parts are read from the closures, so no N x N mask is ever evaluated.
    """
    if not getattr(mask_function, "__qualname__", "").startswith("and_masks"):
        return None
    ids, rest = None, []
    for fn in _closure(mask_function).get("mask_functions", ()):
        name = getattr(fn, "__qualname__", "")
        if name.startswith("packed_sequence_mask_function"):
            ids = _closure(fn).get("packed_sequence_mask")
        elif name.startswith("remap_positions_for_packed_sequence"):
            rest.append(_closure(fn).get("mask_function"))
        else:
            rest.append(fn)
    return ids if ids is not None and all(fn is causal_mask_function for fn in rest) else None


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
    and of 4.53 (``cache_position``). Takes causal or bidirectional attention with
    any 2-D padding mask, and causal attention within packed sequences; refuses,
    with the reason, other rules: sliding windows, chunked or custom mask rules.
    """
    if q_offset is None:
        q_offset = int(cache_position[0]) if cache_position is not None and cache_position.numel() else 0
    if q_length is None:
        q_length = cache_position.numel() if cache_position is not None else kv_length
    ids = None
    if mask_function is causal_mask_function or _unpacked_causal(mask_function, batch_size, int(q_offset), q_length):
        causal = True
    elif mask_function is _BIDIRECTIONAL and _BIDIRECTIONAL is not None:
        causal = False
    else:
        ids, causal = _packed_ids(mask_function), True
        if ids is None:
            name = getattr(mask_function, "__qualname__", repr(mask_function))
            raise ValueError(f"longnet attention cannot apply the mask rule {name} (sliding windows, chunked "
                             f"attention and custom mask functions are not supported); {_SUPPORTED}")
    if local_size is not None or kv_offset:
        raise ValueError(f"longnet attention does not support sliding-window caches (kv_offset={kv_offset}); "
                         f"{_SUPPORTED}")
    return DilatedMask(int(q_offset), causal, _padding(attention_mask), ids)


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
    bias, _, empty = mixture_bias(n, h, segment_lengths, dilation_rates, is_causal=causal, dtype=q.dtype,
                                  device=q.device, segment_phases=segment_phases)
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


def _decode(query: Tensor, key: Tensor, value: Tensor, pattern: DilatedPattern, scale: float,
            padding: Optional[Tensor]) -> Tensor:
    """One query (B, Hq, 1, D) in the last slot S - 1 against key/value (B, Hkv, S, D) -> (B, 1, Hq, D).

    Each pattern reads only its kept keys, as strided slices of the cache (:mod:`longnet.decode`).
    A row's sequence is its real tokens (``padding`` (B, S), None: all real): a row whose real
    tokens end in one run at the query (no padding, left padding) reads the cache in place at its
    own position; a row with gaps (right-padded prompts that went on generating) reads its real
    keys gathered; a query that is padding outputs 0.
    """
    b, s = query.shape[0], key.shape[2]
    q, k, v = query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2)  # (B, S, Hkv, D) views
    args = (pattern.segment_lengths, pattern.dilation_rates, scale)
    if padding is None:
        return decode_attention(q, k, v, [s - 1] * b, *args, segment_phases=pattern.segment_phases
                                ).to(query.dtype).unsqueeze(1)
    counts = padding.sum(1).tolist()
    in_run = padding[:, -1] & (padding.flip(1).int().cumprod(1).sum(1) == padding.sum(1))  # real tokens: one run at the end
    regular = in_run.tolist()
    positions = [c - 1 if ok else 0 for c, ok in zip(counts, regular)]  # 0 reads slot S - 1 only: a harmless stand-in
    out = decode_attention(q, k, v, positions, *args, segment_phases=pattern.segment_phases)
    for i in (i for i, ok in enumerate(regular) if not ok):
        idx = padding[i].nonzero().squeeze(1)
        if not bool(padding[i, -1]):
            out[i] = 0
            continue
        out[i] = decode_attention(q[i:i + 1], k[i:i + 1, idx], v[i:i + 1, idx], [idx.numel() - 1], *args,
                                  segment_phases=pattern.segment_phases)[0]
    return out.to(query.dtype).unsqueeze(1)


def _padded_key_mask(padding: Optional[Tensor], end: int) -> Optional[Tensor]:
    """padding (B, L) as the mask of the first ``end`` positions (a shorter mask: the rest is real)."""
    if padding is None:
        return None
    if padding.shape[1] < end:
        padding = F.pad(padding, (0, end - padding.shape[1]), value=True)
    padding = padding[:, :end]
    return None if bool(padding.all()) else padding


def _dense_per_sequence(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, pattern: DilatedPattern,
                        causal: bool, scale: float, dropout: float) -> Tensor:
    """The dropout path per sequence: packed q, k, v (T, H, D) with cu_seqlens (B + 1,) -> (T, H, D)."""
    parts = []
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            parts.append(_dense_with_dropout(q[lo:hi][None], k[lo:hi][None], v[lo:hi][None], pattern.segment_lengths,
                                             pattern.dilation_rates, causal, scale, dropout,
                                             pattern.segment_phases)[0])
    return torch.cat(parts) if parts else torch.zeros_like(q)


def _attend_padded(query: Tensor, key: Tensor, value: Tensor, span: DilatedMask, padding: Tensor,
                   pattern: DilatedPattern, backend: Optional[str], scale: float, dropout: float) -> Tensor:
    """query (B, Hq, Nq, D) at positions q_offset.., key/value (B, Hkv, S, D), padding (B, S) -> (B, Nq, Hq, D).

    The op runs on each row's real tokens, packed as one sequence from its first
    (:mod:`longnet.varlen`), gaps included; the earlier queries of a chunked prefill are
    zeros and their rows are dropped. Padded rows output 0.
    """
    if span.q_offset and not span.causal:
        raise ValueError(f"longnet attention with a cache needs causal attention; {_SUPPORTED}")
    rep = query.shape[1] // key.shape[1]
    q = query.transpose(1, 2)
    if span.q_offset:
        q = torch.cat([q.new_zeros(q.shape[0], span.q_offset, *q.shape[2:]), q], 1)
    b, s = padding.shape
    # Packed, so that a row with gaps is one sequence of its real tokens too.
    (q, indices, cu_seqlens, _), k, v = unpad(q, padding), unpad(_bnhd(key, rep), padding)[0], \
        unpad(_bnhd(value, rep), padding)[0]
    if dropout > 0:
        out = _dense_per_sequence(q, k, v, cu_seqlens, pattern, span.causal, scale, dropout)
    else:
        out = dilated_attention(q, k, v, pattern.segment_lengths, pattern.dilation_rates, cu_seqlens=cu_seqlens,
                                is_causal=span.causal, scale=scale, backend=backend,
                                segment_phases=pattern.segment_phases)
    return pad(out, indices, b, s)[:, span.q_offset:].contiguous()


def _packed_cu_seqlens(span: DilatedMask, kwargs: dict, query: Tensor, key: Tensor) -> Optional[Tensor]:
    """cu_seqlens (S + 1,) int32 over the B x N rows of a packed batch, or None when it is not packed."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None and span.sequence_ids is None:
        return None
    b, n = query.shape[0], query.shape[2]
    if span.q_offset or key.shape[2] != n or span.key_padding_mask is not None:
        raise ValueError(f"longnet attention takes packed sequences only without a cache or padding; {_SUPPORTED}")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
            raise ValueError("longnet attention takes packed self-attention: cu_seq_lens_q and cu_seq_lens_k must "
                             f"be given together and be equal; {_SUPPORTED}")
        if b != 1 or int(cu_q[-1]) != n:
            raise ValueError(f"cu_seq_lens_q must split the one row of the batch: batch size 1 and cu_seq_lens_q[-1] "
                             f"= {n}, got batch size {b} and {int(cu_q[-1])}")
        return cu_q.to(device=query.device, dtype=torch.int32)
    ids = span.sequence_ids.expand(b, -1).to(query.device)
    lengths = [c for row in ids for c in torch.unique_consecutive(row, return_counts=True)[1].tolist()]
    return cu_seqlens_from_lengths(lengths, device=query.device)


def _attend_packed(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, pattern: DilatedPattern,
                   backend: Optional[str], scale: float, dropout: float) -> Tensor:
    """query (B, Hq, N, D), key/value (B, Hkv, N, D) holding the causal sequences of ``cu_seqlens`` -> (B, N, Hq, D)."""
    b, hq, n, d = query.shape
    rep = hq // key.shape[1]
    q, k, v = (x.reshape(b * n, hq, d) for x in (query.transpose(1, 2), _bnhd(key, rep), _bnhd(value, rep)))
    if dropout > 0:
        out = _dense_per_sequence(q, k, v, cu_seqlens, pattern, True, scale, dropout)
    else:
        out = dilated_attention(q, k, v, pattern.segment_lengths, pattern.dilation_rates, cu_seqlens=cu_seqlens,
                                is_causal=True, scale=scale, backend=backend, segment_phases=pattern.segment_phases)
    return out.view(b, n, hq, d)


def dilated_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """The ``"longnet"`` entry of ``AttentionInterface``: dilated attention on one layer's q, k, v.

    query (B, Hq, Nq, D), key/value (B, Hkv, S, D) -> (out (B, Nq, Hq, D), None).
    The pattern comes from ``module.config``. ``scaling`` (default D^-1/2) scales
    the scores. ``dropout`` > 0 (the model passes its attention dropout in
    training mode) runs the dense form of the same mixture with dropout on its
    probabilities, per sequence, O(N^2) memory. A single query with a cache and no
    gradient takes the decode path, which reads only the kept keys. Padding and
    packed sequences (see the module docstring) run each sequence as if alone.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"longnet attention cannot combine the dilated pattern with {name}="
                             f"{kwargs[name]!r} from {type(module).__name__}; {_SUPPORTED}")
    if kwargs.get("output_attentions"):  # else transformers returns an empty tuple without a word
        raise ValueError("output_attentions=True: longnet attention never forms the N x N attention weights; "
                         "drop output_attentions, or load a copy with attn_implementation='eager' to inspect "
                         "dense weights")
    pattern, backend = _layer_pattern(module)
    span = _span(attention_mask, query, key, module, is_causal)
    scale = default_scale(query.shape[-1]) if scaling is None else float(scaling)
    end = span.q_offset + query.shape[2]
    key, value = key[:, :, :end], value[:, :, :end]  # a static cache is longer than what it holds
    cu_seqlens = _packed_cu_seqlens(span, kwargs, query, key)
    if cu_seqlens is not None:
        return _attend_packed(query, key, value, cu_seqlens, pattern, backend, scale, dropout), None
    padding = _padded_key_mask(span.key_padding_mask, end)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.shape[2] == 1 and span.causal and dropout == 0 and not needs_grad:
        return _decode(query, key, value, pattern, scale, padding), None
    if padding is not None:
        return _attend_padded(query, key, value, span, padding, pattern, backend, scale, dropout), None
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
