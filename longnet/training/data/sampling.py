"""Training windows drawn from a corpus split, their resumable state, and evaluation windows.

A split is a 1-D uint8 array (a memory-mapped :class:`~.corpus.Corpus` view); windows are
(B, N + 1) int64 tensors, read only where they are drawn.
"""


from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ...checks import check_int


__all__ = ["RandomWindowSampler", "iter_eval_windows", "num_eval_windows", "check_sampler_state", "plain_state",
           "state_differences", "restore_state"]


def _check_data(data) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise TypeError(f"data must be a 1-D numpy array (e.g. Corpus.train), got {type(data).__name__}"
                        + (f" with shape {data.shape}" if isinstance(data, np.ndarray) else ""))
    return data


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    # Fancy indexing on a memmap reads just those pages; the result is a small in-RAM copy.
    idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
    return torch.from_numpy(np.asarray(data[idx], dtype=np.int64))


class RandomWindowSampler:
    """Random (x, y) training windows from a byte array.

    ``next_batch()`` -> ``x, y``: int64 tensors (B, seq_len); each row is a window of
    ``seq_len + 1`` bytes at a uniformly random offset, x its first seq_len bytes and y its
    last seq_len (x shifted by one). Offsets come from ``np.random.default_rng(seed)``;
    ``state_dict()`` holds that generator's state and the step, so a sampler restored with
    ``load_state_dict`` draws exactly the batches the original would have drawn next.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0):
        self.data = _check_data(data)
        self.batch_size = check_int("batch_size", batch_size)
        self.seq_len = check_int("seq_len", seq_len)
        if data.size < self.seq_len + 1:
            raise ValueError(f"data has {data.size:,} bytes, fewer than seq_len + 1 = {self.seq_len + 1:,}; "
                             f"use a shorter seq_len or more data")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.step = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, self.data.size - self.seq_len, size=self.batch_size, dtype=np.int64)
        w = _windows(self.data, starts, self.seq_len + 1)
        self.step += 1
        return w[:, :-1], w[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> Dict:
        """JSON-serialisable state: generator state, step and the settings it must be resumed with."""
        return {"kind": "RandomWindowSampler", "bit_generator": plain_state(self.rng.bit_generator.state),
                "step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "data_size": int(self.data.size)}

    def _settings(self) -> Dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "data_size": int(self.data.size)}

    def state_differences(self, state: Dict) -> Dict[str, Tuple]:
        """{setting: (saved, now)} for each setting of ``state`` that differs from this sampler's."""
        return state_differences(state, self._settings())

    def load_state_dict(self, state: Dict, *, strict: bool = True) -> None:
        """Restore ``state``; with ``strict`` the batch size, seq_len and data size must match."""
        restore_state(self, "RandomWindowSampler", state, self._settings() if strict else None)


def plain_state(obj):
    if isinstance(obj, dict):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def state_differences(state: Dict, current: Dict) -> Dict[str, Tuple]:
    return {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}


def check_sampler_state(state) -> None:
    """Raise ValueError unless ``state`` is a well-formed sampler ``state_dict()`` (of either sampler).

    Checks the structure and that the generator state is one numpy accepts, so a damaged
    state is caught before anything depends on it.
    """
    if not isinstance(state, dict):
        raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    if state.get("kind") not in ("RandomWindowSampler", "PasskeyTask", "DocumentSampler"):
        raise ValueError(f"'kind' must be RandomWindowSampler, DocumentSampler or PasskeyTask, got "
                         f"{state.get('kind')!r}")
    step = state.get("step")
    check_int("'step'", step, minimum=0)
    try:
        np.random.default_rng().bit_generator.state = state.get("bit_generator")
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"'bit_generator' is not a numpy generator state ({e})") from None


def restore_state(sampler, kind: str, state: Dict, settings: Optional[Dict]) -> None:
    check_sampler_state(state)
    if state["kind"] != kind:
        raise ValueError(f"state is for {state['kind']!r}, not {kind}")
    diff = state_differences(state, settings) if settings is not None else {}
    if diff:
        raise ValueError("sampler state does not match this sampler: "
                         + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                         + " (pass strict=False to load anyway)")
    sampler.rng.bit_generator.state = state["bit_generator"]
    sampler.step = int(state["step"])


def num_eval_windows(n: int, seq_len: int, *, stride: Optional[int] = None, max_windows: Optional[int] = None) -> int:
    """How many windows :func:`iter_eval_windows` yields for ``n`` bytes."""
    stride = seq_len if stride is None else stride
    count = 0 if n < seq_len + 1 else (n - seq_len - 1) // stride + 1
    return count if max_windows is None else min(count, max_windows)


def iter_eval_windows(data: np.ndarray, seq_len: int, *, batch_size: int = 1, max_windows: Optional[int] = None,
                      stride: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation windows from the start of ``data``.

    Window i covers bytes ``[i*stride, i*stride + seq_len]`` (seq_len + 1 bytes); x is its
    first seq_len bytes, y its last seq_len. The default stride = seq_len makes the targets
    contiguous and non-overlapping: every byte after the first is predicted exactly once
    (up to the tail that does not fill a window). A smaller stride overlaps windows; the
    caller then decides which targets to score. Yields int64 (b, seq_len) pairs, b <= batch_size
    (the last batch may be smaller).
    """
    data = _check_data(data)
    seq_len = check_int("seq_len", seq_len)
    batch_size = check_int("batch_size", batch_size)
    stride = seq_len if stride is None else check_int("stride", stride)
    if max_windows is not None:
        max_windows = check_int("max_windows", max_windows)
    if data.size < seq_len + 1:
        raise ValueError(f"data has {data.size:,} bytes, fewer than seq_len + 1 = {seq_len + 1:,}")
    total = num_eval_windows(int(data.size), seq_len, stride=stride, max_windows=max_windows)
    for first in range(0, total, batch_size):
        starts = np.arange(first, min(first + batch_size, total), dtype=np.int64) * stride
        w = _windows(data, starts, seq_len + 1)
        yield w[:, :-1], w[:, 1:]
