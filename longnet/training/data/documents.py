"""Whole documents of a corpus split, packed into training rows with no attention across them.

Documents: the files of the built-in corpus (each begins with its header line
``# ==> relpath <==``) or the articles of enwik8 (each begins at ``<page>``); whatever
precedes the first marker of a split is a document too. :func:`document_starts` finds them
by scanning the memory-mapped split in chunks, never reading it whole.

:class:`DocumentSampler` shuffles the documents once per epoch and lays them end to end;
each row of a batch is the next ``seq_len + 1`` bytes of that stream, so every document
comes whole, in order, and a long one continues in the following rows. ``next_batch()``
returns x, y (B, seq_len) and ``cu_seqlens`` over the B x seq_len tokens read row after
row (:mod:`longnet.varlen`): a sequence starts at each row and at each document start, so
``LongNetLM(x, cu_seqlens=...)`` attends within one document of one row only. The state
is resumable like :class:`~.sampling.RandomWindowSampler`'s.

:func:`document_start_loss` scores a model on the first bytes of each document.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ...checks import check_int
from .sampling import plain_state, restore_state, state_differences

__all__ = ["DOCUMENT_MARKERS", "document_starts", "DocumentSampler", "document_start_loss"]

# How a document begins, per corpus: (marker, whether it must open a line).
DOCUMENT_MARKERS = {"builtin": (b"# ==> ", True), "enwik8": (b"<page>", False)}
_CHUNK = 1 << 24


def document_starts(data: np.ndarray, corpus_name: str) -> np.ndarray:
    """Sorted int64 offsets of each document's first byte in ``data`` (a split of that corpus); 0 first."""
    if corpus_name not in DOCUMENT_MARKERS:
        raise ValueError(f"train.pack_documents needs a corpus with document boundaries: "
                         f"{sorted(DOCUMENT_MARKERS)} (files, or enwik8's <page> articles), got {corpus_name!r}")
    marker, line_start = DOCUMENT_MARKERS[corpus_name]
    needle = b"\n" + marker if line_start else marker
    shift = 1 if line_start else 0
    found = [0]
    n = int(data.size)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK + len(needle) - 1)  # overlap, so a marker across chunks is seen once
        buf = np.asarray(data[lo:hi]).tobytes()
        i = buf.find(needle)
        while i != -1:
            if i < _CHUNK:
                found.append(lo + i + shift)
            i = buf.find(needle, i + 1)
    starts = np.unique(np.asarray(found, dtype=np.int64))
    return starts[starts < n] if n else starts[:1]


class DocumentSampler:
    """Training rows cut from a shuffled stream of whole documents (see the module docstring).

    ``next_batch()`` -> ``x, y, cu_seqlens``: x, y int64 (B, seq_len) (y is x shifted by one);
    cu_seqlens int32 (S + 1,) over the B x seq_len tokens. ``state_dict()`` holds the
    generator state at the start of the epoch, the epoch, the position in it and the step,
    so a restored sampler draws exactly the batches the original would have drawn next.
    """

    kind = "DocumentSampler"

    def __init__(self, data: np.ndarray, starts: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0):
        if not isinstance(data, np.ndarray) or data.ndim != 1:
            raise TypeError(f"data must be a 1-D numpy array (e.g. Corpus.train), got {type(data).__name__}")
        self.data = data
        self.batch_size = check_int("batch_size", batch_size)
        self.seq_len = check_int("seq_len", seq_len)
        starts = np.asarray(starts, dtype=np.int64)
        if starts.ndim != 1 or starts.size == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() \
                or starts[-1] >= data.size:
            raise ValueError("starts must be increasing document offsets from 0, inside data")
        if data.size < self.seq_len + 1:
            raise ValueError(f"data has {data.size:,} bytes, fewer than seq_len + 1 = {self.seq_len + 1:,}")
        self.starts = starts
        self.lengths = np.diff(np.append(starts, data.size))
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.step = 0
        self._new_epoch(0)

    @property
    def num_documents(self) -> int:
        return int(self.starts.size)

    def _new_epoch(self, epoch: int) -> None:
        self.epoch, self.index, self.offset = epoch, 0, 0
        self._epoch_state = plain_state(self.rng.bit_generator.state)
        self.order = self.rng.permutation(self.num_documents)

    def _row(self) -> Tuple[np.ndarray, List[int]]:
        """The next seq_len + 1 bytes of the stream, and the row positions < seq_len where a document begins."""
        need, parts, begins = self.seq_len + 1, [], []
        while need:
            doc = int(self.order[self.index])
            if self.offset == 0 and sum(map(len, parts)) < self.seq_len:
                begins.append(sum(map(len, parts)))
            take = min(need, int(self.lengths[doc]) - self.offset)
            first = int(self.starts[doc]) + self.offset
            parts.append(np.asarray(self.data[first:first + take], dtype=np.int64))
            need -= take
            self.offset += take
            if self.offset == self.lengths[doc]:
                self.index, self.offset = self.index + 1, 0
                if self.index == self.num_documents:
                    self._new_epoch(self.epoch + 1)
        return np.concatenate(parts), begins

    def next_batch(self) -> Tuple[Tensor, Tensor, Tensor]:
        rows, bounds = [], []
        for b in range(self.batch_size):
            row, begins = self._row()
            rows.append(row)
            bounds += [b * self.seq_len + p for p in sorted(set([0] + begins))]
        w = torch.from_numpy(np.stack(rows))
        cu = torch.tensor(bounds + [self.batch_size * self.seq_len], dtype=torch.int32)
        self.step += 1
        return w[:, :-1], w[:, 1:], cu

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> Dict:
        """JSON-serialisable state: the epoch's starting generator state, position, step and settings."""
        return {"kind": self.kind, "bit_generator": self._epoch_state, "step": self.step, "seed": self.seed,
                "epoch": self.epoch, "index": self.index, "offset": self.offset, **self._settings()}

    def _settings(self) -> Dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "data_size": int(self.data.size),
                "num_documents": self.num_documents}

    def state_differences(self, state: Dict) -> Dict[str, Tuple]:
        """{setting: (saved, now)} for each setting of ``state`` that differs from this sampler's."""
        return state_differences(state, self._settings())

    def load_state_dict(self, state: Dict, *, strict: bool = True) -> None:
        """Restore ``state``; with ``strict`` the batch size, seq_len, data size and document count must match."""
        restore_state(self, self.kind, state, self._settings() if strict else None)
        epoch, index, offset = (check_int(f"sampler state {k!r}", state.get(k), minimum=0)
                                for k in ("epoch", "index", "offset"))
        step = self.step
        self._new_epoch(epoch)  # redraws the epoch's order from its saved generator state
        if index >= self.num_documents or offset >= self.lengths[self.order[index]]:
            raise ValueError(f"sampler state position (document {index}, byte {offset}) is outside the "
                             f"{self.num_documents} documents of this data")
        self.index, self.offset, self.step = index, offset, step


@torch.no_grad()
def document_start_loss(model, data: np.ndarray, starts: np.ndarray, *, first: int = 64, context: int = 0,
                        max_documents: Optional[int] = None, device="cpu") -> Dict[str, float]:
    """Mean next-byte loss (nats) of ``model`` (x (1, N) -> logits (1, N, V)) on each document's first bytes.

    ``context`` 0: each document alone from its first byte, scoring the predictions of its
    bytes 1..first. ``context`` c > 0: a window holding the c bytes before the document (the
    end of the one before it), scoring its bytes 0..first-1; documents with fewer than c
    bytes before them are skipped. Documents shorter than first + 1 bytes are skipped.
    Returns {"loss", "bpb", "documents"}.
    """
    ends = np.append(starts[1:], data.size)
    total, count, docs = 0.0, 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < first + 1 or s < context:
            continue
        w = torch.from_numpy(np.asarray(data[s - context:s + first + 1], dtype=np.int64))[None].to(device)
        logits = model(w[:, :-1]).float()
        lo = max(context - 1, 0)  # the prediction of byte s (context > 0) or of byte s + 1 (alone)
        loss = torch.nn.functional.cross_entropy(logits[0, lo:lo + first], w[0, lo + 1:lo + 1 + first],
                                                 reduction="sum")
        total, count, docs = total + float(loss), count + first, docs + 1
        if max_documents is not None and docs >= max_documents:
            break
    mean = total / max(count, 1)
    return {"loss": mean, "bpb": mean / float(np.log(2)), "documents": docs}
