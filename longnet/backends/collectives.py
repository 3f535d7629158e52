"""Collectives of the sequence-parallel op, their byte accounting, and segment sub-groups.

Byte convention: what one rank puts on the wire and takes off it, for the
ring algorithms gloo and NCCL use. An all-gather of a c-byte chunk among m
ranks sends (m - 1) * c and receives (m - 1) * c bytes per rank; a
reduce-scatter whose output is c bytes does the same. A collective among one
rank is skipped and costs nothing. A point-to-point exchange (the halo of
a shifted segment, see :mod:`.sequence_parallel`) counts the bytes of the
messages this rank sends and receives, and is one call. These are the bytes
the algorithm must move; transport headers are not counted.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "comm_stats", "global_comm_stats", "segment_groups", "init_communicator", "all_gather_chunks",
           "reduce_scatter_chunks", "Message", "exchange"]


@dataclass
class CommStats:
    """Bytes this rank sent and received, and the number of collectives it ran.

    ``by_phase`` splits the same three numbers by phase ("forward",
    "backward") as ``{phase: [bytes_sent, bytes_received, calls]}``.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    by_phase: Dict[str, List[int]] = field(default_factory=dict)

    def record(self, phase: str, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1
        row = self.by_phase.setdefault(phase, [0, 0, 0])
        row[0] += sent
        row[1] += received
        row[2] += 1

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0
        self.by_phase.clear()


_GLOBAL = CommStats()
_ACTIVE: List[CommStats] = []
_LOCK = threading.Lock()


def global_comm_stats() -> CommStats:
    """The running total of this process since import (call ``.reset()`` to zero it)."""
    return _GLOBAL


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the traffic of the sequence-parallel collectives run inside the block.

    >>> with comm_stats() as stats:          # doctest: +SKIP
    ...     out = dilated_attention(q, k, v, w, r, group=g)
    ...     out.sum().backward()
    >>> stats.bytes_sent, stats.by_phase["backward"]  # doctest: +SKIP

    Blocks nest; each sees everything run while it is open.
    """
    stats = CommStats()
    with _LOCK:
        _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        with _LOCK:
            _ACTIVE.remove(stats)


def _record(phase: str, sent: int, received: int) -> None:
    with _LOCK:
        _GLOBAL.record(phase, sent, received)
        for s in _ACTIVE:
            s.record(phase, sent, received)


# ---------------------------------------------------------------- sub-groups

# Keyed by the parent group's global ranks and the segments: every rank of the parent makes the
# same creation calls in the same order (see :func:`segment_groups`), so every rank hits or misses
# this cache together.
_SUBGROUPS: Dict[tuple, list] = {}


def forget_subgroups() -> None:
    """Drop cached segment sub-groups; call after destroying the process group they belong to."""
    _SUBGROUPS.clear()


def _split_mode() -> bool:
    """Whether new groups are NCCL splits of the default group's communicator.

    That is the case once a device id is bound to the default group
    (``init_process_group(device_id=...)``, eager init): PyTorch then creates
    every group with ``ncclCommSplit``, which every rank of the default group
    must join, members or not, and ``use_local_synchronization`` non-members
    would skip it.
    """
    default = dist.distributed_c10d._get_default_group()
    return getattr(default, "bound_device_id", None) is not None


def segment_groups(group, segments: Sequence[Tuple[int, int]]) -> List[tuple]:
    """The process group of each segment ``(first, count)`` of ``group`` (group ranks), as ``(pg, order)``.

    ``order[j]`` is the position inside the segment (0 .. count - 1) of the
    rank with rank j in ``pg``; ``(None, [])`` for a segment this rank is not
    in. A segment that is the whole ``group`` gets ``group`` itself, and a
    one-rank segment gets None (its collectives are skipped). Every rank of
    ``group`` must call this with the same segments, and every rank makes
    the same ``new_group`` calls in the same order, members or not: under
    NCCL splits (:func:`_split_mode`) each is collective over all ranks;
    otherwise sub-groups use ``use_local_synchronization`` and non-members
    return at once, so data-parallel replicas may create theirs concurrently.
    """
    size = dist.get_world_size(group)
    parent = dist.get_process_group_ranks(group)
    me = dist.get_rank()
    key = (tuple(parent), tuple((int(a), int(c)) for a, c in segments))
    cached = _SUBGROUPS.get(key)
    if cached is not None:
        return cached
    split = _split_mode()
    result = []
    for first, count in key[1]:
        members = [parent[first + j] for j in range(count)]
        if first == 0 and count == size:
            result.append((group, list(range(count))))
            continue
        if count == 1:
            result.append((None, [0]) if me in members else (None, []))
            continue
        pg = dist.new_group(sorted(members), use_local_synchronization=not split)
        if me not in members:
            result.append((None, []))
            continue
        sub_ranks = dist.get_process_group_ranks(pg)
        result.append((pg, [members.index(g) for g in sub_ranks]))
    _SUBGROUPS[key] = result
    return result


def init_communicator(group) -> None:
    """Run one collective on ``group`` that every rank joins, so its communicator exists.

    A ``batch_isend_irecv`` that is the group's first operation must be
    joined by every rank of the group (PyTorch's docs; under lazy NCCL init it
    creates the communicator), but a rank with no halo messages skips it.
    """
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


# ---------------------------------------------------------------- collectives

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Pending:
    """An async collective and the reordering to apply once it is done."""

    def __init__(self, work, result: Tensor, order: Sequence[int], gathered: bool):
        self.work, self.result, self.order, self.gathered = work, result, list(order), gathered

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        if self.gathered and self.order != sorted(self.order):
            # recv chunk j came from segment position order[j]; put chunks in position order.
            inv = [self.order.index(p) for p in range(len(self.order))]
            return self.result[inv]
        return self.result


def all_gather_chunks(chunk: Tensor, pg, order: Sequence[int], phase: str = "forward") -> _Pending:
    """Start gathering ``chunk`` from every rank of ``pg``; ``.wait()`` gives (m, *chunk.shape)
    with chunks in segment-position order."""
    m = len(order)
    if m == 1:
        return _Pending(None, chunk.unsqueeze(0), order, True)
    chunk = chunk.contiguous()
    # Flat buffers: gloo only accepts the concatenated (not the stacked) output form.
    out = torch.empty((m, *chunk.shape), dtype=chunk.dtype, device=chunk.device)
    work = _all_gather(out.view(-1), chunk.view(-1), group=pg, async_op=True)
    nbytes = chunk.numel() * chunk.element_size()
    _record(phase, (m - 1) * nbytes, (m - 1) * nbytes)
    return _Pending(work, out, order, True)


def reduce_scatter_chunks(chunks: Tensor, pg, order: Sequence[int], phase: str = "backward") -> _Pending:
    """Start summing ``chunks`` (m, ...) over the ranks of ``pg``; the rank at segment position
    p gets the sum of every rank's ``chunks[p]`` from ``.wait()``."""
    m = len(order)
    if m == 1:
        return _Pending(None, chunks[0], order, False)
    if list(order) != list(range(m)):
        # input slot j goes to the rank with rank j in pg, i.e. to position order[j].
        chunks = chunks[list(order)]
    chunks = chunks.contiguous()
    out = torch.empty(chunks.shape[1:], dtype=chunks.dtype, device=chunks.device)
    work = _reduce_scatter(out.view(-1), chunks.view(-1), group=pg, async_op=True)
    nbytes = out.numel() * out.element_size()
    _record(phase, (m - 1) * nbytes, (m - 1) * nbytes)
    return _Pending(work, out, order, False)


class Message(NamedTuple):
    """One point-to-point message: the tensor to send (or the buffer to receive into), the
    peer's rank in the group, and a tag that tells apart messages between the same two ranks."""

    tensor: Tensor
    peer: int
    tag: int


class _PendingExchange:
    """Started point-to-point messages; ``.wait()`` gives the receive buffers, filled, in order."""

    def __init__(self, works, sends: Sequence[Tensor], recvs: Sequence[Tensor]):
        # The sent tensors are held until the messages complete.
        self.works, self.sends, self.recvs = list(works), list(sends), list(recvs)

    def wait(self) -> List[Tensor]:
        for w in self.works:
            w.wait()
        self.works, self.sends = [], []
        return self.recvs


def exchange(sends: Sequence[Message], recvs: Sequence[Message], pg, phase: str) -> _PendingExchange:
    """Start sending and receiving point-to-point messages within ``pg``; nothing to do costs nothing.

    Every message a rank sends must be matched by a receive of the same shape,
    dtype and tag on its peer, posted in the same order among the messages
    between those two ranks (NCCL matches by order, gloo by tag).
    """
    sends = [m._replace(tensor=m.tensor.contiguous()) for m in sends]
    for m in recvs:
        if not m.tensor.is_contiguous():
            raise ValueError("a receive buffer must be contiguous")
    if not sends and not recvs:
        return _PendingExchange([], [], [])
    ops = [dist.P2POp(dist.isend, m.tensor, group=pg, tag=m.tag, group_peer=m.peer) for m in sends]
    ops += [dist.P2POp(dist.irecv, m.tensor, group=pg, tag=m.tag, group_peer=m.peer) for m in recvs]
    works = dist.batch_isend_irecv(ops)
    _record(phase, sum(m.tensor.numel() * m.tensor.element_size() for m in sends),
            sum(m.tensor.numel() * m.tensor.element_size() for m in recvs))
    return _PendingExchange(works, [m.tensor for m in sends], [m.tensor for m in recvs])
