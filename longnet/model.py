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
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backends.numerics import default_scale
from .config import LongNetConfig, xpos_max_length
from .modules import MultiheadDilatedAttention
from .patterns import broadcast_pattern, used_offsets, visible_keys

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
            backend=cfg.attention_backend, magneto_gain=gain)
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

    Slot i holds position ``start + i``; positions ``start .. length-1`` are filled. A query at
    position p reads only keys of its own segments, none before p - window + 1 (window =
    max(w)), so :meth:`make_room` drops older positions. Until then the buffers double when
    full; afterwards they stay at 2 * window slots and each drop frees about half of them,
    so storing a token costs amortised O(1) and memory is O(min(length, window)).
    ``decay`` is (window, D): row d holds XPOS's key factor zeta^(d / scale_base) for a key
    d positions before the query (<= 1), or None without XPOS.
    """

    keys: List[Tensor]
    values: List[Tensor]
    length: int
    decay: Optional[Tensor]
    window: int
    start: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def fill(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store the prompt's keys and values (B, N, H, D) of one layer, positions start..N-1."""
        n = k.shape[1] - self.start
        self.keys[layer][:, :n] = k[:, self.start:]
        self.values[layer][:, :n] = v[:, self.start:]

    def put(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, 1, H, D) of position ``length`` (after :meth:`make_room`)."""
        i = self.length - self.start
        self.keys[layer][:, i] = k[:, 0]
        self.values[layer][:, i] = v[:, 0]

    def make_room(self) -> None:
        """Make sure position ``length`` has a slot: drop positions no later query reads, and grow."""
        if self.length - self.start < self.capacity:
            return
        keep_from = max(self.start, self.length - self.window + 1)
        kept = self.length - keep_from
        capacity = max(min(2 * self.capacity, 2 * self.window), kept + 1)
        src = keep_from - self.start
        self.keys = [_compact(t, src, kept, capacity) for t in self.keys]
        self.values = [_compact(t, src, kept, capacity) for t in self.values]
        self.start = keep_from


def _compact(buf: Tensor, src: int, kept: int, capacity: int) -> Tensor:
    """buf (B, C, H, D) with slots src..src+kept-1 moved to the front of a buffer of ``capacity`` slots."""
    if capacity == buf.shape[1]:
        buf[:, :kept] = buf[:, src:src + kept].clone()  # the ranges may overlap
        return buf
    out = buf.new_zeros((buf.shape[0], capacity) + tuple(buf.shape[2:]))
    out[:, :kept] = buf[:, src:src + kept]
    return out


# A decode step's work for one pattern: (heads, first slot, end slot, rate, XPOS key decay
# (1, m, 1, D) or None); it reads slots first, first + rate, ... < end.
_CacheStep = Tuple[slice, int, int, int, Optional[Tensor]]


def _rotated_qkv(attn: MultiheadDilatedAttention, h: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """h (B, N, E) -> q, k, v (B, N, H, D), qk-normed and XPOS-rotated but not decayed."""
    q, k, v = attn.project_raw(h)
    if attn.xpos is not None:
        q, k = attn.xpos.rotate(q, positions), attn.xpos.rotate(k, positions)
    return q, k, v


def _prefill_attention(cache: KVCache, layer: int, positions: Tensor):
    """Block attention for a prompt at positions (N,): the full op, filling layer ``layer`` of the cache."""
    def attention(attn: MultiheadDilatedAttention, h: Tensor) -> Tensor:
        q, k, v = _rotated_qkv(attn, h, positions)
        cache.fill(layer, k, v)
        if attn.xpos is not None:
            # Decayed around the centre MultiheadDilatedAttention.project uses, so the logits
            # equal the training forward's.
            center = attn.xpos.default_center(0, positions.numel() - 1)
            q, k = attn.xpos.scale(q, k, attn.xpos.decay(positions, center).to(h.device)[None, :, None, :])
        return attn.attend(q, k, v)
    return attention


def _decode_attention(cache: KVCache, layer: int, position: Tensor, steps: List[_CacheStep], scale: float):
    """Block attention for one new token at ``position`` (1,): stores its k, v and attends to the cache."""
    def attention(attn: MultiheadDilatedAttention, h: Tensor) -> Tensor:
        q, k, v = _rotated_qkv(attn, h, position)
        cache.put(layer, k, v)
        out = _attend_to_cache(q[:, 0].float(), cache.keys[layer], cache.values[layer], steps, scale)
        return out.to(h.dtype)[:, None]
    return attention


def _attend_to_cache(q: Tensor, kc: Tensor, vc: Tensor, steps: List[_CacheStep], scale: float) -> Tensor:
    """q (B, H, D) float32, kc, vc (B, C, H, D) -> (B, H, D) float32; heads no pattern keeps give 0."""
    b, n_heads, d = q.shape
    out = torch.zeros(b, n_heads, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, n_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for heads, first, end, r, decay in steps:
        keys = kc[:, first:end:r, heads].float()  # (B, m, Hs, D), a strided view
        if decay is not None:
            keys = keys * decay
        scores = torch.einsum("bhd,bmhd->bhm", q[:, heads], keys) * scale
        l_i = torch.logsumexp(scores, dim=-1)  # (B, Hs)
        o_i = torch.einsum("bhm,bmhd->bhd", torch.exp(scores - l_i[..., None]), vc[:, first:end:r, heads].float())
        # Mixture merge (docs/design.md §2); l_i is finite (the query sees itself), so new is finite.
        old = lse[:, heads]
        new = torch.logaddexp(old, l_i)
        out[:, heads] = out[:, heads] * torch.exp(old - new)[..., None] + o_i * torch.exp(l_i - new)[..., None]
        lse[:, heads] = new
    return out


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

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N) -> logits (B, N, V), float32 unless under autocast."""
        self._check_tokens(tokens)
        return self._logits(tokens)

    def _logits(self, tokens: Tensor, attention: Optional[Callable[[int], Callable]] = None,
                start: int = 0) -> Tensor:
        """tokens (B, N) at positions start.. -> logits (B, N, V): the model's one forward.

        ``attention(layer)`` gives the attention that :meth:`LongNetBlock.forward` runs in that
        layer (cached decoding); None runs the full op, with activation checkpointing if set.
        """
        x = self.embed(tokens.long())
        if self.pos_embed is not None:
            x = x + self.pos_embed(self._positions(start, tokens.shape[1], tokens.device))
        x = F.dropout(x, self.config.dropout, self.training)
        use_ckpt = (attention is None and self.config.activation_checkpointing and self.training
                    and torch.is_grad_enabled())
        for layer, blk in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x) if attention is None else blk(x, attention(layer))
        return self.lm_head(self.norm(x))

    def _positions(self, start: int, n: int, device) -> Tensor:
        """Positions start..start+n-1 for the learned position embeddings, range-checked."""
        if start + n > self.config.max_positions:
            raise ValueError(f"positions up to {start + n - 1} are past the learned position embeddings "
                             f"(model config max_positions={self.config.max_positions})")
        return torch.arange(start, start + n, device=device)

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats; tokens and targets (B, N)."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ cached decoding

    def _new_cache(self, batch: int, n: int, capacity: Optional[int]) -> KVCache:
        """An empty cache for a prompt of n positions; it keeps only those a later query reads."""
        c = self.config
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
        start = max(0, n - c.max_segment + 1)
        capacity = max(n - start + 1 if capacity is None else capacity, n - start)
        like = self.embed.weight
        shape = (batch, capacity, c.n_heads, c.head_dim)
        keys = [like.new_zeros(shape) for _ in range(c.n_layers)]
        values = [like.new_zeros(shape) for _ in range(c.n_layers)]
        return KVCache(keys, values, 0, self._decay_table(like.device), c.max_segment, start)

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
    def prefill(self, tokens: Tensor, capacity: Optional[int] = None) -> Tuple[Tensor, KVCache]:
        """Full forward of tokens (B, N) that also fills a cache; returns (logits (B, N, V), cache).

        ``capacity`` is the cache's initial number of slots (default: what it keeps of the
        prompt, plus one); it grows as :meth:`decode_step` needs, so it is only a hint.
        """
        self._check_tokens(tokens)
        b, n = tokens.shape
        cache = self._new_cache(b, n, capacity)
        positions = torch.arange(n, device=tokens.device)
        logits = self._logits(tokens, lambda layer: _prefill_attention(cache, layer, positions))
        cache.length = n
        return logits, cache

    def _decode_plan(self, p: int) -> List[Tuple[slice, int, int, int]]:
        """For position p: per pattern that keeps p in some head, (heads, first key, rate, #keys)."""
        plan = []
        H = self.config.n_heads
        attn = self.blocks[0].attn  # every layer runs the same validated pattern, phases included
        phases = getattr(attn, "segment_phases", None) or (0,) * len(attn.segment_lengths)
        for w, r, phi in zip(attn.segment_lengths, attn.dilation_rates, phases):
            s, first, count = visible_keys(p, w, r, phi)
            if s not in used_offsets(r, H):  # only heads h = s mod r would keep p, and there are none
                continue
            plan.append((slice(s, H, r), first, r, count))
        return plan

    @torch.no_grad()
    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Append token (B,) at position ``cache.length``; returns its logits (B, V)."""
        if not isinstance(token, Tensor) or token.ndim != 1 or token.shape[0] != cache.batch:
            got = tuple(token.shape) if isinstance(token, Tensor) else type(token).__name__
            raise ValueError(f"token must be a tensor of shape (B,) = ({cache.batch},), got {got}")
        p = cache.length
        cache.make_room()
        steps = self._cache_steps(p, cache)
        position = torch.tensor([p], device=token.device)
        scale = default_scale(self.config.head_dim)
        logits = self._logits(token[:, None], lambda layer: _decode_attention(cache, layer, position, steps, scale),
                              start=p)
        cache.length = p + 1
        return logits[:, 0]

    def _cache_steps(self, p: int, cache: KVCache) -> List[_CacheStep]:
        """The decode plan of position p in cache slots, with each pattern's XPOS key decays."""
        steps = []
        for heads, first, r, m in self._decode_plan(p):
            if first < cache.start:  # a negative slot would silently wrap around
                raise RuntimeError(f"position {p} reads key {first}, but the cache keeps positions from "
                                   f"{cache.start} on (window {cache.window})")
            decay = None
            if cache.decay is not None:
                # Distances p - j of the pattern's keys j = first, first + r, ..., p.
                dist = (p - first) - r * torch.arange(m, device=cache.decay.device)
                decay = cache.decay[dist][None, :, None, :]
            steps.append((heads, first - cache.start, p - cache.start + 1, r, decay))
        return steps

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: Union[Tensor, Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt`` ((N,) or (B, N) int64).

        ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely tokens.
        ``use_cache=False`` recomputes a full forward over the whole sequence for each
        token (same result, far slower). Returns prompt and continuation, (N + new,) or
        (B, N + new) like the prompt. The model is put in eval mode for the call.
        :meth:`stream` yields the same tokens one at a time.
        """
        prompt, tokens, squeeze = self._prepare_prompt(prompt, max_new_tokens, temperature, top_k, use_cache)
        if max_new_tokens == 0:
            return prompt.clone()
        new = self._stream(tokens, max_new_tokens, temperature, top_k, use_cache, generator)
        res = torch.cat([tokens] + [t[:, None] for t in new], dim=1)
        return res[0] if squeeze else res

    def stream(self, prompt: Union[Tensor, Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
               top_k: Optional[int] = None, use_cache: bool = True,
               generator: Optional[torch.Generator] = None) -> Iterator[Tensor]:
        """As :meth:`generate`, but an iterator over the new tokens as they are sampled.

        Each item is a 0-d tensor for an (N,) prompt, or (B,) for a (B, N) prompt. The
        arguments are checked here, before the first token is asked for. Until the iterator
        is exhausted or closed the model stays in eval mode (and on CPU may run with fewer
        threads); close it (``contextlib.closing``) if you stop early.
        """
        _, tokens, squeeze = self._prepare_prompt(prompt, max_new_tokens, temperature, top_k, use_cache)
        return self._stream(tokens, max_new_tokens, temperature, top_k, use_cache, generator, squeeze=squeeze)

    def _prepare_prompt(self, prompt, max_new_tokens: int, temperature: float, top_k: Optional[int],
                        use_cache: bool) -> Tuple[Tensor, Tensor, bool]:
        """Check the arguments; returns (prompt as a tensor, tokens (B, N) int64 on the model's device, was 1-d)."""
        if not isinstance(prompt, Tensor):
            prompt = torch.tensor(list(prompt), dtype=torch.long)
        squeeze = prompt.ndim == 1
        tokens = prompt[None] if squeeze else prompt
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prompt must have shape (N,) or (B, N) with N >= 1, got {tuple(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"prompt tokens must be in [0, {self.config.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        self._check_xpos_length(tokens.shape[1], max_new_tokens, use_cache)
        device = next(self.parameters()).device
        return prompt, tokens.to(device=device, dtype=torch.long), squeeze

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
    def _stream(self, tokens: Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                use_cache: bool, generator: Optional[torch.Generator], squeeze: bool = False) -> Iterator[Tensor]:
        """Yield max_new_tokens sampled tokens (B,) (or () with squeeze) after tokens (B, N)."""
        with _eval_mode(self):
            logits, step = self._first_logits(tokens, use_cache)
            with _num_threads(self._decode_threads(tokens, use_cache)):
                for i in range(max_new_tokens):
                    nxt = _sample(logits.float(), temperature, top_k, generator)
                    yield nxt[0] if squeeze else nxt
                    if i < max_new_tokens - 1:
                        logits = step(nxt)

    def _first_logits(self, tokens: Tensor, use_cache: bool) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(logits (B, V) after the prompt tokens (B, N), step: next token (B,) -> logits (B, V) after it)."""
        if use_cache:
            logits, cache = self.prefill(tokens)
            return logits[:, -1], lambda nxt: self.decode_step(nxt, cache)
        seq = [tokens]

        def step(nxt: Tensor) -> Tensor:
            seq.append(nxt[:, None])
            return self(torch.cat(seq, dim=1))[:, -1]
        return self(tokens)[:, -1], step

    def _decode_threads(self, tokens: Tensor, use_cache: bool) -> Optional[int]:
        """Threads for the decode loop: 1 for a small model on CPU, else None (leave as is)."""
        # A decode step of a small model is many tiny ops: on CPU, extra threads only add
        # synchronisation, and on a busy machine OpenMP spin-waits made 2 threads ~30x slower
        # than 1 (measured with the tiny preset: 4.4 ms vs 161 ms per token).
        small = tokens.shape[0] * self.num_parameters() < 20_000_000
        return 1 if use_cache and tokens.device.type == "cpu" and small else None


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
            generator: Optional[torch.Generator]) -> Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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
        for name, val in (("dim", dim), ("depth", depth), ("num_tokens", num_tokens), ("dim_head", dim_head),
                          ("heads", heads), ("ff_mult", ff_mult)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if heads * dim_head != dim:
            raise ValueError(f"dim must equal heads * dim_head, got dim={dim} with heads={heads}, "
                             f"dim_head={dim_head} ({heads * dim_head}); e.g. pass dim_head={dim // heads}"
                             if dim % heads == 0 else
                             f"dim must equal heads * dim_head, got dim={dim}, heads={heads}, dim_head={dim_head}")
        sizes, rates = broadcast_pattern(segment_size, dilation_rate)
        config = LongNetConfig(vocab_size=num_tokens, n_layers=depth, d_model=dim, n_heads=heads,
                               d_ffn=ff_mult * dim, segment_lengths=sizes, dilation_rates=rates, **kwargs)
        super().__init__(config)
