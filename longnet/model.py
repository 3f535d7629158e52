"""The LongNet language model: a decoder-only Transformer whose attention is dilated.

Layouts: tokens (B, N) int64 -> logits (B, N, V); hidden states (B, N, E); inside
attention q, k, v are (B, N, H, D).

Each block is pre-LN with MAGNETO's Sub-LayerNorm (Wang et al. 2022):

    x = x + Dropout(out_proj(SubLN(DilatedAttn(LN(x)))))
    x = x + Dropout(fc2(SubLN(act(fc1(LN(x))))))

and MAGNETO's initialisation: Xavier everywhere, with v_proj, out_proj, fc1 and fc2
scaled by ``sqrt(log(2 * n_layers))``. Attention is causal dilated attention
(:func:`longnet.dilated_attention`, SPEC.md §1-2) with XPOS relative positions.

Decoding (:meth:`LongNetLM.generate`) keeps a key/value cache and computes, for the new
token at position p, exactly the row p of the full forward: for each pattern (w, r), p
lies in segment a = floor(p / w) * w with offset s = (p - a) mod r; the heads h with
h mod r = s keep it, and they attend to the cached keys a + s, a + s + r, ..., p (a
strided slice of the cache, no gather); the patterns are merged by their log-sum-exp
(SPEC.md §2) and heads that no pattern keeps output 0. Work per token is
O(sum_i w_i / r_i), independent of the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import LongNetConfig
from .modules import MultiheadDilatedAttention
from .patterns import broadcast_pattern

__all__ = ["LongNetConfig", "LongNetLM", "LongNetTransformer", "FeedForward", "LongNetBlock", "KVCache"]


def magneto_gain(n_layers: int) -> float:
    """MAGNETO's depth-dependent init gain for decoder-only models: sqrt(log(2 L))."""
    return math.sqrt(math.log(2 * n_layers))


def _activation(name: str):
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}[name]


class FeedForward(nn.Module):
    """x (B, N, E) -> (B, N, E): fc1 -> activation -> dropout -> Sub-LayerNorm -> fc2."""

    def __init__(self, d_model: int, d_ffn: int, *, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True, layer_norm_eps: float = 1e-5, gain: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ffn, bias=bias)
        self.fc2 = nn.Linear(d_ffn, d_model, bias=bias)
        self.sub_ln = nn.LayerNorm(d_ffn, eps=layer_norm_eps)
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


class LongNetBlock(nn.Module):
    """One pre-LN MAGNETO block: x (B, N, E) -> (B, N, E)."""

    def __init__(self, cfg: LongNetConfig):
        super().__init__()
        gain = magneto_gain(cfg.n_layers)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = MultiheadDilatedAttention(
            cfg.d_model, cfg.n_heads, cfg.segment_lengths, cfg.dilation_rates, dropout=cfg.dropout,
            bias=cfg.bias, causal=True, qk_norm=cfg.qk_norm, sub_layernorm=True, xpos=cfg.xpos,
            xpos_scale_base=cfg.xpos_scale_base, layer_norm_eps=cfg.layer_norm_eps,
            backend=cfg.attention_backend, magneto_gain=gain)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, activation=cfg.activation, dropout=cfg.dropout,
                               bias=cfg.bias, layer_norm_eps=cfg.layer_norm_eps, gain=gain)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        # attn(...) = finish(attend(project(...))): the hooks sequence parallelism sets
        # (attention_fn, position_offset, xpos_center) all apply here.
        x = x + F.dropout(self.attn(self.attn_norm(x)), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training)


@dataclass
class KVCache:
    """Per-layer keys (XPOS-rotated, not decayed) and values, each (B, capacity, H, D).

    ``length`` positions 0..length-1 are filled. ``decay`` is (max_w, D): row d holds
    XPOS's key factor zeta^(d / scale_base) for a key d positions before the query (<= 1),
    or None without XPOS.
    """

    keys: List[Tensor]
    values: List[Tensor]
    length: int
    decay: Optional[Tensor]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


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
        nn.init.normal_(self.embed.weight, std=c.d_model ** -0.5)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=c.d_model ** -0.5)

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
        x = F.dropout(self.embed(tokens.long()), self.config.dropout, self.training)
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats; tokens and targets (B, N)."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ cached decoding

    def _new_cache(self, batch: int, capacity: int, like: Tensor) -> KVCache:
        c = self.config
        shape = (batch, capacity, c.n_heads, c.head_dim)
        keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(c.n_layers)]
        values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(c.n_layers)]
        decay = None
        if c.xpos:
            xp = self.blocks[0].attn.xpos
            # Key factor relative to the query: zeta^((p - j) / scale_base) <= 1. It is XPOS's
            # decay(j, centre=p) inverted, tabulated by distance; far keys underflow to 0,
            # which is harmless, so no overflow limit applies here.
            dist = torch.arange(c.max_segment, dtype=torch.float64)
            f = xp.zeta.double().cpu()[None, :] ** (dist[:, None] / xp.scale_base)
            decay = f.repeat_interleave(2, dim=-1).to(device=like.device, dtype=torch.float32)
        return KVCache(keys, values, 0, decay)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, capacity: Optional[int] = None) -> Tuple[Tensor, KVCache]:
        """Full forward of tokens (B, N) that also fills a cache; returns (logits (B, N, V), cache).

        ``capacity`` (default N) is how many positions the cache can hold in all.
        """
        self._check_tokens(tokens)
        b, n = tokens.shape
        capacity = n if capacity is None else capacity
        if capacity < n:
            raise ValueError(f"capacity must be >= the prompt length {n}, got {capacity}")
        x = self.embed(tokens.long())
        cache = self._new_cache(b, capacity, x)
        pos = torch.arange(n, device=tokens.device)
        for layer, blk in enumerate(self.blocks):
            attn = blk.attn
            q, k, v = attn.project_raw(blk.attn_norm(x))
            if attn.xpos is not None:
                # The cache keeps keys rotated but not decayed; the forward decays around the same
                # centre as MultiheadDilatedAttention.project.
                q, k = attn.xpos.rotate(q, pos), attn.xpos.rotate(k, pos)
                cache.keys[layer][:, :n] = k
                f = attn.xpos.decay(pos, attn.xpos.default_center(0, n - 1)).to(x.device)[None, :, None, :]
                q, k = attn.xpos.scale(q, k, f)
            else:
                cache.keys[layer][:, :n] = k
            cache.values[layer][:, :n] = v
            x = x + attn.finish(attn.attend(q, k, v))
            x = x + blk.ffn(blk.ffn_norm(x))
        cache.length = n
        return self.lm_head(self.norm(x)), cache

    def _decode_plan(self, p: int) -> List[Tuple[slice, int, int, int]]:
        """For position p: per pattern that keeps p in some head, (heads, first key, rate, #keys)."""
        plan = []
        H = self.config.n_heads
        for w, r in zip(self.config.segment_lengths, self.config.dilation_rates):
            a = (p // w) * w
            s = (p - a) % r
            if s >= H:  # only heads h = s mod r would keep p, and there are none
                continue
            first = a + s
            plan.append((slice(s, H, r), first, r, (p - first) // r + 1))
        return plan

    @torch.no_grad()
    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Append token (B,) at position ``cache.length``; returns its logits (B, V)."""
        if token.ndim != 1 or token.shape[0] != cache.keys[0].shape[0]:
            raise ValueError(f"token must have shape (B,) = ({cache.keys[0].shape[0]},), got {tuple(token.shape)}")
        p = cache.length
        if p >= cache.capacity:
            raise ValueError(f"cache is full ({cache.capacity} positions); prefill with a larger capacity")
        c = self.config
        scale = c.head_dim ** -0.5
        plan = self._decode_plan(p)
        pos = torch.tensor([p], device=token.device)
        decays = None
        if cache.decay is not None:
            # Distances p - j of each pattern's keys j = first, first + r, ..., p.
            decays = [cache.decay[(p - first) - r * torch.arange(m, device=token.device)][None, :, None, :]
                      for _, first, r, m in plan]
        x = self.embed(token.long())[:, None]  # (B, 1, E)
        b = x.shape[0]
        for layer, blk in enumerate(self.blocks):
            attn = blk.attn
            q, k, v = attn.project_raw(blk.attn_norm(x))
            if attn.xpos is not None:
                q, k = attn.xpos.rotate(q, pos), attn.xpos.rotate(k, pos)
            kc, vc = cache.keys[layer], cache.values[layer]
            kc[:, p] = k[:, 0]
            vc[:, p] = v[:, 0]
            q = q[:, 0].float()  # (B, H, D)
            out = torch.zeros(b, c.n_heads, c.head_dim, dtype=torch.float32, device=x.device)
            lse = torch.full((b, c.n_heads), float("-inf"), dtype=torch.float32, device=x.device)
            for i, (heads, first, r, m) in enumerate(plan):
                keys = kc[:, first:p + 1:r, heads].float()  # (B, m, Hs, D), a strided view
                if decays is not None:
                    keys = keys * decays[i]
                scores = torch.einsum("bhd,bmhd->bhm", q[:, heads], keys) * scale
                l_i = torch.logsumexp(scores, dim=-1)  # (B, Hs)
                o_i = torch.einsum("bhm,bmhd->bhd", torch.exp(scores - l_i[..., None]),
                                   vc[:, first:p + 1:r, heads].float())
                # Mixture merge (SPEC.md §2); l_i is finite (p sees itself), so new is finite.
                old = lse[:, heads]
                new = torch.logaddexp(old, l_i)
                out[:, heads] = out[:, heads] * torch.exp(old - new)[..., None] + o_i * torch.exp(l_i - new)[..., None]
                lse[:, heads] = new
            x = x + attn.finish(out.to(x.dtype)[:, None])
            x = x + blk.ffn(blk.ffn_norm(x))
        cache.length = p + 1
        return self.lm_head(self.norm(x))[:, 0]

    @torch.no_grad()
    def generate(self, prompt: Union[Tensor, Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt`` ((N,) or (B, N) int64).

        ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely tokens.
        ``use_cache=False`` recomputes a full forward over the whole sequence for each
        token (same result, far slower). Returns prompt and continuation, (N + new,) or
        (B, N + new) like the prompt. The model is put in eval mode for the call.
        """
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
        device = next(self.parameters()).device
        tokens = tokens.to(device=device, dtype=torch.long)
        was_training = self.training
        # A decode step of a small model is many tiny ops: on CPU, extra threads only add
        # synchronisation, and on a busy machine OpenMP spin-waits made 2 threads ~30x slower
        # than 1 (measured with the tiny preset: 4.4 ms vs 161 ms per token).
        threads = torch.get_num_threads()
        few_threads = (use_cache and device.type == "cpu" and threads > 1
                       and tokens.shape[0] * self.num_parameters() < 20_000_000)
        self.eval()
        try:
            out = [tokens]
            if max_new_tokens == 0:
                return prompt.clone()
            if use_cache:
                logits, cache = self.prefill(tokens, capacity=tokens.shape[1] + max_new_tokens)
                logits = logits[:, -1]
            else:
                logits = self(tokens)[:, -1]
            if few_threads:
                torch.set_num_threads(1)
            for i in range(max_new_tokens):
                nxt = _sample(logits.float(), temperature, top_k, generator)
                out.append(nxt[:, None])
                if i == max_new_tokens - 1:
                    break
                if use_cache:
                    logits = self.decode_step(nxt, cache)
                else:
                    logits = self(torch.cat(out, dim=1))[:, -1]
        finally:
            if few_threads:
                torch.set_num_threads(threads)
            self.train(was_training)
        res = torch.cat(out, dim=1)
        return res[0] if squeeze else res


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
