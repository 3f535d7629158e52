"""Reports: CSV rows written atomically, fixed-width tables and PNG plots.

Used by ``longnet bench``, ``longnet eval`` and ``longnet experiment``; it sits below all of
them so that none of them imports another for a table or a plot.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from .fileio import atomic_path, atomic_savefig

__all__ = ["Record", "write_csv", "read_csv", "Column", "format_table", "Series", "Panel",
           "extrapolated_series", "plot_panels", "publish"]


# --------------------------------------------------------------------------- CSV

Record = Union[Mapping[str, Any], Any]  # a dict or a dataclass instance


def _as_dict(row: Record) -> Mapping[str, Any]:
    return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row


def write_csv(rows: Sequence[Record], path: str, fieldnames: Optional[Sequence[str]] = None) -> None:
    """Write rows (dicts or dataclasses) to ``path`` atomically; missing fields are left blank.

    ``fieldnames`` defaults to the dataclass's fields, or the first dict's keys.
    """
    if fieldnames is None:
        if not rows:
            raise ValueError("write_csv needs fieldnames when there are no rows")
        fieldnames = list(_as_dict(rows[0]))
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames))
        w.writeheader()
        for r in rows:
            d = _as_dict(r)
            w.writerow({k: d.get(k, "") for k in fieldnames})
        f.flush()
        os.fsync(f.fileno())


def read_csv(path: str, row_type: type) -> list:
    """Rows of a CSV written by :func:`write_csv` from ``row_type`` (a dataclass), typed again."""
    hints = typing.get_type_hints(row_type)
    names = [fl.name for fl in dataclasses.fields(row_type)]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [n for n in names if n not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a CSV of {row_type.__name__} rows (no column {', '.join(missing)})")
        return [row_type(**{n: hints[n](rec[n]) for n in names}) for rec in reader]


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """One table column: ``value`` is a field name or a function of the row; NaN prints blank."""

    header: str
    value: Union[str, Callable[[Any], Any]]
    fmt: str = ""
    width: int = 10
    align: str = ">"

    def cell(self, row: Record) -> str:
        if callable(self.value):
            v = self.value(row)
        else:
            v = row[self.value] if isinstance(row, Mapping) else getattr(row, self.value)
        if isinstance(v, float) and math.isnan(v):
            v = ""
        text = format(v, self.fmt) if self.fmt and v != "" else str(v)
        return format(text, f"{self.align}{self.width}")


def format_table(rows: Sequence[Record], columns: Sequence[Column], header: bool = True) -> str:
    """Rows as fixed-width text, one column per :class:`Column`, with a header and a rule."""
    lines = []
    if header:
        head = " ".join(format(c.header, f"{c.align}{c.width}") for c in columns)
        lines += [head, "-" * len(head)]
    lines += [" ".join(c.cell(r) for c in columns) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "o-"
    color: Optional[str] = None  # None: matplotlib's next colour


@dataclass
class Panel:
    """One axes of a figure: its lines, labels and scales."""

    title: str
    xlabel: str
    ylabel: str
    series: List[Series] = field(default_factory=list)
    xscale: Tuple[str, dict] = ("linear", {})
    yscale: Tuple[str, dict] = ("linear", {})
    xticks: Optional[Sequence[float]] = None


def extrapolated_series(label: str, measured: Sequence[Tuple[float, float]],
                        extrapolated: Sequence[Tuple[float, float]], style: str = "s-",
                        color: Optional[str] = None) -> List[Series]:
    """A measured line and, dashed in the same colour and labelled "extrapolated", its continuation
    from the last measured point through the extrapolated (x, y) points (none if there are none)."""
    series = [Series(label, [p[0] for p in measured], [p[1] for p in measured], style, color)] if measured else []
    if extrapolated:
        pts = list(measured[-1:]) + list(extrapolated)
        series.append(Series(f"{label} (extrapolated)", [p[0] for p in pts], [p[1] for p in pts],
                             style.rstrip("-") + "--", color))
    return series


def plot_panels(panels: Sequence[Panel], path: str, title: str, size=(11, 4.2)) -> str:
    """Draw the panels side by side and write a PNG atomically; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for s in panel.series:
            ax.plot(s.x, s.y, s.style, label=s.label, color=s.color)
        ax.set_xscale(panel.xscale[0], **panel.xscale[1])
        ax.set_yscale(panel.yscale[0], **panel.yscale[1])
        if panel.xticks is not None:
            ax.set_xticks(list(panel.xticks), [f"{t:g}" for t in panel.xticks])
            ax.minorticks_off()
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=110)


def publish(rows: Sequence[Record], columns: Sequence[Column], title: str, csv_path: Optional[str] = None,
            plot_path: Optional[str] = None, plot: Optional[Callable[[Sequence[Record], str, str], Any]] = None
            ) -> None:
    """What a benchmark ends with: the title and the table on stdout, then the CSV and the plot if asked."""
    print(title)
    print(format_table(rows, columns))
    if csv_path:
        write_csv(rows, csv_path)
    if plot_path and plot is not None:
        plot(rows, plot_path, title)
