"""``longnet plan``: what one rank of a LongNet run needs, before anyone rents GPUs.

    longnet plan --seq-len 1073741824 --gpus 1024               # paper-base, 1B tokens, 1,024 H100s
    longnet plan --seq-len 1048576 --gpus 16 --dp 2 --device a100 --profile inter_node_gbs=12.5
    longnet plan --figure5 docs/scaling_figure5.png --csv docs/scaling_figure5.csv   # 8K -> 1B, projected

It runs the real model, sequence-parallel and FSDP2 code for one rank under PyTorch's fake
process group and FakeTensorMode (:mod:`longnet.distributed.plan`) and prints per rank:
parameter, gradient and AdamW-state bytes, the tracked peak memory by category, the bytes
sent per collective kind and group per micro-step, and a projected step time on the device
profile (its constants are printed; every one can be overridden with ``--profile K=V``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Dict, List

from ..checks import check_int
from ..config import PRESETS, preset
from ..distributed.plan import (PROFILES, DeviceProfile, Layout, figure5_points, paper_pattern, plan,
                                plan_config, project_step)

__all__ = ["add_arguments", "run"]

GiB = 1024 ** 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 2)[1]
    p.add_argument("--preset", default="paper-base", choices=tuple(PRESETS), help="model (default paper-base)")
    p.add_argument("--seq-len", type=int, default=2 ** 20, help="tokens per sequence (default 1,048,576)")
    p.add_argument("--batch", type=int, default=1, help="global batch of one micro-step (sequences)")
    p.add_argument("--gpus", type=int, default=None, help="ranks (default sp * dp)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default gpus / dp)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas (divides dp)")
    p.add_argument("--rank", type=int, default=0, help="the rank to simulate")
    p.add_argument("--device", default="h100", choices=tuple(PROFILES), help="device profile")
    p.add_argument("--profile", action="append", default=[], metavar="K=V",
                   help=f"override a profile field ({', '.join(f.name for f in dataclasses.fields(DeviceProfile))})")
    p.add_argument("--param-dtype", default="bf16", choices=("fp32", "bf16"),
                   help="FSDP compute dtype of the gathered parameters (default bf16; shards stay fp32)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--all-layers", action="store_true",
                   help="simulate every layer (default: 1 and 2 layers, extrapolated linearly)")
    p.add_argument("--figure5", metavar="PNG", default=None,
                   help="instead: the projected Figure 5, N = 8K .. 1B with GPUs = max(1, N / 1M)")
    p.add_argument("--csv", metavar="FILE", default=None, help="with --figure5: its points as CSV")


def _profile(args) -> DeviceProfile:
    prof = PROFILES[args.device]
    names = {f.name: f.type for f in dataclasses.fields(DeviceProfile)}
    for item in args.profile:
        key, sep, val = item.partition("=")
        if not sep or key not in names or key == "name":
            raise ValueError(f"--profile {item!r}: expected K=V with K one of "
                             f"{', '.join(n for n in names if n != 'name')}")
        try:
            prof = dataclasses.replace(prof, **{key: int(val) if key == "gpus_per_node" else float(val)})
        except ValueError:
            raise ValueError(f"--profile {item!r}: {val!r} is not a number") from None
    return prof


def _layout(args) -> Layout:
    for name in ("seq_len", "batch", "dp", "dp_replicate", "gpus", "sp"):
        v = getattr(args, name)
        if v is not None:
            check_int(f"--{name.replace('_', '-')}", v)
    sp = args.sp or (args.gpus // args.dp if args.gpus else 1)
    if args.gpus is not None and sp * args.dp != args.gpus:
        raise ValueError(f"--sp {sp} x --dp {args.dp} = {sp * args.dp}, not --gpus {args.gpus}")
    layout = Layout(sp=sp, dp=args.dp, replicate=args.dp_replicate)
    layout.check(args.seq_len, args.batch)
    if not 0 <= args.rank < layout.gpus:
        raise ValueError(f"--rank must be in [0, {layout.gpus}), got {args.rank}")
    return layout


def _report(sim, proj, cfg, layout, prof, args, seconds: float) -> str:
    gib = lambda b: f"{b / GiB:10.3f} GiB"  # noqa: E731
    lines = [f"longnet plan: {args.preset} ({cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads), "
             f"seq_len {args.seq_len:,}, batch {args.batch}, {layout.gpus:,} ranks = dp {layout.dp} x sp {layout.sp}"
             + (f" (HSDP, {layout.replicate} replicas)" if layout.replicate > 1 else "")
             + f", FSDP2 {args.param_dtype} params; rank {sim.rank}, {proj['tokens_per_rank']:,.0f} tokens",
             f"pattern {cfg.pattern}",
             f"simulated under the fake process group + FakeTensorMode in {seconds:.0f} s"
             + (" (1 and 2 layers, extrapolated linearly)" if sim.extrapolated else ""),
             "", "memory per rank (FSDPMemTracker peak, by category; shards from the tensors):",
             f"  parameter shards   {gib(sim.params)}", f"  gradient shards    {gib(sim.grads)}",
             f"  AdamW state        {gib(sim.optimizer)}"]
    for key, val in sorted(sim.peak.items(), key=lambda kv: -kv[1]):
        if val and key != "Total":
            lines.append(f"  peak {key.split('.')[-1].lower():<16}{gib(val)}")
    fits = "fits" if sim.peak_total <= prof.hbm_gib * GiB else "DOES NOT FIT"
    lines += [f"  peak total         {gib(sim.peak_total)}  ({fits} in {prof.hbm_gib:.1f} GiB of {prof.name})",
              "  (tensors only: allocator caching and kernel workspaces come on top; a CPU process's peak RSS "
              "was 1.6x this at small scale, docs/scaling.md)", "",
              "bytes sent per rank per micro-step (ring convention):"]
    for (label, kind), b in sorted(sim.comm.items()):
        lines.append(f"  {label:<9} {kind:<15} {b / 1e6:14.1f} MB in {sim.calls[(label, kind)]:5d} calls")
    lines += ["", f"projected on {prof.name}: {prof.bf16_tflops:g} TFLOP/s bf16 x matmul efficiency "
              f"{prof.matmul_efficiency:g} / attention efficiency {prof.attention_efficiency:g} (ASSUMED), "
              f"links {prof.intra_node_gbs:g} GB/s in a node of {prof.gpus_per_node}, {prof.inter_node_gbs:g} GB/s "
              "between nodes",
              f"  FLOPs: linear {proj['linear_flops']:.3e}, dilated attention {proj['attention_flops']:.3e} "
              f"(dense would be {proj['dense_attention_flops']:.3e})",
              f"  compute {proj['compute_s'] * 1e3:.1f} ms + communication {proj['comm_s'] * 1e3:.1f} ms: step "
              f"{proj['overlap_s'] * 1e3:.1f} ms overlapped, {proj['no_overlap_s'] * 1e3:.1f} ms not (projected)"]
    return "\n".join(lines)


def _figure5(args, prof) -> int:
    from ..report import Panel, Series, plot_panels, write_csv
    model, _ = preset(args.preset)
    rows: List[Dict] = []
    for n, gpus in figure5_points():
        cfg = plan_config(model, n, paper_pattern(n), args.activation_checkpointing)
        layout = Layout(sp=gpus)
        t0 = time.perf_counter()
        sim = plan(cfg, n, 1, layout, rank=0, layers_simulated=None if args.all_layers else 2,
                   param_dtype=args.param_dtype)
        proj = project_step(sim, cfg, n, 1, layout, prof)
        rows.append({"seq_len": n, "gpus": gpus, "tokens_per_rank": n // gpus, "patterns": len(cfg.segment_lengths),
                     "peak_gib": sim.peak_total / GiB, "activation_gib": sim.peak.get("_FSDPRefType.ACT", 0) / GiB,
                     "sp_mb": sum(b for (lab, _), b in sim.comm.items() if lab == "sp") / 1e6,
                     "fsdp_mb": sum(b for (lab, _), b in sim.comm.items() if lab != "sp") / 1e6,
                     "step_s": proj["overlap_s"], "step_no_overlap_s": proj["no_overlap_s"],
                     "dense_step_s": proj["dense_compute_s"], "simulated_s": time.perf_counter() - t0})
        print(f"N {n:>13,} on {gpus:>5} GPUs: peak {rows[-1]['peak_gib']:8.2f} GiB/rank, SP {rows[-1]['sp_mb']:9.1f} "
              f"MB, FSDP {rows[-1]['fsdp_mb']:9.1f} MB, step {proj['overlap_s']:8.3f} s projected "
              f"(dense attention {proj['dense_compute_s']:10.3f} s); simulated in {rows[-1]['simulated_s']:.0f} s",
              flush=True)
    if args.csv:
        write_csv(rows, args.csv)
    xs = [r["seq_len"] for r in rows]
    logx = ("log", {"base": 2})
    panels = [
        Panel("per-rank peak memory (simulated)", "sequence length N (GPUs = max(1, N/1M))", "GiB",
              [Series("LongNet, FSDP2 x SP", xs, [r["peak_gib"] for r in rows])], xscale=logx),
        Panel("bytes sent per rank per step (simulated)", "N", "MB",
              [Series("sequence parallel", xs, [r["sp_mb"] for r in rows]),
               Series("FSDP", xs, [r["fsdp_mb"] for r in rows], "s-")], xscale=logx),
        Panel(f"step time on {prof.name} (PROJECTED)", "N", "seconds",
              [Series("LongNet (projected)", xs, [r["step_s"] for r in rows]),
               Series("dense attention, compute only (projected)", xs, [r["dense_step_s"] for r in rows], "x--")],
              xscale=logx, yscale=("log", {}))]
    plot_panels(panels, args.figure5, f"longnet plan, {args.preset}: Figure 5 shape, 8K -> 1B tokens, PROJECTED "
                f"(fake process group + FakeTensorMode; no GPU run)", size=(15, 4.5))
    print(f"[longnet] projected figure: {args.figure5}" + (f", points: {args.csv}" if args.csv else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        prof = _profile(args)
        if args.figure5:
            return _figure5(args, prof)
        layout = _layout(args)
        model, _ = preset(args.preset)
        cfg = plan_config(model, args.seq_len, activation_checkpointing=args.activation_checkpointing)
        t0 = time.perf_counter()
        sim = plan(cfg, args.seq_len, args.batch, layout, rank=args.rank,
                   layers_simulated=None if args.all_layers else 2, param_dtype=args.param_dtype)
        proj = project_step(sim, cfg, args.seq_len, args.batch, layout, prof)
        print(_report(sim, proj, cfg, layout, prof, args, time.perf_counter() - t0))
        return 0
    except ValueError as e:
        print(f"longnet plan: error: {e}", file=sys.stderr)
        return 2
