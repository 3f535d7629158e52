"""``longnet experiment``: LongNet against baselines at equal compute, a scaled-down Table 2.

    longnet experiment --out runs/exp              # the full plan (about 40 minutes on 2 CPU cores)
    longnet experiment --quick --out runs/quick    # everything at toy size, in under 3 minutes
    longnet experiment --dry-run                   # print the plan and its FLOPs; train nothing

Trains six architectures of the same width and depth on the built-in corpus, each on the same
FLOP budget (dense at C, LongNet at 4C and 16C with the paper-style pattern and with the local
window variant, and a sliding window at 16C with LongNet's attention FLOPs; see
:mod:`longnet.training.experiment.plan`), then on the passkey task, and evaluates them on the
test split: bits-per-byte at C, 4C and 16C, loss against position in the window with its
boundary spike, and passkey retrieval against distance. Writes CSVs, PNG plots and the table
into ``--out`` (see :mod:`longnet.training.experiment.report`); every flag is checked, and
the whole plan with its budgets is computed, before anything is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ...argtypes import nonneg_int, output_dir, positive_int
from ...device import machine_name, pick_device
from ...checks import one_line
from ...fileio import atomic_write_json, read_json
from ..checkpoint import checkpoint_steps
from ..data import open_corpus
from ..evaluate import boundary_spike
from ..runlock import LOCK_NAME, FolderLock
from .execute import (
    Stopped,
    eval_flops,
    evaluate_lm_run,
    evaluate_passkey_run,
    train_run,
)
from .plan import (
    DEFAULT,
    LM,
    PLAN,
    QUICK,
    Run,
    Settings,
    check_settings,
    non_embedding_params,
    plan_runs,
)
from .recall_command import add_recall_arguments, run_recall
from .report import format_results, write_plots, write_results, write_table

__all__ = ["add_arguments", "run", "settings_from_args"]

RESULT = "result.json"  # in each run folder: the run's fields of the table, once trained and evaluated

# flag -> (Settings field, argparse type, help)
_FLAGS = {
    "--context": ("context", positive_int, "C: the dense model's training length; LongNet trains at 4C and 16C"),
    "--layers": ("layers", positive_int, "layers of every model"),
    "--d-model": ("d_model", positive_int, "width of every model"),
    "--heads": ("heads", positive_int, "attention heads of every model"),
    "--d-ffn": ("d_ffn", positive_int, "FFN hidden size of every model"),
    "--base-segment": ("base_segment", nonneg_int, "w0, the smallest LongNet segment (0: C/2)"),
    "--local-window": ("local_window", nonneg_int, "window L of the LongNet variant (0: no variant models)"),
    "--budget": ("budget", float, "training FLOPs per model on the corpus"),
    "--passkey-budget": ("passkey_budget", float, "training FLOPs per model on the passkey task (0: no passkey)"),
    "--batch-tokens": ("batch_tokens", nonneg_int, "tokens per optimiser step, every model (0: 16C)"),
    "--lr": ("lr", float, "peak learning rate"),
    "--eval-tokens": ("eval_tokens", positive_int, "test bytes scored at each evaluation length"),
    "--position-tokens": ("position_tokens", positive_int, "test bytes (random windows) for loss against position"),
    "--passkey-weight": ("passkey_weight", float, "loss weight of each passkey answer digit (a filler byte: 1)"),
    "--passkey-curriculum": ("passkey_curriculum", float, "fraction of a passkey run over which the longest "
                             "distance grows to the task's longest (0: no curriculum)"),
    "--passkey-sequences": ("passkey_sequences", positive_int, "passkey test sequences per distance"),
    "--seed": ("seed", nonneg_int, "seed of weights, batches and evaluation windows"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                        help="output folder, new or empty (default runs/experiment-YYYYmmdd-HHMMSS)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped experiment in --out: its plan, its finished runs, the "
                             "interrupted run from its checkpoint, then the rest")
    parser.add_argument("--quick", action="store_true", help="toy sizes: everything in under 3 minutes on 2 cores")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its FLOPs, then exit")
    parser.add_argument("--data", default="builtin", metavar="SPEC",
                        help="corpus: builtin (default), enwik8:PATH or text:PATH")
    for flag, (field, tp, text) in _FLAGS.items():
        defaults = f"default {getattr(DEFAULT, field):g}, --quick {getattr(QUICK, field):g}"
        parser.add_argument(flag, dest=field, type=tp, default=None, help=f"{text} ({defaults})")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--cache-dir", default=None,
                        help="data cache folder (default $LONGNET_CACHE or ~/.cache/longnet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--suite", choices=("lm", "recall"), default="lm",
                        help="lm: language modelling at equal compute (default); recall: the recall probes "
                             "(longnet.training.experiment.recall_command)")
    add_recall_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The quick or default settings with the flags given; raises ValueError naming a bad flag."""
    given = {field: getattr(args, field) for field, _, _ in _FLAGS.values() if getattr(args, field) is not None}
    s = dataclasses.replace(QUICK if args.quick else DEFAULT, **given)
    check_settings(s)
    return s


def _out_dir(args: argparse.Namespace) -> str:
    """The output folder, new or empty (with ``--resume``: an experiment's), checked while this
    process holds its lock (:class:`FolderLock`, kept as ``args.out_lock`` until the command
    ends), so two experiments can never share one folder."""
    out = args.out or os.path.join("runs", f"experiment-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = FolderLock(out, "--out").acquire()
    try:
        entries = [n for n in os.listdir(out) if n != LOCK_NAME]
        if getattr(args, "resume", False):
            if PLAN not in entries:
                raise ValueError(f"--out {out} holds no experiment to resume (no {PLAN}); drop --resume to start one")
        elif entries:
            raise ValueError(f"--out {out} is not empty; pass a new or empty folder"
                             + (", or --resume to continue the experiment in it" if PLAN in entries else ""))
    except BaseException:
        lock.release(discard=True)
        raise
    if lock.stale:
        print(f"[longnet] warning: took over the lock of {out} from process {lock.stale}, which is no longer "
              "running", file=sys.stderr)
    args.out_lock = lock
    return out


def _resumed_settings(args: argparse.Namespace) -> Settings:
    """The settings of the experiment in ``--out`` (its plan.json); a flag that differs is refused."""
    if not args.out:
        raise ValueError("--resume needs --out DIR, the folder of the experiment to continue")
    path = os.path.join(args.out, PLAN)
    try:
        plan = read_json(path)
        s = Settings(**plan["settings"])
    except FileNotFoundError:
        raise ValueError(f"--out {args.out} holds no experiment to resume (no {PLAN}); drop --resume to start "
                         "one") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an experiment's plan ({one_line(e)})") from None
    for flag, (field, _, _) in _FLAGS.items():
        given = getattr(args, field)
        if given is not None and given != getattr(s, field):
            raise ValueError(f"{flag} {given:g} differs from the experiment's {getattr(s, field):g} ({path}); a "
                             "resumed experiment keeps its plan (drop the flag, or start a new --out)")
    data = plan.get("data", args.data)
    if args.data not in ("builtin", data):
        raise ValueError(f"--data {args.data!r} differs from the experiment's {data!r}; drop --data")
    args.data = data
    check_settings(s)
    return s


def _prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check before anything is trained or written (raises ValueError); the output folder
    is taken last (see :func:`_out_dir`)."""
    s = _resumed_settings(args) if getattr(args, "resume", False) else settings_from_args(args)
    job: Dict[str, Any] = {"settings": s, "runs": plan_runs(s), "device": pick_device(args.device)}
    if args.data.strip().lower() == "passkey":
        raise ValueError("--data must be a corpus (builtin, enwik8:PATH, text:PATH); the passkey runs are part "
                         "of the plan already")
    if args.dry_run:
        return job
    corpus = open_corpus(args.data, cache_dir=args.cache_dir, verbose=False)
    longest = s.lengths[-1]
    for split, need in (("train", longest + 1), ("test", max(s.eval_tokens, longest) + 1)):
        have = corpus.split(split).size
        if have < need:
            raise ValueError(f"the {split} split of {args.data!r} has {have:,} bytes; the plan needs at least "
                             f"{need:,} (lower --context or --eval-tokens)")
    job["corpus"] = corpus
    job["out"] = _out_dir(args)
    return job


def _plan_text(job: Dict[str, Any]) -> str:
    s, runs = job["settings"], job["runs"]
    lines = [f"plan: {len(runs)} training runs, {s.layers} layers, d_model {s.d_model}, {s.heads} heads, "
             f"FFN {s.d_ffn}; C = {s.context}, w0 = {s.w0}; {s.tokens_per_step:,} tokens per step; "
             f"budget {s.budget:.3g} FLOPs per model (passkey {s.passkey_budget:.3g})"]
    head = f"  {'run':<32} {'pattern':<58} {'batch':>5} {'steps':>6} {'tokens':>11} {'FLOP/token':>11} {'FLOPs':>9}"
    lines += [head]
    for r in runs:
        lines.append(f"  {r.name:<32} {str(r.model.config.pattern):<58} {r.batch_size:>5} {r.steps:>6} "
                     f"{r.tokens:>11,} {r.flops_per_token:>11.3g} {r.flops:>9.3g}")
    lines.append(f"  total {sum(r.flops for r in runs):.3g} training FLOPs")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "suite", "lm") == "recall":
        return run_recall(args, _out_dir)
    try:
        job = _prepare(args)
    except (ValueError, TypeError) as e:  # settings, budget, data, --out: a message, not a traceback
        print(f"longnet experiment: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(_plan_text(job))
    if args.dry_run:
        return 0
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.resume:
            atomic_write_json(os.path.join(job["out"], PLAN), {
                "settings": dataclasses.asdict(job["settings"]), "data": args.data,
                "device": machine_name(job["device"]),
                "runs": [{"run": r.name, "pattern": str(r.model.config.pattern), "seq_len": r.model.seq_len,
                          "batch": r.batch_size, "steps": r.steps, "tokens": r.tokens, "flops": r.flops}
                         for r in job["runs"]]})
        return _Experiment(job, args.threads, progress=not args.no_progress, resume=args.resume).run()
    finally:
        args.out_lock.release()


class _Experiment:
    """The plan's runs in order, each trained, then evaluated; results written after each."""

    def __init__(self, job: Dict[str, Any], threads: int, progress: bool, resume: bool = False):
        self.s: Settings = job["settings"]
        self.resume = resume
        self.resume_command = f"longnet experiment --resume --out {job['out']}"
        self.runs: List[Run] = job["runs"]
        self.device, self.out, self.corpus, self.threads = job["device"], job["out"], job["corpus"], threads
        self.rows: Dict[str, Dict[str, Any]] = {}
        self.curves: Dict[str, Any] = {}
        self.passkey: List[Dict[str, Any]] = []
        self.lm_runs: List[Dict[str, Any]] = []
        total = sum(r.flops + eval_flops(r, self.s) for r in self.runs)
        self.bar = tqdm(total=total, unit="FLOP", unit_scale=True, desc="experiment", disable=not progress,
                        dynamic_ncols=True, mininterval=0.5)
        self.title = (f"{self.s.layers}L d={self.s.d_model} H={self.s.heads}, C={self.s.context}, "
                      f"{self.s.budget:.2g} FLOPs per model; {machine_name(self.device)}")

    def run(self) -> int:
        t0, code = time.perf_counter(), 0
        try:
            for r in self.runs:
                self._one(r)
        except Stopped as e:
            code = e.code
        except KeyboardInterrupt:
            code = 130
        finally:
            self.bar.close()
        return self._finish(code, time.perf_counter() - t0)

    def _one(self, r: Run) -> None:
        run_dir = os.path.join(self.out, "runs", f"{r.task}_{r.model.slug}")
        result = _finished_result(r, run_dir) if self.resume else None
        if result is None:
            self.bar.set_description(f"train {r.name}")
            trained = train_run(r, self.s, self.corpus, run_dir, self.device, self.threads, self.bar.update,
                                resume_command=self.resume_command, resume=self.resume)
            self.bar.set_description(f"eval {r.name}")
            result = self._evaluate(r, run_dir, trained)
            atomic_write_json(os.path.join(run_dir, RESULT), result)
        else:
            self.bar.update(r.flops)
        row = self.rows.setdefault(r.model.name, _model_fields(r))
        row.update(result["row"])
        if r.task == LM:
            losses = np.asarray(result["losses"])
            self.curves[r.model.name] = (losses, boundary_spike(losses, r.model.period))
            self.lm_runs.append({"model": r.model.name, "dir": run_dir,
                                 "flops_per_step": r.flops_per_token * r.batch_size * r.model.seq_len})
        else:
            self.passkey += [{"model": r.model.name, **f} for f in result["passkey"]]
        self.bar.update(eval_flops(r, self.s))
        write_results(self.out, list(self.rows.values()), self.s.lengths, self.curves, self.passkey)

    def _evaluate(self, r: Run, run_dir: str, trained: Dict[str, float]) -> Dict[str, Any]:
        """The run's fields of its model's row, and its curves, as stored in its result.json."""
        result: Dict[str, Any] = {"run": r.name, "steps": r.steps}
        if r.task == LM:
            results, losses, _ = evaluate_lm_run(r, self.s, self.corpus, run_dir, self.device)
            result["row"] = {**{f"lm_{k}": v for k, v in trained.items()}, "lm_batch": r.batch_size,
                             "lm_tokens_per_s": trained["tokens"] / max(trained["wall_s"], 1e-9), **results}
            result["losses"] = [float(x) for x in losses]
        else:
            found = evaluate_passkey_run(r, self.s, run_dir, self.device)
            result["passkey"] = found
            result["row"] = {**{f"passkey_{k}": v for k, v in trained.items()},
                             "passkey_accuracy": float(np.mean([f["accuracy"] for f in found])),
                             "passkey_digit_accuracy": float(np.mean([f["digit_accuracy"] for f in found])),
                             "passkey_accuracy_longest": found[-1]["accuracy"]}
        return _plain(result)

    def _finish(self, code: int, seconds: float) -> int:
        rows = list(self.rows.values())
        if rows:
            write_results(self.out, rows, self.s.lengths, self.curves, self.passkey)
            text = format_results(rows, self.s.lengths, self.passkey)
            write_table(self.out, text)
            plots = write_plots(self.out, rows, self.s.lengths, self.lm_runs, self.curves, self.passkey, self.title)
            print(text)
            print(f"[longnet] outputs in {self.out}: results.csv, position_loss.csv, passkey.csv, table.txt, "
                  + ", ".join(os.path.basename(p) for p in plots))
        status = "done" if code == 0 else f"stopped (exit status {code}); the results above are the finished runs'"
        print(f"[longnet] experiment {status}: {len(rows)} models, {seconds:.0f} s wall time")
        if code != 0:
            print(f"[longnet] continue the experiment with:\n  {self.resume_command}", file=sys.stderr)
        return code


def _plain(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers (for JSON)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _finished_result(r: Run, run_dir: str) -> Optional[Dict[str, Any]]:
    """The stored result of a run that finished and was evaluated (None: train or evaluate it)."""
    try:
        result = read_json(os.path.join(run_dir, RESULT))
    except (OSError, ValueError):  # missing or damaged: train or evaluate it again
        return None
    done = result.get("run") == r.name and result.get("steps") == r.steps and r.steps in checkpoint_steps(run_dir)
    return result if done else None


def _model_fields(r: Run) -> Dict[str, Any]:
    c = r.model.config
    return {"model": r.model.name, "kind": r.model.kind, "train_len": r.model.seq_len,
            "pattern": str(c.pattern), "params": c.num_parameters(),
            "non_embedding_params": non_embedding_params(c), "flops_per_token": r.flops_per_token}
