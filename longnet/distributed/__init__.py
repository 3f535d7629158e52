"""Sequence parallelism for LongNet on ``torch.distributed`` (docs/design.md §4).

- :func:`sequence_parallel_dilated_attention` — the op; ``longnet.dilated_attention(..., group=g)``
  calls it. Rank i of g passes positions [i*L, (i+1)*L) as (B, L, H, D).
- :func:`check_sequence_parallel` — the shape rule, without running anything;
  :func:`plan_sequence_parallel` — validate a split and create its segment sub-groups up front.
- :class:`CommStats`, :func:`comm_stats`, :func:`global_comm_stats` — bytes sent and received.
- :func:`make_mesh`, :func:`shard_sequence`, :func:`apply_sequence_parallel`,
  :func:`data_parallel` — a 2-D (data x sequence) mesh applied from outside the model.
- ``python -m longnet.bench.sp`` — weak-scaling benchmark.
"""

from ..backends.collectives import CommStats, comm_stats, forget_subgroups, global_comm_stats
from ..backends.sequence_parallel import (SegmentSpan, check_sequence_parallel, plan_sequence_parallel,
                                          sequence_parallel_dilated_attention)
from .parallel import (apply_sequence_parallel, data_parallel, make_mesh, mesh_group, sequence_group,
                       sequence_parallel_disabled, shard_sequence)

__all__ = ["sequence_parallel_dilated_attention", "check_sequence_parallel", "plan_sequence_parallel",
           "SegmentSpan", "CommStats",
           "comm_stats", "global_comm_stats", "make_mesh", "sequence_group", "shard_sequence",
           "apply_sequence_parallel", "data_parallel", "mesh_group", "sequence_parallel_disabled",
           "forget_subgroups"]
