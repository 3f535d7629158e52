"""``longnet bench --lm``: LM training throughput, LongNet against dense attention (not a test).

At each tokens-per-sequence N it builds the tiny preset's language model (4 layers, d 256,
4 heads, FFN 1024; ``--lm-*`` change the size) twice, with the same weights:

* **longnet**: in every layer the geometric pattern w = B, 2B, 4B, ... up to N and
  r = 1, 2, 4, ... up to N/B (w/r = B throughout; B = ``--base-segment``, 512), or the
  ``--segment-lengths``/``--dilation-rates`` given;
* **dense**: one pattern w = N, r = 1, which is exactly dense causal attention through the
  same model and the same op (it runs as one causal SDPA call per layer).

One optimizer step is forward + backward + an AdamW step on batch 1 of random bytes. After
``--warmup`` untimed steps of each, the two models' timed steps take turns and the best of
``--repeats`` counts (common.interleaved_times), so their ratio is measured in one run under
the same load; peak memory growth (common.peak_memory_growth) is one more step of each.

Dense is not run at N above ``--dense-max-n``, nor where one step is estimated to take longer
than ``--dense-max-seconds`` (from the quadratic fit of its measured steps, or the (N/N0)^2
bound from one). Its row there is **extrapolated**: t(N) = a N + b N^2 fitted to the measured
dense steps (common.quadratic_fit), an estimate and never a measurement; with fewer than two
measured dense N the row is **skipped**. Where N exceeds XPOS's float32 range the XPOS scale
base is doubled until it fits, in both models alike (it changes no cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import report
from ..argtypes import (
    nonneg_int,
    output_file,
    pattern_from_flags,
    positive_int,
    positive_int_list,
)
from ..device import machine_name, memory_bytes
from ..patterns import DilatedPattern, dilated_flops
from ..report import Column, Panel, Series
from ..training.optim import decay_groups
from . import common

NAN = float("nan")
MEASURED, EXTRAPOLATED, SKIPPED = "measured", "extrapolated", "skipped"
LONGNET, DENSE = "longnet", "dense"


@dataclass
class Row:
    model: str  # LONGNET or DENSE
    n: int  # tokens per sequence (batch 1: tokens per step)
    status: str  # MEASURED; dense rows may be EXTRAPOLATED (quadratic fit) or SKIPPED
    step_s: float  # one optimizer step: forward + backward + AdamW
    tokens_per_s: float
    peak_mem_mib: float  # growth during one step; NaN where not measured
    attn_gflop: float  # attention FLOPs of one step, all layers, forward + backward (docs/design.md §3)
    longnet_over_dense: float  # longnet rows: its tokens/s over the dense row's at this N
    dense_status: str  # longnet rows: the status of the dense row that ratio is taken against
    pattern: str
    dtype: str
    checkpointing: bool


def _ratio_cell(r: Row) -> str:
    if math.isnan(r.longnet_over_dense):
        return ""
    return f"{r.longnet_over_dense:.2f}" + ("*" if r.dense_status == EXTRAPOLATED else "")


COLUMNS = (
    Column("model", "model", width=8, align="<"), Column("N", "n", width=8),
    Column("status", "status", width=13, align="<"), Column("step s", "step_s", ".2f", 9),
    Column("tokens/s", "tokens_per_s", ".0f", 10), Column("peak MiB", "peak_mem_mib", ".0f", 9),
    Column("attn GFLOP", "attn_gflop", ".1f", 11), Column("longnet/dense", _ratio_cell, width=14),
)

# --------------------------------------------------------------------------- models and steps


def longnet_pattern(n: int, base_segment: int, fixed: Optional[DilatedPattern] = None) -> DilatedPattern:
    """``fixed`` if given, else w = base..<= n by doubling with r = 1..w/base (geometric, w/r = base)."""
    if fixed is not None:
        return fixed
    if n < base_segment:
        raise ValueError(f"N = {n} is below the base segment {base_segment}")
    return DilatedPattern.geometric(base_segment, int(math.log2(n // base_segment)) + 1)


def dense_pattern(n: int) -> DilatedPattern:
    """One pattern w = n, r = 1: every query sees every earlier key, i.e. dense causal attention."""
    return DilatedPattern((n,), (1,))


def model_config(base, pattern: DilatedPattern, n: int):
    """``base`` (a LongNetConfig) with ``pattern`` in every layer and an XPOS range that reaches n."""
    from ..config import xpos_max_length
    scale = base.xpos_scale_base
    while base.xpos and xpos_max_length(scale) < n:
        scale *= 2
    return dataclasses.replace(base, segment_lengths=pattern.segment_lengths,
                               dilation_rates=pattern.dilation_rates, xpos_scale_base=scale)


def build_model(config, device: torch.device):
    """A LongNetLM with weights from seed 0: every pattern gets the same weights."""
    from ..model import LongNetLM
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(0)
        return LongNetLM(config).to(device).train()


def train_step(model, n: int, precision: str, device: torch.device) -> Callable[[], torch.Tensor]:
    """One optimizer step as a call: AdamW (the tiny preset's settings) on batch 1 of n random bytes,
    forward under ``precision``'s autocast (longnet.device.autocast_context), backward outside it."""
    from ..config import preset
    from ..device import autocast_context
    tcfg = preset("tiny")[1]
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, model.config.vocab_size, (1, n + 1), generator=gen).to(device)
    x, y = data[:, :-1], data[:, 1:]  # (1, n) each
    opt = torch.optim.AdamW(decay_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                            eps=tcfg.eps)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = model.loss(x, y)
        loss.backward()
        opt.step()
        return loss
    return step


def attn_gflop(config, n: int) -> float:
    """Attention GFLOPs of one training step of ``config``'s model at n tokens (fwd + bwd, causal)."""
    per_layer = dilated_flops(n, config.n_heads, config.head_dim, config.segment_lengths, config.dilation_rates,
                              causal=True, backward=True)
    return config.n_layers * per_layer / 1e9


# --------------------------------------------------------------------------- measurement


def measure(n: int, base, patterns: Dict[str, DilatedPattern], *, precision: str, device: torch.device,
            repeats: int, warmup: int, memory: bool) -> List[Row]:
    """One measured Row per named pattern at n tokens, their steps timed interleaved."""
    configs = {name: model_config(base, p, n) for name, p in patterns.items()}
    steps = {name: train_step(build_model(c, device), n, precision, device) for name, c in configs.items()}
    times = common.interleaved_times(list(steps.values()), device, repeats, warmup)
    rows = []
    for (name, step), ts in zip(steps.items(), times):
        mem = common.peak_memory_growth(step, device) / 2**20 if memory else NAN
        best = min(ts)
        rows.append(Row(name, n, MEASURED, best, n / best, mem, attn_gflop(configs[name], n), NAN, "",
                        str(patterns[name]), precision, base.activation_checkpointing))
    return rows


def dense_estimate(measured: Sequence[Tuple[int, float]], n: int) -> float:
    """Seconds of a dense step at n from measured (N, seconds): the quadratic fit of two or more;
    from one, (n/N0)^2 times it (an upper bound, as cost grows at most quadratically); NaN from none."""
    if len({m[0] for m in measured}) >= 2:
        a, b = common.quadratic_fit([m[0] for m in measured], [m[1] for m in measured])
        return a * n + b * n * n
    if measured:
        n0, t0 = measured[-1]
        return t0 * (n / n0) ** 2
    return NAN


def run_dense(n: int, measured: Sequence[Tuple[int, float]], max_n: Optional[int], max_seconds: float) -> bool:
    """Whether dense runs at n: within --dense-max-n and not estimated over --dense-max-seconds."""
    return (max_n is None or n <= max_n) and not dense_estimate(measured, n) > max_seconds


def unmeasured_dense_row(n: int, base, measured: Sequence[Tuple[int, float]], precision: str) -> Row:
    """The dense row at an n where dense did not run: EXTRAPOLATED by the quadratic fit of the
    measured steps (two or more N), else SKIPPED with NaN figures."""
    config = model_config(base, dense_pattern(n), n)
    extrapolated = len({m[0] for m in measured}) >= 2
    t = dense_estimate(measured, n) if extrapolated else NAN
    return Row(DENSE, n, EXTRAPOLATED if extrapolated else SKIPPED, t, n / t, NAN, attn_gflop(config, n), NAN,
               "", str(dense_pattern(n)), precision, base.activation_checkpointing)


def fill_ratios(rows: List[Row]) -> None:
    """Set each longnet row's tokens/s ratio to the dense row at its N (and that row's status)."""
    dense = {r.n: r for r in rows if r.model == DENSE}
    for r in rows:
        if r.model == LONGNET and r.n in dense:
            r.longnet_over_dense = r.tokens_per_s / dense[r.n].tokens_per_s
            r.dense_status = dense[r.n].status


def measure_all(args: argparse.Namespace, base, fixed: Optional[DilatedPattern], device: torch.device,
                ns: List[int]) -> List[Row]:
    """Rows of every N in ascending order: longnet, then dense (measured, extrapolated or skipped)."""
    rows: List[Row] = []
    done: List[Tuple[int, float]] = []  # (N, seconds) of the measured dense steps
    for n in ns:
        patterns = {LONGNET: common.PATTERN_VARIANTS[args.pattern](longnet_pattern(n, args.base_segment, fixed))}
        if not args.no_dense and run_dense(n, done, args.dense_max_n, args.dense_max_seconds):
            patterns[DENSE] = dense_pattern(n)
        new = measure(n, base, patterns, precision=args.dtype, device=device, repeats=args.repeats,
                      warmup=args.warmup, memory=not args.no_memory)
        done += [(r.n, r.step_s) for r in new if r.model == DENSE]
        rows += new
        print(f"  N={n}: " + ", ".join(f"{r.model} {r.tokens_per_s:.0f} tokens/s" for r in new), flush=True)
    if not args.no_dense:
        measured = {n for n, _ in done}
        rows += [unmeasured_dense_row(n, base, done, args.dtype) for n in ns if n not in measured]
    rows.sort(key=lambda r: (r.n, r.model != LONGNET))
    fill_ratios(rows)
    return rows


# --------------------------------------------------------------------------- output


def plot(rows: List[Row], path: str, title: str) -> None:
    """Tokens/s and peak memory growth against N (log-log); dense dashed where extrapolated."""
    log2, log = ("log", {"base": 2}), ("log", {})
    tput = Panel("training throughput (dense dashed: quadratic fit)", "tokens per sequence N", "tokens/s",
                 xscale=log2, yscale=log)
    mem = Panel("peak memory growth of one step", "tokens per sequence N", "MiB", xscale=log2, yscale=log)
    for label, model, style, color in (("LongNet", LONGNET, "o-", "C0"), ("dense", DENSE, "s-", "C1")):
        measured = [r for r in rows if r.model == model and r.status == MEASURED]
        extrapolated = [(r.n, r.tokens_per_s) for r in rows if r.model == model and r.status == EXTRAPOLATED]
        tput.series += report.extrapolated_series(label, [(r.n, r.tokens_per_s) for r in measured], extrapolated,
                                                  style, color)
        with_mem = [r for r in measured if not math.isnan(r.peak_mem_mib)]
        if with_mem:
            mem.series.append(Series(label, [r.n for r in with_mem], [r.peak_mem_mib for r in with_mem], style, color))
    report.plot_panels([tput, mem] if mem.series else [tput], path, title)


def describe(args: argparse.Namespace, base, fixed: Optional[DilatedPattern], device: torch.device) -> str:
    """The run's settings in one line: machine, precision, model and patterns."""
    b = args.base_segment
    longnet = (f"longnet {fixed} at every N" if fixed is not None else
               f"longnet w = {b}, {2 * b}, ..., N and r = 1, 2, ..., N/{b} (geometric)")
    return (f"{machine_name(device)} | {args.dtype}{' | checkpointing' if base.activation_checkpointing else ''} | "
            f"{base.n_layers} layers, d {base.d_model}, {base.n_heads} heads, FFN {base.d_ffn}, batch 1 | "
            f"{longnet}; dense w = N, r = 1")


# --------------------------------------------------------------------------- command line


def positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import preset
    tiny = preset("tiny")[0]
    p.add_argument("--n", type=positive_int_list, default=[4096, 16384, 65536],
                   help="comma-separated tokens per sequence (default 4096,16384,65536)")
    p.add_argument("--lm-layers", type=positive_int, default=tiny.n_layers, help="layers (default: tiny preset's)")
    p.add_argument("--lm-dim", type=positive_int, default=tiny.d_model, help="d_model (default: tiny preset's)")
    p.add_argument("--lm-heads", type=positive_int, default=tiny.n_heads, help="heads (default: tiny preset's)")
    p.add_argument("--lm-ffn", type=positive_int, default=tiny.d_ffn, help="FFN hidden size (default: tiny preset's)")
    p.add_argument("--base-segment", type=positive_int, default=512,
                   help="w_0 of longnet's geometric pattern w = B..N, r = 1..N/B (default 512)")
    p.add_argument("--segment-lengths", default=None, help="comma-separated w_i for longnet at every N")
    p.add_argument("--dilation-rates", default=None, help="comma-separated r_i for longnet at every N")
    p.add_argument("--pattern", choices=sorted(common.PATTERN_VARIANTS), default="paper",
                   help="paper: longnet's pattern as the flags give it; lw16: plus the LM presets' local window")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (on the CPU too)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--no-dense", action="store_true", help="measure longnet only")
    p.add_argument("--dense-max-n", type=positive_int, default=None, help="run dense only at N up to this")
    p.add_argument("--dense-max-seconds", type=positive_seconds, default=60.0,
                   help="skip dense (and extrapolate it) where one step is estimated to take longer (default 60)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps per model; the best is reported")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps per model before the timed ones")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--csv", type=output_file, default=None, help="write results to this CSV file")
    p.add_argument("--plot", type=output_file, default=None, help="write a PNG plot to this file")


def build_parser(prog: str = "python -m longnet.bench.lm") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(prog=prog)  # run() names the command in its errors as the user typed it
    return p


def base_config(args: argparse.Namespace):
    """The tiny preset's model at the --lm-* sizes, with --checkpointing; ValueError naming the flags."""
    from ..config import preset
    try:
        # local_window 0: the dense model must be one pattern w = N, and LongNet the pattern named
        # in the table (the tiny preset's local window is a training default, not part of it).
        return dataclasses.replace(preset("tiny")[0], n_layers=args.lm_layers, d_model=args.lm_dim,
                                   n_heads=args.lm_heads, d_ffn=args.lm_ffn, local_window=0,
                                   activation_checkpointing=args.checkpointing)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--lm-layers/--lm-dim/--lm-heads/--lm-ffn: {e}") from None


def _check_memory(base, ns: List[int], device: torch.device) -> None:
    """Refuse an N whose activations cannot fit: each layer's input, one FFN hidden, the logits and
    their gradient in fp32 are a lower bound of one step's memory (with checkpointing too)."""
    n = max(ns)
    need = 4 * n * (base.n_layers * base.d_model + base.d_ffn + 2 * base.vocab_size)
    have = memory_bytes(device)
    if need > have:
        raise ValueError(f"--n {n}: one training step needs at least {need / 2**30:.1f} GiB at this model size, "
                         f"more than the {have / 2**30:.1f} GiB of {device}")


def _checked(args: argparse.Namespace):
    """(base config, fixed pattern or None, device, sorted lengths) once every argument is checked."""
    from ..device import check_precision, pick_device  # the one rule for --device
    fixed = pattern_from_flags(args.segment_lengths, args.dilation_rates)
    device = pick_device(args.device)
    try:
        check_precision(device, args.dtype)
    except ValueError as e:
        raise ValueError(f"--dtype {args.dtype}: {e}") from None
    base = base_config(args)
    ns = sorted(set(args.n))
    if fixed is None and ns[0] < args.base_segment:
        raise ValueError(f"--n {ns[0]}: longnet's default pattern starts at w = {args.base_segment} "
                         "(--base-segment); give a longer N, a smaller --base-segment, or "
                         "--segment-lengths/--dilation-rates")
    _check_memory(base, ns, device)
    for n in ns:  # every model config of the run, validated before the first step
        for pattern in (longnet_pattern(n, args.base_segment, fixed), dense_pattern(n)):
            model_config(base, pattern, n)
    return base, fixed, device, ns


def run(args: argparse.Namespace) -> int:
    """Check every argument, then measure each N, print the table and write --csv/--plot."""
    try:
        base, fixed, device, ns = _checked(args)
    except ValueError as e:
        print(f"{getattr(args, 'prog', 'longnet bench --lm')}: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    title = describe(args, base, fixed, device)
    print(title, flush=True)
    rows = measure_all(args, base, fixed, device, ns)
    print(report.format_table(rows, COLUMNS))
    if any(r.status == EXTRAPOLATED for r in rows):
        print("extrapolated: dense step time from the fit t = a N + b N^2 of its measured steps, not measured "
              "(* marks ratios against it)")
    if any(r.status == SKIPPED for r in rows):
        print("skipped: dense not run at this N, and fewer than two measured dense N to extrapolate from")
    if args.csv:
        report.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
