"""Workers for tests/test_distributed.py: run inside spawned gloo processes on one machine.

Each world runs every check once and saves a dict of measured numbers per rank
(``result_<rank>.pt``); the tests then assert on those numbers, so one spawn
serves many tests.
"""

from __future__ import annotations

import datetime
import os
import traceback
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import longnet
from longnet.distributed import (apply_sequence_parallel, comm_stats, data_parallel, make_mesh,
                                 plan_sequence_parallel, shard_sequence)

# name -> (B, H, D, L, segment_lengths, dilation_rates, use_lse_grad, backend)
CASES = {
    "local": (2, 3, 8, 16, (4, 8), (1, 2), False, None),
    "span2": (2, 3, 8, 16, (8, 32), (1, 4), False, None),
    "span_all": (1, 4, 8, 16, (16, 2000), (2, 8), True, None),
    "r_gt_h": (2, 3, 8, 16, (32,), (4,), True, None),
    "mixed": (2, 4, 8, 16, (8, 16, 32, 64), (1, 2, 4, 8), True, None),
    "uneven_last_segment": (1, 3, 8, 16, (48,), (4,), False, None),
    "math_backend": (1, 2, 8, 16, (8, 32), (1, 2), False, "math"),
    # q, k, v as (B, L, H, D) views of (B, H, L, D) tensors, as Hugging Face passes them.
    "transposed": (2, 3, 8, 16, (8, 32, 64), (1, 2, 4), True, None),
    # Shifted segments (segment_phases below): halo exchanges with the neighbouring ranks.
    "halo_window": (2, 3, 8, 16, (16, 8, 8), (2, 1, 1), True, None),
    "halo_rates": (1, 3, 8, 16, (12, 8, 32), (2, 4, 2), True, None),
    "halo_and_span": (1, 3, 8, 16, (32, 8), (4, 1), False, None),
    "halo_math": (1, 2, 8, 16, (8, 8), (1, 1), True, "math"),
}
TRANSPOSED = {"transposed"}
# name -> segment_phases of the cases with shifted segments (the others have none).
PHASES = {
    "halo_window": (0, 0, 4),  # the local-window variant: segments straddle every boundary
    "halo_rates": (6, 4, 0),  # r > 1, halos of different sizes at each boundary, r = 4 > H
    "halo_and_span": (16, 2),  # w' > L with a phase: whole-block segments shared by ranks
    "halo_math": (0, 4),
}


def _max_err(a, b):
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _finite(lse):
    return torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))


def _parity(rank, world, name, causal):
    b, h, d, L, w, r, lse_grad, backend = CASES[name]
    phases = PHASES.get(name)
    n = L * world
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}{causal}".encode()))
    q, k, v, go = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    gl = torch.randn(b, n, h, generator=g, dtype=torch.float64) if lse_grad else None

    def loss(out, lse, go, gl):
        val = (out * go).sum()
        return val + (_finite(lse) * gl).sum() if gl is not None else val

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = longnet.dilated_attention(*full, w, r, is_causal=causal, return_lse=True,
                                                 backend="reference", segment_phases=phases)
    loss(ref_out, ref_lse, go, gl).backward()
    blk = slice(rank * L, (rank + 1) * L)
    if name in TRANSPOSED:
        leaves = [x[:, blk].transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
        part = [t.transpose(1, 2) for t in leaves]
        assert not part[0].is_contiguous()
    else:
        leaves = part = [x[:, blk].clone().requires_grad_() for x in (q, k, v)]
    with comm_stats() as stats:
        out, lse = longnet.dilated_attention(*part, w, r, is_causal=causal, return_lse=True,
                                             group=dist.group.WORLD, backend=backend, segment_phases=phases)
        loss(out, lse, go[:, blk], gl[:, blk] if gl is not None else None).backward()
    ref_l = ref_lse[:, blk]
    grads = [t.grad.transpose(1, 2) if name in TRANSPOSED else t.grad for t in leaves]
    return {
        "out": _max_err(out, ref_out[:, blk]),
        "lse": _max_err(_finite(lse), _finite(ref_l)),
        "lse_inf_match": bool(torch.equal(torch.isinf(lse), torch.isinf(ref_l))),
        "has_empty_rows": bool(torch.isinf(ref_l).any()),
        "dq": _max_err(grads[0], full[0].grad[:, blk]),
        "dk": _max_err(grads[1], full[1].grad[:, blk]),
        "dv": _max_err(grads[2], full[2].grad[:, blk]),
        "finite": bool(all(torch.isfinite(g).all() for g in grads)),
        "bytes": {ph: list(v) for ph, v in stats.by_phase.items()},
        "sent": stats.bytes_sent, "received": stats.bytes_received,
    }


class _ToyAttention(nn.Module):
    """Has the two attributes apply_sequence_parallel rebinds; uses position_offset like XPOS would."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_fn = longnet.dilated_attention
        self.position_offset = 0

    def forward(self, x):
        b, n, e = x.shape
        pos = torch.arange(self.position_offset, self.position_offset + n, dtype=x.dtype)
        x = x + torch.sin(pos[None, :, None] * 0.37)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, e // self.heads).unbind(2)
        out = self.attention_fn(q, k, v, (4, 16), (1, 2), is_causal=True)
        return self.proj(out.reshape(b, n, e))


class _Toy(nn.Module):
    def __init__(self, dim=8, heads=2, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = _ToyAttention(dim, heads)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.attn(self.emb(ids)))


def _mesh_training_parity(rank, world):
    """2 x 2 mesh: DDP over the mesh + SP must give the single-process gradient of the mean loss."""
    torch.manual_seed(0)
    model = _Toy().double()
    ids = torch.randint(0, 11, (2, 17), generator=torch.Generator().manual_seed(1))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    ref = _Toy().double()
    ref.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(ref(inp).flatten(0, 1), tgt.flatten()).backward()

    mesh = make_mesh(2, 2, "cpu")
    n_mod = apply_sequence_parallel(model, mesh)
    ddp = data_parallel(model, mesh)
    dp_rank = mesh.get_local_rank("dp")
    x = shard_sequence(inp[dp_rank:dp_rank + 1], mesh)
    y = shard_sequence(tgt[dp_rank:dp_rank + 1], mesh)
    nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
    errs = {k: _max_err(p.grad, dict(ref.named_parameters())[k].grad) for k, p in model.named_parameters()}
    refusals = []
    for target in (nn.Linear(2, 2), model):  # no attention module; already applied
        try:
            apply_sequence_parallel(target, mesh)
            refusals.append(None)
        except ValueError as e:
            refusals.append(str(e))
    return {"grad_err": max(errs.values()), "modules": n_mod, "offset": model.attn.position_offset,
            "sp_rank": mesh.get_local_rank("sp"), "refusals": refusals}


def _plan_once(rank, world):
    """How often the split is checked: once per block length for a whole model, not per layer or call."""
    from longnet.backends import sequence_parallel as sp
    calls = []
    real = sp.check_sequence_parallel

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    sp.check_sequence_parallel = counting
    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[longnet.MultiheadDilatedAttention(16, 2, (8, 32), (1, 2), causal=True)
                                for _ in range(3)]).double()
        apply_sequence_parallel(model, dist.group.WORLD, block_length=16)
        after_apply = list(calls)
        for _ in range(3):
            model(torch.randn(2, 16, 16, dtype=torch.float64)).sum().backward()
        after_forwards = list(calls)
        model(torch.randn(1, 8, 16, dtype=torch.float64))  # a new block length: checked once more
        model(torch.randn(1, 8, 16, dtype=torch.float64))
        plan = model[0].attention_fn.plans.get(16, (8, 32), (1, 2))
        q = torch.randn(1, 8, 2, 8)
        try:
            longnet.dilated_attention(q, q, q, (8, 32), (1, 2), group=plan)
            wrong_length = None
        except ValueError as e:
            wrong_length = str(e)
    finally:
        sp.check_sequence_parallel = real
    return {"after_apply": after_apply, "after_forwards": after_forwards, "final": list(calls),
            "wrong_length": wrong_length}


def _errors(rank, world):
    msgs = {}
    # L = 12 with w = 8: a segment straddles two blocks. All ranks raise before any collective.
    q = torch.randn(1, 12, 2, 4)
    try:
        longnet.dilated_attention(q, q, q, (8,), (1,), group=dist.group.WORLD)
        msgs["straddle"] = None
    except ValueError as e:
        msgs["straddle"] = str(e)
    return msgs


def _phase_extras(rank, world):
    """Shifted segments: the halo rule's error, a plan made for other phases, the model wrapper."""
    from longnet.backends.sequence_parallel import plan_sequence_parallel
    from longnet.distributed.parallel import _Plans, _SequenceParallelAttention
    msgs = {}
    q = torch.randn(1, 16, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    for key, call in (
            ("halo_rate", lambda: longnet.dilated_attention(q, q, q, (12,), (4,), segment_phases=(2,),
                                                            group=dist.group.WORLD)),
            ("plan_phases", lambda: longnet.dilated_attention(
                q, q, q, (8,), (1,), segment_phases=(4,),
                group=plan_sequence_parallel(dist.group.WORLD, 16, (8,), (1,))))):
        try:
            call()
            msgs[key] = None
        except ValueError as e:
            msgs[key] = str(e)
    # apply_sequence_parallel's wrapper makes (and keeps) the plan of the call's phases.
    wrapped = _SequenceParallelAttention(longnet.dilated_attention, _Plans(dist.group.WORLD))
    got = wrapped(q, q, q, (8, 16), (1, 2), segment_phases=(4, 0), is_causal=True)
    want = longnet.dilated_attention(q, q, q, (8, 16), (1, 2), segment_phases=(4, 0), is_causal=True,
                                     group=dist.group.WORLD)
    msgs["wrapped_err"] = _max_err(got, want)
    msgs["wrapped_plans"] = [k[3] for k in wrapped.plans.plans]
    return msgs


def _worker(rank, world, tmpdir, tasks):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    try:
        for task in tasks:
            if task[0] == "parity":
                res[task] = _parity(rank, world, task[1], task[2])
            elif task[0] == "mesh":
                res[task] = _mesh_training_parity(rank, world)
            elif task[0] == "prepare":
                spans = plan_sequence_parallel(dist.group.WORLD, 16, (8, 16, 32, 64), (1, 2, 4, 8)).spans
                res[task] = [(sp.first, sp.count, sp.position) for sp in spans]
            elif task[0] == "errors":
                res[task] = _errors(rank, world)
            elif task[0] == "plan_once":
                res[task] = _plan_once(rank, world)
            elif task[0] == "phase_extras":
                res[task] = _phase_extras(rank, world)
    except Exception:
        res["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(res, f"{tmpdir}/result_{rank}.pt")
        dist.destroy_process_group()


def run_world(world, tmpdir, tasks):
    """Spawn ``world`` gloo processes that run ``tasks``; returns the per-rank result dicts."""
    mp.spawn(_worker, args=(world, str(tmpdir), list(tasks)), nprocs=world, join=True)
    return [torch.load(f"{tmpdir}/result_{r}.pt", weights_only=False) for r in range(world)]
