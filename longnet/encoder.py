"""A native, non-causal LongNet encoder over embeddings, e.g. the tile features of a whole slide.

Layouts: input x (B, N, d_in) with an optional ``key_padding_mask`` (B, N) bool (True = a real
token; any padding layout), or packed x (T, d_in) with ``cu_seqlens`` (B + 1,) int32
(:mod:`longnet.varlen`). Inside, every layer runs on the packed real tokens only, so each
sequence is encoded exactly as if alone (its positions start at 0, its segments at its own
first token, docs/design.md §1-2) and padding costs nothing.

Each sequence is [CLS] (optional) + its tokens: input projection d_in -> d_model, learned or
sin-cos positions (optional), ``n_layers`` pre-LN blocks (non-causal dilated attention and an
FFN, MAGNETO's Sub-LayerNorm by default), a final LayerNorm. The output is
:class:`EncoderOutput`: hidden states and one pooled vector per sequence (the CLS state, or the
mean over its tokens).

Presets (:data:`ENCODER_PRESETS`): ``gigapath`` is Prov-GigaPath's slide-encoder shape
(d_in 1536, 12 layers, 768 wide, 16 heads, w = 1024, 5792, 32768, 185363, 1048576,
r = 1, 2, 4, 8, 16); ``tiny`` is for tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ACTIVATIONS, _check_bool, _check_choice, _check_float, _check_int
from .model import FeedForward, magneto_gain
from .modules import MultiheadDilatedAttention
from .patterns import DilatedPattern
from .varlen import check_cu_seqlens, check_varlen_args, pad, unpad

__all__ = ["LongNetEncoderConfig", "LongNetEncoder", "EncoderOutput", "ENCODER_PRESETS", "encoder_preset"]

POSITIONS = ("none", "learned", "sincos")
POOLINGS = ("cls", "mean")


@dataclass
class LongNetEncoderConfig:
    """Settings of :class:`LongNetEncoder`; validated on construction (errors name the field).

    Attributes:
        d_in: width of the input embeddings.
        n_layers, d_model, n_heads, d_ffn: depth, width, heads, FFN hidden size.
        segment_lengths, dilation_rates, segment_phases: the dilation patterns of every layer
            (phases empty = all 0).
        cls_token: prepend a learned [CLS] token to every sequence.
        positions: "none", "learned" (needs ``max_positions``) or "sincos" (1-D, over each
            sequence's positions, [CLS] at 0).
        max_positions: learned positions only: the longest sequence, [CLS] included.
        pooling: "cls" (needs ``cls_token``) or "mean" (over each sequence's tokens, not [CLS]).
        sub_layernorm: MAGNETO's Sub-LayerNorm and init gain in attention and FFN.
        dropout, activation, bias, layer_norm_eps: as in :class:`longnet.LongNetConfig`.
        activation_checkpointing: recompute each block in the backward (less memory).
        attention_backend: None (best available), "torch", "math", "reference", ...
    """

    d_in: int = 1536
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 16
    d_ffn: int = 3072
    segment_lengths: Tuple[int, ...] = (1024, 5792, 32768, 185363, 1048576)
    dilation_rates: Tuple[int, ...] = (1, 2, 4, 8, 16)
    segment_phases: Tuple[int, ...] = ()
    cls_token: bool = True
    positions: str = "none"
    max_positions: int = 0
    pooling: str = "cls"
    sub_layernorm: bool = True
    dropout: float = 0.0
    activation: str = "gelu"
    bias: bool = True
    layer_norm_eps: float = 1e-6
    activation_checkpointing: bool = False
    attention_backend: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("d_in", "n_layers", "d_model", "n_heads", "d_ffn"):
            setattr(self, name, _check_int(name, getattr(self, name)))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        pattern = self.pattern  # validates lengths, rates and phases
        self.segment_lengths, self.dilation_rates = pattern.segment_lengths, pattern.dilation_rates
        self.segment_phases = pattern.segment_phases if self.segment_phases else ()
        for name in ("cls_token", "sub_layernorm", "bias", "activation_checkpointing"):
            _check_bool(name, getattr(self, name))
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        self.max_positions = _check_int("max_positions", self.max_positions, 0)
        if self.positions == "learned" and self.max_positions == 0:
            raise ValueError("positions='learned' needs max_positions >= 1 (the longest sequence, [CLS] included)")
        if self.pooling == "cls" and not self.cls_token:
            raise ValueError("pooling='cls' needs cls_token=True; use pooling='mean' without a [CLS] token")
        if self.positions == "sincos" and self.d_model % 2:
            raise ValueError(f"positions='sincos' needs an even d_model, got {self.d_model}")
        self.dropout = _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        self.layer_norm_eps = _check_float("layer_norm_eps", self.layer_norm_eps, 0.0, lo_open=True)
        if self.attention_backend is not None and not isinstance(self.attention_backend, str):
            raise TypeError(f"attention_backend must be a string or None, got {self.attention_backend!r}")

    @property
    def pattern(self) -> DilatedPattern:
        return DilatedPattern(self.segment_lengths, self.dilation_rates, self.segment_phases or None)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("segment_lengths", "dilation_rates", "segment_phases"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LongNetEncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LongNetEncoderConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        for name in ("segment_lengths", "dilation_rates", "segment_phases"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


ENCODER_PRESETS: Dict[str, Dict[str, Any]] = {
    "gigapath": {},  # the defaults above
    "tiny": dict(d_in=32, n_layers=2, d_model=64, n_heads=4, d_ffn=128, segment_lengths=(256, 1024, 4096),
                 dilation_rates=(1, 2, 4)),
}


def encoder_preset(name: str, **overrides) -> LongNetEncoderConfig:
    """A named :class:`LongNetEncoderConfig` (:data:`ENCODER_PRESETS`) with field overrides."""
    if name not in ENCODER_PRESETS:
        raise ValueError(f"encoder preset must be one of {sorted(ENCODER_PRESETS)}, got {name!r}")
    return LongNetEncoderConfig(**{**ENCODER_PRESETS[name], **overrides})


class EncoderOutput(NamedTuple):
    """hidden_states: (B, 1 + N, d_model) for padded input ([CLS] at 0, token n at 1 + n, 0 on padding;
    (B, N, d_model) without [CLS]) or packed (T + B, d_model) / (T, d_model) with ``cu_seqlens``;
    pooled: (B, d_model); cu_seqlens: the packed hidden states' (B + 1,) int32, None for padded input."""

    hidden_states: Tensor
    pooled: Tensor
    cu_seqlens: Optional[Tensor]


class EncoderBlock(nn.Module):
    """One pre-LN block on packed x (T, E) with cu_seqlens: non-causal dilated attention, then an FFN."""

    def __init__(self, cfg: LongNetEncoderConfig):
        super().__init__()
        gain = magneto_gain(cfg.n_layers) if cfg.sub_layernorm else 1.0
        p = cfg.pattern
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = MultiheadDilatedAttention(
            cfg.d_model, cfg.n_heads, p.segment_lengths, p.dilation_rates, segment_phases=p.segment_phases,
            dropout=cfg.dropout, bias=cfg.bias, causal=False, sub_layernorm=cfg.sub_layernorm,
            layer_norm_eps=cfg.layer_norm_eps, backend=cfg.attention_backend, magneto_gain=gain)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, activation=cfg.activation, dropout=cfg.dropout,
                               bias=cfg.bias, layer_norm_eps=cfg.layer_norm_eps, gain=gain,
                               sub_layernorm=cfg.sub_layernorm)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + F.dropout(self.attn.forward_packed(self.attn_norm(x), cu_seqlens), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)


def sincos_positions(positions: Tensor, dim: int) -> Tensor:
    """(T, dim) float32 1-D sin-cos embedding of integer positions (T,): sin then cos of p / 10000^(2i/dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    ang = positions.to(torch.float32)[:, None] * freq
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class LongNetEncoder(nn.Module):
    """x (B, N, d_in) [+ key_padding_mask (B, N)] -> :class:`EncoderOutput`; see the module docstring."""

    def __init__(self, config: Optional[LongNetEncoderConfig] = None, **overrides):
        super().__init__()
        if config is None:
            config = LongNetEncoderConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, LongNetEncoderConfig):
            raise TypeError(f"config must be a LongNetEncoderConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.proj = nn.Linear(cfg.d_in, cfg.d_model, bias=cfg.bias)
        self.cls = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.cls_token else None
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> EncoderOutput:
        """Padded x (B, N, d_in); ``key_padding_mask`` (B, N) bool, None = no padding."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"x must have shape (B, N, {self.config.d_in}), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        if key_padding_mask is None:
            key_padding_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        packed, indices, cu, _ = unpad(x, key_padding_mask)
        hidden, pooled, cu_out = self.forward_packed(packed, cu)
        if self.cls is None:
            return EncoderOutput(pad(hidden, indices, b, n), pooled, None)
        # Token n of row b sits at 1 + n of a (B, 1 + N) grid, its [CLS] at 0.
        out_idx = torch.cat([torch.arange(b, device=x.device) * (n + 1), indices + indices // n + 1])
        src = torch.cat([hidden.index_select(0, cu_out[:-1].long()),
                         hidden.index_select(0, _token_rows(cu_out, hidden.shape[0]))])
        return EncoderOutput(pad(src, out_idx, b, n + 1), pooled, None)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor) -> EncoderOutput:
        """Packed x (T, d_in) with cu_seqlens (B + 1,) int32 -> hidden (T [+ B], d_model) packed, with its cu_seqlens."""
        if x.ndim != 2 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"x must have shape (T, {self.config.d_in}) with cu_seqlens, got {tuple(x.shape)}")
        check_varlen_args(x, cu_seqlens, None, None)
        check_cu_seqlens(cu_seqlens.tolist(), x.shape[0])  # before any row is indexed by it
        h = self.proj(x)
        cu = cu_seqlens
        if self.cls is not None:
            h, cu = self._with_cls(h, cu_seqlens)
        if self.config.positions != "none":
            h = h + self._positions(cu, h.shape[0]).to(h.dtype)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, cu, use_reentrant=False)
            else:
                h = block(h, cu)
        h = self.norm(h)
        return EncoderOutput(h, self._pool(h, cu), cu)

    def _with_cls(self, h: Tensor, cu: Tensor) -> Tuple[Tensor, Tensor]:
        """(T + B, E) with the [CLS] row before each sequence, and its cu_seqlens."""
        bsz = cu.numel() - 1
        cu_out = cu + torch.arange(bsz + 1, device=cu.device, dtype=cu.dtype)
        rows = torch.cat([cu_out[:-1].long(), _token_rows(cu_out, h.shape[0] + bsz)])
        src = torch.cat([self.cls.to(h.dtype).expand(bsz, -1), h])
        out = h.new_empty(h.shape[0] + bsz, h.shape[1]).index_copy(0, rows, src)
        return out, cu_out

    def _positions(self, cu: Tensor, total: int) -> Tensor:
        """(T, E) position embeddings: each sequence's positions from 0."""
        lengths = cu.diff().long()
        positions = torch.arange(total, device=cu.device) - torch.repeat_interleave(
            cu[:-1].long(), lengths, output_size=total)
        if self.pos is None:
            return sincos_positions(positions, self.config.d_model)
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > self.config.max_positions:
            raise ValueError(f"a sequence of {longest} positions ([CLS] included) is longer than max_positions = "
                             f"{self.config.max_positions}")
        return self.pos(positions)

    def _pool(self, h: Tensor, cu: Tensor) -> Tensor:
        """(B, E): the [CLS] state of each sequence, or the mean of its token states (0 for an empty one)."""
        if self.config.pooling == "cls":
            return h.index_select(0, cu[:-1].long())
        bsz = cu.numel() - 1
        lengths = cu.diff().long()
        first = 1 if self.cls is not None else 0
        seq = torch.repeat_interleave(torch.arange(bsz, device=h.device), lengths, output_size=h.shape[0])
        keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        if first:
            keep[cu[:-1].long()] = False
        sums = h.new_zeros(bsz, h.shape[1]).index_add(0, seq[keep], h[keep])
        counts = (lengths - first).clamp(min=1).to(h.dtype)
        return sums / counts[:, None]


def _token_rows(cu_out: Tensor, total: int) -> Tensor:
    """Rows of a packed batch with a [CLS] first in each sequence (``cu_out``) that hold tokens, in order."""
    is_token = torch.ones(total, dtype=torch.bool, device=cu_out.device)
    is_token[cu_out[:-1].long()] = False
    return is_token.nonzero().squeeze(1)
