"""What every benchmark shares: timing, peak memory and extrapolation.

The benchmarks (:mod:`.op`, :mod:`.lm`, :mod:`.sp`, :mod:`.triton_kernel`) time with
:func:`timed` / :func:`best_of` / :func:`interleaved_times` (or :func:`gpu_median_ms`
for Triton's GPU timer), measure memory with :func:`peak_memory_growth` and extrapolate
dense attention with :func:`quadratic_fit`, so how we time is decided in one place.
Tables, CSVs and plots come from :mod:`longnet.report`, devices from :mod:`longnet.device`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

import torch

from ..checks import check_int

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# --pattern of `longnet bench` and `longnet bench --lm`: the benchmarked pattern from the one the flags give
# (lw16: plus the LM presets' local window, DilatedPattern.with_local_window(16)).
PATTERN_VARIANTS = {"paper": lambda p: p, "lw16": lambda p: p.with_local_window(16)}

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
    check_int("repeats", repeats)
    check_int("warmup", warmup, minimum=0)
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
    import torch.nn.functional as F

    from ..functional import dilated_attention

    def attn(a, b, c):
        if impl == DENSE:
            return F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)
        if impl == DENSE_OP:
            return dilated_attention(a, b, c, [a.shape[1]], [1], is_causal=causal)
        return dilated_attention(a, b, c, pattern.segment_lengths, pattern.dilation_rates,
                                 is_causal=causal, backend=impl, segment_phases=pattern.segment_phases)

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


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current resident size (Linux:
    write 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory above a baseline (CPU has no allocator statistics).

    On Linux it is exact: the kernel's high-water mark (VmHWM), reset to the resident size on
    entry (:func:`reset_peak_rss`), so no peak between two samples is missed. Elsewhere it is
    sampled by a thread every ``interval`` seconds (``exact`` is then False).
    """

    def __init__(self, interval: float = 0.002):
        self.interval, self.base, self.peak, self._stop = interval, 0, 0, threading.Event()
        self.exact = False
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        release_free_heap()
        self.exact = reset_peak_rss()
        self.base = self.peak = self.rss()
        if not self.exact:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.exact:
            self.peak = max(self.peak, _status_bytes("VmHWM"), self.rss())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: the CUDA allocator's on GPU, the resident size on CPU (after a collection)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    return PeakRSS.rss()


def peak_memory_growth(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes by which one call of ``fn`` raises peak memory: the CUDA allocator's peak on GPU,
    peak resident memory on CPU (:class:`PeakRSS`; the allocator's reuse of freed pages blurs
    it for small tensors)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = memory_in_use(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakRSS() as m:
        fn()
    return m.growth


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
