"""torchscale's LongNet surface on longnet's kernels: no flash-attn, fairscale, timm or CUDA needed.

Drop-in for ``torchscale.architecture.config`` (:class:`EncoderConfig`,
:class:`DecoderConfig`), ``torchscale.model.LongNet`` (:class:`LongNetEncoder`,
:class:`LongNetDecoder` and their layers) and Prov-GigaPath's additions
(:func:`make_longnet_from_name`, the named configs in :data:`LongNetConfig`).
Module and parameter names follow torchscale's, so its state dicts load with
no missing or unexpected keys, and the forward pass is its function
(:mod:`.attention`; differences in docs/gigapath.md).

Layouts: hidden states (B, N, E); padding masks (B, N) bool with True =
padding (torchscale's convention). Unlike torchscale, a padding mask is
honoured: each sequence is computed exactly as if it were alone.

Not supported (a one-line error says so): incremental decoding, MoE layers,
multiway networks, relative position buckets, encoder-decoder cross
attention and attention dropout. ``seq_parallel``, ``fsdp`` and
``block_shift`` are accepted and have no effect (one device; ``block_shift``
is read nowhere in torchscale either).
"""

from __future__ import annotations

import ast
import math
import types
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_int
from .attention import kernel_attend, per_sequence, torchscale_dilated_attention

__all__ = ["EncoderConfig", "DecoderConfig", "DilatedAttention", "XPOS", "FeedForwardNetwork",
           "LongNetEncoderLayer", "LongNetDecoderLayer", "LongNetEncoder", "LongNetDecoder",
           "LongNetConfig", "NAMED_CONFIGS", "make_longnet", "make_longnet_from_name"]

_COMMON = dict(
    activation_fn="gelu", dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, activation_dropout=0.0,
    no_scale_embedding=True, layernorm_embedding=False, moe_freq=0, moe_top1_expert=False,
    moe_expert_count=0, moe_gating_use_fp32=True, moe_eval_capacity_token_fraction=0.25,
    moe_second_expert_policy="random", moe_normalize_gate_prob_before_dropping=False, use_xmoe=False,
    rel_pos_buckets=0, max_rel_pos=0, deepnorm=False, subln=True, bert_init=False, multiway=False,
    no_output_layer=False, layernorm_eps=1e-5, vocab_size=-1, checkpoint_activations=False, fsdp=False,
    ddp_rank=0, xpos_rel_pos=False, xpos_scale_base=512, flash_attention=False, segment_length=None,
    dilated_ratio=None, seq_parallel=False)

_ENCODER = dict(encoder_embed_dim=768, encoder_attention_heads=12, encoder_ffn_embed_dim=3072,
                encoder_layers=12, encoder_normalize_before=True, normalize_output=True,
                share_encoder_input_output_embed=False, max_source_positions=1024, img_size=224,
                patch_size=16, in_chans=3, **_COMMON)

_DECODER = dict(decoder_embed_dim=768, decoder_attention_heads=12, decoder_ffn_embed_dim=3072,
                decoder_layers=12, decoder_normalize_before=True, share_decoder_input_output_embed=False,
                max_target_positions=1024, **_COMMON)


def _int_list(value, name: str) -> Optional[List[int]]:
    """A list of ints from a list/tuple or from the string torchscale parses ('[1, 2, 4]'); None/'' -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{name} must be a list of ints or a string like '[1, 2, 4]', got {value!r}") from None
    if isinstance(value, (int, np.integer)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of ints, got {value!r}")
    return [check_int(f"{name}[{i}]", x) for i, x in enumerate(value)]


class _Config:
    """torchscale's config object: every default of the original; unknown fields are kept as attributes."""

    _DEFAULTS: Dict[str, Any] = {}
    _PREFIX = ""

    def __init__(self, **kwargs):
        for key, default in self._DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        for key, value in kwargs.items():  # e.g. block_shift: accepted, read by nothing
            setattr(self, key, value)
        self.postprocessing()

    def override(self, args) -> None:
        for key in list(self.__dict__):
            if getattr(args, key, None) is not None:
                setattr(self, key, getattr(args, key))
        self.postprocessing()

    def postprocessing(self) -> None:
        self.segment_length = _int_list(self.segment_length, "segment_length")
        self.dilated_ratio = _int_list(self.dilated_ratio, "dilated_ratio")
        if (self.segment_length is None) != (self.dilated_ratio is None) or (
                self.segment_length is not None and len(self.segment_length) != len(self.dilated_ratio)):
            raise ValueError("segment_length and dilated_ratio must be given together with equal lengths, got "
                             f"{self.segment_length} and {self.dilated_ratio}")
        if self.deepnorm:
            setattr(self, f"{self._PREFIX}_normalize_before", False)
            self.subln = False
        if self.subln:
            setattr(self, f"{self._PREFIX}_normalize_before", True)
            self.deepnorm = False
        if self.use_xmoe:
            self.moe_normalize_gate_prob_before_dropping = True
            self.moe_second_expert_policy = "random"

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


class EncoderConfig(_Config):
    """torchscale's ``EncoderConfig``: ``segment_length``/``dilated_ratio`` as lists or strings."""

    _DEFAULTS = _ENCODER
    _PREFIX = "encoder"


class DecoderConfig(_Config):
    """torchscale's ``DecoderConfig``: ``segment_length``/``dilated_ratio`` as lists or strings."""

    _DEFAULTS = _DECODER
    _PREFIX = "decoder"


def _check_supported(args) -> None:
    """One-line errors for the torchscale features this layer does not implement."""
    unsupported = [("moe_freq", args.moe_freq != 0, "mixture-of-experts layers"),
                   ("multiway", args.multiway, "multiway networks"),
                   ("rel_pos_buckets", args.rel_pos_buckets > 0 and args.max_rel_pos > 0,
                    "relative position buckets"),
                   ("attention_dropout", args.attention_dropout != 0, "attention dropout (expected 0.0)")]
    for name, bad, what in unsupported:
        if bad:
            raise NotImplementedError(f"{name}={getattr(args, name)!r}: longnet.compat does not support {what}")
    if args.segment_length is None:
        raise ValueError("segment_length and dilated_ratio must be set for LongNet (e.g. '[1024, 2048]', '[1, 2]')")


class XPOS(nn.Module):
    """torchscale's XPOS rotation with its per-length centred decay, on (B, N, H, D) rows.

    ``scale`` is a persistent buffer, as in torchscale's state dicts. The
    factors are computed in the buffer's dtype; x is returned in its own.
    """

    def __init__(self, head_dim: int, scale_base: int = 512):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"XPOS needs an even head dim, got {head_dim}")
        self.head_dim, self.scale_base = head_dim, scale_base
        self.register_buffer("scale", (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim))

    def factors(self, length: int, offset: int = 0, downscale: bool = False):
        """(cos * s, sin * s), each (length, D), for the last ``length`` of ``length + offset`` positions."""
        total = length + offset
        first = -total // 2  # the decay is centred on the whole (offset + length) span
        dt = self.scale.dtype
        expo = torch.arange(first, first + total, device=self.scale.device).to(dt).div(self.scale_base)
        decay = self.scale ** expo[:, None]
        half = decay.shape[1]
        # The angles are float32 products whatever the buffer's dtype, as in torchscale.
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, device=decay.device) / half))
        angle = (torch.arange(0, total, device=decay.device, dtype=torch.float)[:, None] * inv_freq).to(dt)
        decay, angle = decay[-length:], angle[-length:]
        if downscale:
            decay = 1 / decay
        return ((torch.cos(angle) * decay).repeat_interleave(2, -1),
                (torch.sin(angle) * decay).repeat_interleave(2, -1))

    def forward(self, x: Tensor, offset: int = 0, downscale: bool = False) -> Tensor:
        cos, sin = self.factors(x.shape[1], offset, downscale)
        xf = x.to(cos.dtype)
        pairs = xf.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class DilatedAttention(nn.Module):
    """torchscale's ``DilatedAttention``: projections, XPOS, dilated attention, sub-LN, output projection."""

    def __init__(self, args, embed_dim: int, num_heads: int, dropout: float = 0.0, self_attention: bool = False,
                 encoder_decoder_attention: bool = False, subln: bool = False):
        super().__init__()
        if not self_attention or encoder_decoder_attention:
            raise NotImplementedError("longnet.compat implements dilated self-attention only "
                                      "(self_attention=True, encoder_decoder_attention=False)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        self.args, self.embed_dim, self.num_heads = args, embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout
        self.self_attention, self.encoder_decoder_attention = self_attention, encoder_decoder_attention
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=args.layernorm_eps) if subln else None
        self.xpos = XPOS(self.head_dim, args.xpos_scale_base) if args.xpos_rel_pos else None
        self.attend = kernel_attend  # dense_attend: the plain-PyTorch reference of the same function

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
        if self.xpos is not None:
            k = self.xpos(k, offset=0, downscale=True)
            q = self.xpos(q, offset=0, downscale=False)
        return torchscale_dilated_attention(q, k, v, self.args.segment_length, self.args.dilated_ratio,
                                            is_causal=is_causal, scale=self.scaling, attend=self.attend)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, incremental_state=None,
                key_padding_mask: Optional[Tensor] = None, attn_mask=None, rel_pos=None,
                is_first_step: bool = False, is_causal: bool = False):
        """(attn (B, N, E), None), like torchscale; ``key_padding_mask`` (B, N), True = padding, is honoured."""
        if incremental_state is not None:
            raise NotImplementedError("incremental_state: longnet.compat does not implement incremental decoding")
        if attn_mask is not None or rel_pos is not None:
            raise ValueError("attn_mask and rel_pos must be None for dilated attention (as in torchscale)")
        b, n, e = query.shape
        if e != self.embed_dim or key.shape != query.shape or value.shape != query.shape:
            raise ValueError(f"query, key and value must all be (B, N, {self.embed_dim}), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        attn = per_sequence(lambda *t: self._attention(*t, is_causal), q, k, v, key_padding_mask)
        attn = attn.reshape(b, n, e)
        if self.inner_attn_ln is not None:
            attn = self.inner_attn_ln(attn)
        return self.out_proj(attn), None


def _activation(name: str):
    table = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
    if str(name) not in table:
        raise NotImplementedError(f"activation_fn must be one of {sorted(table)}, got {name!r}")
    return table[str(name)]


class FeedForwardNetwork(nn.Module):
    """torchscale's FFN: fc1, activation in float32, optional sub-LN (``ffn_layernorm``), fc2."""

    def __init__(self, embed_dim, ffn_dim, activation_fn, dropout, activation_dropout, layernorm_eps,
                 subln=False):
        super().__init__()
        self.embed_dim = embed_dim
        self.activation_fn = _activation(activation_fn)
        self.activation_dropout_module = nn.Dropout(activation_dropout)
        self.dropout_module = nn.Dropout(dropout)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=layernorm_eps) if subln else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = self.activation_dropout_module(self.activation_fn(h.float()).type_as(h))
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        return self.dropout_module(self.fc2(h))


class DropPath(nn.Module):
    """Stochastic depth per sample (kept samples scaled by 1 / keep probability), in training only."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class _Layer(nn.Module):
    """The pre-/post-LN residual block shared by the encoder and decoder layers."""

    def __init__(self, args, depth: int, prefix: str, deepnorm_alpha: float):
        super().__init__()
        _check_supported(args)
        self.args = args
        self.embed_dim = getattr(args, f"{prefix}_embed_dim")
        layers = getattr(args, f"{prefix}_layers")
        self.self_attn = DilatedAttention(args, self.embed_dim, getattr(args, f"{prefix}_attention_heads"),
                                          dropout=args.attention_dropout, self_attention=True, subln=args.subln)
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim, eps=args.layernorm_eps)
        self.dropout_module = nn.Dropout(args.dropout)
        rate = float(np.linspace(0, args.drop_path_rate, layers)[depth]) if args.drop_path_rate > 0 else 0.0
        self.drop_path = DropPath(rate) if args.drop_path_rate > 0 else None
        self.normalize_before = getattr(args, f"{prefix}_normalize_before")
        self.ffn_dim = getattr(args, f"{prefix}_ffn_embed_dim")
        self.ffn = FeedForwardNetwork(self.embed_dim, self.ffn_dim, args.activation_fn, args.dropout,
                                      args.activation_dropout, args.layernorm_eps, args.subln)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim, eps=args.layernorm_eps)
        self.alpha = deepnorm_alpha if args.deepnorm else 1.0

    def _sublayer(self, x: Tensor, norm: nn.Module, body) -> Tensor:
        residual = x
        if self.normalize_before:
            x = norm(x)
        x = body(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        x = residual * self.alpha + x
        return x if self.normalize_before else norm(x)

    def _block(self, x: Tensor, padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        def attn(h):
            return self.dropout_module(self.self_attn(h, h, h, key_padding_mask=padding_mask,
                                                      is_causal=is_causal)[0])
        x = self._sublayer(x, self.self_attn_layer_norm, attn)
        return self._sublayer(x, self.final_layer_norm, self.ffn)

    def _run(self, x, padding_mask, is_causal):
        if self.args.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(self._block, x, padding_mask, is_causal, use_reentrant=False)
        return self._block(x, padding_mask, is_causal)


class LongNetEncoderLayer(_Layer):
    """torchscale's encoder layer with dilated self-attention (non-causal)."""

    def __init__(self, args, depth: int, is_moe_layer: bool = False, is_encoder_decoder: bool = False):
        alpha = (math.pow(math.pow(args.encoder_layers, 4) * getattr(args, "decoder_layers", 0), 0.0625) * 0.81
                 if is_encoder_decoder else math.pow(2.0 * args.encoder_layers, 0.25))
        super().__init__(args, depth, "encoder", alpha)

    def forward(self, x, encoder_padding_mask, attn_mask=None, rel_pos=None, multiway_split_position=None,
                incremental_state=None):
        if attn_mask is not None or rel_pos is not None or multiway_split_position is not None:
            raise ValueError("attn_mask, rel_pos and multiway_split_position must be None for LongNet")
        if incremental_state is not None:
            raise NotImplementedError("incremental_state: longnet.compat does not implement incremental decoding")
        return self._run(x, encoder_padding_mask, False), None


class LongNetDecoderLayer(_Layer):
    """torchscale's decoder layer with causal dilated self-attention (no cross attention)."""

    def __init__(self, args, depth: int, is_moe_layer: bool = False, is_encoder_decoder: bool = False):
        if is_encoder_decoder:
            raise NotImplementedError("is_encoder_decoder=True: longnet.compat has no cross attention")
        super().__init__(args, depth, "decoder", math.pow(2.0 * args.decoder_layers, 0.25))
        self.encoder_attn = None
        self.encoder_attn_layer_norm = None

    def forward(self, x, encoder_out=None, encoder_padding_mask=None, incremental_state=None,
                self_attn_mask=None, self_attn_padding_mask=None, self_attn_rel_pos=None,
                cross_attn_rel_pos=None, is_first_step=False):
        if incremental_state is not None:
            raise NotImplementedError("incremental_state: longnet.compat does not implement incremental decoding")
        if self_attn_rel_pos is not None or cross_attn_rel_pos is not None:
            raise ValueError("relative position biases must be None for LongNet")
        return self._run(x, self_attn_padding_mask, True), None, None, None


def _init_scaling(model: nn.Module, args, layers: int, deepnorm_div: float, skip: str = "") -> None:
    """torchscale's init rescaling of fc1, fc2, out_proj and v_proj (deepnorm divides, sub-LN multiplies)."""
    factor = 1.0
    if args.deepnorm:
        factor = 1.0 / math.pow(deepnorm_div * layers, 0.25)
    if args.subln:
        factor = math.sqrt(math.log(layers * 2))
    if factor == 1.0:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (not skip or skip not in name) and any(s in name for s in ("fc1", "fc2", "out_proj", "v_proj")):
                p.mul_(factor)


def _bert_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        with torch.no_grad():
            module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


class _Stack(nn.Module):
    """Embedding, layers, final LayerNorm and output projection shared by the encoder and decoder."""

    def _build(self, args, prefix: str, embed_tokens, embed_positions, output_projection, layer_cls):
        _check_supported(args)
        self.args = args
        self.dropout_module = nn.Dropout(args.dropout)
        embed_dim = getattr(args, f"{prefix}_embed_dim")
        self.embed_dim = embed_dim
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(embed_dim)
        self.embed_tokens, self.embed_positions = embed_tokens, embed_positions
        if output_projection is None and not args.no_output_layer and args.vocab_size > 0:
            shared = getattr(args, f"share_{prefix}_input_output_embed")
            output_projection = nn.Linear(embed_dim, args.vocab_size, bias=False)
            if shared and embed_tokens is not None:
                output_projection.weight = embed_tokens.weight
            else:
                nn.init.normal_(output_projection.weight, mean=0, std=embed_dim ** -0.5)
        self.output_projection = output_projection
        self.layernorm_embedding = (nn.LayerNorm(embed_dim, eps=args.layernorm_eps)
                                    if args.layernorm_embedding else None)
        layers = getattr(args, f"{prefix}_layers")
        self.layers = nn.ModuleList([layer_cls(args, depth=i) for i in range(layers)])
        self.num_layers = len(self.layers)
        if args.bert_init:
            self.apply(_bert_init)

    def _embed(self, tokens, token_embedding, **position_kwargs):
        if token_embedding is None:
            if self.embed_tokens is None:
                raise ValueError("token_embeddings must be given when the model has no embed_tokens")
            token_embedding = self.embed_tokens(tokens)
        x = embed = self.embed_scale * token_embedding
        if self.embed_positions is not None:
            x = x + self.embed_positions(tokens if tokens is not None else x, **position_kwargs)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x), embed

    def _project(self, x: Tensor, features_only: bool) -> Tensor:
        if features_only or self.output_projection is None:
            return x
        return self.output_projection(x)


class LongNetEncoder(_Stack):
    """torchscale's ``LongNetEncoder``: ``forward(src_tokens, ..., token_embeddings=...)`` -> output dict."""

    def __init__(self, args, embed_tokens=None, embed_positions=None, output_projection=None,
                 is_encoder_decoder=False, **kwargs):
        super().__init__(**kwargs)
        if is_encoder_decoder:
            raise NotImplementedError("is_encoder_decoder=True: longnet.compat has no cross attention")
        self._build(args, "encoder", embed_tokens, embed_positions, output_projection, LongNetEncoderLayer)
        self.layer_norm = (nn.LayerNorm(self.embed_dim, eps=args.layernorm_eps)
                           if args.encoder_normalize_before and args.normalize_output else None)
        self.relative_position = None
        _init_scaling(self, args, args.encoder_layers, 8.0)

    def forward(self, src_tokens, encoder_padding_mask=None, attn_mask=None, return_all_hiddens=False,
                token_embeddings=None, multiway_split_position=None, features_only=False,
                incremental_state=None, positions=None, **kwargs):
        """{"encoder_out" (B, N, E), "encoder_embedding", "encoder_padding_mask" (B, N), "encoder_states", "l_aux"}.

        ``encoder_states`` (with ``return_all_hiddens``) holds the embedded
        input and each layer's output, before the final LayerNorm.
        """
        if src_tokens is None and token_embeddings is None:
            raise ValueError("one of src_tokens and token_embeddings must be given")
        if attn_mask is not None or multiway_split_position is not None:
            raise ValueError("attn_mask and multiway_split_position must be None for LongNet")
        if incremental_state is not None:
            raise NotImplementedError("incremental_state: longnet.compat does not implement incremental decoding")
        ref = src_tokens if src_tokens is not None else token_embeddings
        if encoder_padding_mask is None:
            encoder_padding_mask = torch.zeros(ref.shape[:2], dtype=torch.bool, device=ref.device)
        x, embedding = self._embed(src_tokens, token_embeddings, positions=positions)
        x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        states = [x] if return_all_hiddens else []
        l_aux = []
        for layer in self.layers:
            x, aux = layer(x, encoder_padding_mask=encoder_padding_mask)
            if return_all_hiddens:
                states.append(x)
            l_aux.append(aux)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {"encoder_out": self._project(x, features_only), "encoder_embedding": embedding,
                "encoder_padding_mask": encoder_padding_mask, "encoder_states": states, "l_aux": l_aux}


class LongNetDecoder(_Stack):
    """torchscale's ``LongNetDecoder`` (causal): ``forward(prev_output_tokens, ...)`` -> (x, extras)."""

    def __init__(self, args, embed_tokens=None, embed_positions=None, output_projection=None,
                 is_encoder_decoder=False, **kwargs):
        super().__init__(**kwargs)
        if is_encoder_decoder:
            raise NotImplementedError("is_encoder_decoder=True: longnet.compat has no cross attention")
        self._build(args, "decoder", embed_tokens, embed_positions, output_projection, LongNetDecoderLayer)
        self.layer_norm = (nn.LayerNorm(self.embed_dim, eps=args.layernorm_eps)
                           if args.decoder_normalize_before else None)
        self.self_attn_relative_position = None
        self.cross_attn_relative_position = None
        _init_scaling(self, args, args.decoder_layers, 8.0, skip="encoder_attn")

    def forward(self, prev_output_tokens, self_attn_padding_mask=None, encoder_out=None, incremental_state=None,
                features_only=False, return_all_hiddens=False, token_embeddings=None, **kwargs):
        """(x (B, N, E or vocab), {"inner_states": [embedded input, each layer's output], "l_aux", "attn": None})."""
        if incremental_state is not None:
            raise NotImplementedError("incremental_state: longnet.compat does not implement incremental decoding")
        if encoder_out is not None:
            raise NotImplementedError("encoder_out: longnet.compat has no cross attention")
        x, _ = self._embed(prev_output_tokens, token_embeddings, incremental_state=None)
        inner_states, l_aux = [x], []
        for layer in self.layers:
            x, _, _, aux = layer(x, self_attn_padding_mask=self_attn_padding_mask)
            inner_states.append(x)
            l_aux.append(aux)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if not features_only and self.output_projection is None:
            raise ValueError("features_only=False needs an output projection (vocab_size > 0 or output_projection)")
        return self._project(x, features_only), {"inner_states": inner_states, "l_aux": l_aux, "attn": None}


def _named(layers, dim, ffn, heads, ratio, segment, block_shift=True) -> Dict[str, Any]:
    return {"encoder_layers": layers, "encoder_embed_dim": dim, "encoder_ffn_embed_dim": ffn,
            "encoder_attention_heads": heads, "dilated_ratio": ratio, "segment_length": segment,
            "block_shift": block_shift, "flash_attention": True, "use_xmoe": False, "moe_top1_expert": False,
            "moe_freq": 0, "moe_expert_count": 0}


_R5, _S5 = "[1, 2, 4, 8, 16]", "[1024, 2048, 4096, 8192, 16384]"
_R3, _S3 = "[1, 2, 4]", "[512, 1024, 2048]"

# Prov-GigaPath's named LongNet encoders (gigapath/torchscale/model/LongNetConfig.py).
NAMED_CONFIGS: Dict[str, Dict[str, Any]] = {
    "LongNet_8_layers_256_dim_mlp2": _named(8, 256, 512, 16, _R3, _S3),
    "LongNet_12_layers_256_dim_mlp2": _named(12, 256, 512, 16, _R3, _S3),
    "LongNet_8_layers_256_dim": _named(8, 256, 1024, 16, _R5, _S5),
    "LongNet_12_layers_256_dim": _named(12, 256, 1024, 16, _R5, _S5),
    "LongNet_3_layers_384_dim": _named(3, 384, 1536, 16, _R5, _S5),
    "LongNet_6_layers_384_dim": _named(6, 384, 1536, 16, _R5, _S5),
    "LongNet_12_layers_384_dim": _named(12, 384, 1536, 16, _R5, _S5),
    "LongNet_12_layers_512_dim": _named(12, 512, 1024, 8, _R3, _S3),
    "LongNet_3_layers_768_dim": _named(3, 768, 3072, 16, _R5, _S5),
    "LongNet_6_layers_768_dim": _named(6, 768, 3072, 16, _R5, "[1024, 4096, 8192, 16384, 65536]"),
    "LongNet_8_layers_768_dim": _named(8, 768, 3072, 16, _R5, _S5),
    "LongNet_12_layers_768_dim": _named(12, 768, 3072, 16, _R5, _S5),
    "LongNet_8_layers_1024_dim": _named(8, 1024, 4096, 16, _R5, _S5),
    "LongNet_24_layers_1024_dim": _named(24, 1024, 4096, 16, _R5, _S5),
    "LongNet_3_layers_1536_dim": _named(3, 1536, 6144, 16, _R5, _S5),
    "LongNet_6_layers_1536_dim": _named(6, 1536, 6144, 16, _R5, _S5),
    "LongNet_8_layers_1536_dim": _named(8, 1536, 6144, 16, _R5, _S5),
    "LongNet_12_layers_1536_dim": _named(12, 1536, 6144, 16, _R5, _S5),
    "LongNet_Vanilla_12_layers_256_dim": _named(12, 256, 512, 8, "[1]", "[10000000]", False),
    "LongNet_Vanilla_6_layers_768_dim": _named(6, 768, 3072, 16, "[1]", "[10000000]", False),
    "LongNet_Vanilla_6_layers_1536_dim": _named(6, 1536, 6144, 16, "[1]", "[10000000]", False),
    "LongNet_test": _named(1, 192, 192, 8, _R3, _S3),
}

# ``torchscale.model.LongNetConfig.<name>`` in GigaPath's vendored copy.
LongNetConfig = types.SimpleNamespace(**NAMED_CONFIGS)


def _named_config(config_name: str) -> Dict[str, Any]:
    if config_name not in NAMED_CONFIGS:
        raise ValueError(f"config_name must be one of the named LongNet configs {sorted(NAMED_CONFIGS)}, "
                         f"got {config_name!r}")
    return dict(NAMED_CONFIGS[config_name])


def make_longnet(args) -> LongNetEncoder:
    """GigaPath's ``make_longnet(args)``: the named config ``args.arch`` with ``args.dropout``/``drop_path_rate``."""
    cfg = _named_config(args.arch)
    for key in ("dropout", "drop_path_rate"):
        if hasattr(args, key):
            cfg[key] = getattr(args, key)
    return LongNetEncoder(EncoderConfig(**cfg))


def make_longnet_from_name(config_name: str, dilated_ratio="[1, 2, 4, 8, 16]",
                           segment_length="[1024, 2048, 4096, 8192, 16384]", drop_path_rate: float = 0.1,
                           dropout: float = 0.1, **overrides) -> LongNetEncoder:
    """GigaPath's ``make_longnet_from_name``: a named encoder with these segments, dilations and dropouts.

    ``overrides`` (a longnet extension) replace fields of the named config,
    e.g. for a small model with the same structure; with overrides, a name
    that is not a named config starts from :class:`EncoderConfig`'s defaults.
    """
    cfg = dict(NAMED_CONFIGS.get(config_name, {})) if overrides else _named_config(config_name)
    cfg.update(dropout=dropout, drop_path_rate=drop_path_rate, dilated_ratio=dilated_ratio,
               segment_length=segment_length, **overrides)
    return LongNetEncoder(EncoderConfig(**cfg))
