"""``longnet train``: train a LongNet language model on bytes.

    longnet train                                   # tiny preset, built-in corpus, CPU, ~4 minutes
    longnet train --data enwik8:~/data/enwik8.zip --preset small --device cuda
    longnet train --set model.n_layers=2 --set train.lr=1e-3 --max-steps 50 --out runs/try
    longnet train --resume --out runs/try --max-steps 100   # continue (and extend) a run
    longnet train --data passkey --set train.seq_len=1024  # synthetic long-range retrieval
    torchrun --nproc_per_node 2 -m longnet train --sequence-parallel 2   # one sequence over 2 processes
    torchrun --nproc_per_node 4 -m longnet train --fsdp --sequence-parallel 2   # FSDP2 x SP, DCP checkpoints

Settings come from a preset, then ``--set KEY=VALUE`` overrides (``model.FIELD``,
``train.FIELD`` or a bare field name; ``--list-fields`` lists them), then ``--max-steps``.
Everything (settings, device, data, ``--out``, the checkpoint to resume) is checked before
the run folder is written. The run folder receives ``log.csv`` (one row per step, one per
evaluation), ``loss_curve.png``, TensorBoard events when ``tensorboard`` is installed, and
checkpoints (see :mod:`longnet.training.checkpoint`).

Stopping. Ctrl-C, SIGTERM and SIGHUP (what ``timeout``, ``docker stop`` and schedulers
send) stop the run after the current step, save a checkpoint and exit with 128 + the
signal number; a second signal stops at once, still saving the last complete step when
that is safe. The last checkpoint is written before the final evaluation, so a signal
during it loses nothing. ``--resume`` continues from the newest intact checkpoint and
follows the same loss curve as an uninterrupted run on CPU.

Under ``torchrun`` the same loop runs on a (data x sequence) device mesh through a
:class:`longnet.distributed.training.DistContext` (one process uses the do-nothing
:class:`longnet.training.context.TrainContext`): ``--sequence-parallel S`` cuts every
sequence into S blocks, one per process, and ``--data-parallel D`` (default WORLD_SIZE / S)
splits the batch's rows. ``train.batch_size`` stays the global batch, so a run follows the
same loss curve (up to fp32 rounding) at any mesh shape, and its checkpoints resume at any
other. Stop requests are agreed by all ranks at each step boundary.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

from ..config import PRESETS, config_fields_help
from ..training.context import TrainContext
from ..training.setup import NothingToDo, TrainSetup, is_rank0, prepare
from ..training.trainer import train

__all__ = ["add_arguments", "run"]


class _PresetGiven(argparse.Action):
    """Stores --preset and records that it was given (--resume then checks it against the run)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.preset_given = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(preset_given=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "overrides: --set KEY=VALUE, repeatable. KEY is model.FIELD, train.FIELD or a field name\n"
        "that only one of them has; VALUE is parsed by the field's type (true/false, none,\n"
        "comma-separated integers for tuples). Examples:\n"
        "  --set model.n_layers=2 --set d_model=128 --set train.lr=1e-3\n"
        "  --set segment_lengths=64,128 --set dilation_rates=1,2 --set train.grad_accum=4\n"
        "`longnet train --list-fields` prints every field with its default.")
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS), action=_PresetGiven,
                        help="model + training preset (default tiny: ~4 min on 2 CPU cores); with --resume it "
                             "must match the run's model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable); see below")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="builtin (default: Python stdlib sources), enwik8:PATH, text:PATH, or passkey")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run folder for logs and checkpoints (default runs/PRESET-YYYYmmdd-HHMMSS); a new "
                             "run needs a new or empty folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest intact checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="--resume when --out already holds a checkpoint, else start the run there (for "
                             "torchrun --max-restarts: a restarted job continues from its last complete checkpoint)")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though the training data changed since the checkpoint")
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
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 over "
                             "all data x sequence ranks (default: DDP, each rank holds everything); "
                             "checkpoints are then DCP folders that resume at any world size")
    parser.add_argument("--dp-replicate", type=int, default=1, metavar="R",
                        help="with --fsdp: HSDP, R replicas each sharded over WORLD_SIZE / R ranks (R divides D)")
    parser.add_argument("--fsdp-param-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="with --fsdp: dtype parameters are gathered and computed in (gradients are reduced "
                             "and the optimizer runs in fp32)")
    parser.add_argument("--checkpoint-format", default="auto", choices=("auto", "safetensors", "dcp"),
                        help="auto: dcp with --fsdp, else safetensors (whole-state files written by rank 0)")
    parser.add_argument("--async-checkpoint", action="store_true",
                        help="with dcp checkpoints under torchrun: periodic saves write in the background "
                             "(dcp.async_save on a gloo group); the last save always waits")


def run(args: argparse.Namespace) -> int:
    if args.list_fields:
        print("config fields (KEY for --set KEY=VALUE, type, value in the tiny preset):")
        print(config_fields_help())
        return 0
    # Under torchrun every rank checks the same settings; rank > 0 says which it is, since a
    # data path can be missing on one node only.
    prefix = "" if is_rank0() else f"[rank {os.environ.get('RANK')}] "
    ctx = setup = None
    try:
        if args.auto_resume:
            from ..training.checkpoint import checkpoint_steps
            args.resume = bool(args.out) and bool(checkpoint_steps(args.out))
        parallel = _parallel_sizes(args)
        setup = prepare(args)
        _check_mesh(setup, parallel, args)
        ctx = _open_context(setup, parallel, args)
        return train(**setup.kwargs(), dist_ctx=ctx)
    except NothingToDo as e:
        if is_rank0():
            print(f"[longnet] {e}")
        return 0
    except KeyboardInterrupt:  # before the loop's own handling (setup, process group) or a third signal
        return 130
    except (ValueError, TypeError) as e:  # settings, data, --out or checkpoint: a message, not a traceback
        print(f"{prefix}longnet train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.close()
        if setup is not None and setup.lock is not None:
            setup.lock.release()


def _parallel_sizes(args: argparse.Namespace) -> Tuple[int, int, int]:
    """(S, D, world size); the distributed package is imported only when torchrun or the flags ask for it."""
    S, D = args.sequence_parallel, args.data_parallel
    if not os.environ.get("WORLD_SIZE") and S == 1 and D in (None, 1):
        if args.fsdp:
            raise ValueError("--fsdp shards the model over processes started by torchrun (WORLD_SIZE is not "
                             "set); launch it as\n  torchrun --nproc_per_node P -m longnet train --fsdp ...")
        return 1, 1, 1
    from ..distributed.training import resolve_parallel_sizes
    return resolve_parallel_sizes(S, D)


def _open_context(setup: TrainSetup, parallel: Tuple[int, int, int], args: argparse.Namespace) -> TrainContext:
    """One process, or the (data x sequence) mesh of a torchrun launch."""
    S, D, world = parallel
    fmt = None if args.checkpoint_format == "auto" else args.checkpoint_format
    if world == 1 and not args.fsdp:
        ctx = TrainContext(setup.device)
        ctx.checkpoint_format = fmt or ctx.checkpoint_format
        return ctx
    from ..distributed.fsdp import FSDPOptions
    from ..distributed.training import init_distributed
    mcfg, tcfg = setup.model_config, setup.train_config
    pat = mcfg.pattern
    fsdp = FSDPOptions(args.dp_replicate, args.fsdp_param_dtype) if args.fsdp else None
    ctx = init_distributed(S, D, setup.device, seq_len=tcfg.seq_len, segment_lengths=pat.segment_lengths,
                           dilation_rates=pat.dilation_rates, segment_phases=pat.segment_phases, fsdp=fsdp,
                           checkpoint_format=fmt, async_checkpoint=args.async_checkpoint)
    setup.device = ctx.device
    return ctx



def _check_mesh(setup: TrainSetup, parallel: Tuple[int, int, int],
                args: Optional[argparse.Namespace] = None) -> None:
    """Checks of the settings against the mesh (raises ValueError); ``args``: the FSDP and
    checkpoint flags (None: none given)."""
    S, D, world = parallel
    args = args if args is not None else argparse.Namespace(fsdp=False, dp_replicate=1, fsdp_param_dtype="fp32",
                                                             async_checkpoint=False, checkpoint_format="auto")
    if not args.fsdp and (args.dp_replicate != 1 or args.fsdp_param_dtype != "fp32"):
        raise ValueError("--dp-replicate and --fsdp-param-dtype apply to --fsdp runs only; add --fsdp")
    if args.fsdp:
        from ..distributed.fsdp import FSDPOptions
        FSDPOptions(args.dp_replicate, args.fsdp_param_dtype).check(D)
    if args.async_checkpoint and (world == 1 or (args.checkpoint_format != "dcp" and not args.fsdp)):
        raise ValueError("--async-checkpoint needs DCP checkpoints under torchrun (--fsdp or "
                         "--checkpoint-format dcp)")
    if world > 1:
        from ..distributed.training import check_parallel_config
        mcfg, tcfg, compile_model = setup.model_config, setup.train_config, setup.compile_model
        pat = mcfg.pattern
        check_parallel_config(tcfg.seq_len, tcfg.batch_size, pat.segment_lengths, pat.dilation_rates, S, D,
                              segment_phases=pat.segment_phases)
        if mcfg.short_conv and S > 1:
            raise ValueError(f"model.short_conv = {mcfg.short_conv} cannot run with --sequence-parallel {S}: each "
                             "block's first rows would need the previous rank's last rows; set model.short_conv=0")
        if compile_model and S > 1:
            raise ValueError("--compile cannot be combined with --sequence-parallel > 1: the sequence-parallel "
                             "attention runs collectives (all-gather, halo exchange, reduce-scatter) inside a "
                             "torch.autograd.Function, which torch.compile cannot capture, so every attention "
                             "layer would break the graph; drop --compile, or use --data-parallel alone")
