"""``longnet train``: train a LongNet language model on bytes.

    longnet train                                   # tiny preset, built-in corpus, CPU, ~4 minutes
    longnet train --data enwik8:~/data/enwik8.zip --preset small --device cuda
    longnet train --set model.n_layers=2 --set train.lr=1e-3 --max-steps 50 --out runs/try
    longnet train --resume --out runs/try --max-steps 100   # continue (and extend) a run
    longnet train --data passkey --set train.seq_len=1024  # synthetic long-range retrieval
    torchrun --nproc_per_node 2 -m longnet train --sequence-parallel 2   # one sequence over 2 processes

Settings come from a preset, then ``--set KEY=VALUE`` overrides (``model.FIELD``,
``train.FIELD`` or a bare field name; ``--list-fields`` lists them), then ``--max-steps``.
The run folder (``--out``) receives ``log.csv`` (one row per step, one per evaluation),
``loss_curve.png``, TensorBoard events when ``tensorboard`` is installed, and
checkpoints (see :mod:`longnet.training.checkpoint`). Ctrl-C stops after the current step and
saves a checkpoint (a second Ctrl-C aborts at once, still saving the last complete step
when that is safe); ``--resume`` continues from the latest one and follows the same loss
curve as an uninterrupted run on CPU.

Under ``torchrun`` the same loop runs on a (data x sequence) device mesh:
``--sequence-parallel S`` cuts every sequence into S blocks, one per process, and
``--data-parallel D`` (default WORLD_SIZE / S) splits the batch's rows; see
:mod:`longnet.distributed.training` for how batches, losses, evaluation and checkpoints
are shared. ``train.batch_size`` stays the global batch, so a run follows the same loss
curve (up to fp32 rounding) at any mesh shape, and its checkpoints resume at any other.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import random
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_savefig, atomic_write_text
from ..config import (PRESETS, LongNetConfig, TrainConfig, apply_overrides, check_compatible,
                     config_fields_help, lr_factor, preset)

__all__ = ["add_arguments", "run", "train", "CSV_FIELDS"]

CSV_FIELDS = ["step", "split", "loss", "bpb", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "accuracy"]
LN2 = math.log(2.0)


def _after_step(step: int) -> None:
    """Called after every completed optimiser step (a seam for tests); does nothing."""


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "overrides: --set KEY=VALUE, repeatable. KEY is model.FIELD, train.FIELD or a field name\n"
        "that only one of them has; VALUE is parsed by the field's type (true/false, none,\n"
        "comma-separated integers for tuples). Examples:\n"
        "  --set model.n_layers=2 --set d_model=128 --set train.lr=1e-3\n"
        "  --set segment_lengths=64,128 --set dilation_rates=1,2 --set train.grad_accum=4\n"
        "`longnet train --list-fields` prints every field with its default.")
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                        help="model + training preset (default tiny: ~4 min on 2 CPU cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable); see below")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="builtin (default: Python stdlib sources), enwik8:PATH, text:PATH, or passkey")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run folder for logs and checkpoints (default runs/PRESET-YYYYmmdd-HHMMSS)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="optimiser steps (same as --set train.max_steps=N; the lr schedule spans them)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cache-dir", default=None, help="data cache folder (default $LONGNET_CACHE or ~/.cache/longnet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("--list-fields", action="store_true", help="print every config field and exit")
    parser.add_argument("--sequence-parallel", type=int, default=1, metavar="S",
                        help="split each sequence over S processes (launch with torchrun; train.seq_len / S "
                             "must fit the dilation pattern)")
    parser.add_argument("--data-parallel", type=int, default=None, metavar="D",
                        help="data-parallel groups (default WORLD_SIZE / S); torchrun must start S*D processes; "
                             "train.batch_size is the global batch, split over the D groups")


def run(args: argparse.Namespace) -> int:
    if args.list_fields:
        print("config fields (KEY for --set KEY=VALUE, type, value in the tiny preset):")
        print(config_fields_help())
        return 0
    rank = os.environ.get("RANK", "0")
    try:
        from ..distributed.training import resolve_parallel_sizes
        S, D, world = resolve_parallel_sizes(getattr(args, "sequence_parallel", 1),
                                             getattr(args, "data_parallel", None))
        setup = _setup(args, parallel=(S, D) if world > 1 else None)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError) as e:  # bad settings, data or checkpoint: a message, not a traceback
        # Under torchrun every rank checks the same settings; rank > 0 says which it is, since
        # a data path can be missing on one node only.
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}longnet train: error: {e}", file=sys.stderr)
        return 2
    if world == 1:
        return train(**setup)
    return _train_distributed(setup, S, D)


def _train_distributed(setup: Dict[str, Any], S: int, D: int) -> int:
    from ..distributed.training import init_distributed, shutdown_distributed
    mcfg, tcfg = setup["model_config"], setup["train_config"]
    ctx = None
    try:
        try:
            ctx = init_distributed(S, D, setup["device"], seq_len=tcfg.seq_len,
                                   segment_lengths=mcfg.segment_lengths, dilation_rates=mcfg.dilation_rates)
        except (ValueError, TypeError) as e:
            print(f"longnet train: error: {e}", file=sys.stderr)
            return 2
        setup["device"] = ctx.device
        return train(**setup, dist_ctx=ctx)
    except KeyboardInterrupt:  # e.g. during process-group setup
        return 130
    finally:
        shutdown_distributed(ctx)


def _setup(args: argparse.Namespace, parallel: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    from .checkpoint import load_checkpoint
    from .evaluate import pick_device
    device = pick_device(args.device)
    if args.max_steps is not None and (isinstance(args.max_steps, bool) or args.max_steps < 1):
        raise ValueError(f"--max-steps must be a positive integer, got {args.max_steps}")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    resume_info = None
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        resume_info = load_checkpoint(args.out)
        mcfg, tcfg = resume_info["model_config"], resume_info["train_config"]
        new_m, tcfg = apply_overrides(mcfg, tcfg, overrides)
        if new_m != mcfg:
            changed = [k for k, v in new_m.to_dict().items() if mcfg.to_dict()[k] != v]
            raise ValueError(f"cannot change model fields {changed} when resuming; start a new run instead")
        data_spec = args.data if args.data is not None else (resume_info["data"] or "builtin")
        if data_spec != resume_info["data"]:
            raise ValueError(f"--data {data_spec!r} differs from the run's data {resume_info['data']!r}; "
                             "a resumed run must use the same data")
        out = args.out
    else:
        mcfg, tcfg = preset(args.preset)
        mcfg, tcfg = apply_overrides(mcfg, tcfg, overrides)
        data_spec = args.data if args.data is not None else "builtin"
        out = args.out or os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
            raise ValueError(f"--out {out!r} already holds a run; pass --resume to continue it or choose a new --out")
    check_compatible(mcfg, tcfg)
    if args.compile and not hasattr(torch, "compile"):
        raise ValueError("--compile needs PyTorch >= 2.0")
    if tcfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 but this GPU has no bf16 support; use train.precision=fp32")
    if parallel is not None:
        from ..distributed.training import check_parallel_config
        check_parallel_config(tcfg.seq_len, tcfg.batch_size, mcfg.segment_lengths, mcfg.dilation_rates,
                              *parallel)
        if args.compile:
            raise ValueError("--compile is not supported with --sequence-parallel/--data-parallel yet")
    data = _open_data(data_spec, tcfg, args.cache_dir,
                      verbose=parallel is None or os.environ.get("RANK", "0") == "0")
    return dict(model_config=mcfg, train_config=tcfg, data_spec=data_spec, data=data, out_dir=out, device=device,
                resume=resume_info, compile_model=args.compile, progress=not args.no_progress,
                preset_name=args.preset if resume_info is None else "resumed")


def _open_data(spec: str, tcfg: TrainConfig, cache_dir: Optional[str], verbose: bool = True) -> Dict[str, Any]:
    from .data import PasskeyTask, RandomWindowSampler, open_corpus
    if spec == "passkey":
        task = PasskeyTask(tcfg.seq_len, tcfg.passkey_distance or None, key_digits=tcfg.passkey_digits,
                           seed=tcfg.seed, batch_size=tcfg.batch_size)
        return {"kind": "passkey", "sampler": task, "task": task,
                "description": f"passkey task: seq_len {tcfg.seq_len}, distance "
                               f"{tcfg.passkey_distance or f'random in [{task.min_distance}, {task.max_distance}]'}, "
                               f"{tcfg.passkey_digits}-digit keys"}
    # The trainer prints the corpus description itself; the data module would repeat it on a first build.
    corpus = open_corpus(spec, cache_dir=cache_dir, verbose=False)
    if corpus.valid.size < tcfg.seq_len + 1:
        raise ValueError(f"the valid split of {spec!r} has {corpus.valid.size:,} bytes, fewer than train.seq_len + 1 "
                         f"= {tcfg.seq_len + 1}; use a smaller train.seq_len or more data")
    sampler = RandomWindowSampler(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    return {"kind": "corpus", "sampler": sampler, "corpus": corpus, "description": corpus.description}


# ----------------------------------------------------------------------------- logging


class _Log:
    """log.csv (one row per step and per evaluation) and TensorBoard when installed."""

    def __init__(self, out_dir: str, resume_step: Optional[int]):
        self.path = os.path.join(out_dir, "log.csv")
        self.rows: List[Dict[str, Any]] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        # Rewrite (atomically) so rows past the checkpoint, from an interrupted run, are dropped.

        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_FIELDS)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except Exception:  # tensorboard not installed (ImportError) or broken: CSV only
            self.tb = None

    def write(self, **row) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "bpb", "lr", "grad_norm", "tokens_per_s", "accuracy"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"{row['split']}/{k}", float(row[k]), int(row["step"]))

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(rows: List[Dict[str, Any]], path: str, title: str = "") -> Optional[str]:
    """Train and validation bits-per-byte against step, written atomically as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tr = [(int(r["step"]), float(r["bpb"])) for r in rows if r["split"] == "train" and r.get("bpb") not in (None, "")]
    va = [(int(r["step"]), float(r["bpb"])) for r in rows if r["split"] == "valid" and r.get("bpb") not in (None, "")]
    if not tr and not va:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        steps, vals = zip(*tr)
        ax.plot(steps, vals, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        ema, smooth = None, []
        for v in vals:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="train (EMA 0.9)")
    if va:
        steps, vals = zip(*va)
        ax.plot(steps, vals, "o-", color="tab:orange", lw=1.6, label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, path)


# ----------------------------------------------------------------------------- training


def _param_groups(model: torch.nn.Module, weight_decay: float):
    # Decay matrices of linear layers only; biases, norms and the (tied) embedding are exempt.
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        is_linear_weight = p.ndim == 2 and not name.startswith("embed") and "lm_head" not in name
        (decay if is_linear_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _StopFlag:
    """First Ctrl-C: finish the current step, save, exit. Second: KeyboardInterrupt.

    ``debounce_s``: a second SIGINT this soon after the first counts as the same Ctrl-C
    (torchrun forwards the terminal's SIGINT to workers that already got it).
    """

    def __init__(self, debounce_s: float = 0.0, quiet: bool = False):
        self.requested = False
        self.previous = None
        self.debounce_s, self.quiet = debounce_s, quiet
        self.first_at = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: plain KeyboardInterrupt handling only
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.first_at < self.debounce_s:
                return
            raise KeyboardInterrupt
        self.requested = True
        self.first_at = time.monotonic()
        if not self.quiet:
            print("\n[longnet] Ctrl-C: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _decode(tokens) -> str:
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


class _NoLog:
    """Stand-in for :class:`_Log` on ranks other than 0 (they write nothing)."""

    rows: List[Dict[str, Any]] = []
    path = ""

    def write(self, **row) -> None:
        pass

    def close(self) -> None:
        pass


def train(*, model_config: LongNetConfig, train_config: TrainConfig, data_spec: str, data: Dict[str, Any],
          out_dir: str, device: torch.device, resume: Optional[Dict[str, Any]] = None,
          compile_model: bool = False, progress: bool = True, preset_name: str = "",
          dist_ctx=None) -> int:
    """The training loop. Returns 0 when done, 130 when stopped by Ctrl-C (after saving).

    ``dist_ctx`` (a :class:`longnet.distributed.training.DistContext`) runs it on a device
    mesh: every rank calls ``train`` with the same arguments; rank 0 alone prints, logs
    and writes checkpoints.
    """
    from tqdm.auto import tqdm

    from .checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
    from .evaluate import autocast_context, evaluate_lm, evaluate_passkey
    from ..model import LongNetLM

    mcfg, tcfg = model_config, train_config
    ctx = dist_ctx
    is_main = ctx is None or ctx.is_main

    def say(*a, **k) -> None:
        if is_main:
            print(*a, **k)

    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    random.seed(tcfg.seed)
    model = LongNetLM(mcfg).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                                  betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.max_steps, tcfg.lr_power, tcfg.min_lr_ratio))
    sampler = data["sampler"]
    step = 0
    if resume is not None:
        from safetensors.torch import load_model as st_load
        st_load(model, os.path.join(resume["dir"], "model.safetensors"), strict=True, device=str(device))
        state, data_state = load_trainer_state(resume["dir"], map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The lambda above follows the (possibly changed) max_steps and lr; LambdaLR keeps its step count.
        factor = lr_factor(scheduler.last_epoch, tcfg.warmup_steps, tcfg.max_steps, tcfg.lr_power,
                           tcfg.min_lr_ratio)
        scheduler.base_lrs = [tcfg.lr] * len(optimizer.param_groups)
        for g in optimizer.param_groups:
            g["initial_lr"] = tcfg.lr
            g["lr"] = tcfg.lr * factor
        sampler.load_state_dict(data_state)
        set_rng_state(state["rng"])
        step = int(state["step"])
    if ctx is not None:
        from ..distributed.training import parallelize
        train_module = parallelize(model, ctx)  # model stays the unwrapped module
    else:
        train_module = model
    fwd = torch.compile(train_module) if compile_model else train_module
    log = _Log(out_dir, step if resume is not None else None) if is_main else _NoLog()
    n_params = model.num_parameters()
    title = (f"{preset_name}: {mcfg.n_layers}L d={mcfg.d_model} H={mcfg.n_heads} "
             f"w={','.join(map(str, mcfg.segment_lengths))} r={','.join(map(str, mcfg.dilation_rates))}, "
             f"{data_spec}")
    say(f"[longnet] data: {data['description']}")
    say(f"[longnet] model: {n_params:,} parameters, {mcfg.n_layers} layers, d_model {mcfg.d_model}, "
        f"{mcfg.n_heads} heads, w={mcfg.segment_lengths} r={mcfg.dilation_rates}; device {device}, "
        f"{torch.get_num_threads()} CPU threads")
    if ctx is not None:
        S, D = ctx.sequence_parallel, ctx.data_parallel
        say(f"[longnet] mesh: {ctx.world_size} processes ({ctx.backend}) = data-parallel {D} x "
            f"sequence-parallel {S}; each process holds {tcfg.batch_size // D} of {tcfg.batch_size} rows x "
            f"{tcfg.seq_len // S} of {tcfg.seq_len} positions per micro-step")
    say(f"[longnet] training {tcfg.max_steps} steps of {tcfg.tokens_per_step:,} tokens "
        f"(batch {tcfg.batch_size} x seq_len {tcfg.seq_len} x accum {tcfg.grad_accum}), peak lr {tcfg.lr:g}; "
        f"run folder {out_dir}" + (f"; resuming at step {step}" if resume is not None else ""))

    is_passkey = data["kind"] == "passkey"

    def evaluate() -> Dict[str, float]:
        if ctx is not None:
            from ..distributed.training import GatheredLM, evaluate_lm_distributed
            if is_passkey:
                return evaluate_passkey(GatheredLM(model, ctx), data["task"], tcfg.eval_windows,
                                        batch_size=tcfg.eval_batch_size, seed=tcfg.seed + 1, device=device,
                                        precision=tcfg.precision)
            return evaluate_lm_distributed(model, data["corpus"].valid, tcfg.seq_len, ctx,
                                           max_windows=tcfg.eval_windows, batch_size=tcfg.eval_batch_size,
                                           precision=tcfg.precision)
        if is_passkey:
            return evaluate_passkey(model, data["task"], tcfg.eval_windows, batch_size=tcfg.eval_batch_size,
                                    seed=tcfg.seed + 1, device=device, precision=tcfg.precision)
        return evaluate_lm(model, data["corpus"].valid, tcfg.seq_len, max_windows=tcfg.eval_windows,
                           batch_size=tcfg.eval_batch_size, device=device, precision=tcfg.precision)

    def log_eval(res: Dict[str, float], elapsed: float) -> None:
        log.write(step=step, split="valid", loss=res["loss"], bpb=res["bpb"], elapsed_s=elapsed,
                  accuracy=res.get("accuracy", ""))
        msg = f"step {step}: val loss {res['loss']:.4f}, val bpb {res['bpb']:.4f}"
        if is_passkey:
            msg += f", passkey accuracy {res['accuracy']:.3f} (digits {res['digit_accuracy']:.3f})"
        if is_main:
            tqdm.write(msg) if progress else print(msg)

    def save(rng=None, data_state=None, metrics=None, collective: bool = True) -> str:
        # Every rank holds the same weights, optimizer and sampler state (the sampler draws the
        # global batch everywhere), so rank 0's copy is the run's; the weights are the unwrapped
        # model's state_dict, with no DDP prefix and nothing about the mesh.
        if ctx is not None and collective:
            from ..distributed.training import barrier
            barrier(ctx)
        path = os.path.join(out_dir, "checkpoints", f"step_{step:08d}")
        if is_main:
            path = save_checkpoint(out_dir, model=model, train_config=tcfg, data_spec=data_spec, step=step,
                                   optimizer=optimizer, scheduler=scheduler, rng=rng,
                                   data_state=data_state if data_state is not None else sampler.state_dict(),
                                   metrics=metrics, keep=tcfg.keep_checkpoints)
        if ctx is not None and collective:
            barrier(ctx)  # nobody reads a checkpoint rank 0 is still writing
        return path

    model.train()
    t_start = time.perf_counter()
    elapsed_before = float(log.rows[-1]["elapsed_s"]) if log.rows and log.rows[-1].get("elapsed_s") else 0.0
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or not is_main, mininterval=0.5)
    snapshot = (rng_state(), sampler.state_dict())  # state after the last completed step
    last_val: Optional[Dict[str, float]] = None
    status = "done"
    in_update = False
    tok_rate = None
    try:
        with _StopFlag(debounce_s=2.0 if ctx is not None else 0.0, quiet=not is_main) as stop:
            while step < tcfg.max_steps:
                t0 = time.perf_counter()
                loss_sum = 0.0
                if ctx is not None:
                    from ..distributed.training import step_seed
                    torch.manual_seed(step_seed(tcfg.seed, step, ctx.rank))
                for micro in range(tcfg.grad_accum):
                    x, y = sampler.next_batch()
                    if ctx is not None:
                        from ..distributed.training import shard_batch
                        x, y = shard_batch(x, y, ctx)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    # DDP all-reduces gradients on the last micro-batch of the step only.
                    sync = ctx is None or ctx.world_size == 1 or micro == tcfg.grad_accum - 1
                    with contextlib.nullcontext() if sync else train_module.no_sync():
                        with autocast_context(device, tcfg.precision):
                            logits = fwd(x)
                        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                        (loss / tcfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                stop_now = False
                if ctx is not None:
                    # One all-reduce carries the loss (mean over the mesh: equal token counts per
                    # rank) and the ranks' stop requests, so every rank stops after the same step.
                    from ..distributed.training import all_reduce_sum
                    time_up = bool(tcfg.time_limit_s and time.perf_counter() - t_start >= tcfg.time_limit_s)
                    loss_sum, n_stop, n_time = all_reduce_sum([loss_sum, stop.requested, time_up], ctx)
                    loss_sum /= ctx.world_size
                    stop_now, time_up_all = n_stop > 0, n_time > 0
                loss_val = loss_sum / tcfg.grad_accum
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss is {loss_val} at step {step + 1}; lower train.lr "
                                             "or raise train.warmup_steps")
                in_update = True
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                in_update = False
                snapshot = (rng_state(), sampler.state_dict())
                dt = time.perf_counter() - t0
                rate = tcfg.tokens_per_step / dt
                tok_rate = rate if tok_rate is None else 0.8 * tok_rate + 0.2 * rate
                elapsed = elapsed_before + time.perf_counter() - t_start
                log.write(step=step, split="train", loss=loss_val, bpb=loss_val / LN2, lr=lr,
                          grad_norm=float(gnorm), tokens_per_s=rate, elapsed_s=elapsed)
                bar.set_postfix(loss=f"{loss_val:.3f}", bpb=f"{loss_val / LN2:.3f}", tok_s=f"{tok_rate:,.0f}",
                                refresh=False)
                bar.update(1)
                if not progress and (step % 10 == 0 or step == 1):
                    say(f"step {step}/{tcfg.max_steps}: loss {loss_val:.4f}, bpb {loss_val / LN2:.4f}, "
                        f"lr {lr:.3g}, {rate:,.0f} tok/s")
                _after_step(step)
                if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < tcfg.max_steps:
                    last_val = evaluate()
                    log_eval(last_val, elapsed_before + time.perf_counter() - t_start)
                if tcfg.save_interval and step % tcfg.save_interval == 0 and step < tcfg.max_steps:
                    save()
                if stop_now if ctx is not None else stop.requested:
                    status = "interrupted"
                    break
                if ctx is not None:
                    if time_up_all and step < tcfg.max_steps:
                        if is_main:
                            tqdm.write(f"time limit of {tcfg.time_limit_s:g} s reached at step {step}")
                        status = "time limit"
                        break
                elif tcfg.time_limit_s and time.perf_counter() - t_start >= tcfg.time_limit_s:
                    tqdm.write(f"time limit of {tcfg.time_limit_s:g} s reached at step {step}")
                    status = "time limit"
                    break
    except KeyboardInterrupt:
        bar.close()
        # No collective here: other ranks may be anywhere (or gone). Rank 0's weights are
        # complete unless it was inside an optimiser update.
        if is_main:
            if in_update:
                print(f"\n[longnet] interrupted during an optimiser update; no checkpoint written "
                      f"(latest one stays in {out_dir})", file=sys.stderr)
            else:
                path = save(rng=snapshot[0], data_state=snapshot[1], collective=False)
                print(f"\n[longnet] interrupted; saved step {step} to {path}. Continue with:\n"
                      f"  {_resume_command(out_dir, ctx)}", file=sys.stderr)
            log.close()
            plot_loss_curve(log.rows, os.path.join(out_dir, "loss_curve.png"), title)
        return 130
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    if status == "interrupted":
        path = save(rng=snapshot[0], data_state=snapshot[1])
        if is_main:
            log.close()
            plot_loss_curve(log.rows, os.path.join(out_dir, "loss_curve.png"), title)
            print(f"[longnet] stopped at step {step}; checkpoint {path}. Continue with:\n"
                  f"  {_resume_command(out_dir, ctx)}", file=sys.stderr)
        return 130
    # End of run: final evaluation, checkpoint (before sampling, so the saved RNG state is
    # exactly what a longer uninterrupted run would have continued from), plot, sample.
    final = evaluate()
    log_eval(final, elapsed_before + time.perf_counter() - t_start)
    metrics = {"val_loss": final["loss"], "val_bpb": final["bpb"], "elapsed_s": elapsed}
    if is_passkey:
        metrics["passkey_accuracy"] = final["accuracy"]
    path = save(rng=snapshot[0], data_state=snapshot[1], metrics=metrics)
    log.close()
    png = plot_loss_curve(log.rows, os.path.join(out_dir, "loss_curve.png"), title) if is_main else None
    say(f"[longnet] {status}: {step} steps in {elapsed:.0f} s; final val bpb {final['bpb']:.4f} "
        f"(loss {final['loss']:.4f} nats/byte)" + (f", passkey accuracy {final['accuracy']:.3f}" if is_passkey else ""))
    say(f"[longnet] checkpoint: {path}")
    say(f"[longnet] log: {log.path}" + (f", loss curve: {png}" if png else ""))
    if is_main:
        # Sampling is sequential decoding by one process: rank 0 runs it on the unwrapped model
        # with the single-device attention (the other ranks wait at the barrier below).
        local = contextlib.nullcontext()
        if ctx is not None:
            from ..distributed.parallel import sequence_parallel_disabled
            local = sequence_parallel_disabled(model)
        with local:
            _sample_at_end(model, data, tcfg, device, is_passkey)
    if ctx is not None:
        from ..distributed.training import barrier
        barrier(ctx)
    return 0


def _resume_command(out_dir: str, ctx) -> str:
    if ctx is None:
        return f"longnet train --resume --out {out_dir}"
    return (f"torchrun --nproc_per_node {ctx.world_size} -m longnet train --resume --out {out_dir} "
            f"--sequence-parallel {ctx.sequence_parallel} (any S and D work)")


def _sample_at_end(model, data: Dict[str, Any], tcfg: TrainConfig, device: torch.device, is_passkey: bool) -> None:
    if tcfg.sample_tokens and not is_passkey:
        valid = data["corpus"].valid
        prompt = torch.from_numpy(valid[:min(64, valid.size)].astype("int64"))
        gen = torch.Generator().manual_seed(tcfg.seed)
        out = model.generate(prompt.to(device), tcfg.sample_tokens, temperature=0.8, top_k=40,
                             generator=gen if device.type == "cpu" else None)
        text = _decode(out.tolist())
        print("[longnet] sample (prompt: the first 64 bytes of the validation split; temperature 0.8, top-k 40):")
        print("-" * 60)
        print(text)
        print("-" * 60)
    elif is_passkey:
        x, y, mask = data["task"].batch(1, np.random.default_rng(tcfg.seed + 7))
        prompt = x[0, :int(mask[0].nonzero()[0]) + 1]
        out = model.generate(prompt.to(device), data["task"].key_digits, temperature=0)
        print(f"[longnet] passkey example: expected {_decode(y[0][mask[0]].tolist())!r}, "
              f"model answered {_decode(out[prompt.numel():].tolist())!r}")
