"""Building blocks that apply sequence and data parallelism to a model from the outside.

The model never imports ``torch.distributed``: :func:`apply_sequence_parallel`
only rebinds two plain attributes of each attention module, and
:func:`data_parallel` wraps the model in DDP.

Typical use under ``torchrun --nproc_per_node D*S``::

    mesh = make_mesh(D, S, "cpu")                  # dims ("dp", "sp")
    apply_sequence_parallel(model, mesh, block_length=N // S)  # checks the split once, here
    model = data_parallel(model, mesh)
    ids = shard_sequence(batch_ids, mesh)          # (B, N) -> (B, N/S), this rank's block
    targets = shard_sequence(batch_targets, mesh)  # shift targets on the FULL sequence first
    loss = cross_entropy(model(ids), targets)      # mean over this rank's block
    loss.backward()
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import Tensor, nn

from ..backends.sequence_parallel import SequenceParallelPlan, plan_sequence_parallel
from ..checks import check_int
from ..modules import XPOS

__all__ = ["make_mesh", "sequence_group", "shard_sequence", "apply_sequence_parallel", "data_parallel",
           "mesh_group", "sequence_parallel_disabled"]


def make_mesh(data_parallel: int, sequence_parallel: int, device_type: str = "cpu"):
    """A 2-D ``DeviceMesh`` of shape (data_parallel, sequence_parallel), dims ("dp", "sp").

    Ranks r = d * sequence_parallel + s: the ranks of one sequence-parallel
    group are consecutive (on GPUs, keep them inside one node so the
    all-gathers use the fast links). Initialises the default process group
    from the torchrun environment if needed (gloo on CPU, NCCL on CUDA).
    """
    from torch.distributed.device_mesh import init_device_mesh
    data_parallel = check_int("data_parallel", data_parallel)
    sequence_parallel = check_int("sequence_parallel", sequence_parallel)
    if dist.is_initialized() and dist.get_world_size() != data_parallel * sequence_parallel:
        raise ValueError(f"data_parallel * sequence_parallel must equal the world size "
                         f"{dist.get_world_size()}, got {data_parallel} * {sequence_parallel}")
    return init_device_mesh(device_type, (data_parallel, sequence_parallel), mesh_dim_names=("dp", "sp"))


def sequence_group(mesh_or_group):
    """The sequence-parallel process group of a mesh (its "sp" dim), or the group itself."""
    if hasattr(mesh_or_group, "get_group"):
        names = getattr(mesh_or_group, "mesh_dim_names", None) or ()
        return mesh_or_group.get_group("sp" if "sp" in names else mesh_or_group.ndim - 1)
    return mesh_or_group


def shard_sequence(tensor: Tensor, mesh_or_group, dim: int = 1) -> Tensor:
    """This rank's contiguous block of ``tensor`` along ``dim`` (a view).

    With S sequence-parallel ranks the length along ``dim`` must be a
    multiple of S; rank i gets [i*L, (i+1)*L), L = length / S.
    """
    group = sequence_group(mesh_or_group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n = tensor.shape[dim]
    if n % size:
        raise ValueError(f"tensor length {n} along dim {dim} must be a multiple of the "
                         f"sequence-parallel size {size}")
    return tensor.narrow(dim, rank * (n // size), n // size)


def _set_offset_hook(rank: int, size: int, seq_dim: int):
    def hook(module, args, kwargs):
        if getattr(module, "_longnet_sp_suspended", False):  # inside sequence_parallel_disabled
            return
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if x is not None:
            # The block length is read from each call's input, so the offset follows the sequence
            # length (training and evaluation lengths can differ).
            block = x.shape[seq_dim]
            module.position_offset = rank * block
            # XPOS scales q and k around a centre; q.k is relative only if every rank uses the
            # same one, so it is the middle of the global sequence rather than of this block.
            if hasattr(module, "xpos_center"):
                module.xpos_center = XPOS.default_center(0, size * block - 1)
    return hook


class _Plans:
    """The sequence-parallel plans of one model, one per (block length, pattern), checked once each.

    Every attention module of the model shares it, so a pattern used by every
    layer is validated (and its sub-groups created) once, not per layer and call.
    """

    def __init__(self, group):
        self.group = group
        self.plans: Dict[Tuple[int, tuple, tuple, Optional[tuple]], SequenceParallelPlan] = {}

    def get(self, block_length: int, segment_lengths: Sequence[int],
            dilation_rates: Sequence[int], segment_phases: Optional[Sequence[int]] = None) -> SequenceParallelPlan:
        phases = tuple(segment_phases) if segment_phases is not None and any(segment_phases) else None
        key = (int(block_length), tuple(segment_lengths), tuple(dilation_rates), phases)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = plan_sequence_parallel(self.group, *key)
        return plan


class _SequenceParallelAttention:
    """An attention module's ``attention_fn`` under sequence parallelism.

    Calls the module's own function with ``group=`` the validated plan of this
    call's block length (q is (B, L, H, D)), which the op then trusts.
    """

    def __init__(self, fn, plans: _Plans):
        self.fn, self.plans = fn, plans

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, **kwargs):
        plan = self.plans.get(q.shape[1], segment_lengths, dilation_rates, kwargs.get("segment_phases"))
        return self.fn(q, k, v, segment_lengths, dilation_rates, group=plan, **kwargs)


def apply_sequence_parallel(model: nn.Module, mesh_or_group, *, seq_dim: int = 1,
                            block_length: Optional[int] = None) -> int:
    """Make every attention module of ``model`` run sequence-parallel; returns how many it changed.

    An attention module is one with the attributes ``attention_fn`` (a callable
    with :func:`longnet.dilated_attention`'s signature) and ``position_offset``
    (int, the global position of its first row, used by XPOS). Each gets an
    ``attention_fn`` that calls the old one with ``group=`` a validated
    :class:`~longnet.backends.sequence_parallel.SequenceParallelPlan` of the
    sp group, and a forward pre-hook that sets ``position_offset = sp_rank * L``
    and (if the module has one) ``xpos_center`` to the middle of the global
    sequence, L being the length of the first tensor input along ``seq_dim``
    (its input is (B, L, E), this rank's block). Applying twice is an error.

    Plans are checked once per block length and pattern for the whole model.
    With ``block_length`` (L), the patterns of modules that expose
    ``segment_lengths``/``dilation_rates`` are checked here, on every rank
    together, so a split that does not fit fails before any forward and no
    process group is created inside one; other lengths are checked on first use.
    """
    group = sequence_group(mesh_or_group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    plans = _Plans(group)
    changed = 0
    for module in model.modules():
        if not (hasattr(module, "attention_fn") and hasattr(module, "position_offset")):
            continue
        if getattr(module, "_longnet_sp_applied", False):
            raise ValueError(f"sequence parallelism is already applied to {type(module).__name__}")
        if block_length is not None and hasattr(module, "segment_lengths"):
            plans.get(block_length, module.segment_lengths, module.dilation_rates,
                      getattr(module, "segment_phases", None))
        module._longnet_sp_original = (module.attention_fn, module.position_offset,
                                       getattr(module, "xpos_center", None))
        module.attention_fn = _SequenceParallelAttention(module.attention_fn, plans)
        module.register_forward_pre_hook(_set_offset_hook(rank, size, seq_dim), with_kwargs=True)
        module._longnet_sp_applied = True
        changed += 1
    if changed == 0:
        raise ValueError("model has no attention module (no module with attributes attention_fn and "
                         "position_offset)")
    return changed


@contextlib.contextmanager
def sequence_parallel_disabled(model: nn.Module):
    """Run a sequence-parallel ``model`` on this process alone inside the block.

    For work one rank does by itself on full sequences (sampling on rank 0):
    restores each attention module's original ``attention_fn``,
    ``position_offset`` and ``xpos_center`` and suspends the pre-hook, then
    puts the sequence-parallel settings back. A no-op for modules that
    :func:`apply_sequence_parallel` did not change.
    """
    saved = []
    for module in model.modules():
        orig = getattr(module, "_longnet_sp_original", None)
        if orig is None or not getattr(module, "_longnet_sp_applied", False):
            continue
        saved.append((module, module.attention_fn, module.position_offset, getattr(module, "xpos_center", None)))
        module.attention_fn, module.position_offset = orig[0], orig[1]
        if hasattr(module, "xpos_center"):
            module.xpos_center = orig[2]
        module._longnet_sp_suspended = True
    try:
        yield model
    finally:
        for module, fn, offset, center in saved:
            module.attention_fn, module.position_offset = fn, offset
            if hasattr(module, "xpos_center"):
                module.xpos_center = center
            module._longnet_sp_suspended = False


def mesh_group(mesh):
    """One process group over every rank of ``mesh`` (the world group when the mesh is the world)."""
    ranks = sorted(int(x) for x in mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    return dist.new_group(ranks)


def data_parallel(model: nn.Module, mesh, **ddp_kwargs) -> nn.Module:
    """Wrap ``model`` in DDP over ALL ranks of the mesh (data x sequence).

    Why the whole mesh: let R = D*S ranks each compute ``loss_i``, the mean
    over its own block of B_local*L tokens (equal counts everywhere). The
    global loss is the mean over all tokens, ``(1/R) * sum_i loss_i``. In a
    sequence-parallel backward every rank's autograd also carries the other
    ranks' losses into its own block (the reduce-scatter sends back the
    gradient of the keys and values other ranks used), so after backward the
    local parameter gradient on rank i is ``d(sum_j loss_j)/d theta_i``
    restricted to rank i's copy of the parameters (summed over the j of its
    sequence group). The true gradient sums these over the copies:
    ``d loss/d theta = (1/R) * sum_i g_i`` — the mean of the local gradients
    over all R ranks, which is what DDP's all-reduce-average over the whole
    mesh computes. Averaging over "dp" only would leave the S sequence
    ranks with different partial gradients and the replicas would drift.
    """
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, process_group=mesh_group(mesh), **ddp_kwargs)
