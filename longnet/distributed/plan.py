"""What one rank of a LongNet run needs, found by running the real code for that rank alone.

:func:`simulate_rank` builds the real :class:`~longnet.model.LongNetLM`, applies longnet's
sequence parallelism and FSDP2 (:mod:`longnet.distributed.fsdp`) on the real mesh, and runs
one training micro-step (forward, backward, AdamW step) of one rank. Under
:func:`fake_world` the process group is PyTorch's fake backend (``FakeStore``: collectives
move nothing) and the tensors are ``FakeTensorMode`` tensors (shapes only), so rank r of
1,024 ranks at 1M tokens per rank runs in seconds on a CPU. The same function runs under a
real gloo group with real tensors, which is how the simulation is checked
(tests/test_plan.py): the collectives and their bytes must be identical, the tracked peak
memory equal within a stated tolerance.

Measured per rank, not derived from formulas:
- memory: ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`` (peak by category:
  parameters, gradients, optimizer state, activations, temporaries, all-gather and
  reduce-scatter buffers); parameter, gradient and AdamW-state bytes also from the local
  shards themselves;
- bytes: :class:`CommCounter`, a dispatch mode over the ``c10d`` ops (every collective of
  FSDP and of the sequence-parallel op), grouped by kind and process group, with the
  ring-algorithm convention of :mod:`longnet.backends.collectives` (an all-gather of c
  bytes among m ranks sends (m - 1) c); longnet's own ``comm_stats`` is kept beside it.

Layers are identical, so a run of L layers costs the 1-layer run plus L - 1 times the
difference between the 2- and 1-layer runs; :func:`plan` simulates 1 and 2 layers and
extrapolates linearly (``layers_simulated=None`` runs every layer instead; the test checks
the two agree). The projected step time (:func:`project_step`) is arithmetic on these
counts and a :class:`DeviceProfile`; its efficiencies are assumptions, stated there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..backends.collectives import comm_stats, forget_subgroups
from ..backends.sequence_parallel import plan_sequence_parallel
from ..config import LongNetConfig, xpos_max_length
from ..patterns import dense_flops, dilated_flops
from .fsdp import FSDPOptions, apply_fsdp, fsdp_mesh, make_fsdp_mesh
from .parallel import apply_sequence_parallel, sequence_group

__all__ = ["DeviceProfile", "PROFILES", "Layout", "RankSim", "CommCounter", "paper_pattern", "plan_config",
           "fake_world", "simulate_rank", "plan", "project_step", "figure5_points"]

GiB = 1024 ** 3


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator and its links. Bandwidths are GB/s (1e9 bytes) per GPU per direction.

    From the public spec sheets (dense bf16, no sparsity): H100 SXM5 989 TFLOP/s, 80 GB
    HBM3, NVLink 4 900 GB/s total (450 each way), one 400 Gb/s NDR InfiniBand NIC per GPU
    (50 GB/s); A100 SXM4 312 TFLOP/s, 80 GB HBM2e, NVLink 3 600 GB/s total (300 each way),
    one 200 Gb/s HDR NIC per GPU (25 GB/s). ``matmul_efficiency`` and
    ``attention_efficiency`` are ASSUMED fractions of peak (longnet's kernels have never run
    on these GPUs): 0.5 is a typical bf16 GEMM MFU at these sizes, 0.35 is below published
    FlashAttention-2 forward+backward efficiency, for the dilated gathers.
    """

    name: str
    bf16_tflops: float
    hbm_gib: float
    intra_node_gbs: float
    inter_node_gbs: float
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.5
    attention_efficiency: float = 0.35

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"device profile {f.name} must be a positive number, got {v!r}")


PROFILES = {
    "h100": DeviceProfile("H100 SXM5 80GB", bf16_tflops=989.0, hbm_gib=80e9 / GiB, intra_node_gbs=450.0,
                          inter_node_gbs=50.0),
    "a100": DeviceProfile("A100 SXM4 80GB", bf16_tflops=312.0, hbm_gib=80e9 / GiB, intra_node_gbs=300.0,
                          inter_node_gbs=25.0),
}


@dataclass(frozen=True)
class Layout:
    """GPUs = dp * sp; FSDP shards over all of them (over gpus / replicate with HSDP)."""

    sp: int
    dp: int = 1
    replicate: int = 1

    @property
    def gpus(self) -> int:
        return self.sp * self.dp

    def check(self, seq_len: int, batch: int) -> None:
        if seq_len % self.sp:
            raise ValueError(f"--seq-len {seq_len} must be divisible by --sp {self.sp}")
        if batch % self.dp:
            raise ValueError(f"--batch {batch} must be divisible by --dp {self.dp} (the global batch)")
        FSDPOptions(replicate=self.replicate).check(self.dp)


def paper_pattern(n: int, ratio: int = 2048, base: int = 4) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """w_i = ratio * base^i, r_i = base^i up to the first w >= n: every pattern keeps ``ratio``
    rows per segment and head (docs/design.md §3: w / r constant), the longest spans the
    whole sequence, as in the paper's scaling experiments."""
    w, r = [ratio], [1]
    while w[-1] < n:
        w.append(w[-1] * base)
        r.append(r[-1] * base)
    return tuple(w), tuple(r)


def plan_config(model: LongNetConfig, seq_len: int, pattern: Optional[Tuple[Sequence[int], Sequence[int]]] = None,
                activation_checkpointing: bool = False) -> LongNetConfig:
    """``model`` with the pattern for ``seq_len`` (:func:`paper_pattern` unless given) and an
    XPOS scale base long enough for it (the decay overflows float32 otherwise)."""
    w, r = pattern if pattern is not None else paper_pattern(seq_len)
    base = model.xpos_scale_base
    if model.xpos and xpos_max_length(base) < seq_len:
        base = base * math.ceil(seq_len / xpos_max_length(base) * 1.01)
    return dataclasses.replace(model, segment_lengths=tuple(w), dilation_rates=tuple(r), xpos_scale_base=base,
                               activation_checkpointing=activation_checkpointing, dropout=0.0)


# ----------------------------------------------------------------------------- counting


_KINDS = {"_allgather_base_": "all-gather", "allgather_": "all-gather", "allgather_into_tensor_coalesced_":
          "all-gather", "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_": "reduce-scatter",
          "reduce_scatter_tensor_coalesced_": "reduce-scatter", "allreduce_": "all-reduce",
          "allreduce_coalesced_": "all-reduce", "send": "send", "recv_": "recv", "broadcast_": "broadcast",
          "alltoall_base_": "all-to-all"}


_SP_FILE = os.path.join("backends", "collectives.py")  # where every sequence-parallel collective starts


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _called_from_sequence_parallel() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_SP_FILE):
            return True
        frame = frame.f_back
    return False


class CommCounter(TorchDispatchMode):
    """Bytes this rank sends per (group label, collective kind) while active, from the ``c10d``
    ops themselves. ``groups`` maps a label to the process groups it covers; other groups are
    "other". Convention (ring algorithms, as :mod:`longnet.backends.collectives`): all-gather
    (m - 1) x input bytes, reduce-scatter (m - 1) x output bytes, all-reduce 2 (m - 1) / m x
    bytes, send and recv their message bytes; barriers are not counted."""

    def __init__(self, groups: Dict[str, Sequence]):
        super().__init__()
        self.labels = {id(pg): label for label, pgs in groups.items() for pg in pgs}
        self.bytes: Dict[Tuple[str, str], int] = {}
        self.calls: Dict[Tuple[str, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            kind = _KINDS.get(func._opname)
            if kind is not None:
                self._count(kind, args)
        return func(*args, **(kwargs or {}))

    def _count(self, kind: str, args) -> None:
        pg = next((dist.ProcessGroup.unbox(a) for a in args if type(a).__name__ == "ScriptObject"
                   and a._type().name().endswith("ProcessGroup")), None)
        m = pg.size() if pg is not None else 1
        # FSDP's group and the sequence group can be the same ranks (dp = 1): the caller decides.
        label = "sp" if _called_from_sequence_parallel() else self.labels.get(id(pg), "other")
        tensors = list(_tensors(args[0])), list(_tensors(args[1])) if len(args) > 1 else []
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        if kind == "all-gather":
            sent = (m - 1) * nbytes(tensors[1])
        elif kind == "reduce-scatter":
            sent = (m - 1) * nbytes(tensors[0])
        elif kind == "all-reduce":
            sent = 2 * (m - 1) * nbytes(tensors[0]) // m
        else:
            sent = nbytes(tensors[0])
        key = (label, kind)
        self.bytes[key] = self.bytes.get(key, 0) + sent
        self.calls[key] = self.calls.get(key, 0) + 1


# ----------------------------------------------------------------------------- one rank


@dataclass
class RankSim:
    """One rank's micro-step. Bytes throughout; ``peak`` is the tracker's peak by category."""

    rank: int
    layers: int
    params: int
    grads: int
    optimizer: int
    peak: Dict[str, int]
    comm: Dict[Tuple[str, str], int]
    calls: Dict[Tuple[str, str], int]
    sp_stats: Tuple[int, int, int]  # longnet comm_stats: bytes sent, received, calls
    extrapolated: bool = False
    notes: list = field(default_factory=list)

    @property
    def peak_total(self) -> int:
        return self.peak.get("Total", 0)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks in which this process is ``rank``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without a process group")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        forget_subgroups()
        dist.destroy_process_group()


def _groups(mesh, layout: Layout) -> Dict[str, list]:
    fm = fsdp_mesh(mesh)
    out = {"fsdp": [fm.get_group("fsdp")]}
    if layout.replicate > 1:
        out["replicate"] = [fm.get_group("dp_replicate")]
    return out


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def simulate_rank(model_cfg: LongNetConfig, seq_len: int, batch: int, layout: Layout, *, fake: bool = True,
                  param_dtype: str = "fp32") -> RankSim:
    """One micro-step of this process's rank on ``layout``, in the current process group
    (:func:`fake_world`, or a real one). ``batch`` is the global batch; this rank gets
    batch / dp rows of seq_len / sp positions. With ``fake`` the tensors are fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from ..model import LongNetLM
    layout.check(seq_len, batch)
    L, rows = seq_len // layout.sp, batch // layout.dp
    mesh = make_fsdp_mesh(layout.dp, layout.sp, layout.replicate, "cpu")
    groups = _groups(mesh, layout)  # flattened before fake mode: the mesh holds real rank tensors
    pat = model_cfg.pattern
    if layout.sp > 1:
        plan_sequence_parallel(sequence_group(mesh), L, pat.segment_lengths, pat.dilation_rates,
                               pat.segment_phases)
    with (FakeTensorMode() if fake else contextlib.nullcontext()):
        torch.manual_seed(0)
        model = LongNetLM(model_cfg)
        if layout.sp > 1:
            apply_sequence_parallel(model, mesh)
        apply_fsdp(model, mesh, FSDPOptions(replicate=layout.replicate, param_dtype=param_dtype))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _init_optimizer_state(model, opt)
        x = torch.randint(0, model_cfg.vocab_size, (rows, L))
        counter = CommCounter(groups)
        with FSDPMemTracker(model, opt) as tracker, comm_stats() as sp, counter:
            model.loss(x, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return RankSim(rank=dist.get_rank(), layers=model_cfg.n_layers, params=_local_bytes(params),
                       grads=_local_bytes(p for p in params if p.requires_grad), optimizer=_local_bytes(state),
                       peak={str(k): int(v) for k, v in peak.items()}, comm=dict(counter.bytes),
                       calls=dict(counter.calls), sp_stats=(sp.bytes_sent, sp.bytes_received, sp.calls))


def _init_optimizer_state(model, opt) -> None:
    # AdamW creates its state at the first step; one step with zero gradients and lr 0 makes
    # the measured step a steady-state one (state allocated) without changing the weights.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def _extrapolate(one: RankSim, two: RankSim, layers: int) -> RankSim:
    """The L-layer numbers from the 1- and 2-layer runs: x(L) = x(1) + (L - 1) (x(2) - x(1))."""
    lin = lambda a, b: a + (layers - 1) * (b - a)  # noqa: E731
    keys = set(one.comm) | set(two.comm)
    return RankSim(rank=one.rank, layers=layers, params=lin(one.params, two.params),
                   grads=lin(one.grads, two.grads), optimizer=lin(one.optimizer, two.optimizer),
                   peak={k: lin(one.peak.get(k, 0), two.peak.get(k, 0)) for k in set(one.peak) | set(two.peak)},
                   comm={k: lin(one.comm.get(k, 0), two.comm.get(k, 0)) for k in keys},
                   calls={k: lin(one.calls.get(k, 0), two.calls.get(k, 0)) for k in keys},
                   sp_stats=tuple(lin(a, b) for a, b in zip(one.sp_stats, two.sp_stats)), extrapolated=True)


def plan(model_cfg: LongNetConfig, seq_len: int, batch: int, layout: Layout, *, rank: int = 0,
         layers_simulated: Optional[int] = 2, param_dtype: str = "fp32") -> RankSim:
    """Rank ``rank`` of ``layout`` in a fake world of ``layout.gpus`` ranks (this process must
    have no process group). ``layers_simulated=2``: 1- and 2-layer runs, extrapolated to
    ``model_cfg.n_layers``; None: every layer."""
    layout.check(seq_len, batch)

    def run(n_layers: int) -> RankSim:
        with fake_world(layout.gpus, rank):
            return simulate_rank(dataclasses.replace(model_cfg, n_layers=n_layers), seq_len, batch, layout,
                                 param_dtype=param_dtype)
    if layers_simulated is None or model_cfg.n_layers <= 2:
        return run(model_cfg.n_layers)
    if layers_simulated != 2:
        raise ValueError(f"layers_simulated must be 2 or None, got {layers_simulated!r}")
    return _extrapolate(run(1), run(2), model_cfg.n_layers)


# ----------------------------------------------------------------------------- projection


def _bandwidth(group_size: int, profile: DeviceProfile) -> float:
    # Groups are consecutive ranks (sp innermost): up to a node's GPUs they stay on NVLink.
    return (profile.intra_node_gbs if group_size <= profile.gpus_per_node else profile.inter_node_gbs) * 1e9


def project_step(sim: RankSim, model_cfg: LongNetConfig, seq_len: int, batch: int, layout: Layout,
                 profile: DeviceProfile) -> Dict[str, float]:
    """Projected seconds of one micro-step on ``profile`` from the simulated bytes and the
    FLOP counts: linear layers 6 x params x tokens (the embedding lookup excluded, the head
    included), attention by :func:`longnet.patterns.dilated_flops` (causal, forward +
    backward), each at its assumed efficiency; activation checkpointing adds one forward.
    ``no_overlap_s`` adds communication to compute, ``overlap_s`` takes the larger."""
    c = model_cfg
    tokens = batch // layout.dp * seq_len // layout.sp
    per_layer = 4 * c.d_model * c.d_model + (3 if c.activation in ("silu", "swish") else 2) * c.d_model * c.d_ffn
    linear = 6.0 * tokens * (c.n_layers * per_layer + c.d_model * c.vocab_size)
    pat = c.pattern
    attn = c.n_layers * dilated_flops(seq_len, c.n_heads, c.head_dim, pat.segment_lengths, pat.dilation_rates,
                                      causal=True, batch=batch // layout.dp, backward=True,
                                      segment_phases=pat.segment_phases) / layout.sp
    dense = c.n_layers * dense_flops(seq_len, c.n_heads, c.head_dim, causal=True, batch=batch // layout.dp,
                                     backward=True) / layout.sp
    if c.activation_checkpointing:
        linear, attn, dense = linear * 4 / 3, attn * 4.5 / 3.5, dense * 4.5 / 3.5
    peak = profile.bf16_tflops * 1e12
    compute = linear / (peak * profile.matmul_efficiency) + attn / (peak * profile.attention_efficiency)
    sizes = {"sp": layout.sp, "fsdp": layout.gpus // layout.replicate, "replicate": layout.replicate}
    comm = sum(b / _bandwidth(sizes.get(label, layout.gpus), profile) for (label, _), b in sim.comm.items())
    return {"linear_flops": linear, "attention_flops": attn, "dense_attention_flops": dense,
            "compute_s": compute, "comm_s": comm, "no_overlap_s": compute + comm, "overlap_s": max(compute, comm),
            "dense_compute_s": linear / (peak * profile.matmul_efficiency) + dense / (peak * profile.attention_efficiency),
            "tokens_per_rank": float(tokens)}


def figure5_points(tokens_per_gpu: int = 2 ** 20, first: int = 13, last: int = 30) -> list:
    """(N, GPUs) for the projected Figure 5: N = 2^first .. 2^last (every other power of 2 and
    the last), on one GPU up to ``tokens_per_gpu`` and N / tokens_per_gpu GPUs beyond."""
    exps = list(range(first, last + 1, 2))
    if exps[-1] != last:
        exps.append(last)
    return [(2 ** e, max(1, 2 ** e // tokens_per_gpu)) for e in exps]
