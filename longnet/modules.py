"""nn.Modules around :func:`longnet.dilated_attention`: they project, normalise and reshape.

Layouts: module inputs and outputs are (B, N, E) with E = embed_dim; inside,
q, k, v are (B, N, H, D) with D = E / H.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.numerics import default_scale
from .backends.registry import check_backend_name
from .checks import check_int, check_short_conv
from .functional import _dilated_attention
from .varlen import pad, unpad
from .patterns import broadcast_pattern, validate_pattern, validate_phases

__all__ = ["XPOS", "RelativePositionBias", "MultiheadDilatedAttention", "DilatedAttention",
           "xpos_max_distance"]

# XPOS's smallest decay base: zeta = (2i + 0.4 D) / (1.4 D) at i = 0, whatever D is.
_XPOS_ZETA_MIN = 2 / 7
# float32 overflows at exp(88.7); the decay factor zeta^(-|p - c| / scale_base) must stay below e^80.
_XPOS_MAX_EXPONENT = 80.0


def xpos_max_distance(scale_base: float) -> float:
    """The largest |p - c| (position minus XPOS centre) whose decay factor stays finite in float32.

    The one home of XPOS's length limit: :class:`XPOS` refuses positions past
    it, and :func:`longnet.config.xpos_max_length` (twice this, as a full
    forward centres on the middle) is derived from it.
    """
    return _XPOS_MAX_EXPONENT / -math.log(_XPOS_ZETA_MIN) * scale_base


class XPOS(nn.Module):
    """XPOS relative positions (Sun et al. 2022): rotary rotation plus an exponential decay.

    For position p, q is rotated by p and scaled by ``zeta^((p - c) / scale_base)``,
    k is rotated by p and scaled by ``zeta^(-(p - c) / scale_base)``; q.k then
    depends only on p_q - p_k, for any centre c. Callers pick c: the middle of
    the positions for a full forward (keeps exponents small, see
    :meth:`default_center`), the query position when decoding from a cache
    (every factor is then <= 1).
    """

    def __init__(self, head_dim: int, scale_base: float = 512.0, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"XPOS needs an even head dim, got head_dim={head_dim}")
        self.head_dim = head_dim
        self.scale_base = float(scale_base)
        half = torch.arange(0, head_dim, 2, dtype=torch.float32)
        zeta = (half + 0.4 * head_dim) / (1.4 * head_dim)
        self.register_buffer("inv_freq", 1.0 / theta ** (half / head_dim), persistent=False)
        self.register_buffer("zeta", zeta, persistent=False)
        # A Python float, so range checks never read a device tensor back to the host.
        self._max_distance = xpos_max_distance(self.scale_base)
        self._range_cache = None  # (key, cos, sin, factor) of the last contiguous range

    @staticmethod
    def default_center(first: float, last: float) -> float:
        """The centre used for a full forward over positions first..last."""
        return (first + last) / 2

    def _check_range(self, first: float, last: float, center: float) -> None:
        if max(abs(first - center), abs(last - center)) > self._max_distance:
            raise ValueError(
                f"XPOS decay overflows float32 for positions {int(first)}..{int(last)} around centre "
                f"{float(center):.0f} with scale_base={self.scale_base}: |p - c| must stay below "
                f"{int(self._max_distance)}; raise xpos_scale_base or use "
                "xpos=False for longer sequences")

    def _angles(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        ang = positions.to(torch.float32)[:, None] * self.inv_freq  # (N, D/2)
        return ang.cos()[:, None, :], ang.sin()[:, None, :]

    def _factor(self, positions: Tensor, center: float) -> Tensor:
        expo = (positions.to(torch.float64) - center) / self.scale_base
        f = self.zeta.double()[None, :] ** expo[:, None]
        return f.repeat_interleave(2, dim=-1).float()

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotary rotation of x (B, N, H, D) by positions (N,)."""
        return self._rotate(x, *self._angles(positions))

    def decay(self, positions: Tensor, center: float) -> Tensor:
        """(N, D) factor zeta^((p - center) / scale_base); q is multiplied, k divided."""
        if positions.numel():
            self._check_range(float(positions.min()), float(positions.max()), center)
        return self._factor(positions, center)

    @staticmethod
    def scale(q: Tensor, k: Tensor, factor: Tensor) -> Tuple[Tensor, Tensor]:
        """Rotated q, k (B, N, H, D) times / divided by a decay factor broadcastable to them."""
        return (q.float() * factor).to(q.dtype), (k.float() / factor).to(k.dtype)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor, center=None):
        """Apply to q, k (B, N, H, D) at positions (N,). Returns (q, k)."""
        if center is None:
            center = self.default_center(float(positions[0]), float(positions[-1])) if positions.numel() else 0.0
        cos, sin = self._angles(positions)
        f = self.decay(positions, center).to(q.device)[None, :, None, :]
        return self.scale(self._rotate(q, cos, sin), self._rotate(k, cos, sin), f)

    def forward_packed(self, q: Tensor, k: Tensor, positions: Tensor, centers: Tensor, max_distance: float):
        """Apply to packed q, k (1, T, H, D) at positions (T,) with one centre per row (T,) float64.

        Each sequence of a packed batch gets its own positions and centre, so it is rotated
        and decayed exactly as if alone; ``max_distance`` is the largest |p - c| (range check
        on a Python number).
        """
        self._check_range(0.0, max_distance, 0.0)
        cos, sin = self._angles(positions)
        f = self._factor(positions, centers).to(q.device)[None, :, None, :]
        return self.scale(self._rotate(q, cos, sin), self._rotate(k, cos, sin), f)

    def forward_range(self, q: Tensor, k: Tensor, start: int, center: Optional[float] = None):
        """As :meth:`forward` at positions start..start+N-1, from tables cached per range.

        Every layer and step of a training run asks for the same range, so the
        tables are built once, and the range is checked on Python ints (no
        device-to-host sync).
        """
        n = q.shape[1]
        if center is None:
            center = self.default_center(start, start + n - 1)
        if torch.compiler.is_compiling():
            # In a compiled graph the tables are part of the graph; a cache kept on the module
            # would be guarded on, and every new sequence length would recompile.
            cos, sin, f = self._range_tables(start, n, center, q.device)
        else:
            key = (start, n, float(center), q.device)
            if self._range_cache is None or self._range_cache[0] != key:
                self._range_cache = (key, *self._range_tables(start, n, center, q.device))
            _, cos, sin, f = self._range_cache
        return self.scale(self._rotate(q, cos, sin), self._rotate(k, cos, sin), f)

    def _range_tables(self, start: int, n: int, center: float, device: torch.device):
        """(cos, sin, factor) for positions start..start+n-1, range-checked on Python numbers."""
        self._check_range(start, start + n - 1, center)
        positions = torch.arange(start, start + n, device=device)
        cos, sin = self._angles(positions)
        return cos, sin, self._factor(positions, center)[None, :, None, :]


class RelativePositionBias(nn.Module):
    """T5-style bucketed relative-position bias per head, on original positions.

    ``forward(rel)`` maps differences ``rel = pos_q - pos_k`` (any shape) to a
    bias of shape (H, *rel.shape).
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 causal: bool = False):
        super().__init__()
        self.num_buckets, self.max_distance, self.causal = num_buckets, max_distance, causal
        self.embedding = nn.Embedding(num_buckets, num_heads)
        nn.init.zeros_(self.embedding.weight)

    def bucket(self, rel: Tensor) -> Tensor:
        n = -rel  # T5 convention: distance to the key
        nb = self.num_buckets
        ret = torch.zeros_like(n)
        if not self.causal:
            nb //= 2
            ret = ret + (n < 0).long() * nb
            n = n.abs()
        else:
            n = n.clamp(min=0)
        max_exact = nb // 2
        large = max_exact + (
            torch.log(n.float().clamp(min=1) / max_exact) / math.log(self.max_distance / max_exact)
            * (nb - max_exact)).long()
        large = large.clamp(max=nb - 1)
        return ret + torch.where(n < max_exact, n, large)

    def forward(self, rel: Tensor) -> Tensor:
        return self.embedding(self.bucket(rel)).movedim(-1, 0)


def causal_short_conv(x: Tensor, weight: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """A causal depthwise convolution along the sequence: x (B, N, E), weight (W, E) -> (B, N, E).

    ``out[:, t] = sum_l weight[l] * x[:, t - l]`` over lags l < W, where only rows of the same
    sequence count: ``positions`` (N,) is each row's position inside its own sequence (default
    0..N-1), and lag l reaches row t only if ``positions[t] >= l``, so packed sequences
    (cu_seqlens) do not see each other.
    """
    width, n = weight.shape[0], x.shape[1]
    out = x * weight[0]
    for lag in range(1, min(width, n)):
        shifted = F.pad(x[:, :n - lag], (0, 0, lag, 0))
        if positions is not None:
            shifted = shifted * (positions >= lag).to(x.dtype)[None, :, None]
        out = out + shifted * weight[lag]
    return out


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated self-attention: x (B, N, E) -> (B, N, E).

    q/k/v projections -> optional short convolution of k and v -> optional qk-norm and XPOS
    -> :func:`dilated_attention`
    -> dropout -> optional sub-LayerNorm (MAGNETO) -> output projection.

    ``dropout`` applies to the attention output (the op itself is dropout-free,
    so its backward stays exact). ``attention_fn`` and ``position_offset`` are
    the hooks that sequence parallelism sets from outside (see
    :mod:`longnet.distributed`); ``xpos_center`` fixes XPOS's centre (None:
    the middle of this call's positions).

    The pattern and the backend name are checked here, once; forwards call the
    op's internal entry, which does not check them again.

    ``short_conv`` (0: off, or a width W >= 2): each key and value row becomes a learned
    per-channel mix of itself and the W - 1 rows before it (:func:`causal_short_conv`,
    initialised to the identity), so a row a dilated segment keeps also carries the rows it
    skips (docs/recall.md). The op is unchanged, so every backend computes it exactly; the
    convolution needs the previous rows, so it is not available with sequence parallelism.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Union[int, Sequence[int]],
                 dilation_rates: Union[int, Sequence[int]], *, segment_phases: Optional[Sequence[int]] = None,
                 dropout: float = 0.0, bias: bool = True,
                 causal: bool = False, qk_norm: bool = False, sub_layernorm: bool = True,
                 xpos: bool = False, xpos_scale_base: float = 512.0, layer_norm_eps: float = 1e-5,
                 backend: Optional[str] = None, magneto_gain: float = 1.0, short_conv: int = 0,
                 device=None, dtype=None):
        super().__init__()
        embed_dim, num_heads = check_int("embed_dim", embed_dim), check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.segment_lengths, self.dilation_rates = validate_pattern(segment_lengths, dilation_rates)
        self.segment_phases = validate_phases(segment_phases, self.segment_lengths)
        # Only a phased pattern passes phases on, so the default path stays the paper's.
        self._pattern_kwargs = {"segment_phases": self.segment_phases} if any(self.segment_phases) else {}
        check_backend_name(backend)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.backend, self.dropout = causal, backend, dropout
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=layer_norm_eps, **fk) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=layer_norm_eps, **fk) if qk_norm else None
        self.sub_ln = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **fk) if sub_layernorm else None
        self.xpos = XPOS(self.head_dim, xpos_scale_base) if xpos else None
        self.short_conv = check_short_conv(short_conv)
        # (2, W, E): the key and the value convolution's weights.
        self.kv_conv = nn.Parameter(torch.empty(2, self.short_conv, embed_dim, **fk)) if self.short_conv else None
        # Same signature as longnet.dilated_attention; the pattern above is already validated.
        self.attention_fn: Callable = _dilated_attention
        self.position_offset: int = 0
        self.xpos_center: Optional[float] = None
        self.magneto_gain = magneto_gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MAGNETO: q/k/v Xavier with gain 2^-1/2, out Xavier; v and out scaled by the
        # depth-dependent gain sqrt(log 2L) that the model passes in.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        with torch.no_grad():
            self.v_proj.weight.mul_(self.magneto_gain)
            self.out_proj.weight.mul_(self.magneto_gain)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.kv_conv is not None:
            with torch.no_grad():
                self.kv_conv.zero_()
                self.kv_conv[:, 0] = 1.0  # the identity: the module starts as without it

    def project_raw(self, x: Tensor, positions: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, N, E) -> q, k, v (B, N, H, D), with the short convolution and qk-norm applied
        and no positions yet; ``positions`` (N,): each row's position in its own sequence, which
        the short convolution needs for packed rows (default 0..N-1)."""
        b, n, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.kv_conv is not None:
            if self.attention_fn is not _dilated_attention or self.position_offset:
                raise ValueError("short_conv is not supported with sequence parallelism: each block's first rows "
                                 "would need the previous rank's last short_conv - 1 rows")
            k, v = causal_short_conv(k, self.kv_conv[0], positions), causal_short_conv(v, self.kv_conv[1], positions)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def project(self, x: Tensor, positions: Optional[Tensor] = None, xpos_center=None):
        """x (B, N, E) -> q, k, v (B, N, H, D), with qk-norm and XPOS applied.

        ``positions`` (N,) defaults to ``position_offset + arange(N)``.
        """
        q, k, v = self.project_raw(x)
        if self.xpos is not None:
            center = xpos_center if xpos_center is not None else self.xpos_center
            if positions is None:
                q, k = self.xpos.forward_range(q, k, self.position_offset, center)
            else:
                q, k = self.xpos(q, k, positions, center)
        return q, k, v

    def finish(self, attn: Tensor) -> Tensor:
        """Attention output (B, N, H, D) -> module output (B, N, E)."""
        b, n = attn.shape[:2]
        attn = F.dropout(attn.reshape(b, n, self.embed_dim), self.dropout, self.training)
        if self.sub_ln is not None:
            attn = self.sub_ln(attn)
        return self.out_proj(attn)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attention_fn(q, k, v, self.segment_lengths, self.dilation_rates,
                                 is_causal=self.causal, backend=self.backend, **self._pattern_kwargs)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, N, E) -> (B, N, E). ``key_padding_mask`` (B, N) bool, True = a real token.

        With a mask, each row's real tokens are one sequence, computed exactly as if alone
        (its positions start at 0) through :meth:`forward_packed`; padding rows give 0. Only
        real tokens are projected, so padding costs no FLOPs.
        """
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        if key_padding_mask is not None:
            packed, indices, cu_seqlens, _ = unpad(x, key_padding_mask)
            return pad(self.forward_packed(packed, cu_seqlens), indices, x.shape[0], x.shape[1])
        q, k, v = self.project(x)
        return self.finish(self.attend(q, k, v))

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Packed x (T, E) with cu_seqlens (B + 1,) int32 (:mod:`longnet.varlen`) -> (T, E).

        Each sequence is attended (and XPOS-rotated, from its own position 0) as if alone.
        """
        if x.ndim != 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (T, {self.embed_dim}) with cu_seqlens, got {tuple(x.shape)}")
        if self.attention_fn is not _dilated_attention:
            raise ValueError("packed / padded input is not supported with a replaced attention_fn "
                             "(sequence parallelism): run variable-length batches without it")
        if getattr(self, "rel_pos_bias", None) is not None:
            raise ValueError("packed / padded input is not supported with use_rel_pos_bias=True (its biased "
                             "path has no variable-length form)")
        q, k, v = (t[0] for t in self.project_raw(x[None], packed_positions(cu_seqlens, x.shape[0])))
        if self.xpos is not None:
            q, k = (t[0] for t in self._xpos_packed(q[None], k[None], cu_seqlens))
        attn = self.attention_fn(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=self.causal,
                                 backend=self.backend, cu_seqlens=cu_seqlens, **self._pattern_kwargs)
        return self.finish(attn[None])[0]

    def _xpos_packed(self, q: Tensor, k: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor]:
        """XPOS for packed q, k (1, T, H, D): positions from 0 in each sequence, each its own centre."""
        lengths = cu_seqlens.diff().long()
        positions = packed_positions(cu_seqlens, q.shape[1])
        longest = int(lengths.max()) if lengths.numel() else 0
        if self.xpos_center is not None:
            centers = torch.full_like(positions, 0, dtype=torch.float64) + float(self.xpos_center)
            reach = max(abs(self.xpos_center), abs(longest - 1 - self.xpos_center))
        else:
            centers = (torch.repeat_interleave(lengths, lengths, output_size=q.shape[1]) - 1).double() / 2
            reach = max(0, longest - 1) / 2
        return self.xpos.forward_packed(q, k, positions, centers, reach)


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """(T,) each packed row's position inside its own sequence, from cu_seqlens (B + 1,)."""
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    row_start = torch.repeat_interleave(starts, lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - row_start


def _one_name(name: str, value, alias: str, alias_value):
    """The value of an argument that has two accepted names; exactly one must be given."""
    if value is not None and alias_value is not None:
        raise TypeError(f"DilatedAttention got both {name}={value!r} and {alias}={alias_value!r}: "
                        f"they are one argument under two names, pass only one")
    if value is None and alias_value is None:
        raise TypeError(f"DilatedAttention needs {name} (or its other name {alias})")
    return value if value is not None else alias_value


class DilatedAttention(MultiheadDilatedAttention):
    """The seed ``longnet`` package's API with correct math: x (B, N, dim) -> (B, N, dim).

    ``dim``/``heads`` may also be spelled ``d_model``/``num_heads``, as the seed README does.
    ``dilation_rate`` and ``segment_size`` take an int or a sequence.
    ``use_rel_pos_bias=True`` adds a T5-style bucketed bias per head on
    original positions and runs the slower pure-PyTorch path
    (:mod:`longnet.backends.biased`), which materialises each segment's scores.
    """

    def __init__(self, dim: Optional[int] = None, heads: Optional[int] = None,
                 dilation_rate: Union[int, Sequence[int]] = 2,
                 segment_size: Union[int, Sequence[int]] = 64, dropout: float = 0.0,
                 causal: bool = False, use_xpos: bool = False, use_rel_pos_bias: bool = False,
                 qk_norm: bool = False, *, d_model: Optional[int] = None, num_heads: Optional[int] = None,
                 **kwargs):
        # The seed README spells dim/heads as d_model/num_heads: accept either name, never both.
        dim = _one_name("dim", dim, "d_model", d_model)
        heads = _one_name("heads", heads, "num_heads", num_heads)
        sizes, rates = broadcast_pattern(segment_size, dilation_rate)
        super().__init__(dim, heads, sizes, rates, dropout=dropout, causal=causal, qk_norm=qk_norm,
                         xpos=use_xpos, **kwargs)
        self.rel_pos_bias = RelativePositionBias(heads, causal=causal) if use_rel_pos_bias else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.rel_pos_bias is None:
            return super().attend(q, k, v)
        from .backends.biased import dilated_attention_biased
        out, _ = dilated_attention_biased(q, k, v, self.segment_lengths, self.dilation_rates,
                                          is_causal=self.causal, scale=default_scale(self.head_dim),
                                          bias_fn=self.rel_pos_bias, **self._pattern_kwargs)
        return out
