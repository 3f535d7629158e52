"""The run folder of ``longnet train`` (``--out``): which folders may hold one, and its log.

:func:`check_out_dir` decides, before anything is written, whether ``--out`` may be used:
a run is never placed inside a checkpoint folder or inside another run, and a fresh run
never goes into a folder holding anything it did not create. :class:`RunLog` writes
``log.csv`` (and TensorBoard events when installed); on resume it keeps the rows up to the
checkpoint and, if the file is damaged, keeps the readable rows and saves the original
beside it. :func:`plot_loss_curve` draws ``loss_curve.png``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..fileio import atomic_savefig, atomic_write_text
from .checkpoint import checkpoint_steps, holds_checkpoints
from .runlock import LOCK_NAME, FolderLock

__all__ = ["CSV_FIELDS", "RUN_ENTRIES", "check_out_dir", "RunLog", "NoLog", "plot_loss_curve"]

CSV_FIELDS = ["step", "split", "loss", "bpb", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "accuracy"]
# Everything a run writes at its top level (besides temporary ".tmp-*" files and damaged-log copies).
RUN_ENTRIES = ("log.csv", "loss_curve.png", "latest", "checkpoints", "tensorboard")
_NUMERIC = CSV_FIELDS[2:]


def _is_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors"))


def _is_run(path: str) -> bool:
    return holds_checkpoints(path)


def _enclosing(path: str, is_what: Callable[[str], bool]) -> Optional[str]:
    """The nearest folder above ``path`` (``path`` excluded) for which ``is_what`` holds."""
    parent = os.path.dirname(path)
    while parent != path:
        if os.path.isdir(parent) and is_what(parent):
            return parent
        path, parent = parent, os.path.dirname(parent)
    return None


def _ours(out: str, name: str, marked: bool) -> bool:
    if name in RUN_ENTRIES[1:] or name == LOCK_NAME or name.startswith((".tmp-", "log.csv.damaged")):
        return True
    if name != "log.csv" or not marked:
        # A log.csv counts as a run's only beside the lock file every run writes first: a log
        # with the right header alone says nothing about who wrote it.
        return False
    with open(os.path.join(out, name), encoding="utf-8", errors="replace") as f:
        return f.readline().strip() == ",".join(CSV_FIELDS)


def check_out_dir(out: str, resume: bool, lock: Optional[FolderLock] = None) -> Optional[str]:
    """Raise ValueError when ``--out`` must not be used; else None, or a note to print.

    Refused: a checkpoint folder or anything inside one or inside another run; a file; for a
    new run, a folder holding a checkpoint (use --resume) or files no run writes. ``lock``:
    the folder's lock, when this process holds it (the check is then final).
    """
    path = os.path.abspath(out)
    ckpt = path if _is_checkpoint(path) else _enclosing(path, _is_checkpoint)
    if ckpt is not None:
        run = os.path.dirname(os.path.dirname(ckpt))
        raise ValueError(f"--out {out!r} is {'a' if ckpt == path else 'inside the'} checkpoint folder {ckpt}; "
                         f"pass the run folder that holds it (--out {run})")
    run = _enclosing(path, _is_run)
    if run is not None:
        raise ValueError(f"--out {out!r} is inside the run folder {run}; pass --out {run} itself or a folder "
                         "outside it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out!r} is a file; pass a folder")
    if resume or not os.path.isdir(path) or not os.listdir(path):
        return None
    steps = checkpoint_steps(path)
    if steps:
        raise ValueError(f"--out {out!r} already holds a run (checkpoint at step {steps[-1]}); pass --resume to "
                         "continue it or choose a new --out")
    marked = lock.inherited if lock is not None else os.path.exists(os.path.join(path, LOCK_NAME))
    foreign = sorted(n for n in os.listdir(path) if not _ours(path, n, marked))
    if not foreign and os.listdir(path) == [LOCK_NAME]:
        return None
    if foreign:
        raise ValueError(f"--out {out!r} exists and is not a longnet run folder (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder")
    return f"--out {out} holds a run that never saved a checkpoint; starting it over"


# ----------------------------------------------------------------------------- log.csv


def _row_problem(row: Dict[str, Any]) -> Optional[str]:
    if None in row or any(v is None for v in row.values()):
        return "wrong number of fields"
    try:
        if int(row["step"]) < 0:
            return f"negative step {row['step']!r}"
        for k in _NUMERIC:
            if row[k] != "":
                float(row[k])
    except ValueError as e:
        return str(e)
    return None if row["split"] in ("train", "valid") else f"unknown split {row['split']!r}"


def _read_rows(path: str, upto: int) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Rows of ``path`` with step <= ``upto``, and a description of the first damage (or None)."""
    rows, problem = [], None
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            # Undecodable bytes and NULs (what a crash can leave) only spoil their own rows.
            reader = csv.DictReader(line.replace("\0", "\ufffd") for line in f)
            if reader.fieldnames != CSV_FIELDS:
                return [], f"its header is {reader.fieldnames!r}"
            for row in reader:
                bad = _row_problem(row)
                if bad is not None:
                    problem = problem or f"line {reader.line_num}: {bad}"
                elif int(row["step"]) <= upto:
                    rows.append(row)
    except (OSError, csv.Error) as e:
        problem = problem or " ".join(str(e).split())
    return rows, problem


def _keep_copy(path: str) -> str:
    backup, n = path + ".damaged", 1
    while os.path.exists(backup):
        backup, n = f"{path}.damaged-{n}", n + 1
    shutil.copy2(path, backup)
    return backup


class RunLog:
    """log.csv (one row per step and per evaluation) and TensorBoard when installed.

    ``resume_step``: keep the rows of an earlier run up to that step (rows past it, from an
    interrupted run, are dropped); ``warn`` receives the note about a damaged file.
    """

    def __init__(self, out_dir: str, resume_step: Optional[int], warn: Callable[[str], None]):
        self.path = os.path.join(out_dir, "log.csv")
        self.rows: List[Dict[str, Any]] = []
        if resume_step is not None and os.path.isfile(self.path):
            self.rows, problem = _read_rows(self.path, resume_step)
            if problem is not None:
                warn(f"{self.path} is damaged ({problem}); kept its {len(self.rows)} readable rows up to step "
                     f"{resume_step} and saved the original as {_keep_copy(self.path)}")
        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_FIELDS)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except Exception:  # tensorboard not installed (ImportError) or broken: CSV only
            self.tb = None

    def elapsed(self) -> float:
        """Training seconds logged so far (0 for a new log)."""
        return float(self.rows[-1]["elapsed_s"] or 0.0) if self.rows else 0.0

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
        if not self.file.closed:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class NoLog:
    """Stand-in for :class:`RunLog` on ranks other than 0 (they write nothing)."""

    rows: List[Dict[str, Any]] = []
    path = ""

    def elapsed(self) -> float:
        return 0.0

    def write(self, **row) -> None:
        pass

    def close(self) -> None:
        pass


def plot_loss_curve(rows: List[Dict[str, Any]], path: str, title: str = "") -> Optional[str]:
    """Train and validation bits-per-byte against step, written atomically as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = {split: [(int(r["step"]), float(r["bpb"])) for r in rows if r["split"] == split and r.get("bpb")]
              for split in ("train", "valid")}
    tr, va = curves["train"], curves["valid"]
    if not tr and not va:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        steps, vals = zip(*tr)
        ax.plot(steps, vals, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        ema, smooth = None, []
        for v in vals:
            ema = v if ema is None or not math.isfinite(ema) else 0.9 * ema + 0.1 * v
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
