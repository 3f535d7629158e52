"""``longnet experiment --suite recall``: can a LongNet model recall what it saw?

    longnet experiment --suite recall --out runs/recall            # the full suite
    longnet experiment --suite recall --quick --out runs/rq        # every task and model, toy size (< 3 min)
    longnet experiment --suite recall --dry-run                    # the plan, its FLOPs; trains nothing
    longnet experiment --suite recall --tasks mqar --lengths 256   # a part of the plan
    longnet experiment --suite recall --merge runs/a runs/b --out runs/ab   # one report from several
    longnet experiment --suite recall --resume --out runs/recall   # go on after a stop, skipping finished runs

Trains dense attention, LongNet's paper pattern, LongNet with the local window and a sliding
window of LongNet's attention FLOPs, at equal training FLOPs, on byte-level recall probes
(:mod:`longnet.training.recall`), sweeping width and learning rate and keeping each model's best
(:mod:`.recall_plan`, :mod:`.recall_suite`); writes CSVs, PNGs and a table (:mod:`.recall_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from ...argtypes import positive_int_list
from ...device import machine_name, pick_device
from ...fileio import atomic_write_json, read_json
from .plan import PLAN
from .recall_plan import BLOCKS, CPU_FLOPS_PER_S, MODEL_KINDS, RECALL_DEFAULT, RECALL_QUICK, RecallRun, \
    RecallSettings, plan_recall, settings_from_dict, total_flops
from .recall_report import best_rows, curve_rows, format_recall_table, merge_recall, write_reach, write_recall_plots, \
    write_recall_results, write_recall_table
from .recall_suite import FORWARD_SHARE, RunResult, best_runs, eval_set, gap_rows, reach_rows, result_from_record, \
    result_record, train_recall_run

__all__ = ["add_recall_arguments", "recall_settings_from_args", "run_recall", "LM_ONLY"]

# Flags of the LM experiment that the recall suite shares (same dest, same meaning).
SHARED = {"layers": "layers", "heads": "heads", "local_window": "local_window", "base_segment": "base_segment",
          "seed": "seed"}
# The suite's own flags that shape its plan (argparse dest: flag); --resume refuses them.
PLAN_FLAGS = {"tasks": "--tasks", "lengths": "--lengths", "pairs": "--pairs", "mqar_queries": "--mqar-queries",
              "models": "--models", "short_conv": "--short-conv", "max_rate": "--max-rate", "d_models": "--d-models",
              "lrs": "--lrs", "block": "--block", "batch_size": "--batch-size", "evals": "--evals",
              "eval_sequences": "--eval-sequences", "stop_accuracy": "--stop-accuracy"}
RESULTS_NAME = "results.json"  # beside plan.json: the finished runs, for --resume
# Flags of the LM experiment that mean nothing to the recall suite.
LM_ONLY = ("context", "d_model", "d_ffn", "budget", "passkey_budget", "batch_tokens", "lr", "eval_tokens",
           "position_tokens", "passkey_weight", "passkey_curriculum", "passkey_sequences")


def _floats(text: str) -> List[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 3e-4,1e-3, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_recall_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only ``--suite recall`` reads (it also reads --layers, --heads, --local-window,
    --base-segment, --seed, --out, --quick, --dry-run, --threads, --no-progress)."""
    g = parser.add_argument_group("recall suite (--suite recall)")
    g.add_argument("--tasks", type=_names, default=None, help="tasks to keep: mqar,copy,vt,passkey (default all)")
    g.add_argument("--lengths", type=positive_int_list, default=None, help="sequence lengths to keep (default all)")
    g.add_argument("--pairs", type=int, default=None, help="MQAR: key-value pairs of every MQAR probe")
    g.add_argument("--mqar-queries", choices=("even", "any"), default=None,
                   help="MQAR query offsets: even (Zoology's layout, every gap odd; default) or any")
    g.add_argument("--models", type=_names, default=None,
                   help=f"models to train: {','.join(MODEL_KINDS)} (default all)")
    g.add_argument("--short-conv", type=int, default=None,
                   help="add dense+convW and longnet+convW: keys and values convolved over W rows (default 0: off)")
    g.add_argument("--max-rate", type=int, default=None,
                   help="add longnet+maxrateR: LongNet with every rate capped at R (default 0: off)")
    g.add_argument("--d-models", type=positive_int_list, default=None, help="widths of the sweep (default 64,128)")
    g.add_argument("--lrs", type=_floats, default=None, help="learning rates of the sweep (default 3e-4,1e-3,3e-3)")
    g.add_argument("--block", choices=BLOCKS, default=None, help="block of every model (default magneto)")
    g.add_argument("--budget-scale", type=float, default=1.0, help="multiply every probe's FLOP budget")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32)")
    g.add_argument("--evals", type=int, default=None, help="evaluations per run (accuracy against FLOPs)")
    g.add_argument("--eval-sequences", type=int, default=None, help="evaluation sequences per probe")
    g.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="train nothing: combine the outputs of earlier recall runs (folders) into --out")
    g.add_argument("--stop-accuracy", type=float, default=None, help="stop a run at this accuracy (default 0.99)")


def _probes(base: RecallSettings, args: argparse.Namespace) -> tuple:
    probes = list(base.probes)
    if args.tasks:
        unknown = sorted(set(args.tasks) - {p.task for p in RECALL_DEFAULT.probes})
        if unknown:
            raise ValueError(f"--tasks must name tasks among mqar, copy, vt, passkey; got {', '.join(unknown)}")
        probes = [p for p in probes if p.task in args.tasks]
    if args.lengths:
        probes = [p for p in probes if p.seq_len in args.lengths]
    mqar = {}
    if args.pairs is not None:
        mqar["num_pairs"] = args.pairs
    if args.mqar_queries is not None:
        mqar["even_queries"] = args.mqar_queries == "even"
    if mqar:
        probes = [dataclasses.replace(p, knobs=tuple({**dict(p.knobs), **mqar}.items())) if p.task == "mqar" else p
                  for p in probes]
    if args.budget_scale <= 0:
        raise ValueError(f"--budget-scale must be > 0, got {args.budget_scale}")
    probes = [dataclasses.replace(p, budget=p.budget * args.budget_scale) for p in probes]
    if not probes:
        raise ValueError("--tasks and --lengths leave no probe of the plan; the plan's probes are "
                         + ", ".join(p.name for p in base.probes))
    return tuple(probes)


def _refuse_lm_flags(args: argparse.Namespace) -> None:
    given = [f"--{k.replace('_', '-')}" for k in LM_ONLY if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to --suite lm")


def recall_settings_from_args(args: argparse.Namespace) -> RecallSettings:
    """The quick or full recall settings with the flags given; raises ValueError naming a bad flag."""
    _refuse_lm_flags(args)
    base = RECALL_QUICK if args.quick else RECALL_DEFAULT
    over: Dict[str, Any] = {f: getattr(args, a) for a, f in SHARED.items() if getattr(args, a, None) is not None}
    for flag, field in (("models", "models"), ("short_conv", "short_conv"), ("max_rate", "max_rate"),
                        ("d_models", "d_models"), ("lrs", "lrs"), ("block", "block"), ("batch_size", "batch_size"),
                        ("evals", "evals"), ("eval_sequences", "eval_sequences"), ("stop_accuracy", "stop_accuracy")):
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = tuple(v) if isinstance(v, list) else v
    s = dataclasses.replace(base, probes=_probes(base, args), **over)
    plan_recall(s)  # every check, and the budgets
    return s


def _plan_text(s: RecallSettings, runs: List[RecallRun]) -> str:
    lines = [f"recall plan: {len(runs)} runs, {s.layers} layers, {s.heads} heads, block {s.block}, "
             f"widths {list(s.d_models)}, lrs {list(s.lrs)}, batch {s.batch_size}; "
             f"total {total_flops(runs):.3g} training FLOPs, about {total_flops(runs) / CPU_FLOPS_PER_S / 3600:.2g} "
             f"CPU-core hours at {CPU_FLOPS_PER_S:.2g} FLOP/s (measured on a 2-core CPU; docs/recall.md)"]
    lines.append(f"  {'probe':<20} {'model':<16} {'pattern':<64} {'d':>4} {'steps':>6} {'FLOPs/run':>10}")
    seen = set()
    for r in runs:
        key = (r.probe.name, r.model.name, r.d_model)
        if key not in seen:
            seen.add(key)
            lines.append(f"  {r.probe.name:<20} {r.model.name:<16} {str(r.model.config.pattern):<64} "
                         f"{r.d_model:>4} {r.steps:>6} {r.flops:>10.3g}")
    return "\n".join(lines)


def run_recall(args: argparse.Namespace, out_dir: Callable[[argparse.Namespace], str]) -> int:
    """The recall suite's command; ``out_dir(args)`` gives (and checks, under its lock) the output
    folder, new or empty, or with ``--resume`` a suite's folder to go on in."""
    try:
        if args.merge:
            return _merge(args, out_dir)
        return _run_plan(args, out_dir)
    finally:
        lock = getattr(args, "out_lock", None)
        if lock is not None:
            lock.release()


def _run_plan(args: argparse.Namespace, out_dir: Callable[[argparse.Namespace], str]) -> int:
    try:
        if args.resume:
            s, done = _resumed(args)
        else:
            s, done = recall_settings_from_args(args), {}
        runs = plan_recall(s)
        out = None if args.dry_run else out_dir(args)
        finished = [result_from_record(done[r.name], r) for r in runs if r.name in done]
    except (ValueError, TypeError) as e:
        print(f"longnet experiment: error: {e}", file=sys.stderr)
        return 2
    print(_plan_text(s, runs))
    if args.dry_run:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(out, exist_ok=True)
    device = pick_device(args.device)
    if args.resume:
        print(f"[longnet] resuming {out}: {len(finished)} of {len(runs)} runs finished, "
              f"{len(runs) - len(finished)} to go")
    else:
        atomic_write_json(os.path.join(out, PLAN), {
            "settings": dataclasses.asdict(s), "device": machine_name(device), "threads": torch.get_num_threads(),
            "runs": [{"run": r.name, "pattern": str(r.model.config.pattern), "steps": r.steps, "flops": r.flops}
                     for r in runs]})
    return _Suite(s, runs, out, device, progress=not args.no_progress, finished=finished).run()


def _resumed(args: argparse.Namespace):
    """(settings, {run name: record}) of the suite in ``--out``: its plan.json and the finished
    runs of its results.json. A flag that would change the plan is refused."""
    _refuse_lm_flags(args)
    if not args.out:
        raise ValueError("--resume needs --out DIR, the folder of the recall suite to go on with")
    given = [flag for dest, flag in PLAN_FLAGS.items() if getattr(args, dest, None) is not None]
    given += [f"--{dest.replace('_', '-')}" for dest in SHARED if getattr(args, dest, None) is not None]
    given += ["--quick"] * bool(args.quick) + ["--budget-scale"] * (args.budget_scale != 1.0)
    if given:
        raise ValueError(f"{', '.join(given)}: a resumed suite keeps the plan of {args.out}; drop the flags "
                         "(or start a new --out)")
    path = os.path.join(args.out, PLAN)
    try:
        plan = read_json(path)
    except FileNotFoundError:
        raise ValueError(f"--out {args.out} holds no recall suite to resume (no {PLAN}); drop --resume") from None
    if not isinstance(plan, dict) or "probes" not in plan.get("settings", {}):
        raise ValueError(f"{path} is not a recall suite's plan; drop --resume")
    s = settings_from_dict(plan["settings"])
    planned = [(r.name, r.steps) for r in plan_recall(s)]
    if planned != [(r.get("run"), r.get("steps")) for r in plan.get("runs", []) if isinstance(r, dict)]:
        raise ValueError(f"the plan in {args.out} is not what this version of longnet plans from its settings; "
                         "start a new --out")
    path = os.path.join(args.out, RESULTS_NAME)
    if not os.path.exists(path) and os.path.exists(os.path.join(args.out, "runs.csv")):
        # Runs finished without their records (an older longnet): resuming would train them again
        # and overwrite their rows.
        raise ValueError(f"{args.out} holds finished runs but no {RESULTS_NAME} to resume from; --merge it with a "
                         "new suite that runs the rest")
    records = read_json(path) if os.path.exists(path) else []
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a list of finished runs")
    return s, {rec.get("run"): rec for rec in records if isinstance(rec, dict)}


def _merge(args: argparse.Namespace, out_dir: Callable[[argparse.Namespace], str]) -> int:
    """--merge: one report (CSVs, table, plots) in --out from the folders of earlier runs."""
    try:
        out = out_dir(args)  # new or empty, so never one of the merged folders
        text = merge_recall(args.merge, out)
    except (ValueError, OSError) as e:
        print(f"longnet experiment: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"[longnet] merged {len(args.merge)} recall outputs into {out}")
    return 0


class _Suite:
    """The plan's runs in order, after those already ``finished`` (``--resume``); results, their
    records (results.json) and the table are rewritten after each run, the plots at the end."""

    def __init__(self, s: RecallSettings, runs: List[RecallRun], out: str, device: torch.device, progress: bool,
                 finished: Sequence[RunResult] = ()):
        self.s, self.runs, self.out, self.device, self.machine = s, runs, out, device, machine_name(device)
        self.data = {p.name: eval_set(p, s.eval_sequences, s.seed) for p in s.probes}
        self.results: List[RunResult] = list(finished)
        self.todo = [r for r in runs if r.name not in {f.run.name for f in finished}]

        def cost(r: RecallRun) -> float:
            return r.flops + s.evals * FORWARD_SHARE * r.flops_per_token * s.eval_sequences * r.probe.seq_len
        self.bar = tqdm(total=sum(map(cost, runs)), initial=sum(cost(f.run) for f in finished), unit="FLOP",
                        unit_scale=True, desc="recall", disable=not progress, dynamic_ncols=True, mininterval=0.5)

    def run(self) -> int:
        t0, code = time.perf_counter(), 0
        try:
            for r in self.todo:
                self.bar.set_description(f"[{len(self.results) + 1}/{len(self.runs)}] {r.name}")
                self.results.append(train_recall_run(r, self.s, self.data[r.probe.name], self.bar.update,
                                                     self.device, self._reporter(r)))
                self._write(final=False)
        except KeyboardInterrupt:
            code = 130
        finally:
            self.bar.close()
        text = self._write(final=True)
        if text:
            print(text)
        status = "done" if code == 0 else (f"stopped; the results above are the finished runs' "
                                            f"(--resume --out {self.out} goes on)")
        print(f"[longnet] recall suite {status}: {len(self.results)} of {len(self.runs)} runs, "
              f"{time.perf_counter() - t0:.0f} s wall time; outputs in {self.out}")
        return code

    def _reporter(self, r: RecallRun) -> Callable[[int, float, float], None]:
        def report(step: int, accuracy: float, loss: float) -> None:
            # Above the bar (or alone with --no-progress), so a long run shows its curve as it goes.
            self.bar.write(f"[longnet] {r.name}: step {step}/{r.steps}, accuracy {accuracy:.3f}, "
                           f"answer loss {loss:.3f}")
        return report

    def _write(self, final: bool) -> str:
        if not self.results:
            return ""
        best = best_runs(self.results)
        gaps = [g for (probe, _), r in best.items() for g in gap_rows(self.s, r, self.data[probe])]
        rows, curve = best_rows(best, gaps), curve_rows(self.results)
        write_recall_results(self.out, [r.row() for r in self.results], rows, curve, gaps)
        atomic_write_json(os.path.join(self.out, RESULTS_NAME), [result_record(r) for r in self.results])
        text = format_recall_table(rows)
        write_recall_table(self.out, text)
        if final:
            title = f"{self.s.layers}L, block {self.s.block}; {self.machine}"
            write_recall_plots(self.out, rows, curve, gaps, title)
            reach = [row for p in self.s.probes for row in reach_rows(self.s, p, self.data[p.name])]
            write_reach(self.out, reach)
        return text

