"""Outputs of ``longnet experiment``: CSV files, PNG plots and the printed table (all written atomically).

* ``results.csv``: one row per model (see :data:`RESULT_FIELDS` and the ``bpb@N`` columns);
* ``position_loss.csv``: model, position, loss (test split, at the model's training length);
* ``passkey.csv``: model, distance, accuracy, digit_accuracy, loss;
* ``bpb.png`` (bits-per-byte against evaluation length; training loss against FLOPs),
  ``position_loss.png`` (loss against position; loss by residue), ``passkey.png``;
* ``table.txt``: the printed table.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ...fileio import atomic_write_text
from ...report import Column, Panel, Series, format_table, plot_panels, write_csv
from ..evaluate import BoundarySpike, position_loss_panels

__all__ = ["RESULT_FIELDS", "result_fields", "write_results", "write_plots", "format_results", "write_table"]

LN2 = math.log(2.0)
RESULT_FIELDS = ("model", "kind", "train_len", "pattern", "params", "non_embedding_params", "flops_per_token",
                 "lm_steps", "lm_batch", "lm_tokens", "lm_train_flops", "lm_wall_s", "lm_tokens_per_s",
                 "spike", "spike_period", "worst_residue", "passkey_steps", "passkey_tokens", "passkey_train_flops",
                 "passkey_wall_s", "passkey_accuracy", "passkey_digit_accuracy", "passkey_accuracy_longest")


def result_fields(lengths: Sequence[int]) -> List[str]:
    """The columns of results.csv: :data:`RESULT_FIELDS` with one ``bpb@N`` per evaluation length."""
    i = RESULT_FIELDS.index("spike")
    return list(RESULT_FIELDS[:i]) + [f"bpb@{n}" for n in lengths] + list(RESULT_FIELDS[i:])


def write_results(out: str, rows: List[Dict[str, Any]], lengths: Sequence[int],
                  curves: Dict[str, Tuple[np.ndarray, BoundarySpike]], passkey: List[Dict[str, Any]]) -> None:
    """results.csv, position_loss.csv and passkey.csv (what exists so far)."""
    write_csv(rows, os.path.join(out, "results.csv"), result_fields(lengths))
    pos = [{"model": name, "position": p, "loss": float(v)} for name, (losses, _) in curves.items()
           for p, v in enumerate(losses)]
    write_csv(pos, os.path.join(out, "position_loss.csv"), ["model", "position", "loss"])
    write_csv(passkey, os.path.join(out, "passkey.csv"), ["model", "distance", "accuracy", "digit_accuracy", "loss"])


def _col(header: str, key: str, fmt: str, width: int = 9, scale: float = 1.0) -> Column:
    """A right-aligned number column; '-' where the row has no finite value."""
    def value(row: Dict[str, Any]) -> str:
        v = row.get(key)
        finite = isinstance(v, (int, float)) and math.isfinite(v)
        return format(v / scale if scale != 1 else v, fmt) if finite else "-"
    return Column(header, value, width=width)


def format_results(rows: List[Dict[str, Any]], lengths: Sequence[int],
                   passkey: List[Dict[str, Any]]) -> str:
    """The printed table: one line per model, then passkey accuracy by distance."""
    cols = [Column("model", "model", width=22, align="<"), _col("train len", "train_len", "d"),
            _col("steps", "lm_steps", "d", 6), _col("Mtokens", "lm_tokens", ".2f", 8, 1e6),
            _col("TFLOP", "lm_train_flops", ".2f", 7, 1e12), _col("wall s", "lm_wall_s", ".0f", 7)]
    cols += [_col(f"bpb@{n}", f"bpb@{n}", ".3f", max(8, len(f"bpb@{n}") + 1)) for n in lengths]
    cols += [_col("spike", "spike", ".3f", 6), _col("passkey", "passkey_accuracy", ".3f", 8),
             _col("pk digit", "passkey_digit_accuracy", ".3f", 8)]
    text = format_table(rows, cols)
    if passkey:
        text += "\n\n" + _format_passkey(passkey)
    return text


def _format_passkey(passkey: List[Dict[str, Any]]) -> str:
    """Passkey accuracy (digit accuracy) by distance, one line per model; '-' beyond its length."""
    distances = sorted({int(r["distance"]) for r in passkey})
    models = list(dict.fromkeys(r["model"] for r in passkey))
    cell = {(r["model"], int(r["distance"])): f"{r['accuracy']:.2f} ({r['digit_accuracy']:.2f})" for r in passkey}
    head = f"{'passkey accuracy (digits) at distance':<38}" + "".join(f"{d:>13}" for d in distances)
    lines = [head, "-" * len(head)]
    lines += [f"{m:<38}" + "".join(f"{cell.get((m, d), '-'):>13}" for d in distances) for m in models]
    return "\n".join(lines)


def _training_curves(out: str, runs: List[Dict[str, Any]]) -> Panel:
    """Training loss (moving mean over 10 steps) against training FLOPs, from each LM run's log."""
    panel = Panel("training loss at equal compute", "training FLOPs", "train loss (bits/byte)",
                  xscale=("log", {}))
    for r in runs:
        with open(os.path.join(r["dir"], "log.csv"), newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if row.get("split") == "train"]
        if not rows:
            continue
        loss = np.array([float(row["loss"]) for row in rows]) / LN2
        k = min(10, loss.size)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        steps = np.array([int(row["step"]) for row in rows])[k - 1:]
        panel.series.append(Series(r["model"], steps * r["flops_per_step"], smooth, "-"))
    return panel


def write_plots(out: str, rows: List[Dict[str, Any]], lengths: Sequence[int], lm_runs: List[Dict[str, Any]],
                curves: Dict[str, Tuple[np.ndarray, BoundarySpike]], passkey: List[Dict[str, Any]],
                title: str) -> List[str]:
    """bpb.png, position_loss.png and (with passkey results) passkey.png; returns their paths."""
    bpb = Panel("test bits-per-byte against evaluation length", "evaluation length (bytes)", "bits per byte",
                xscale=("log", {"base": 2}), xticks=list(lengths))
    for r in rows:
        points = [(n, r.get(f"bpb@{n}", float("nan"))) for n in lengths]
        points = [(n, v) for n, v in points if isinstance(v, float) and not math.isnan(v)]
        bpb.series.append(Series(r["model"], [p[0] for p in points], [p[1] for p in points]))
    paths = [plot_panels([bpb, _training_curves(out, lm_runs)], os.path.join(out, "bpb.png"), title)]
    if curves:
        smooth = max(1, min(s.period for _, s in curves.values()) // 2)
        paths.append(plot_panels(position_loss_panels(curves, smooth=smooth), os.path.join(out, "position_loss.png"),
                                 f"{title}; test split, each model at its training length"))
    if passkey:
        paths.append(plot_panels(_passkey_panels(passkey), os.path.join(out, "passkey.png"), title))
    return paths


def _passkey_panels(passkey: List[Dict[str, Any]]) -> List[Panel]:
    acc = Panel("passkey retrieval (whole key)", "distance (bytes)", "accuracy", xscale=("log", {"base": 2}))
    digits = Panel("passkey digits (chance 0.1)", "distance (bytes)", "digit accuracy", xscale=("log", {"base": 2}))
    for m in dict.fromkeys(r["model"] for r in passkey):
        mine = [r for r in passkey if r["model"] == m]
        acc.series.append(Series(m, [r["distance"] for r in mine], [r["accuracy"] for r in mine]))
        digits.series.append(Series(m, [r["distance"] for r in mine], [r["digit_accuracy"] for r in mine]))
    return [acc, digits]


def write_table(out: str, text: str) -> str:
    path = os.path.join(out, "table.txt")
    atomic_write_text(path, text + "\n")
    return path
