"""FSDP2 (``torch.distributed.fsdp.fully_shard``) composed with LongNet's sequence parallelism.

Mesh. ``--fsdp`` builds a 3-D ``DeviceMesh`` of shape (R, D / R, S) with dims
("dp_replicate", "dp_shard", "sp"), its device type given explicitly (a CPU mesh keeps the
model on the CPU even on a machine with GPUs, pytorch#132471). Global rank
r = (i * D / R + j) * S + s, the same order as :func:`longnet.distributed.make_mesh`, so the
batch rows and sequence blocks of a rank do not depend on the sharding.

Sharding. As in torchtitan, parameters, gradients and optimizer state are sharded over
"dp_shard" x "sp" flattened into one "fsdp" dim: the S ranks that share a sequence also
share the parameter shards. With R > 1 (HSDP) each of the R replicas holds a full set of
shards and the gradients are also all-reduced over "dp_replicate". LongNet's own
sequence-parallel attention runs over "sp" (:func:`longnet.distributed.apply_sequence_parallel`).

Gradients. Every rank's loss is the mean over its block of tokens; FSDP's reduce-scatter
averages over all "fsdp" ranks (and HSDP's all-reduce over "dp_replicate"), i.e. over the
whole mesh, which is the exact gradient of the global mean loss for the same reason as
DDP over the whole mesh (see :func:`longnet.distributed.data_parallel`).

Each :class:`~longnet.model.LongNetBlock` is one FSDP unit (its parameters are all-gathered
just before its forward and freed after), the root holds the embedding, the final norm and
the (tied) head. Activation checkpointing is the model's own
(``--set activation_checkpointing=true``: ``torch.utils.checkpoint`` around each block,
non-reentrant), which composes with FSDP2: the block's parameters are gathered again for the
recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..checks import check_int

__all__ = ["FSDPOptions", "make_fsdp_mesh", "fsdp_mesh", "apply_fsdp", "MESH_DIMS"]

MESH_DIMS = ("dp_replicate", "dp_shard", "sp")


@dataclass(frozen=True)
class FSDPOptions:
    """How ``--fsdp`` shards the model.

    ``replicate``: R, the HSDP replica count (1: plain FSDP over the whole mesh); the data
    parallel size D must be a multiple of it. ``param_dtype``: "fp32" or "bf16" (parameters
    all-gathered and computed in bf16; gradients reduced and the optimizer run in fp32).
    ``reshard_after_forward``: free each block's gathered parameters after its forward
    (ZeRO-3; False keeps them until the backward, ZeRO-2-like, trading memory for one
    all-gather per block).
    """

    replicate: int = 1
    param_dtype: str = "fp32"
    reshard_after_forward: bool = True

    def __post_init__(self):
        check_int("--dp-replicate", self.replicate)
        if self.param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"--fsdp-param-dtype must be 'fp32' or 'bf16', got {self.param_dtype!r}")

    def check(self, data_parallel: int) -> None:
        if data_parallel % self.replicate:
            raise ValueError(f"--dp-replicate {self.replicate} must divide --data-parallel {data_parallel}: "
                             "each replica shards over D / R data-parallel groups x S sequence ranks")


def make_fsdp_mesh(data_parallel: int, sequence_parallel: int, replicate: int = 1, device_type: str = "cpu"):
    """The (R, D / R, S) mesh with dims :data:`MESH_DIMS` (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    FSDPOptions(replicate=replicate).check(data_parallel)
    return init_device_mesh(device_type, (replicate, data_parallel // replicate, sequence_parallel),
                            mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh):
    """The mesh ``fully_shard`` gets: ("dp_shard", "sp") flattened into "fsdp", with
    "dp_replicate" in front when there is more than one replica (HSDP, a 2-D mesh)."""
    shard = mesh["dp_shard", "sp"]._flatten("fsdp")
    if mesh["dp_replicate"].size() == 1:
        return shard
    return mesh["dp_replicate", "fsdp"]


def apply_fsdp(model: nn.Module, mesh, options: Optional[FSDPOptions] = None) -> nn.Module:
    """``fully_shard`` every block of ``model`` (``model.blocks``), then the root; in place.

    ``mesh``: a mesh from :func:`make_fsdp_mesh`. Apply sequence parallelism first (it only
    rebinds attributes). Returns ``model``, now an FSDP module: build the optimizer after this
    call, on ``model.parameters()`` (DTensor shards).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    options = options or FSDPOptions()
    kw = {"mesh": fsdp_mesh(mesh), "reshard_after_forward": options.reshard_after_forward}
    if options.param_dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"apply_fsdp needs a model with .blocks (a LongNetLM), got {type(model).__name__}")
    for block in blocks:
        fully_shard(block, **kw)
    # The root's parameters are gathered for the whole forward anyway.
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    return model


def gather_full_model(model: nn.Module, keep: bool) -> Optional[nn.Module]:
    """A plain (unsharded, single-device) copy of an FSDP ``model`` with its full weights, on
    the ranks with ``keep`` (None elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return None
    from ..model import LongNetLM
    plain = LongNetLM(model.config)
    plain.load_state_dict(full)
    return plain.eval()
