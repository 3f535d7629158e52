"""Where a training process sits: the one interface the trainer and the evaluation use.

:class:`TrainContext` is one process; every method does nothing (collectives return their
input, batches stay whole). :class:`longnet.distributed.training.DistContext` overrides the
same methods with ``torch.distributed`` on a (data x sequence) mesh. The trainer calls
them unconditionally, so it never branches on "distributed or not" and this package never
imports :mod:`longnet.distributed` unless ``torchrun`` started it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["TrainContext"]


class TrainContext:
    """One process on one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.world_size = self.sequence_parallel = self.data_parallel = 1
        self.rank = 0
        # "safetensors" (whole-state files, the sharing format) or "dcp" (torch.distributed.checkpoint).
        self.checkpoint_format = "safetensors"
        # A repeated signal this soon after the first counts as the same one (trainer._StopFlag).
        self.debounce_s = 0.0

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def shards_parameters(self) -> bool:
        """Whether each process holds a shard of the parameters only (FSDP), so the optimizer is
        built after :meth:`prepare` and a checkpoint is written by every process."""
        return False

    def solo_model(self, model: nn.Module) -> Optional[nn.Module]:
        """Collective: a module with the full weights that the main process can run alone
        (``model`` itself unless the parameters are sharded); None on the other processes."""
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to call for training (``model`` itself stays the unwrapped one)."""
        return model

    def accumulate(self, module: nn.Module, sync: bool) -> ContextManager:
        """Context for one micro-batch's backward; gradients are synchronised only when ``sync``."""
        return contextlib.nullcontext()

    def seed_step(self, seed: int, step: int) -> None:
        """Seed dropout for optimiser step ``step`` (one process keeps one continuous RNG stream)."""

    def shard_batch(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """This process's part of a global batch x, y (B, N)."""
        return x, y

    def eval_shards(self, batches: Iterable[Tuple[Tensor, Tensor]]) -> Iterator[Tuple[Tensor, Tensor]]:
        """This process's parts of the evaluation batches (x, y each (B, N))."""
        return iter(batches)

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        """Each value summed over every process."""
        return [float(v) for v in values]

    def any_rank(self, *flags: bool) -> List[bool]:
        """Each flag, true when it is true on any process: every process takes the same decision."""
        return [total > 0 for total in self.all_reduce_sum([bool(f) for f in flags])]

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def full_sequence(self, model: nn.Module) -> nn.Module:
        """A module mapping whole sequences (B, N) -> logits (B, N, V) on every process."""
        return model

    def single_device(self, model: nn.Module) -> ContextManager:
        """Context in which ``model`` runs on this process alone (for sampling)."""
        return contextlib.nullcontext()

    def describe(self, batch_size: int, seq_len: int) -> Optional[str]:
        """A line describing the mesh, or None for one process."""
        return None

    def resume_command(self, out_dir: str) -> str:
        return f"longnet train --resume --out {out_dir}"

    def close(self) -> None:
        """Release what the context holds (the process group)."""
