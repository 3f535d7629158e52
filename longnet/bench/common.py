"""What every benchmark shares: timing, peak memory, CSV files, tables and plots.

The benchmarks (:mod:`.op`, :mod:`.lm`, :mod:`.sp`, :mod:`.triton_kernel`) time with
:func:`timed` / :func:`best_of` / :func:`interleaved_times` (or :func:`gpu_median_ms`
for Triton's GPU timer), measure memory with :func:`peak_memory_growth`, extrapolate
dense attention with :func:`quadratic_fit`, write CSVs with :func:`write_csv` (atomic),
print with :func:`format_table` and draw with :func:`plot_panels`, so how we time and
record is decided in one place.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import gc
import math
import os
import platform
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..fileio import atomic_path, atomic_savefig

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}

# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: float = math.nan

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[Timing]:
    """Time the body: synchronised before and after, so only the body's own work counts."""
    t = Timing()
    sync(device)
    start = time.perf_counter()
    yield t
    sync(device)
    t.seconds = time.perf_counter() - start


def interleaved_times(fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int,
                      warmup: int) -> List[List[float]]:
    """Seconds of ``repeats`` calls of each of ``fns``, after ``warmup`` untimed calls of each.

    The timed calls take turns (fns[0], fns[1], ..., fns[0], ...), so a burst of load from
    other processes slows all of them alike and their ratio stays honest on a noisy machine.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            with timed(device) as t:
                fn()
            ts.append(t.seconds)
    return times


def repeat_times(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    return interleaved_times([fn], device, repeats, warmup)[0]


def best_of(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Best seconds of ``repeats`` calls: interference from other processes only ever adds time."""
    return min(repeat_times(fn, device, repeats, warmup))


DENSE = "sdpa"  # attention_call's name for dense F.scaled_dot_product_attention
# attention_call's name for dense attention through dilated_attention itself (one pattern, w = N,
# r = 1): the same kernels as the dilated op, so its ratio to the op is the pattern's alone.
DENSE_OP = "dense-op"


def attention_call(impl: Optional[str], mode: str, q, k, v, do, pattern, causal: bool
                   ) -> Callable[[], torch.Tensor]:
    """A no-argument call to time: one forward (``mode="fwd"``, no autograd) or forward and
    backward (``"fwdbwd"``) of dense SDPA (``impl=DENSE``), of dense attention through
    ``dilated_attention`` (``impl=DENSE_OP``: w = N, r = 1) or of ``dilated_attention`` with
    backend ``impl`` (None: the automatic choice). q, k, v, do: (B, N, H, D); dense SDPA gets
    (B, H, N, D) transposed views, never copies. The call returns the output, (B, N, H, D)."""
    from ..functional import dilated_attention
    import torch.nn.functional as F

    def attn(a, b, c):
        if impl == DENSE:
            return F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)
        if impl == DENSE_OP:
            return dilated_attention(a, b, c, [a.shape[1]], [1], is_causal=causal)
        return dilated_attention(a, b, c, pattern.segment_lengths, pattern.dilation_rates,
                                 is_causal=causal, backend=impl)

    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return attn(q, k, v)
        return forward
    if mode != "fwdbwd":
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def forward_backward():
        for x in leaves:
            x.grad = None  # no accumulation into last call's gradients
        out = attn(*leaves)
        out.backward(do)
        return out
    return forward_backward


def gpu_median_ms(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> float:
    """Median ms of ``fn`` by Triton's GPU timer (CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so that the next call's
    allocations raise the resident set again instead of silently reusing pages an earlier
    call freed; elsewhere (no glibc) a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident memory above a baseline, sampled in a thread (CPU has no allocator stats)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.base, self.peak, self._stop = interval, 0, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        release_free_heap()
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def peak_memory_growth(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes by which one call of ``fn`` raises peak memory: the CUDA allocator's peak on GPU,
    sampled resident memory on CPU (which the allocator's reuse of freed pages blurs for
    small tensors)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakRSS() as m:
        fn()
    return m.growth


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device (physical RAM for CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- extrapolation


def quadratic_fit(ns: Sequence[float], ts: Sequence[float]) -> Tuple[float, float]:
    """(a, b), both >= 0, of the least-squares fit t(N) = a*N + b*N^2 to measured (N, t) points.

    The model of dense attention's cost: a part linear in N (projections, memory traffic) and the
    quadratic score matrix; no constant term. Needs two or more distinct N. The normal equations
    are solved in units of the largest N (N^4 spans 24 decades otherwise); if the free fit makes
    a coefficient negative, it is set to 0 and the other one is fitted alone.
    """
    if len(ns) != len(ts) or len(set(ns)) < 2:
        raise ValueError(f"quadratic_fit needs (N, t) points at two or more distinct N, got N = {list(ns)}")
    scale = float(max(ns))
    x = [n / scale for n in ns]
    sxx, sx3, sx4 = (sum(xi**p for xi in x) for p in (2, 3, 4))
    sxt = sum(xi * t for xi, t in zip(x, ts))
    sx2t = sum(xi * xi * t for xi, t in zip(x, ts))
    det = sxx * sx4 - sx3 * sx3  # > 0 for two distinct positive x (Cauchy-Schwarz)
    a, b = (sxt * sx4 - sx2t * sx3) / det, (sxx * sx2t - sx3 * sxt) / det
    if a < 0:
        a, b = 0.0, sx2t / sx4
    elif b < 0:
        a, b = sxt / sxx, 0.0
    return a / scale, b / scale**2


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
