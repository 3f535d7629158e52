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
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

from ...report import Column, Panel, Series, format_table, plot_panels, write_csv
from ...fileio import atomic_write_text
from .recall_plan import BUCKETS
from .recall_suite import RunResult

__all__ = ["RUN_FIELDS", "best_rows", "write_recall_results", "format_recall_table", "write_recall_plots",
           "write_reach", "write_recall_table"]

RUN_FIELDS = ("probe", "task", "seq_len", "model", "kind", "pattern", "block", "d_model", "lr", "params",
              "planned_steps", "steps", "batch", "flops_per_token", "train_flops", "accuracy", "loss", "chance",
              "wall_s", "s_per_step")
BEST_FIELDS = RUN_FIELDS + tuple(f"acc_{b}" for b in BUCKETS) + tuple(f"n_{b}" for b in BUCKETS)


def best_rows(best: Dict[Any, RunResult], gaps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """best.csv's rows: each best run's row with its bucket accuracies and answer counts."""
    rows = []
    for (probe, model), r in best.items():
        row = r.row()
        for g in gaps:
            if g["probe"] == probe and g["model"] == model and g["by"] == "bucket":
                row[f"acc_{g['bin']}"], row[f"n_{g['bin']}"] = g["accuracy"], g["answers"]
        rows.append(row)
    return rows


def write_recall_results(out: str, results: List[RunResult], best: List[Dict[str, Any]],
                         gaps: List[Dict[str, Any]]) -> None:
    write_csv([r.row() for r in results], os.path.join(out, "runs.csv"), RUN_FIELDS)
    write_csv(best, os.path.join(out, "best.csv"), BEST_FIELDS)
    curve = [{"probe": r.run.probe.name, "model": r.run.model.name, "d_model": r.run.d_model, "lr": r.run.lr,
              "step": step, "train_flops": flops, "accuracy": acc} for r in results for step, flops, acc in r.curve]
    write_csv(curve, os.path.join(out, "curve.csv"),
              ["probe", "model", "d_model", "lr", "step", "train_flops", "accuracy"])
    write_csv(gaps, os.path.join(out, "gaps.csv"), ["probe", "model", "by", "bin", "answers", "accuracy"])


def _bucket(b: str) -> Column:
    def value(row: Dict[str, Any]) -> str:
        v = row.get(f"acc_{b}")
        return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else "-"
    return Column(b, value, width=11)


def format_recall_table(best: List[Dict[str, Any]]) -> str:
    """One line per (probe, model): its best width and lr, steps, FLOPs, accuracy, and by bucket."""
    cols = [Column("probe", "probe", width=20, align="<"), Column("model", "model", width=16, align="<"),
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


def _probe_panels(best: Dict[Any, RunResult], results: Sequence[RunResult]) -> List[Panel]:
    probes = list(dict.fromkeys(r.run.probe.name for r in results))
    panels = []
    for p in probes:
        panel = Panel(p, "training FLOPs", "answer accuracy", xscale=("log", {}))
        for (probe, model), r in best.items():
            if probe == p and r.curve:
                panel.series.append(Series(f"{model} (d{r.run.d_model}, lr {r.run.lr:g})",
                                           [c[1] for c in r.curve], [c[2] for c in r.curve]))
        panels.append(panel)
    return panels


def write_recall_plots(out: str, best: Dict[Any, RunResult], results: Sequence[RunResult],
                       gaps: List[Dict[str, Any]], title: str) -> List[str]:
    """frontier.png and gaps.png; returns their paths."""
    frontier = _probe_panels(best, results)
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
