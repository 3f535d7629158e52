"""Plumbing for ``longnet train`` on a 2-D (data x sequence) device mesh under ``torchrun``.

    torchrun --nproc_per_node P -m longnet train --sequence-parallel S [--data-parallel D]

P = S * D processes. Rank r = d * S + s holds data-parallel index d and
sequence-parallel index s (:func:`longnet.distributed.make_mesh`).

Batches. ``train.batch_size`` is the GLOBAL batch of one micro-step, as in a
single-process run. Every rank draws the same global batch from the same
sampler (same seed, same state), keeps the rows of its data-parallel group
(``batch_size / D`` of them) and, of those, its block of the sequence (x and y
are shifted by one on the full sequence first, then cut into S blocks of
``seq_len / S``). So the ranks of one sequence group see the same rows, the
data-parallel groups see different rows, and the union over the mesh is
exactly the single-process batch: a run behaves the same at any mesh shape
(up to fp32 rounding), and the sampler state is identical on every rank,
which is why a checkpoint written by rank 0 resumes at any other S and D.

Loss. Each rank's loss is the mean over its block (equal token counts
everywhere); DDP over the whole mesh averages the gradients (see
:func:`longnet.distributed.data_parallel` for why that is the exact gradient),
and the logged loss is the mean of the per-rank losses over the mesh.

FSDP (``--fsdp``). The mesh becomes (dp_replicate, dp_shard, sp) and FSDP2 shards the model
over dp_shard x sp (:mod:`longnet.distributed.fsdp`); batches and losses are as above. Every
rank then takes part in each checkpoint (DCP, :func:`longnet.training.checkpoint.save_dcp_checkpoint`),
evaluation batch and the gathering of the weights for the final sample.

Stopping. Every rank handles SIGINT, SIGTERM and SIGHUP; the requests are all-reduced at
each step boundary (:meth:`DistContext.any_rank`), so all ranks stop after the same step,
rank 0 saves, and every rank exits with the same code.

:class:`DistContext` implements :class:`longnet.training.context.TrainContext`, the
interface the trainer and the evaluation call; one process uses that class itself, and
never imports this module. Nothing here is imported by the model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..backends.sequence_parallel import check_sequence_parallel, plan_sequence_parallel
from ..checks import check_int
from ..training.context import TrainContext
from .fsdp import FSDPOptions, apply_fsdp, make_fsdp_mesh
from .parallel import (apply_sequence_parallel, data_parallel, make_mesh, sequence_group,
                       sequence_parallel_disabled, shard_sequence)

__all__ = ["DistContext", "resolve_parallel_sizes", "check_parallel_config", "init_distributed",
           "shutdown_distributed", "parallelize", "step_seed", "GatheredLM", "launch_command"]


def launch_command(processes: int, args: str = "...") -> str:
    return f"torchrun --nproc_per_node {processes} -m longnet train {args}"


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (torchrun sets it)") from None


def resolve_parallel_sizes(sequence_parallel: int = 1, data_parallel: Optional[int] = None,
                           env: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int]:
    """(S, D, world size) from the flags and the torchrun environment (``WORLD_SIZE``).

    D defaults to ``WORLD_SIZE / S``. Without torchrun (no ``WORLD_SIZE``) only S = D = 1
    is possible; otherwise the error names the torchrun command to use.
    """
    env = os.environ if env is None else env
    S = check_int("--sequence-parallel", sequence_parallel)
    if data_parallel is not None:
        data_parallel = check_int("--data-parallel", data_parallel)
    world = _env_int(env, "WORLD_SIZE")
    if world is None:
        D = 1 if data_parallel is None else data_parallel
        if S * D > 1:
            flags = f"--sequence-parallel {S}" + (f" --data-parallel {D}" if data_parallel is not None else "")
            raise ValueError(f"{flags} needs {S * D} processes, one per device, but this process was not "
                             f"started by torchrun (WORLD_SIZE is not set); launch it as\n  "
                             f"{launch_command(S * D, flags + ' ...')}\n(add --nnodes/--rdzv-endpoint "
                             "for several machines)")
        return S, D, 1
    check_int("WORLD_SIZE", world)
    if data_parallel is None:
        if world % S:
            raise ValueError(f"WORLD_SIZE={world} processes (torchrun --nproc_per_node x --nnodes) is not a "
                             f"multiple of --sequence-parallel {S}; use P = S * D processes")
        D = world // S
    else:
        D = data_parallel
    if S * D != world:
        raise ValueError(f"--sequence-parallel {S} x --data-parallel {D} = {S * D} processes, but torchrun "
                         f"started WORLD_SIZE={world}; launch {launch_command(S * D)} or change the flags "
                         f"so that S * D = {world}")
    return S, D, world


def check_parallel_config(seq_len: int, batch_size: int, segment_lengths: Sequence[int],
                          dilation_rates: Sequence[int], sequence_parallel: int, data_parallel: int,
                          segment_phases: Optional[Sequence[int]] = None) -> None:
    """Shape rules of the mesh, checked before any process group exists (raises ValueError).

    seq_len % S == 0, batch_size % D == 0, and the pattern rule of
    :func:`longnet.distributed.check_sequence_parallel` for blocks of seq_len / S.
    """
    S, D = sequence_parallel, data_parallel
    if seq_len % S:
        raise ValueError(f"train.seq_len = {seq_len} must be divisible by --sequence-parallel {S}: each "
                         f"sequence is cut into S blocks of equal length (try seq_len = "
                         f"{max(S, seq_len // S * S)})")
    if batch_size % D:
        raise ValueError(f"train.batch_size = {batch_size} (the global batch of one micro-step) must be "
                         f"divisible by --data-parallel {D}: each data-parallel group takes batch_size / D "
                         f"rows")
    if S > 1:
        try:
            check_sequence_parallel(seq_len // S, S, segment_lengths, dilation_rates,
                                    segment_phases=segment_phases)
        except ValueError as e:
            raise ValueError(f"model pattern w={tuple(segment_lengths)} r={tuple(dilation_rates)} cannot be "
                             f"split into --sequence-parallel {S} blocks of train.seq_len / S = "
                             f"{seq_len // S}: {e}") from None


@dataclass
class DistContext(TrainContext):
    """This process's place on the mesh: :class:`longnet.training.context.TrainContext` with
    ``torch.distributed``. ``owns_group``: this module initialised the default process group
    (and so destroys it at the end)."""

    world_size: int
    rank: int
    local_rank: int
    sequence_parallel: int
    data_parallel: int
    sp_rank: int
    dp_rank: int
    mesh: Any
    device: torch.device
    backend: str
    owns_group: bool
    # FSDP2 sharding (None: DDP); "dcp" or "safetensors" (what the trainer's checkpoints are).
    fsdp: Optional[FSDPOptions] = None
    checkpoint_format: str = "safetensors"
    async_group: Any = None  # a gloo group for dcp.async_save (None: saves block)
    # torchrun forwards a terminal's SIGINT (and a scheduler's SIGTERM) to workers that
    # already received it: a repeat within this window is the same request.
    debounce_s: float = 2.0

    @property
    def sp_group(self):
        return sequence_group(self.mesh)

    def prepare(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self)

    @property
    def shards_parameters(self) -> bool:
        return self.fsdp is not None

    def accumulate(self, module: nn.Module, sync: bool):
        if self.fsdp is not None:
            # FSDP2 keeps unsharded gradients until the last micro-batch, then reduce-scatters once.
            module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        # DDP all-reduces gradients on the last micro-batch of a step only.
        return contextlib.nullcontext() if sync or self.world_size == 1 else module.no_sync()

    def seed_step(self, seed: int, step: int) -> None:
        torch.manual_seed(step_seed(seed, step, self.rank))

    def shard_batch(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Rows of this rank's data-parallel group, then its block of the sequence:
        x, y (B, N) -> (B / D, N / S)."""
        b = x.shape[0]
        if b % self.data_parallel:
            raise ValueError(f"batch of {b} rows is not divisible by --data-parallel {self.data_parallel}")
        rows = slice(self.dp_rank * (b // self.data_parallel), (self.dp_rank + 1) * (b // self.data_parallel))
        return shard_sequence(x[rows], self.mesh), shard_sequence(y[rows], self.mesh)

    def eval_shards(self, batches):
        """Batch i goes to data-parallel group i % D; each rank of it scores its block of the sequence.

        Under FSDP every forward is collective over the whole mesh, so every group scores every
        batch: the summed losses and token counts both grow by D, their ratio is unchanged."""
        for i, (x, y) in enumerate(batches):
            if self.fsdp is not None or i % self.data_parallel == self.dp_rank:
                yield shard_sequence(x, self.mesh), shard_sequence(y, self.mesh)

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index]) if self.backend == "nccl" else dist.barrier()

    def full_sequence(self, model: nn.Module) -> nn.Module:
        return GatheredLM(model, self)

    def single_device(self, model: nn.Module):
        return sequence_parallel_disabled(model)

    def solo_model(self, model: nn.Module) -> Optional[nn.Module]:
        """Under FSDP (collective): a plain copy with the full weights on rank 0, None elsewhere."""
        if self.fsdp is None:
            return model
        from .fsdp import gather_full_model
        return gather_full_model(model, self.is_main)

    def describe(self, batch_size: int, seq_len: int) -> Optional[str]:
        S, D = self.sequence_parallel, self.data_parallel
        shard = ("; FSDP2 shards parameters, gradients and optimizer state over "
                 + (f"{self.world_size // self.fsdp.replicate} ranks x {self.fsdp.replicate} replicas (HSDP)"
                    if self.fsdp.replicate > 1 else f"all {self.world_size} ranks")
                 + f", {self.fsdp.param_dtype} parameters" if self.fsdp is not None else "; DDP")
        return (f"mesh: {self.world_size} processes ({self.backend}) = data-parallel {D} x sequence-parallel "
                f"{S}; each process holds {batch_size // D} of {batch_size} rows x {seq_len // S} of "
                f"{seq_len} positions per micro-step{shard}; checkpoints: {self.checkpoint_format}")

    def resume_command(self, out_dir: str) -> str:
        return (f"torchrun --nproc_per_node {self.world_size} -m longnet train --resume --out {out_dir} "
                f"--sequence-parallel {self.sequence_parallel}" + (" --fsdp" if self.fsdp is not None else "")
                + " (any S and D work)")

    def close(self) -> None:
        shutdown_distributed(self)


def init_distributed(sequence_parallel: int, data_parallel: int, device: torch.device, *,
                     seq_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                     segment_phases: Optional[Sequence[int]] = None, timeout_s: float = 1800.0,
                     fsdp: Optional[FSDPOptions] = None, checkpoint_format: Optional[str] = None,
                     async_checkpoint: bool = False) -> DistContext:
    """Join the torchrun world (or use an already initialised one) and build the mesh.

    NCCL for CUDA devices, gloo otherwise; on CUDA each process takes ``cuda:LOCAL_RANK``
    (torchrun sets LOCAL_RANK; several nodes rendezvous through torchrun, nothing more is
    needed here). With ``fsdp`` the mesh is :func:`longnet.distributed.fsdp.make_fsdp_mesh`'s
    and checkpoints default to DCP. The segment sub-groups are created up front
    (:func:`plan_sequence_parallel`), so no group is created inside a forward.
    """
    local_rank = _env_int(os.environ, "LOCAL_RANK") or 0
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                             "devices; use --nproc_per_node <= the number of GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    world = dist.get_world_size()
    if world != sequence_parallel * data_parallel:
        raise ValueError(f"the process group has {world} ranks, not --sequence-parallel {sequence_parallel} "
                         f"x --data-parallel {data_parallel}")
    if fsdp is not None:
        mesh = make_fsdp_mesh(data_parallel, sequence_parallel, fsdp.replicate, device.type)
        dp_rank = mesh.get_local_rank("dp_replicate") * (data_parallel // fsdp.replicate) + \
            mesh.get_local_rank("dp_shard")
    else:
        mesh = make_mesh(data_parallel, sequence_parallel, device.type)
        dp_rank = mesh.get_local_rank("dp")
    if sequence_parallel > 1:
        plan_sequence_parallel(sequence_group(mesh), seq_len // sequence_parallel, segment_lengths,
                               dilation_rates, segment_phases)
    return DistContext(world_size=world, rank=dist.get_rank(), local_rank=local_rank,
                       sequence_parallel=sequence_parallel, data_parallel=data_parallel,
                       sp_rank=mesh.get_local_rank("sp"), dp_rank=dp_rank, mesh=mesh,
                       device=device, backend=backend, owns_group=owns, fsdp=fsdp,
                       checkpoint_format=checkpoint_format or ("dcp" if fsdp is not None else "safetensors"),
                       # Background saves run their collectives on their own group, as torchtitan does.
                       async_group=dist.new_group(backend="gloo") if async_checkpoint else None)


def shutdown_distributed(ctx: Optional[DistContext]) -> None:
    """Destroy the default process group if :func:`init_distributed` created it."""
    if ctx is None or not ctx.owns_group or not dist.is_initialized():
        return
    # The op caches segment sub-groups by global ranks; they die with the default group.
    from ..backends import collectives as comm
    comm.forget_subgroups()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def parallelize(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Apply sequence parallelism (S > 1) to ``model`` in place, then FSDP2 (``ctx.fsdp``, in
    place: ``model`` itself is returned) or DDP over the whole mesh (more than one rank).
    Returns the module to call for training; under DDP ``model`` stays the unwrapped one
    (checkpoints, evaluation, sampling)."""
    if ctx.sequence_parallel > 1:
        apply_sequence_parallel(model, ctx.mesh)
    if ctx.fsdp is not None:
        return apply_fsdp(model, ctx.mesh, ctx.fsdp)
    if ctx.world_size == 1:
        return model
    # Buffers (XPOS tables) are constants: no need to broadcast them before every forward
    # (torch 2.13 renamed the switch).
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    kw = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    kw["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return data_parallel(model, ctx.mesh, **kw)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Torch seed for (run seed, optimiser step, global rank): dropout masks differ between
    ranks and do not depend on the RNG history, so a resumed run on the same mesh redraws
    the same masks without saving every rank's RNG state."""
    return (seed * 1_000_003 + step * 65_537 + rank * 7_919 + 1) % (2 ** 63)


class GatheredLM(nn.Module):
    """Full-sequence view of a sequence-parallel model: tokens (B, N) -> logits (B, N, V).

    Each rank runs its block and the blocks' logits are all-gathered within the sequence
    group, so code written for one device (e.g. :func:`longnet.training.evaluate.evaluate_passkey`)
    runs unchanged on every rank. Inference only (no gradient through the gather); the
    gathered logits cost B * N * V floats per rank, fine for evaluation batches.
    """

    def __init__(self, model: nn.Module, ctx: DistContext):
        super().__init__()
        self.model = model
        self.ctx = ctx

    def forward(self, tokens: Tensor) -> Tensor:
        block = self.model(shard_sequence(tokens, self.ctx.mesh)).contiguous()
        if self.ctx.sequence_parallel == 1:
            return block
        parts = [torch.empty_like(block) for _ in range(self.ctx.sequence_parallel)]
        dist.all_gather(parts, block, group=self.ctx.sp_group)
        return torch.cat(parts, dim=1)

