"""The synthetic passkey-retrieval task: a key hidden in filler text, asked for at the end."""


from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ...checks import check_int
from .sampling import plain_state, restore_state, state_differences

from ...config import TrainConfig

__all__ = ["PasskeyTask", "passkey_accuracy", "passkey_digit_accuracy", "DEFAULT_ANSWER_WEIGHT"]

_FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
# Newlines set needle and query apart from filler that may be cut mid-word.
_NEEDLE = "\nThe pass key is {key}. Remember it.\n"
_KEY_OFFSET = _NEEDLE.index("{key}")  # bytes of needle before the first key digit
_QUERY = b"\nWhat is the pass key? The pass key is "
# Answer digits weigh this many filler bytes in the training loss (PasskeyTask.loss_weights):
# with 5 digits in 1,024 bytes the answer then carries a third of the loss.
DEFAULT_ANSWER_WEIGHT = TrainConfig.passkey_answer_weight


class PasskeyTask:
    """Synthetic long-range retrieval: repeat a key seen ``distance`` bytes earlier.

    Each sequence (seq_len + 1 bytes before the x/y shift) is::

        filler ... "\\nThe pass key is 71432. Remember it.\\n" filler ...
        "\\nWhat is the pass key? The pass key is 71432"

    ``distance`` is the number of bytes from the first key digit in that needle to the first
    digit of the answer at the very end, i.e. how far back attention must reach. None draws
    it uniformly per sequence from the feasible range [min_distance, max_distance]. Keys are
    ``key_digits`` uniform random digits (leading zeros allowed). Filler is a fixed cycle of
    sentences, so the key is the only thing that cannot be predicted locally.

    ``batch(batch_size, generator)`` -> ``x, y, answer_mask``: int64 (B, seq_len) twice and
    bool (B, seq_len), True at the positions of y that are the answer digits (the last
    key_digits positions). ``next_batch()`` -> ``x, y`` with the task's own generator, and
    ``state_dict`` / ``load_state_dict``, like :class:`RandomWindowSampler`.

    Learning signal. The answer is key_digits of seq_len predicted bytes, so with a plain
    mean loss the filler drowns it (at seq_len 1024 a model reaches filler loss 0.03 and
    chance accuracy). :meth:`loss_weights` gives each answer position ``answer_weight``
    times the weight of a filler position; the trainer minimises that weighted mean.
    ``answer_weight=1`` is the plain mean. The weight changes no batch. ``curriculum_steps``
    > 0 (with random distances) is a curriculum over distance for training: ``next_batch``
    draws distances up to :meth:`longest_distance`, which grows linearly from the shortest
    distance to the longest over that many batches; ``batch`` (evaluation) always draws from
    the whole range.
    """

    def __init__(self, seq_len: int, distance: Optional[int] = None, *, key_digits: int = 5, seed: int = 0,
                 batch_size: int = 8, answer_weight: float = DEFAULT_ANSWER_WEIGHT, curriculum_steps: int = 0):
        self.seq_len = check_int("seq_len", seq_len)
        self.curriculum_steps = check_int("curriculum_steps", curriculum_steps, minimum=0)
        if isinstance(answer_weight, bool) or not isinstance(answer_weight, numbers.Real) \
                or not math.isfinite(answer_weight) or answer_weight <= 0:
            raise ValueError(f"answer_weight must be a finite number > 0, got {answer_weight!r}")
        self.answer_weight = float(answer_weight)
        self.key_digits = check_int("key_digits", key_digits)
        if self.key_digits > 32:
            raise ValueError(f"key_digits must be at most 32, got {key_digits}")
        self.batch_size = check_int("batch_size", batch_size)
        needle_tail = len(_NEEDLE.format(key="0" * self.key_digits)) - _KEY_OFFSET
        # Smallest distance: needle directly followed by the query; largest: needle at byte 0.
        self.min_distance = needle_tail + len(_QUERY)
        self.answer_start = self.seq_len + 1 - self.key_digits  # index of the first answer digit
        self.max_distance = self.answer_start - _KEY_OFFSET
        if self.max_distance < self.min_distance:
            need = self.seq_len + self.min_distance - self.max_distance
            raise ValueError(f"seq_len={seq_len} is too short for a passkey with key_digits={key_digits}: "
                             f"needs seq_len >= {need}")
        if distance is not None:
            distance = check_int("distance", distance)
            if not self.min_distance <= distance <= self.max_distance:
                raise ValueError(f"distance must be in [{self.min_distance}, {self.max_distance}] for "
                                 f"seq_len={seq_len}, key_digits={key_digits}; got {distance}")
        self.distance = distance
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.step = 0
        reps = (self.seq_len + 1) // len(_FILLER) + 2
        self._filler = np.frombuffer(_FILLER * reps, dtype=np.uint8)
        self._query = np.frombuffer(_QUERY, dtype=np.uint8)

    def _sequence(self, key: str, distance: int) -> np.ndarray:
        needle = np.frombuffer(_NEEDLE.format(key=key).encode(), dtype=np.uint8)
        key_pos = self.answer_start - distance            # first key digit inside the needle
        needle_start = key_pos - _KEY_OFFSET
        gap = self.answer_start - len(self._query) - (needle_start + len(needle))
        pre = self._filler[:needle_start]
        mid = self._filler[needle_start:needle_start + gap]  # filler keeps its phase across the needle
        s = np.concatenate([pre, needle, mid, self._query, np.frombuffer(key.encode(), dtype=np.uint8)])
        assert s.size == self.seq_len + 1 and bytes(s[key_pos:key_pos + self.key_digits]) == key.encode()
        return s

    def batch(self, batch_size: int, generator: Optional[np.random.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x, y, answer_mask`` for ``batch_size`` fresh sequences (see class docstring)."""
        batch_size = check_int("batch_size", batch_size)
        if generator is None:
            rng = self.rng
        elif isinstance(generator, np.random.Generator):
            rng = generator
        else:
            raise TypeError(f"generator must be a numpy.random.Generator or None, got {type(generator).__name__}")
        return self._draw(batch_size, rng, self.max_distance)

    def longest_distance(self, step: Optional[int] = None) -> int:
        """The longest distance ``next_batch`` draws at sampler step ``step`` (default: the next
        batch's): the task's longest, or during the curriculum a linear ramp up to it."""
        step = self.step if step is None else step
        if not self.curriculum_steps:
            return self.max_distance
        frac = min(1.0, (step + 1) / self.curriculum_steps)
        return self.min_distance + round(frac * (self.max_distance - self.min_distance))

    def _draw(self, batch_size: int, rng: np.random.Generator, longest: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        digits = rng.integers(0, 10, size=(batch_size, self.key_digits))
        if self.distance is None:
            dists = rng.integers(self.min_distance, longest + 1, size=batch_size)
        else:
            dists = np.full(batch_size, self.distance)
        seqs = np.stack([self._sequence("".join(map(str, d)), int(t)) for d, t in zip(digits, dists)])
        seqs = torch.from_numpy(seqs.astype(np.int64))
        mask = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        mask[:, self.seq_len - self.key_digits:] = True
        return seqs[:, :-1], seqs[:, 1:], mask

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self._draw(self.batch_size, self.rng, self.longest_distance())
        self.step += 1
        return x, y

    def loss_weights(self) -> torch.Tensor:
        """Per-position loss weights (seq_len,) float32 for every sequence of the task.

        Answer positions (the last key_digits of y) weigh ``answer_weight`` times a filler
        position. Scaled to mean 1, so the weighted loss ``mean(weights * per_token_loss)``
        keeps the plain loss's scale, and a shard of the positions (sequence parallelism)
        adds up to the same total as the whole sequence.
        """
        w = torch.ones(self.seq_len, dtype=torch.float32)
        w[self.seq_len - self.key_digits:] = self.answer_weight
        return w * (self.seq_len / float(w.sum()))

    def state_dict(self) -> Dict:
        return {"kind": "PasskeyTask", "bit_generator": plain_state(self.rng.bit_generator.state), "step": self.step,
                "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "distance": self.distance, "key_digits": self.key_digits}

    def _settings(self) -> Dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "distance": self.distance,
                "key_digits": self.key_digits}

    def state_differences(self, state: Dict) -> Dict[str, Tuple]:
        """{setting: (saved, now)} for each setting of ``state`` that differs from this task's."""
        return state_differences(state, self._settings())

    def load_state_dict(self, state: Dict, *, strict: bool = True) -> None:
        """Restore ``state``; with ``strict`` the batch size, seq_len, distance and key digits must match."""
        restore_state(self, "PasskeyTask", state, self._settings() if strict else None)

    @staticmethod
    def accuracy(logits: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> float:
        """Fraction of sequences whose answer digits are all argmax-correct."""
        return passkey_accuracy(logits, y, answer_mask)

    @staticmethod
    def digit_accuracy(logits: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> float:
        """Fraction of answer digits that are argmax-correct."""
        return passkey_digit_accuracy(logits, y, answer_mask)


def _answer_hits(logits: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    if not (isinstance(logits, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(answer_mask, torch.Tensor)):
        raise TypeError("logits, y and answer_mask must be torch tensors")
    if logits.dim() != 3 or y.shape != logits.shape[:2] or answer_mask.shape != y.shape:
        raise ValueError(f"expected logits (B, N, V), y (B, N), answer_mask (B, N); got {tuple(logits.shape)}, "
                         f"{tuple(y.shape)}, {tuple(answer_mask.shape)}")
    if answer_mask.dtype != torch.bool:
        raise TypeError(f"answer_mask must be bool, got {answer_mask.dtype}")
    if not bool(answer_mask.any(dim=1).all()):
        raise ValueError("answer_mask marks no answer position in some sequence")
    return logits.argmax(dim=-1) == y


def passkey_accuracy(logits: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> float:
    """Fraction of sequences whose masked positions are all argmax-correct; logits (B, N, V)."""
    hits = _answer_hits(logits, y, answer_mask)
    return float((hits | ~answer_mask).all(dim=1).float().mean())


def passkey_digit_accuracy(logits: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> float:
    """Fraction of masked positions that are argmax-correct; logits (B, N, V)."""
    hits = _answer_hits(logits, y, answer_mask)
    return float(hits[answer_mask].float().mean())
