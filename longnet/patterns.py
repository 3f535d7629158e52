"""Dilation patterns: validation, presets and the cost model of SPEC.md §3.

A pattern is a pair of equally long sequences ``segment_lengths`` (w_i) and
``dilation_rates`` (r_i). Head ``h`` of pattern ``i`` keeps, in each segment
``[a, a + w_i)``, the rows ``a + s, a + s + r_i, ...`` with ``s = h mod r_i``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator, Tuple

__all__ = [
    "DilatedPattern",
    "PAPER_SEGMENT_LENGTHS",
    "PAPER_DILATION_RATES",
    "validate_pattern",
    "dilated_flops",
    "dense_flops",
]

PAPER_SEGMENT_LENGTHS: Tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES: Tuple[int, ...] = (1, 2, 4, 6, 12)


def _as_int_tuple(name: str, value) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(value).__name__}")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of ints, got {type(value).__name__}"
        ) from None
    out = []
    for i, x in enumerate(items):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            # torch / numpy integer scalars are accepted, floats are not (even 4.0):
            # a silent int() would hide a caller's unit mix-up.
            if hasattr(x, "item") and getattr(x, "ndim", 1) == 0 and isinstance(x.item(), int):
                x = x.item()
            else:
                raise TypeError(f"{name}[{i}] must be an integer, got {x!r}")
        out.append(int(x))
    return tuple(out)


def broadcast_pattern(segment_size, dilation_rate) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The seed package's (segment_size, dilation_rate): each an int or a sequence; a single
    value is repeated to match the other's length. Returns validated tuples."""
    sizes = _as_int_tuple("segment_size", segment_size)
    rates = _as_int_tuple("dilation_rate", dilation_rate)
    if len(rates) == 1 and len(sizes) > 1:
        rates = rates * len(sizes)
    if len(sizes) == 1 and len(rates) > 1:
        sizes = sizes * len(rates)
    return validate_pattern(sizes, rates)


def validate_pattern(segment_lengths, dilation_rates) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Check a (segment_lengths, dilation_rates) pair and return it as int tuples.

    Raises ``TypeError`` for non-integers and ``ValueError`` for empty or
    mismatched lists, non-positive values, or a rate larger than its segment.
    """
    w = _as_int_tuple("segment_lengths", segment_lengths)
    r = _as_int_tuple("dilation_rates", dilation_rates)
    if len(w) == 0:
        raise ValueError("segment_lengths must hold at least one segment length, got an empty sequence")
    if len(w) != len(r):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got {len(w)} and {len(r)}"
        )
    for i, (wi, ri) in enumerate(zip(w, r)):
        if wi <= 0:
            raise ValueError(f"segment_lengths[{i}] must be a positive integer, got {wi}")
        if ri <= 0:
            raise ValueError(f"dilation_rates[{i}] must be a positive integer, got {ri}")
        if ri > wi:
            raise ValueError(
                f"dilation_rates[{i}] = {ri} must be <= segment_lengths[{i}] = {wi} "
                "(a segment keeps every r-th row, so r > w keeps at most one row)"
            )
    return w, r


def _kept_count(length: int, offset: int, rate: int) -> int:
    """Rows offset, offset+rate, ... below ``length``."""
    return 0 if offset >= length else (length - offset + rate - 1) // rate


def _pattern_pairs(segment_lengths, dilation_rates, n: int):
    for w, r in zip(segment_lengths, dilation_rates):
        yield min(w, n), r


def dilated_flops(n: int, num_heads: int, head_dim: int, segment_lengths, dilation_rates,
                  *, causal: bool = False, batch: int = 1, backward: bool = False) -> float:
    """Attention FLOPs of one dilated-attention call, by SPEC.md §3's count.

    Counts the two matmuls (QK^T and PV) on the kept rows of every segment,
    head and pattern exactly, including short tail segments and r not
    dividing w: 4 * m^2 * D per segment and head with m kept rows, halved
    when causal. ``backward=True`` adds the usual 2.5x for the backward
    (five matmuls instead of two).
    """
    w_t, r_t = validate_pattern(segment_lengths, dilation_rates)
    total = 0.0
    for w, r in _pattern_pairs(w_t, r_t, n):
        n_full, tail = divmod(n, w)
        for h in range(num_heads):
            s = h % r
            m_full = _kept_count(w, s, r)
            m_tail = _kept_count(tail, s, r)
            total += n_full * m_full * m_full + m_tail * m_tail
    flops = 4.0 * head_dim * total * batch
    if causal:
        flops /= 2
    if backward:
        flops *= 3.5  # forward (1x) + backward (2.5x)
    return flops


def dense_flops(n: int, num_heads: int, head_dim: int, *, causal: bool = False,
                batch: int = 1, backward: bool = False) -> float:
    """FLOPs of dense attention over the same shape, counted the same way."""
    flops = 4.0 * n * n * num_heads * head_dim * batch
    if causal:
        flops /= 2
    if backward:
        flops *= 3.5
    return flops


@dataclass(frozen=True)
class DilatedPattern:
    """A validated mixture of dilation patterns.

    >>> p = DilatedPattern.paper()
    >>> p.segment_lengths, p.dilation_rates
    ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
    >>> DilatedPattern.geometric(64, num_patterns=3).segment_lengths
    (64, 128, 256)
    """

    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]

    def __post_init__(self) -> None:
        w, r = validate_pattern(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)

    @classmethod
    def paper(cls) -> "DilatedPattern":
        """The paper's experimental pattern: w = 2048..32768, r = (1, 2, 4, 6, 12)."""
        return cls(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)

    @classmethod
    def geometric(cls, base_segment: int, num_patterns: int, *, alpha: int = 2,
                  base_rate: int = 1) -> "DilatedPattern":
        """w_i = base_segment * alpha^i and r_i = base_rate * alpha^i, so w_i / r_i is constant."""
        for name, val in (("base_segment", base_segment), ("num_patterns", num_patterns),
                          ("alpha", alpha), ("base_rate", base_rate)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if alpha < 2 and num_patterns > 1:
            raise ValueError(f"alpha must be >= 2 for a geometric pattern, got {alpha}")
        w = tuple(base_segment * alpha**i for i in range(num_patterns))
        r = tuple(base_rate * alpha**i for i in range(num_patterns))
        return cls(w, r)

    def __len__(self) -> int:
        return len(self.segment_lengths)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(zip(self.segment_lengths, self.dilation_rates))

    def flops(self, n: int, num_heads: int, head_dim: int, **kw) -> float:
        """FLOPs of one call (see :func:`dilated_flops`)."""
        return dilated_flops(n, num_heads, head_dim, self.segment_lengths, self.dilation_rates, **kw)

    def flop_ratio(self, n: int, num_heads: int, head_dim: int, *, causal: bool = False) -> float:
        """Dense FLOPs divided by dilated FLOPs at this shape."""
        return dense_flops(n, num_heads, head_dim, causal=causal) / self.flops(
            n, num_heads, head_dim, causal=causal)

    def kept_rows(self, pattern_index: int, head: int, n: int) -> list:
        """Sorted positions that pattern ``pattern_index`` keeps in ``head`` for length ``n``."""
        w, r = self.segment_lengths[pattern_index], self.dilation_rates[pattern_index]
        s = head % r
        return [p for a in range(0, n, w) for p in range(a + s, min(a + w, n), r)]

    def __str__(self) -> str:
        return "w=" + ",".join(map(str, self.segment_lengths)) + " r=" + ",".join(map(str, self.dilation_rates))

    @classmethod
    def parse(cls, segment_lengths: str, dilation_rates: str) -> "DilatedPattern":
        """Build from comma-separated strings, as the CLI takes them ("2048,4096", "1,2")."""
        def ints(name, text):
            try:
                return tuple(int(t) for t in str(text).split(",") if t.strip())
            except ValueError:
                raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
        return cls(ints("segment_lengths", segment_lengths), ints("dilation_rates", dilation_rates))
