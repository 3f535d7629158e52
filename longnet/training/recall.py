"""Byte-level recall probes, generated on the fly: MQAR, copying, variable tracking, passkey.

Every task draws a batch of ``(x, y, mask, gap)``, all (B, N):

* ``x``: int64 input bytes; ``y``: int64 target bytes (the byte to predict at each position);
* ``mask``: bool, True only at the answer positions; loss and accuracy count only those;
* ``gap``: int64, at an answer position q the distance q - j to the position j that holds
  what must be read to answer (0 elsewhere). Attention at q has to reach j, in one layer
  or through a chain of layers.

Byte ranges are disjoint, so a byte says what it is (Zoology's keys and values come from
disjoint halves of the vocabulary):

* ``SPECIAL`` 0..15 (``SEP``, ``QUERY``, ``NEEDLE``, ``ASSIGN``);
* ``FILLER`` 16..63: the bytes between the items; never a key, a value or an answer;
* ``KEYS`` 64..127: MQAR keys and variable names (so at most 64 pairs or variables);
* ``VALUES`` 128..255: MQAR values, variable values, passkey digits, copied strings.

Tasks:

* :class:`MQAR`, Zoology's multi-query associative recall layout: ``num_pairs`` key-value
  pairs first (``k1 v1 k2 v2 ...``, distinct keys), then filler in which every key is asked
  once at a random even offset; the answer at a query is its value. Zoology draws query
  offsets from a power law that favours the start of the query region; here they are uniform
  over it, so gaps span the whole sequence. The gap is measured to the value's position.
  In this layout every gap is odd (queries at even, values at odd positions), so no dilated
  segment with an even rate keeps both ends in one head; ``even_queries=False`` puts queries
  at any position of the query region instead.
* :class:`Copying` (``x SEP x``, Jelassi et al. 2024): filler, a string of ``copy_len`` bytes,
  ``SEP``, and the string again; the answers are the second copy (gap = copy_len).
* :class:`VariableTracking` (RULER's multi-hop tracing, byte-level): ``chains`` chains of
  ``hops`` assignments ``ASSIGN a1 v``, ``ASSIGN a2 a1``, ... placed in order at random slots in
  filler; at the end ``QUERY a_last`` for each chain, answered by the chain's value.
* :class:`Passkey`: filler with ``NEEDLE d1 .. dK`` at a random depth and ``QUERY d1 .. dK``
  at the end; the answers are the K digits (bytes from ``VALUES``).

Each task takes ``seq_len`` N and draws with a ``torch.Generator`` (``batch(b, generator)``),
so a seed fixes every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from ..checks import check_int

__all__ = ["SEP", "QUERY", "NEEDLE", "ASSIGN", "FILLER", "KEYS", "VALUES", "RecallBatch", "RecallTask", "MQAR",
           "Copying", "VariableTracking", "Passkey", "TASKS", "make_task", "chance_accuracy"]

SEP, QUERY, NEEDLE, ASSIGN = 1, 2, 3, 4
FILLER = (16, 64)
KEYS = (64, 128)
VALUES = (128, 256)


@dataclass
class RecallBatch:
    """x, y (B, N) int64; mask (B, N) bool, True at answer positions; gap (B, N) int64 (0 off answers)."""

    x: Tensor
    y: Tensor
    mask: Tensor
    gap: Tensor


def _randint(lo: int, hi: int, shape, g: torch.Generator) -> Tensor:
    return torch.randint(lo, hi, shape, generator=g)


def _choose(population: int, k: int, b: int, g: torch.Generator) -> Tensor:
    """(b, k) int64: k distinct values of 0..population-1 per row, in random order."""
    return torch.rand(b, population, generator=g).argsort(dim=1)[:, :k]


class RecallTask:
    """Base: ``seq_len`` and the batch layout; subclasses fill :meth:`_fill`."""

    name = "task"

    def __init__(self, seq_len: int):
        self.seq_len = check_int("seq_len", seq_len, minimum=8)

    def batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> RecallBatch:
        """One batch of ``batch_size`` sequences of ``seq_len`` bytes (see the module docstring)."""
        b = check_int("batch_size", batch_size)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        n = self.seq_len
        seq = _randint(*FILLER, (b, n + 1), g)  # x = seq[:, :-1]; y defaults to seq[:, 1:]
        y = torch.zeros(b, n, dtype=torch.int64)
        mask = torch.zeros(b, n, dtype=torch.bool)
        gap = torch.zeros(b, n, dtype=torch.int64)
        self._fill(seq, y, mask, gap, g)
        x = seq[:, :n]
        y = torch.where(mask, y, seq[:, 1:])
        return RecallBatch(x, y, mask, gap)

    def _fill(self, seq: Tensor, y: Tensor, mask: Tensor, gap: Tensor, g: torch.Generator) -> None:
        raise NotImplementedError

    def answers_per_sequence(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}@{self.seq_len}"


class MQAR(RecallTask):
    """Zoology's multi-query associative recall (module docstring); ``num_pairs`` <= 64."""

    name = "mqar"

    def __init__(self, seq_len: int, num_pairs: int = 8, even_queries: bool = True):
        super().__init__(seq_len)
        self.num_pairs = check_int("num_pairs", num_pairs)
        if self.num_pairs > KEYS[1] - KEYS[0]:
            raise ValueError(f"num_pairs must be at most {KEYS[1] - KEYS[0]} (distinct key bytes), got {num_pairs}")
        if not isinstance(even_queries, bool):
            raise ValueError(f"even_queries must be True or False, got {even_queries!r}")
        self.stride = 2 if even_queries else 1
        # Query offsets in the region after the pairs (the last position has no target after it).
        self.slots = (self.seq_len - 2 * self.num_pairs) // self.stride
        if self.slots < self.num_pairs:
            raise ValueError(f"seq_len={seq_len} is too short for {num_pairs} pairs: needs seq_len >= "
                             f"{4 * self.num_pairs}")

    def _fill(self, seq, y, mask, gap, g):
        b, p = seq.shape[0], self.num_pairs
        keys = _choose(KEYS[1] - KEYS[0], p, b, g) + KEYS[0]
        values = _randint(*VALUES, (b, p), g)
        seq[:, 0:2 * p:2], seq[:, 1:2 * p:2] = keys, values
        q = 2 * p + self.stride * _choose(self.slots, p, b, g)  # query positions (b, p), pair i asked at q[:, i]
        seq.scatter_(1, q, keys)
        y.scatter_(1, q, values)
        mask.scatter_(1, q, torch.ones_like(q, dtype=torch.bool))
        gap.scatter_(1, q, q - (2 * torch.arange(p) + 1))  # to the value's position 2i + 1

    def answers_per_sequence(self) -> int:
        return self.num_pairs

    def describe(self) -> str:
        return f"mqar@{self.seq_len}/{self.num_pairs}p" + ("" if self.stride == 2 else "/any")


class Copying(RecallTask):
    """``filler x SEP x``; ``copy_len`` None draws it per sequence from [min_len, seq_len // 2 - 1]."""

    name = "copy"

    def __init__(self, seq_len: int, copy_len: Optional[int] = None, min_len: int = 4):
        super().__init__(seq_len)
        self.longest = self.seq_len // 2 - 1
        self.min_len = check_int("min_len", min_len)
        if copy_len is not None:
            copy_len = check_int("copy_len", copy_len)
            if copy_len > self.longest:
                raise ValueError(f"copy_len must be at most seq_len // 2 - 1 = {self.longest}, got {copy_len}")
        elif self.min_len > self.longest:
            raise ValueError(f"min_len must be at most seq_len // 2 - 1 = {self.longest}, got {min_len}")
        self.copy_len = copy_len

    def _fill(self, seq, y, mask, gap, g):
        b, n = seq.shape[0], self.seq_len
        for i in range(b):
            L = self.copy_len or int(_randint(self.min_len, self.longest + 1, (1,), g))
            s = _randint(*VALUES, (L,), g)
            start = n + 1 - (2 * L + 1)  # the second copy ends at the last byte
            seq[i, start:start + L], seq[i, start + L] = s, SEP
            seq[i, start + L + 1:start + 2 * L + 1] = s
            answers = slice(start + L, start + 2 * L)  # x = SEP, s[0], ... predicts s[0], s[1], ...
            mask[i, answers] = True
            y[i, answers] = s
            gap[i, answers] = L

    def answers_per_sequence(self) -> int:
        return self.copy_len or (self.min_len + self.longest) // 2

    def describe(self) -> str:
        return f"copy@{self.seq_len}" + (f"/{self.copy_len}" if self.copy_len else "")


class VariableTracking(RecallTask):
    """Chains ``ASSIGN a1 v; ASSIGN a2 a1; ...`` in filler, then ``QUERY a_last`` per chain."""

    name = "vt"

    def __init__(self, seq_len: int, hops: int = 2, chains: int = 2):
        super().__init__(seq_len)
        self.hops = check_int("hops", hops)
        self.chains = check_int("chains", chains)
        if self.hops * self.chains > KEYS[1] - KEYS[0]:
            raise ValueError(f"hops * chains must be at most {KEYS[1] - KEYS[0]} (distinct names), "
                             f"got {hops} * {chains}")
        self.body = self.seq_len - 2 * self.chains  # the queries take the last 2 * chains bytes
        if self.body // 3 < self.hops * self.chains:
            raise ValueError(f"seq_len={seq_len} is too short for {chains} chains of {hops} hops: needs "
                             f"seq_len >= {3 * self.hops * self.chains + 2 * self.chains}")

    def _fill(self, seq, y, mask, gap, g):
        b, h, c = seq.shape[0], self.hops, self.chains
        for i in range(b):
            names = (_choose(KEYS[1] - KEYS[0], h * c, 1, g)[0] + KEYS[0]).view(c, h)
            values = _randint(*VALUES, (c,), g)
            slots = _choose(self.body // 3, h * c, 1, g)[0].view(c, h).sort(dim=1).values * 3
            for k in range(c):
                for j in range(h):
                    src = values[k] if j == 0 else names[k, j - 1]
                    seq[i, slots[k, j]:slots[k, j] + 3] = torch.stack([torch.tensor(ASSIGN), names[k, j], src])
                q = self.body + 2 * k + 1
                seq[i, q - 1], seq[i, q] = QUERY, names[k, h - 1]
                y[i, q], mask[i, q] = values[k], True
                gap[i, q] = q - (slots[k, 0] + 2)  # to the value in the chain's first assignment

    def answers_per_sequence(self) -> int:
        return self.chains

    def describe(self) -> str:
        return f"vt@{self.seq_len}/{self.hops}h{self.chains}c"


class Passkey(RecallTask):
    """``NEEDLE d1..dK`` at a random depth in filler, ``QUERY d1..dK`` at the end; K digits from VALUES."""

    name = "passkey"

    def __init__(self, seq_len: int, digits: int = 5):
        super().__init__(seq_len)
        self.digits = check_int("digits", digits)
        self.query = self.seq_len - self.digits  # position of QUERY in x
        if self.query < self.digits + 2:
            raise ValueError(f"seq_len={seq_len} is too short for a {digits}-digit passkey: needs seq_len >= "
                             f"{2 * self.digits + 2}")

    def _fill(self, seq, y, mask, gap, g):
        b, k = seq.shape[0], self.digits
        key = _randint(*VALUES, (b, k), g)
        at = _randint(0, self.query - k, (b,), g)  # NEEDLE position; the digits end before QUERY
        cols = at[:, None] + 1 + torch.arange(k)
        seq.scatter_(1, at[:, None], torch.full((b, 1), NEEDLE))
        seq.scatter_(1, cols, key)
        seq[:, self.query] = QUERY
        seq[:, self.query + 1:self.query + 1 + k] = key
        answers = slice(self.query, self.query + k)
        mask[:, answers] = True
        y[:, answers] = key
        gap[:, answers] = (self.query - (at + 1))[:, None]

    def answers_per_sequence(self) -> int:
        return self.digits

    def describe(self) -> str:
        return f"passkey@{self.seq_len}"


TASKS: Dict[str, type] = {"mqar": MQAR, "copy": Copying, "vt": VariableTracking, "passkey": Passkey}


def make_task(name: str, seq_len: int, **knobs) -> RecallTask:
    """``make_task("mqar", 512, num_pairs=8)``; raises ValueError for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name](seq_len, **knobs)


def chance_accuracy(task: RecallTask) -> float:
    """Accuracy of guessing uniformly among the values a sequence shows (MQAR: 1 / num_pairs)."""
    if isinstance(task, MQAR):
        return 1.0 / task.num_pairs
    if isinstance(task, VariableTracking):
        return 1.0 / task.chains
    return 1.0 / (VALUES[1] - VALUES[0])

