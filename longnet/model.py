"""The LongNet language model: a decoder-only Transformer whose attention is dilated.

Layouts: tokens (B, N) int64 -> logits (B, N, V); hidden states (B, N, E); inside
attention q, k, v are (B, N, H, D).

Each block is pre-LN with MAGNETO's Sub-LayerNorm (Wang et al. 2022):

    x = x + Dropout(out_proj(SubLN(DilatedAttn(LN(x)))))
    x = x + Dropout(fc2(SubLN(act(fc1(LN(x))))))

and MAGNETO's initialisation: Xavier everywhere, with v_proj, out_proj, fc1 and fc2
scaled by ``sqrt(log(2 * n_layers))``. Attention is causal dilated attention
(:func:`longnet.dilated_attention`, docs/design.md §1-2) with XPOS relative positions.

Decoding (:meth:`LongNetLM.generate`) keeps a key/value cache and computes, for the new
token at position p, exactly the row p of the full forward: for each pattern (w, r), p
lies in segment a = floor(p / w) * w with offset s = (p - a) mod r; the heads h with
h mod r = s keep it, and they attend to the cached keys a + s, a + s + r, ..., p (a
strided slice of the cache, no gather); the patterns are merged by their log-sum-exp
(docs/design.md §2) and heads that no pattern keeps output 0. Work per token is
O(sum_i w_i / r_i), independent of the context length, and so is the cache's memory:
no query reads a key more than max(w) - 1 positions back, so the cache grows by doubling
up to 2 max(w) slots and then drops the positions no later query reads (:class:`KVCache`).

One block forward (:meth:`LongNetBlock.forward`) serves the three paths; they differ only
in how attention gets its keys and values: the full op (training forward), the full op
while filling the cache (:meth:`LongNetLM.prefill`), or attending to the cache
(:meth:`LongNetLM.decode_step`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backends.numerics import default_scale
from .checks import check_int
from .config import LongNetConfig, xpos_max_length
from .modules import MultiheadDilatedAttention
from .decode import decode_attention
from .patterns import broadcast_pattern
from .varlen import check_cu_seqlens, check_varlen_args, cu_seqlens_from_lengths, pad, unpad

__all__ = ["LongNetConfig", "LongNetLM", "LongNetTransformer", "FeedForward", "LongNetBlock", "KVCache"]


def magneto_gain(n_layers: int) -> float:
    """MAGNETO's depth-dependent init gain for decoder-only models: sqrt(log(2 L))."""
    return math.sqrt(math.log(2 * n_layers))


def _activation(name: str):
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}[name]


class FeedForward(nn.Module):
    """x (B, N, E) -> (B, N, E): fc1 -> activation -> dropout -> Sub-LayerNorm -> fc2."""

    def __init__(self, d_model: int, d_ffn: int, *, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True, layer_norm_eps: float = 1e-5, gain: float = 1.0, sub_layernorm: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ffn, bias=bias)
        self.fc2 = nn.Linear(d_ffn, d_model, bias=bias)
        self.sub_ln = nn.LayerNorm(d_ffn, eps=layer_norm_eps) if sub_layernorm else nn.Identity()
        self.act = _activation(activation)
        self.dropout = dropout
        self.gain = gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight, gain=self.gain)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.act(self.fc1(x)), self.dropout, self.training)
        return self.fc2(self.sub_ln(h))


def gpt_init(block: "LongNetBlock", n_layers: int) -> None:
    """GPT-2's initialisation of a block: N(0, 0.02) weights, N(0, 0.02 / sqrt(2 L)) for the two
    projections into the residual stream, zero biases."""
    attn, ffn = block.attn, block.ffn
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, ffn.fc1, ffn.fc2):
        std = 0.02 / math.sqrt(2 * n_layers) if lin in (attn.out_proj, ffn.fc2) else 0.02
        nn.init.normal_(lin.weight, std=std)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


class LongNetBlock(nn.Module):
    """One pre-LN block: x (B, N, E) -> (B, N, E); MAGNETO's (``block="magneto"``) or GPT-2's
    (``block="gpt"``: no Sub-LN, :func:`gpt_init`), with dilated attention in both."""

    def __init__(self, cfg: LongNetConfig):
        super().__init__()
        magneto = cfg.block == "magneto"
        gain = magneto_gain(cfg.n_layers) if magneto else 1.0
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        pattern = cfg.pattern
        self.attn = MultiheadDilatedAttention(
            cfg.d_model, cfg.n_heads, pattern.segment_lengths, pattern.dilation_rates,
            segment_phases=pattern.segment_phases, dropout=cfg.dropout,
            bias=cfg.bias, causal=True, qk_norm=cfg.qk_norm, sub_layernorm=magneto, xpos=cfg.xpos,
            xpos_scale_base=cfg.xpos_scale_base, layer_norm_eps=cfg.layer_norm_eps,
            backend=cfg.attention_backend, magneto_gain=gain, short_conv=cfg.short_conv)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, activation=cfg.activation, dropout=cfg.dropout,
                               bias=cfg.bias, layer_norm_eps=cfg.layer_norm_eps, gain=gain, sub_layernorm=magneto)
        self.dropout = cfg.dropout
        if not magneto:
            gpt_init(self, cfg.n_layers)

    def forward(self, x: Tensor, attention: Optional[Callable[[MultiheadDilatedAttention, Tensor], Tensor]] = None
                ) -> Tensor:
        """x (B, N, E) -> (B, N, E); the only place the block's computation is written.

        ``attention`` None runs the module ``self.attn`` on LN(x), so the hooks that sequence
        parallelism installs (forward pre-hook, attention_fn, position_offset, xpos_center)
        all apply. Cached decoding passes ``attention(attn, h)``: h (B, N, E) -> attention
        output (B, N, H, D), which decides where keys and values come from; the block then
        finishes it with the module's dropout, Sub-LN and out_proj.
        """
        h = self.attn_norm(x)
        a = self.attn(h) if attention is None else self.attn.finish(attention(self.attn, h))
        x = x + F.dropout(a, self.dropout, self.training)
        return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)


@dataclass
class KVCache:
    """Per-layer keys (XPOS-rotated, not decayed) and values, each (B, capacity, H, D).

    Each sequence b has its own length: slot i of row b holds position ``starts[b] + i`` of
    sequence b, and positions ``starts[b] .. lengths[b] - 1`` are filled. A query at position p
    reads only keys of its own segments, none before p - window + 1 (window = max(w)), so
    :meth:`make_room` drops older positions, per sequence. Until then the buffers double when
    full; afterwards they stay at 2 * window slots and each drop frees about half of them, so
    storing a token costs amortised O(1) and each sequence keeps O(min(length, window)).
    ``decay`` is (window, D): row d holds XPOS's key factor zeta^(d / scale_base) for a key
    d positions before the query (<= 1), or None without XPOS.
    """

    keys: List[Tensor]
    values: List[Tensor]
    lengths: List[int]
    decay: Optional[Tensor]
    window: int
    starts: List[int]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        """The common length of every sequence (a batch of one length)."""
        return _common("lengths", self.lengths)

    @property
    def start(self) -> int:
        """The common first kept position of every sequence (a batch of one length)."""
        return _common("starts", self.starts)

    def slots(self) -> List[int]:
        """The slot of each sequence's next position ``lengths[b]``."""
        return [n - s for n, s in zip(self.lengths, self.starts)]

    def fill(self, layer: int, b: int, k: Tensor, v: Tensor) -> None:
        """Store sequence b's prompt keys and values (L, H, D) of one layer, positions starts[b]..L-1."""
        start = self.starts[b]
        n = k.shape[0] - start
        self.keys[layer][b, :n] = k[start:]
        self.values[layer][b, :n] = v[start:]

    def put(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, 1, H, D) of each sequence's position ``lengths[b]`` (after :meth:`make_room`)."""
        slots = self.slots()
        if len(set(slots)) == 1:
            self.keys[layer][:, slots[0]] = k[:, 0]
            self.values[layer][:, slots[0]] = v[:, 0]
            return
        rows = torch.arange(self.batch, device=k.device)
        idx = torch.tensor(slots, device=k.device)
        self.keys[layer][rows, idx] = k[:, 0]
        self.values[layer][rows, idx] = v[:, 0]

    def make_room(self) -> None:
        """Make sure each position ``lengths[b]`` has a slot: drop positions no later query reads, and grow."""
        if max(self.slots()) < self.capacity:
            return
        keep_from = [max(s, n - self.window + 1) for n, s in zip(self.lengths, self.starts)]
        kept = [n - f for n, f in zip(self.lengths, keep_from)]
        capacity = max(min(2 * self.capacity, 2 * self.window), max(kept) + 1)
        src = [f - s for f, s in zip(keep_from, self.starts)]
        self.keys = [_compact(t, src, kept, capacity) for t in self.keys]
        self.values = [_compact(t, src, kept, capacity) for t in self.values]
        self.starts = keep_from


def _common(name: str, values: List[int]) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"the cached sequences have different {name} {values}; read cache.{name}")
    return values[0]


def _compact(buf: Tensor, src: List[int], kept: List[int], capacity: int) -> Tensor:
    """buf (B, C, H, D) with row b's slots src[b]..src[b]+kept[b]-1 moved to the front of ``capacity`` slots."""
    out = buf if capacity == buf.shape[1] else buf.new_zeros((buf.shape[0], capacity) + tuple(buf.shape[2:]))
    same = len(set(src)) == 1 and len(set(kept)) == 1
    for b in [slice(None)] if same else range(buf.shape[0]):
        s, n = (src[0], kept[0]) if same else (src[b], kept[b])
        out[b, :n] = buf[b, s:s + n].clone()  # the ranges may overlap
    return out


def _rotated_qkv(attn: MultiheadDilatedAttention, h: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """h (B, N, E) -> q, k, v (B, N, H, D), qk-normed and XPOS-rotated by positions (N,), not decayed."""
    q, k, v = attn.project_raw(h, positions)
    if attn.xpos is not None:
        q, k = attn.xpos.rotate(q, positions), attn.xpos.rotate(k, positions)
    return q, k, v


def _packed_attention(cu_seqlens: Tensor, lengths: List[int], cache: Optional[KVCache] = None,
                      layer: int = 0):
    """Block attention for packed sequences: h (1, T, E), sequence b at rows cu_seqlens[b]..[b+1].

    Each sequence gets positions from 0 and XPOS's centre of a forward over it alone, and the op
    segments it from its own start (varlen), so every row equals that sequence run alone. With a
    cache, each sequence's keys and values fill its row (prefill).
    """
    def attention(attn: MultiheadDilatedAttention, h: Tensor) -> Tensor:
        positions, centers = _packed_positions(lengths, h.device)
        q, k, v = _rotated_qkv(attn, h, positions)
        if cache is not None:
            bounds = cu_seqlens.tolist()
            for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                cache.fill(layer, b, k[0, lo:hi], v[0, lo:hi])
        if attn.xpos is not None:
            q, k = attn.xpos.scale(q, k, attn.xpos.decay(positions - centers, 0.0).to(h.device)[None, :, None, :])
        out = attn.attention_fn(q[0], k[0], v[0], attn.segment_lengths, attn.dilation_rates,
                                is_causal=attn.causal, backend=attn.backend, cu_seqlens=cu_seqlens,
                                **attn._pattern_kwargs)
        return out[None]
    return attention


def _packed_positions(lengths: List[int], device) -> Tuple[Tensor, Tensor]:
    """(positions (T,) restarting at 0 per sequence, XPOS centre (T,) of each row's sequence)."""
    n = torch.tensor(lengths, dtype=torch.int64)
    first = torch.repeat_interleave(n.cumsum(0) - n, n)
    positions = torch.arange(int(n.sum())) - first
    centers = torch.repeat_interleave((n - 1).clamp(min=0).double() / 2, n)
    return positions.to(device), centers.to(device)


def _prefill_attention(cache: KVCache, layer: int, positions: Tensor):
    """Block attention for a prompt (B, N) at positions (N,): the full op, filling layer ``layer`` of the cache."""
    def attention(attn: MultiheadDilatedAttention, h: Tensor) -> Tensor:
        q, k, v = _rotated_qkv(attn, h, positions)
        for b in range(k.shape[0]):
            cache.fill(layer, b, k[b], v[b])
        if attn.xpos is not None:
            # Decayed around the centre MultiheadDilatedAttention.project uses, so the logits
            # equal the training forward's.
            center = attn.xpos.default_center(0, positions.numel() - 1)
            q, k = attn.xpos.scale(q, k, attn.xpos.decay(positions, center).to(h.device)[None, :, None, :])
        return attn.attend(q, k, v)
    return attention


def _decode_attention(cache: KVCache, layer: int, positions: Tensor, scale: float):
    """Block attention for one new token per sequence at ``positions`` (B,): stores its k, v, attends to the cache."""
    def attention(attn: MultiheadDilatedAttention, h: Tensor) -> Tensor:
        # Rows as positions of one sequence, so each row is rotated by its own position.
        q, k, v = (x.transpose(0, 1) for x in _rotated_qkv(attn, h.transpose(0, 1), positions))
        cache.put(layer, k, v)
        out = decode_attention(q[:, 0], cache.keys[layer], cache.values[layer], cache.lengths,
                               attn.segment_lengths, attn.dilation_rates, scale,
                               segment_phases=attn.segment_phases, slots=cache.slots(), decay=cache.decay)
        return out.to(h.dtype)[:, None]
    return attention


class LongNetLM(nn.Module):
    """LongNet decoder-only language model; ``model(tokens)`` maps (B, N) int64 to logits (B, N, V).

    ``LongNetLM(config)`` or ``LongNetLM(n_layers=2, d_model=64, ...)`` (fields of
    :class:`LongNetConfig`; keywords override the config's fields).
    """

    def __init__(self, config: Optional[LongNetConfig] = None, **overrides):
        super().__init__()
        if config is None:
            config = LongNetConfig(**overrides)
        elif not isinstance(config, LongNetConfig):
            raise TypeError(f"config must be a LongNetConfig or None, got {type(config).__name__}")
        elif overrides:
            config = LongNetConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(LongNetBlock(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.pos_embed = nn.Embedding(c.max_positions, c.d_model) if c.max_positions else None
        std = c.d_model ** -0.5 if c.block == "magneto" else 0.02
        nn.init.normal_(self.embed.weight, std=std)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)

    # ------------------------------------------------------------------ training forward

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor (B, N) of int64, got {type(tokens).__name__}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, N), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor (int64), got {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}); need B >= 1 and N >= 1")

    def forward(self, tokens: Tensor, *, cu_seqlens: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tokens (B, N) -> logits (B, N, V), float32 unless under autocast.

        Variable-length batches (each sequence's logits equal those of the sequence alone):
        ``cu_seqlens`` (S + 1,) int32 splits the B x N tokens, read row after row as one
        stream, into S sequences (flash-attn's packed convention, :mod:`longnet.varlen`), e.g.
        documents packed into training rows; ``key_padding_mask`` (B, N) bool (True = a real
        token) marks padding anywhere in a row, whose logits are 0.
        """
        self._check_tokens(tokens)
        if cu_seqlens is not None and key_padding_mask is not None:
            raise ValueError("pass cu_seqlens or key_padding_mask, not both")
        if cu_seqlens is None and key_padding_mask is None:
            return self._logits(tokens)
        b, n = tokens.shape
        if key_padding_mask is not None:
            packed, indices, cu_seqlens, _ = unpad(tokens, key_padding_mask)
            return pad(self._packed_logits(packed[None], cu_seqlens)[0], indices, b, n)
        check_varlen_args(tokens.reshape(-1, 1, 1), cu_seqlens, None, None)
        check_cu_seqlens(cu_seqlens.tolist(), b * n)
        return self._packed_logits(tokens.reshape(1, b * n), cu_seqlens).view(b, n, -1)

    def _packed_logits(self, tokens: Tensor, cu_seqlens: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """tokens (1, T) holding the sequences of ``cu_seqlens`` -> logits (1, T, V), optionally filling a cache."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        positions, _ = _packed_positions(lengths, tokens.device)
        return self._logits(tokens, lambda layer: _packed_attention(cu_seqlens, lengths, cache, layer),
                            positions=positions)

    def _logits(self, tokens: Tensor, attention: Optional[Callable[[int], Callable]] = None,
                positions: Optional[Tensor] = None) -> Tensor:
        """tokens (B, N) at ``positions`` ((N,) or (B, N), default 0..N-1) -> logits (B, N, V): the one forward.

        ``attention(layer)`` gives the attention that :meth:`LongNetBlock.forward` runs in that
        layer (packed sequences, cached decoding); None runs the full op. Activation
        checkpointing, if set, applies whenever gradients are taken.
        """
        x = self.embed(tokens.long())
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed(self._positions(tokens.shape[1], tokens.device, positions))
        x = F.dropout(x, self.config.dropout, self.training)
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, blk in enumerate(self.blocks):
            fn = None if attention is None else attention(layer)
            if use_ckpt:
                x = checkpoint(blk, x, fn, use_reentrant=False)
            else:
                x = blk(x, fn)
        return self.lm_head(self.norm(x))

    def _positions(self, n: int, device, positions: Optional[Tensor] = None) -> Tensor:
        """Positions for the learned position embeddings (default 0..n-1), range-checked."""
        last = n - 1 if positions is None else (int(positions.max()) if positions.numel() else 0)
        if last >= self.config.max_positions:
            raise ValueError(f"positions up to {last} are past the learned position embeddings "
                             f"(model config max_positions={self.config.max_positions})")
        return torch.arange(n, device=device) if positions is None else positions

    def loss(self, tokens: Tensor, targets: Tensor, *, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Mean next-token cross-entropy in nats; tokens and targets (B, N), ``cu_seqlens`` as in :meth:`forward`."""
        logits = self(tokens, cu_seqlens=cu_seqlens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ cached decoding

    def _new_cache(self, lengths: List[int], capacity: Optional[int]) -> KVCache:
        """An empty cache for prompts of these lengths; it keeps only the positions a later query reads."""
        c = self.config
        if capacity is not None:
            capacity = check_int("capacity", capacity)
        starts = [max(0, n - c.max_segment + 1) for n in lengths]
        kept = max(n - s for n, s in zip(lengths, starts))
        capacity = max(kept + 1 if capacity is None else capacity, kept)
        like = self.embed.weight
        shape = (len(lengths), capacity, c.n_heads, c.head_dim)
        keys = [like.new_zeros(shape) for _ in range(c.n_layers)]
        values = [like.new_zeros(shape) for _ in range(c.n_layers)]
        return KVCache(keys, values, [0] * len(lengths), self._decay_table(like.device), c.max_segment, starts)

    def _decay_table(self, device) -> Optional[Tensor]:
        """(max(w), D) XPOS key factor by distance to the query (see :class:`KVCache`), or None."""
        if not self.config.xpos:
            return None
        xp = self.blocks[0].attn.xpos
        # Key factor relative to the query: zeta^((p - j) / scale_base) <= 1. It is XPOS's
        # decay(j, centre=p) inverted, tabulated by distance; far keys underflow to 0,
        # which is harmless, so no overflow limit applies here.
        dist = torch.arange(self.config.max_segment, dtype=torch.float64)
        f = xp.zeta.double().cpu()[None, :] ** (dist[:, None] / xp.scale_base)
        return f.repeat_interleave(2, dim=-1).to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def prefill(self, tokens: Union[Tensor, Sequence[Tensor]], capacity: Optional[int] = None
                ) -> Tuple[Union[Tensor, List[Tensor]], KVCache]:
        """Full forward of the prompts that also fills a cache; returns (logits, cache).

        ``tokens`` is (B, N) (logits (B, N, V)) or a list of B 1-D prompts of any lengths
        >= 1 (a list of (L_b, V) logits; each sequence is run as if alone). ``capacity`` is
        the cache's initial number of slots (default: what it keeps of the longest prompt,
        plus one); it grows as :meth:`decode_step` needs, so it is only a hint.
        """
        if self.config.short_conv:
            raise ValueError("a model with short_conv has no KV cache (a new key needs the previous rows' "
                             "projections); generate with it recomputes the whole forward instead")
        if isinstance(tokens, Tensor):
            self._check_tokens(tokens)
            b, n = tokens.shape
            cache = self._new_cache([n] * b, capacity)
            positions = torch.arange(n, device=tokens.device)
            logits = self._logits(tokens, lambda layer: _prefill_attention(cache, layer, positions))
            cache.lengths = [n] * b
            return logits, cache
        lengths = [int(t.numel()) for t in tokens]
        if not lengths or min(lengths) < 1 or any(t.ndim != 1 for t in tokens):
            raise ValueError(f"tokens must be (B, N) or a list of B >= 1 one-dimensional prompts of >= 1 token, "
                             f"got lengths {lengths}")
        flat = torch.cat(list(tokens))[None]
        self._check_tokens(flat)
        cache = self._new_cache(lengths, capacity)
        logits = self._packed_logits(flat, cu_seqlens_from_lengths(lengths, flat.device), cache)
        cache.lengths = list(lengths)
        return list(logits[0].split(lengths)), cache

    @torch.no_grad()
    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Append token (B,) at each sequence's position ``cache.lengths[b]``; returns its logits (B, V)."""
        if not isinstance(token, Tensor) or token.ndim != 1 or token.shape[0] != cache.batch:
            got = tuple(token.shape) if isinstance(token, Tensor) else type(token).__name__
            raise ValueError(f"token must be a tensor of shape (B,) = ({cache.batch},), got {got}")
        cache.make_room()
        positions = torch.tensor(cache.lengths, device=token.device)
        scale = default_scale(self.config.head_dim)
        logits = self._logits(token[:, None], lambda layer: _decode_attention(cache, layer, positions, scale),
                              positions=positions[:, None])
        cache.lengths = [n + 1 for n in cache.lengths]
        return logits[:, 0]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: Union[Tensor, Sequence[int], Sequence[Sequence[int]]], max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None
                 ) -> Union[Tensor, List[Tensor]]:
        """Sample ``max_new_tokens`` tokens after ``prompt``.

        ``prompt`` is (N,) or (B, N) int64, or a list of B prompts of different lengths (lists
        or 1-D tensors). ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely tokens.
        ``generator``: one generator for the batch, or one per prompt, with which every
        prompt's tokens equal those of that prompt generated alone with its generator (as do
        greedy results always). ``use_cache=False`` recomputes a full forward over the whole
        sequence for each token (same result, far slower); a model with ``short_conv`` always
        does (it has no KV cache). Returns prompt and continuation
        like the prompt: (N + new,), (B, N + new), or a list of (L_b + new,). The model is put
        in eval mode for the call. :meth:`stream` yields the same tokens one at a time.
        """
        use_cache = use_cache and not self.config.short_conv
        prompt, tokens, kind = self._prepare_prompt(prompt, max_new_tokens, temperature, top_k, use_cache,
                                                    generator)
        new = list(self._stream(tokens, max_new_tokens, temperature, top_k, use_cache, generator))
        if kind == "ragged":
            return [torch.cat([t] + [x[b:b + 1] for x in new]) for b, t in enumerate(tokens)]
        res = torch.cat([tokens] + [t[:, None] for t in new], dim=1)
        return res[0] if kind == "1d" else res

    def stream(self, prompt: Union[Tensor, Sequence[int], Sequence[Sequence[int]]], max_new_tokens: int, *,
               temperature: float = 1.0, top_k: Optional[int] = None, use_cache: bool = True,
               generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None) -> Iterator[Tensor]:
        """As :meth:`generate`, but an iterator over the new tokens as they are sampled.

        Each item is a 0-d tensor for an (N,) prompt, else (B,). The arguments are checked
        here, before the first token is asked for. Until the iterator is exhausted or closed
        the model stays in eval mode (and on CPU may run with fewer threads); close it
        (``contextlib.closing``) if you stop early.
        """
        use_cache = use_cache and not self.config.short_conv
        _, tokens, kind = self._prepare_prompt(prompt, max_new_tokens, temperature, top_k, use_cache, generator)
        return self._stream(tokens, max_new_tokens, temperature, top_k, use_cache, generator,
                            squeeze=kind == "1d")

    def _prepare_prompt(self, prompt, max_new_tokens: int, temperature: float, top_k: Optional[int],
                        use_cache: bool, generator=None) -> Tuple[Any, Union[Tensor, List[Tensor]], str]:
        """Check the arguments; returns (prompt as given or as a tensor, tokens on the model's device, kind).

        kind "1d" (tokens (1, N)), "2d" (tokens (B, N)) or "ragged" (a list of B 1-D prompts).
        """
        # A list of prompts holds sequences (lists, tuples, 1-D tensors); a list of ints (or 0-d tensors) is one prompt.
        ragged = (isinstance(prompt, (list, tuple)) and len(prompt) > 0
                  and (isinstance(prompt[0], (list, tuple)) or (isinstance(prompt[0], Tensor) and prompt[0].ndim > 0)))
        device = next(self.parameters()).device
        if ragged:
            rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) if not isinstance(p, Tensor) else p
                    for p in prompt]
            if any(r.ndim != 1 or r.numel() < 1 for r in rows):
                raise ValueError("each prompt of a list must be one-dimensional with >= 1 token, got shapes "
                                 f"{[tuple(r.shape) for r in rows]}")
            tokens, kind, n_max = [r.to(device=device, dtype=torch.long) for r in rows], "ragged", max(map(len, rows))
            values = torch.cat(tokens)
        else:
            if not isinstance(prompt, Tensor):
                prompt = torch.tensor(list(prompt), dtype=torch.long)
            kind = "1d" if prompt.ndim == 1 else "2d"
            tokens = prompt[None] if kind == "1d" else prompt
            if tokens.ndim != 2 or tokens.shape[1] < 1:
                raise ValueError(f"prompt must have shape (N,) or (B, N) with N >= 1, or be a list of prompts, "
                                 f"got {tuple(prompt.shape)}")
            values, n_max = tokens, tokens.shape[1]
            tokens = tokens.to(device=device, dtype=torch.long)
        self._check_generation(max_new_tokens, temperature, top_k, generator, len(tokens))
        if int(values.min()) < 0 or int(values.max()) >= self.config.vocab_size:
            raise ValueError(f"prompt tokens must be in [0, {self.config.vocab_size}), got values in "
                             f"[{int(values.min())}, {int(values.max())}]")
        self._check_xpos_length(n_max, max_new_tokens, use_cache)
        return prompt, tokens, kind

    @staticmethod
    def _check_generation(max_new_tokens, temperature, top_k, generator, batch: int) -> None:
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None:
            check_int("top_k", top_k)
        if generator is not None and not isinstance(generator, torch.Generator):
            gens = list(generator)
            if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
                raise ValueError(f"generator must be None, a torch.Generator, or one torch.Generator per prompt "
                                 f"({batch}), got {generator!r}")

    def _check_xpos_length(self, n_prompt: int, max_new_tokens: int, use_cache: bool) -> None:
        """Refuse up front a generation whose full forwards would pass XPOS's length limit."""
        c = self.config
        if not c.xpos:
            return
        limit = xpos_max_length(c.xpos_scale_base)
        # With the cache only the prompt runs as one full forward (decoding decays by distance,
        # which has no limit); without it, each token reruns everything before it.
        longest = n_prompt if use_cache else n_prompt + max(max_new_tokens - 1, 0)
        if longest <= limit:
            return
        what = (f"the prompt has {n_prompt} tokens" if use_cache else
                f"without the cache the last forward covers prompt + max_new_tokens - 1 = {longest} tokens")
        fix = "shorten the prompt" if use_cache else "use the cache, or lower max_new_tokens"
        raise ValueError(f"{what}, past the XPOS length limit of {limit} tokens for this model "
                         f"(model config xpos_scale_base={c.xpos_scale_base:g}; the limit grows with it: "
                         f"train with --set model.xpos_scale_base=..., or model.xpos=false for none); {fix}")

    @torch.no_grad()
    def _stream(self, tokens: Union[Tensor, List[Tensor]], max_new_tokens: int, temperature: float,
                top_k: Optional[int], use_cache: bool, generator, squeeze: bool = False) -> Iterator[Tensor]:
        """Yield max_new_tokens sampled tokens (B,) (or () with squeeze) after tokens ((B, N) or B prompts)."""
        if max_new_tokens == 0:
            return
        with _eval_mode(self):
            logits, step = self._first_logits(tokens, use_cache)
            with _num_threads(self._decode_threads(len(tokens), use_cache, logits.device)):
                for i in range(max_new_tokens):
                    nxt = _sample(logits.float(), temperature, top_k, generator)
                    yield nxt[0] if squeeze else nxt
                    if i < max_new_tokens - 1:
                        logits = step(nxt)

    def _first_logits(self, tokens: Union[Tensor, List[Tensor]], use_cache: bool
                      ) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(logits (B, V) after the prompts, step: next token (B,) -> logits (B, V) after it)."""
        if use_cache:
            logits, cache = self.prefill(tokens)
            last = logits[:, -1] if isinstance(logits, Tensor) else torch.stack([x[-1] for x in logits])
            return last, lambda nxt: self.decode_step(nxt, cache)
        seqs = [tokens] if isinstance(tokens, Tensor) else list(tokens)

        def logits_now() -> Tensor:
            if isinstance(tokens, Tensor):
                return self(torch.cat(seqs, dim=1))[:, -1]
            lengths = [len(s) for s in seqs]
            flat = torch.cat(seqs)[None]
            out = self._packed_logits(flat, cu_seqlens_from_lengths(lengths, flat.device))[0]
            return out[torch.tensor(lengths, device=out.device).cumsum(0) - 1]

        def step(nxt: Tensor) -> Tensor:
            if isinstance(tokens, Tensor):
                seqs.append(nxt[:, None])
            else:
                seqs[:] = [torch.cat([s, nxt[b:b + 1]]) for b, s in enumerate(seqs)]
            return logits_now()
        return logits_now(), step

    def _decode_threads(self, batch: int, use_cache: bool, device: torch.device) -> Optional[int]:
        """Threads for the decode loop: 1 for a small model on CPU, else None (leave as is)."""
        # A decode step of a small model is many tiny ops: on CPU, extra threads only add
        # synchronisation, and on a busy machine OpenMP threads spin-wait for each other
        # (docs/performance.md, "Decoding").
        small = batch * self.num_parameters() < 20_000_000
        return 1 if use_cache and device.type == "cpu" and small else None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _num_threads(n: Optional[int]):
    """torch's intra-op threads set to at most n inside the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n is not None and n < old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _sample(logits: Tensor, temperature: float, top_k: Optional[int],
            generator: Union[None, torch.Generator, Sequence[torch.Generator]]) -> Tensor:
    """logits (B, V) -> token ids (B,); with one generator per row, row b draws from generator[b] only."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    # One draw per row from its own generator, so a row's tokens do not depend on its batch.
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g)[:, 0] for b, g in enumerate(generator)])


class LongNetTransformer(LongNetLM):
    """The seed ``longnet`` package's model name, as a correct causal LongNet LM.

    ``LongNetTransformer(dim, depth, num_tokens, dim_head=64, heads=8, ff_mult=4,
    dilation_rate=2, segment_size=64)``: ``dim = heads * dim_head``;
    ``dilation_rate`` and ``segment_size`` take an int or equally long sequences (one
    int is repeated to the other's length). Further keywords go to :class:`LongNetConfig`.
    ``model(tokens)``: (B, N) int64 -> logits (B, N, num_tokens).
    """

    def __init__(self, dim: int, depth: int, num_tokens: int, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4, dilation_rate: Union[int, Sequence[int]] = 2,
                 segment_size: Union[int, Sequence[int]] = 64, **kwargs):
        dim, depth, num_tokens, dim_head, heads, ff_mult = (
            check_int(name, val) for name, val in (("dim", dim), ("depth", depth), ("num_tokens", num_tokens),
                                                   ("dim_head", dim_head), ("heads", heads), ("ff_mult", ff_mult)))
        if heads * dim_head != dim:
            raise ValueError(f"dim must equal heads * dim_head, got dim={dim} with heads={heads}, "
                             f"dim_head={dim_head} ({heads * dim_head}); e.g. pass dim_head={dim // heads}"
                             if dim % heads == 0 else
                             f"dim must equal heads * dim_head, got dim={dim}, heads={heads}, dim_head={dim_head}")
        sizes, rates = broadcast_pattern(segment_size, dilation_rate)
        config = LongNetConfig(vocab_size=num_tokens, n_layers=depth, d_model=dim, n_heads=heads,
                               d_ffn=ff_mult * dim, segment_lengths=sizes, dilation_rates=rates, **kwargs)
        super().__init__(config)
