"""Outputs of ``longnet experiment --suite recall`` (all written atomically):

* ``runs.csv``: one row per training run (every model, width and learning rate of the sweep);
* ``best.csv``: each (probe, model)'s best run, with its accuracy in each gap bucket;
* ``curve.csv``: accuracy on the evaluation set against training FLOPs, every run;
* ``gaps.csv``: the best runs' accuracy by gap bucket and by gap in powers of two;
* ``reach.csv``: per probe and gap bucket, the layers LongNet's pattern needs to link each answer
  to what it must read (:func:`~.recall_suite.reach_rows`);
* ``frontier.png``: per probe, each model's best accuracy against training FLOPs;
* ``gaps.png``: per probe, each model's best accuracy by gap bucket;
* ``table.txt``: the printed table.

:func:`merge_recall` combines the outputs of several runs of the suite (parts of the plan run
at different times or places, other depths or variants) into one set of these files.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

from ...report import Column, Panel, Series, format_table, plot_panels, write_csv
from ...fileio import atomic_write_text, read_json
from .plan import PLAN
from .recall_plan import BUCKETS
from .recall_suite import RunResult, rank

__all__ = ["RUN_FIELDS", "best_rows", "curve_rows", "write_recall_results", "format_recall_table",
           "write_recall_plots", "write_reach", "write_recall_table", "merge_recall"]

RUN_FIELDS = ("probe", "task", "seq_len", "model", "kind", "pattern", "block", "layers", "d_model", "lr", "params",
              "planned_steps", "steps", "batch", "flops_per_token", "train_flops", "accuracy", "loss", "chance",
              "wall_s", "s_per_step")
BEST_FIELDS = RUN_FIELDS + tuple(f"acc_{b}" for b in BUCKETS) + tuple(f"n_{b}" for b in BUCKETS)


def best_rows(best: Dict[Any, RunResult], gaps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """best.csv's rows: each best run's row with its bucket accuracies and answer counts."""
    return best_rows_from([r.row() for r in best.values()], gaps)


CURVE_FIELDS = ("probe", "model", "d_model", "lr", "step", "train_flops", "accuracy")
GAP_FIELDS = ("probe", "model", "by", "bin", "answers", "accuracy")


def curve_rows(results: Sequence[RunResult]) -> List[Dict[str, Any]]:
    """curve.csv's rows: every evaluation of every run."""
    return [{"probe": r.run.probe.name, "model": r.run.model.name, "d_model": r.run.d_model, "lr": r.run.lr,
             "step": step, "train_flops": flops, "accuracy": acc} for r in results for step, flops, acc in r.curve]


def write_recall_results(out: str, runs: List[Dict[str, Any]], best: List[Dict[str, Any]],
                         curve: List[Dict[str, Any]], gaps: List[Dict[str, Any]]) -> None:
    write_csv(runs, os.path.join(out, "runs.csv"), RUN_FIELDS)
    write_csv(best, os.path.join(out, "best.csv"), BEST_FIELDS)
    write_csv(curve, os.path.join(out, "curve.csv"), CURVE_FIELDS)
    write_csv(gaps, os.path.join(out, "gaps.csv"), GAP_FIELDS)


def _bucket(b: str) -> Column:
    def value(row: Dict[str, Any]) -> str:
        v = row.get(f"acc_{b}")
        return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else "-"
    return Column(b, value, width=11)


def format_recall_table(best: List[Dict[str, Any]]) -> str:
    """One line per (probe, model): its best width and lr, steps, FLOPs, accuracy, and by bucket."""
    cols = [Column("probe", "probe", width=20, align="<"), Column("model", "model", width=20, align="<"),
            Column("d", "d_model", width=4), Column("lr", "lr", "g", 7), Column("steps", "steps", "d", 6),
            Column("TFLOP", lambda r: r["train_flops"] / 1e12, ".3f", 7), Column("accuracy", "accuracy", ".3f", 8),
            Column("chance", "chance", ".3f", 6)]
    return format_table(best, cols + [_bucket(b) for b in BUCKETS])


REACH_FIELDS = ("probe", "pattern", "bucket", "answers", "share", "min_depth", "max_depth", "mean_depth", "never")


def write_reach(out: str, rows: List[Dict[str, Any]]) -> None:
    write_csv(rows, os.path.join(out, "reach.csv"), REACH_FIELDS)


def write_recall_table(out: str, text: str) -> str:
    path = os.path.join(out, "table.txt")
    atomic_write_text(path, text + "\n")
    return path


def _probe_panels(best: Sequence[Dict[str, Any]], curve: Sequence[Dict[str, Any]]) -> List[Panel]:
    panels = []
    for p in dict.fromkeys(b["probe"] for b in best):
        panel = Panel(p, "training FLOPs", "answer accuracy", xscale=("log", {}))
        for b in (b for b in best if b["probe"] == p):
            pts = [c for c in curve if all(c[k] == b[k] for k in ("probe", "model", "d_model", "lr"))]
            if pts:
                panel.series.append(Series(f"{b['model']} (d{b['d_model']}, lr {b['lr']:g})",
                                           [c["train_flops"] for c in pts], [c["accuracy"] for c in pts]))
        panels.append(panel)
    return panels


def write_recall_plots(out: str, best: Sequence[Dict[str, Any]], curve: Sequence[Dict[str, Any]],
                       gaps: List[Dict[str, Any]], title: str) -> List[str]:
    """frontier.png (each best run's accuracy against its training FLOPs) and gaps.png; returns their paths."""
    frontier = _probe_panels(best, curve)
    width = max(6.0, 4.2 * len(frontier))
    paths = [plot_panels(frontier, os.path.join(out, "frontier.png"), f"accuracy against training FLOPs; {title}",
                         size=(width, 4.2))]
    bucket_panels = []
    for panel in frontier:
        bp = Panel(panel.title, "gap bucket (0 local, 1 dilated, 2 off-residue, 3 beyond)", "answer accuracy")
        for model in dict.fromkeys(g["model"] for g in gaps if g["probe"] == panel.title):
            pts = [(i, g["accuracy"]) for i, b in enumerate(BUCKETS) for g in gaps
                   if g["probe"] == panel.title and g["model"] == model and g["by"] == "bucket" and g["bin"] == b
                   and g["answers"] > 0]
            bp.series.append(Series(model, [p[0] for p in pts], [p[1] for p in pts]))
        bucket_panels.append(bp)
    paths.append(plot_panels(bucket_panels, os.path.join(out, "gaps.png"),
                             f"accuracy by gap bucket (LongNet's pattern); {title}", size=(width, 4.2)))
    return paths


# ---------------------------------------------------------------------------- merging outputs

_INTS = ("seq_len", "layers", "d_model", "params", "planned_steps", "steps", "batch", "step", "answers")
_FLOATS = ("lr", "flops_per_token", "train_flops", "accuracy", "loss", "chance", "wall_s", "s_per_step")


def _read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k in _INTS:
            if row.get(k) not in (None, ""):
                row[k] = int(row[k])
        for k in _FLOATS:
            if row.get(k) not in (None, ""):
                row[k] = float(row[k])
    return rows


def _read_folder(folder: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], List[Dict[str, Any]], str]:
    """One suite output folder: (runs, curve, gaps rows, block); rows get ``layers`` from plan.json
    when runs.csv predates the column."""
    need = [os.path.join(folder, n) for n in (PLAN, "runs.csv", "curve.csv", "gaps.csv")]
    missing = [p for p in need if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--merge: {folder} is not a finished recall suite output (missing {', '.join(missing)})")
    settings = read_json(need[0])["settings"]
    runs, curve, gaps = (_read_rows(p) for p in need[1:])
    for row in runs:
        row["layers"] = row.get("layers") or settings["layers"]
    return runs, curve, gaps, settings["block"]


def merge_recall(folders: Sequence[str], out: str) -> str:
    """Combine several recall suite outputs into ``out``: every run, each (probe, model)'s best
    over all of them, its curve and gap rows, the table and the plots; returns the table.

    Models of different depths are told apart by a `` 2L``/`` 3L`` suffix when the folders hold
    more than one depth. A (probe, model) in several folders (another sweep, another budget)
    keeps the best run, as within one suite.
    """
    if len(folders) < 1:
        raise ValueError("--merge needs at least one folder")
    all_runs, all_curve, all_gaps = [], [], []
    parts = [_read_folder(f) for f in folders]
    depths = {r["layers"] for runs, _, _, _ in parts for r in runs}
    for i, (runs, curve, gaps, _) in enumerate(parts):
        layers = {(r["probe"], r["model"]): r["layers"] for r in runs}
        for rows in (runs, curve, gaps):
            for r in rows:
                r["source"] = i
                if len(depths) > 1:
                    r["model"] = f"{r['model']} {layers[(r['probe'], r['model'])]}L"
        all_runs += runs
        all_curve += curve
        all_gaps += gaps
    best: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in all_runs:
        key = (r["probe"], r["model"])
        if key not in best or rank(r["accuracy"], r["train_flops"]) > rank(best[key]["accuracy"],
                                                                       best[key]["train_flops"]):
            best[key] = r
    # gaps.csv holds each folder's best run per (probe, model); keep the folder whose best won.
    gaps = [g for g in all_gaps if g["source"] == best[(g["probe"], g["model"])]["source"]]
    best_list = best_rows_from(list(best.values()), gaps)
    curve = [c for c in all_curve if c["source"] == best[(c["probe"], c["model"])]["source"]]
    os.makedirs(out, exist_ok=True)
    write_recall_results(out, all_runs, best_list, curve, gaps)
    text = format_recall_table(best_list)
    write_recall_table(out, text)
    blocks = sorted({b for _, _, _, b in parts})
    title = f"{'/'.join(map(str, sorted(depths)))}L, block {'/'.join(blocks)}; merged from {len(folders)} folders"
    write_recall_plots(out, best_list, curve, gaps, title)
    return text


def best_rows_from(best: Sequence[Dict[str, Any]], gaps: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """best.csv's rows from run rows: each with its bucket accuracies and answer counts."""
    rows = []
    for row in best:
        row = dict(row)
        for g in gaps:
            if g["probe"] == row["probe"] and g["model"] == row["model"] and g["by"] == "bucket":
                row[f"acc_{g['bin']}"], row[f"n_{g['bin']}"] = g["accuracy"], g["answers"]
        rows.append(row)
    return rows
