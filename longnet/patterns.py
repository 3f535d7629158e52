"""Dilation patterns: validation, the kept-rows rule, presets and the cost model of docs/design.md §3.

A pattern is a pair of equally long sequences ``segment_lengths`` (w_i) and
``dilation_rates`` (r_i). Head ``h`` of pattern ``i`` keeps, in each segment
``[a, a + w_i)``, the rows ``a + s, a + s + r_i, ...`` with ``s = h mod r_i``.

Segment phases (an extension of docs/design.md, opt-in). A pattern may carry a third
component, the phase φ_i with 0 <= φ_i < w_i (default 0). Pattern i then cuts
the positions into [0, φ), [φ, φ + w), [φ + w, φ + 2w), ... (the first is empty
when φ = 0, the last may be short), and everything else -- kept rows, head
offsets, causality -- is measured from each segment's own start a as above.
With every phase 0 this is exactly docs/design.md §1-2.

The local-window variant, :meth:`DilatedPattern.with_local_window`, uses
phases to remove the causal blind spot of docs/design.md §2.1: it adds two r = 1
patterns (window, 1, phase 0) and (window, 1, phase window / 2). A pair of
neighbours (j, j + 1) is split by the first only when j + 1 ≡ 0 (mod window)
and by the second only when j + 1 ≡ window / 2, never both, so in every head
each pair of neighbours shares a segment of at least one of them.

That rule has one home, the functions below; every backend, the decode cache
and the analysis tools call them (the Triton kernels repeat the index math on
the device, with a comment pointing here):

* :func:`clip_segment`, :func:`clip_phase` -- w' = min(w, N), φ' = min(φ, N);
* :func:`segment_start`, :func:`segment_bounds` -- the segment holding position p;
* :func:`segment_groups` -- the segments as runs of equally long ones;
* :func:`head_offset` -- s = h mod r, the offset head h keeps;
* :func:`row_offset` -- (p - a) mod r, the offset of the heads that keep row p;
* :func:`used_offsets`, :func:`heads_with_offset` -- which offsets and heads occur;
* :func:`kept_count` -- rows s, s + r, ... below a length;
* :func:`kept_positions`, :func:`keep_mask` -- the kept rows themselves;
* :func:`visible_keys` -- the kept keys a causal query sees (decoding).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from .checks import check_int

__all__ = [
    "DilatedPattern",
    "PAPER_SEGMENT_LENGTHS",
    "PAPER_DILATION_RATES",
    "MAX_PATTERN_VALUE",
    "validate_pattern",
    "validate_phases",
    "clip_segment",
    "clip_phase",
    "segment_start",
    "segment_bounds",
    "segment_groups",
    "head_offset",
    "row_offset",
    "used_offsets",
    "heads_with_offset",
    "kept_count",
    "kept_positions",
    "keep_mask",
    "visible_keys",
    "dilated_flops",
    "dense_flops",
]

PAPER_SEGMENT_LENGTHS: Tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES: Tuple[int, ...] = (1, 2, 4, 6, 12)


# Segment lengths and rates are positions: they must fit in int64 like every index tensor.
MAX_PATTERN_VALUE = 2**63 - 1


def _is_scalar(value) -> bool:
    return isinstance(value, numbers.Integral) or getattr(value, "ndim", None) == 0


def _as_int(name: str, x) -> int:
    """One integer of a pattern; bools (Python, numpy or a 0-d tensor) and floats are refused."""
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        x = x.item()  # numpy / torch scalars and 0-d arrays
    # bool is an Integral: True would silently mean 1. Floats (even 4.0) are refused too: a
    # silent int() would hide a caller's unit mix-up.
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    return int(x)


def _as_int_tuple(name: str, value) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(value).__name__}")
    if _is_scalar(value):
        return (_as_int(name, value),)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of ints, got {type(value).__name__}"
        ) from None
    return tuple(_as_int(f"{name}[{i}]", x) for i, x in enumerate(items))


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

    Raises ``TypeError`` for non-integers (bools included) and ``ValueError``
    for empty or mismatched lists, non-positive values, values that do not
    fit in int64, or a rate larger than its segment.
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
        for name, x in (("segment_lengths", wi), ("dilation_rates", ri)):
            if x > MAX_PATTERN_VALUE:
                raise ValueError(f"{name}[{i}] must fit in int64 (at most 2**63 - 1), got {x}")
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


def validate_phases(segment_phases, segment_lengths) -> Tuple[int, ...]:
    """Check the segment phases of validated ``segment_lengths``; None means all 0.

    Returns an int tuple as long as ``segment_lengths``. Raises ``TypeError``
    for non-integers and ``ValueError`` for a length mismatch or a phase
    outside 0 <= φ_i < w_i.
    """
    if segment_phases is None:
        return (0,) * len(segment_lengths)
    phases = _as_int_tuple("segment_phases", segment_phases)
    if len(phases) != len(segment_lengths):
        raise ValueError(f"segment_phases must have one phase per segment length, got {len(phases)} "
                         f"phases for {len(segment_lengths)} segment lengths")
    for i, (phi, w) in enumerate(zip(phases, segment_lengths)):
        if not 0 <= phi < w:
            raise ValueError(f"segment_phases[{i}] must satisfy 0 <= phase < segment_lengths[{i}] = {w}, "
                             f"got {phi}")
    return phases


# --------------------------------------------------------------------------- the kept-rows rule
# Functions of ints also take numpy arrays and torch tensors (elementwise), so each backend and
# analysis tool applies this one definition to whatever it holds.

def clip_segment(segment_length: int, n: int) -> int:
    """w' = min(w, N): a segment at least as long as the sequence is the whole sequence (docs/design.md §1)."""
    return min(segment_length, n)


def clip_phase(phase: int, n: int) -> int:
    """φ' = min(φ, N): a phase at or past the end makes [0, N) one (leading) segment.

    Clipped with :func:`clip_segment`, φ' <= w' always holds, which
    :func:`segment_start` relies on.
    """
    return min(phase, n)


def segment_start(position, segment_length: int, phase: int = 0):
    """a, the start of the segment that holds ``position``: 0 below the phase, else φ + k*w.

    ``segment_length`` and ``phase`` are clipped (w', φ' with φ' <= w').
    """
    shifted = position - phase
    start = shifted - shifted % segment_length + phase
    # Below the phase the grid gives φ - w <= 0, where the leading segment starts at 0:
    # this is max(start, 0) for ints, numpy arrays and tensors alike.
    return start * (start > 0)


def segment_bounds(position: int, n: int, segment_length: int, phase: int = 0) -> Tuple[int, int]:
    """[start, end): the segment of a sequence of N that holds ``position`` (w and φ clipped here)."""
    w, phi = clip_segment(segment_length, n), clip_phase(phase, n)
    start = segment_start(position, w, phi)
    end = phi if position < phi else start + w
    return start, min(end, n)


def segment_groups(n: int, segment_length: int, phase: int = 0) -> List[Tuple[int, int, int]]:
    """The segments of [0, N) as runs of equally long ones: [(start, count, length), ...].

    The leading segment [0, φ') when φ' > 0, the full segments from φ', then
    the short tail; w and φ are clipped here (:func:`clip_segment`, :func:`clip_phase`).
    """
    w, phi = clip_segment(segment_length, n), clip_phase(phase, n)
    n_full, tail = divmod(n - phi, w)
    groups = [(0, 1, phi)] if phi else []
    if n_full:
        groups.append((phi, n_full, w))
    if tail:
        groups.append((phi + n_full * w, 1, tail))
    return groups


def head_offset(head, dilation_rate: int):
    """s = h mod r: head h keeps rows a + s, a + s + r, ... of every segment [a, a + w)."""
    return head % dilation_rate


def row_offset(position, segment_length: int, dilation_rate: int, phase: int = 0):
    """(p - a) mod r, a = :func:`segment_start`: row p is kept exactly by the heads whose
    :func:`head_offset` equals this ((p mod w) mod r for phase 0)."""
    if phase == 0:
        return (position % segment_length) % dilation_rate
    return (position - segment_start(position, segment_length, phase)) % dilation_rate


def used_offsets(dilation_rate: int, num_heads: int) -> range:
    """The offsets some head uses: 0 .. min(r, H) - 1 (rows of the others are kept by no head)."""
    return range(min(dilation_rate, num_heads))


def heads_with_offset(offset: int, dilation_rate: int, num_heads: int) -> range:
    """Heads h < H with h mod r == offset: offset, offset + r, ..."""
    return range(offset, num_heads, dilation_rate)


def kept_count(length: int, offset: int, dilation_rate: int) -> int:
    """How many of the rows offset, offset + r, ... lie below ``length`` (a segment's length)."""
    return 0 if offset >= length else (length - offset + dilation_rate - 1) // dilation_rate


def kept_positions(n: int, segment_length: int, dilation_rate: int, offset: int,
                   phase: int = 0) -> List[int]:
    """Sorted positions < N kept by the heads with this offset, over every segment."""
    return [p for start, count, length in segment_groups(n, segment_length, phase)
            for a in range(start, start + count * length, length)
            for p in range(a + offset, a + length, dilation_rate)]


def keep_mask(positions, heads, segment_length: int, dilation_rate: int, phase: int = 0):
    """(H, N) bool: ``[i, j]`` is True when head ``heads[i]`` keeps row ``positions[j]``.

    ``positions`` (N,) and ``heads`` (H,) are integer torch tensors or numpy
    arrays; the mask is of the same kind (and device). ``segment_length`` and
    ``phase`` are clipped (w', φ').
    """
    return row_offset(positions[None, :], segment_length, dilation_rate, phase) == \
        head_offset(heads[:, None], dilation_rate)


def visible_keys(position: int, segment_length: int, dilation_rate: int,
                 phase: int = 0) -> Tuple[int, int, int]:
    """(offset, first, count): the kept keys a causal query at ``position`` sees in one pattern.

    They are rows first, first + r, ..., position of its segment (``count``
    of them), in the heads with that offset (:func:`heads_with_offset`).
    A causal query never sees past itself, so the sequence length does not
    matter and (w, φ) need no clipping (φ < w holds unclipped).
    """
    start = segment_start(position, segment_length, phase)
    offset = row_offset(position, segment_length, dilation_rate, phase)
    first = start + offset
    return offset, first, kept_count(position - start + 1, offset, dilation_rate)


def dilated_flops(n: int, num_heads: int, head_dim: int, segment_lengths, dilation_rates,
                  *, causal: bool = False, batch: int = 1, backward: bool = False,
                  segment_phases=None) -> float:
    """Attention FLOPs of one dilated-attention call, by docs/design.md §3's count.

    Counts the two matmuls (QK^T and PV) on the kept rows of every segment,
    head and pattern exactly, including short tail segments, the leading
    segment of a phase and r not dividing w: 4 * m^2 * D per segment and head
    with m kept rows, halved when causal. ``backward=True`` adds the usual
    2.5x for the backward (five matmuls instead of two).
    """
    w_t, r_t = validate_pattern(segment_lengths, dilation_rates)
    phases = validate_phases(segment_phases, w_t)
    total = 0  # exact in integers, converted once
    for w, r, phi in zip(w_t, r_t, phases):
        for _, count, length in segment_groups(n, w, phi):
            for h in range(num_heads):
                m = kept_count(length, head_offset(h, r), r)
                total += count * m * m
    flops = 4.0 * head_dim * float(total) * batch
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
    >>> str(DilatedPattern((256,), (2,)).with_local_window(16))
    'w=256,16,16 r=2,1,1 phase=0,0,8'

    ``segment_phases`` (default all 0) are the segment phases of the module
    docstring; iterating yields (w, r) pairs, phases are in the attribute.
    """

    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    segment_phases: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        w, r = validate_pattern(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        object.__setattr__(self, "segment_phases", validate_phases(self.segment_phases, w))

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
            check_int(name, val)
        if alpha < 2 and num_patterns > 1:
            raise ValueError(f"alpha must be >= 2 for a geometric pattern, got {alpha}")
        w = tuple(base_segment * alpha**i for i in range(num_patterns))
        r = tuple(base_rate * alpha**i for i in range(num_patterns))
        return cls(w, r)

    def with_local_window(self, window: int) -> "DilatedPattern":
        """This pattern plus a causal local window: (window, 1, phase 0) and (window, 1, phase window/2).

        Every pair of neighbours then shares a segment in every head (see the
        module docstring), which removes the blind spot of docs/design.md §2.1.
        ``window`` must be even and >= 2.
        """
        window = _as_int("window", window)
        if window < 2 or window % 2:
            raise ValueError(f"window must be an even integer >= 2, got {window}")
        return DilatedPattern(self.segment_lengths + (window, window), self.dilation_rates + (1, 1),
                              self.segment_phases + (0, window // 2))

    def __len__(self) -> int:
        return len(self.segment_lengths)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(zip(self.segment_lengths, self.dilation_rates))

    def flops(self, n: int, num_heads: int, head_dim: int, **kw) -> float:
        """FLOPs of one call (see :func:`dilated_flops`)."""
        return dilated_flops(n, num_heads, head_dim, self.segment_lengths, self.dilation_rates,
                             segment_phases=self.segment_phases, **kw)

    def flop_ratio(self, n: int, num_heads: int, head_dim: int, *, causal: bool = False) -> float:
        """Dense FLOPs divided by dilated FLOPs at this shape."""
        return dense_flops(n, num_heads, head_dim, causal=causal) / self.flops(
            n, num_heads, head_dim, causal=causal)

    def kept_rows(self, pattern_index: int, head: int, n: int) -> list:
        """Sorted positions that pattern ``pattern_index`` keeps in ``head`` for length ``n``."""
        w, r = self.segment_lengths[pattern_index], self.dilation_rates[pattern_index]
        return kept_positions(n, w, r, head_offset(head, r), self.segment_phases[pattern_index])

    def __str__(self) -> str:
        text = "w=" + ",".join(map(str, self.segment_lengths)) + " r=" + ",".join(map(str, self.dilation_rates))
        if any(self.segment_phases):  # unphased patterns print w and r only, and parse back alike
            text += " phase=" + ",".join(map(str, self.segment_phases))
        return text

    @classmethod
    def parse(cls, segment_lengths: str, dilation_rates: str,
              segment_phases: Optional[str] = None) -> "DilatedPattern":
        """Build from comma-separated strings, as the CLI takes them ("2048,4096", "1,2", "0,1024")."""
        def ints(name, text):
            try:
                return tuple(int(t) for t in str(text).split(",") if t.strip())
            except ValueError:
                raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
        phases = None if segment_phases is None else ints("segment_phases", segment_phases)
        return cls(ints("segment_lengths", segment_lengths), ints("dilation_rates", dilation_rates), phases)
