"""longnet's own CPU flash-attention kernel (``csrc/flash_cpu.cpp``), compiled on first use.

It reads float32, float64, bfloat16 and float16 (the last two converted to float32 block by
block and computed in it). Why it exists, twice over:

* Its float32 products go to oneDNN's AVX-512 brgemm micro-kernel (through PyTorch's
  ``at::native::cpublas::brgemm``), where PyTorch's CPU flash kernel calls MKL's sgemm, which
  takes its AVX2 path on AMD CPUs, at about half the rate.
* PyTorch's kernel skips masked scores only in whole tiles of 512 keys, so a causal problem of
  S rows computes about S x 256 masked scores: 25-30% extra work at the 2,048-2,731 kept rows of
  the paper's pattern. This kernel's forward takes the keys a whole query block sees in
  full-size products and its diagonal in 32-row sub-blocks, each stopping at its own last key;
  its backward stops every query block at its own last key.

It also has a band mode (:func:`band_fwd`, :func:`band_bwd`, used by :mod:`.band`): the local
window's short r = 1 patterns in one pass over the sequence. Its timings against PyTorch's
kernel, and the local window's cost, are in docs/cpu-kernel.md.

:func:`wanted` takes every float32, bfloat16 and float16 call where oneDNN's micro-kernel is
there to be used (x86 with AVX2 or better and oneDNN enabled; elsewhere brgemm falls back to a BLAS gemm
and the kernel keeps to what the tiles alone win), and float64 calls (MKL's dgemm on both
sides) of at most :data:`MAX_ROWS` rows: causal ones because the tiles win, the others because the
kernel's backward clamps p to 1 where aten's does not (see :func:`wanted`).

Which kernel runs is set by the environment variable ``LONGNET_CPU_KERNEL``:

* ``auto`` (default): this kernel where :func:`wanted` says so, if it builds; if the
  build fails (no C++ compiler), one warning and PyTorch's kernel everywhere;
* ``aten``: PyTorch's kernel everywhere;
* ``longnet``: like ``auto``, but a failed build is an error.

The build (``torch.utils.cpp_extension.load``: g++ and ninja, about a minute on a busy 2-core
machine, once per machine and source version) goes to PyTorch's extension cache, one folder per
source version, verified before every load and rebuilt when damaged
(:mod:`longnet.backends.kernel_cache`); ``-march=native`` makes it for the machine it runs on.
Same contract as aten's kernel: (Z, H, L, D) inputs with any strides whose last
dimension is contiguous, lse in float32 (float64 for float64 inputs), out / grads in the input
dtype laid out (Z, L, H, D) in memory.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .kernel_cache import explain_failure, load_extension
from .numerics import acc_dtype, last_dim_contiguous

ENV = "LONGNET_CPU_KERNEL"
MODES = ("auto", "aten", "longnet")
MAX_ROWS = 4096  # without oneDNN's products, longer causal problems waste little in aten's tiles
# Fewer query rows go to aten: a decode step (one row against a cache that grows every step) would
# have oneDNN generate micro-kernels for a new shape each step, slower than aten's call and
# leaving them cached for good (docs/cpu-kernel.md).
MIN_ROWS = 16
_NAME = "longnet_flash_cpu"
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "flash_cpu.cpp")
# Forward: query rows per block, key columns per product, rows per diagonal sub-block.
# Backward: query rows, key columns. Chosen from {64, 128, 256} x {128, 256, 512} (x {32, 64})
# at 1,024, 2,048 and 8,192 causal rows, where they hardly differ (docs/cpu-kernel.md).
FWD_BLOCKS = (128, 512, 32)
BWD_BLOCKS = (128, 256)

_lock = threading.Lock()
_module = None
_failed: Optional[str] = None


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES}, got {value!r}")
    return value


def _build():
    # -ffast-math lets the exp loops vectorise; the kernel keeps every value finite for it.
    # The cache verifies the library before loading it and rebuilds a damaged one (kernel_cache).
    return load_extension(_NAME, _SOURCE, ["-O3", "-march=native", "-ffast-math", "-fopenmp"], ["-fopenmp"],
                          what="the CPU attention kernel", skip_hint=f"{ENV}=aten skips it")


def module():
    """The compiled kernel, or None (mode ``aten``, or a failed build in mode ``auto``)."""
    global _module, _failed
    m = mode()
    if m == "aten":
        return None
    if _module is None and _failed is None:
        with _lock:
            if _module is None and _failed is None:
                try:
                    _module = _build()
                except Exception as e:  # a missing compiler shows up as several exception types
                    _failed = explain_failure(e)
                    if m == "auto":
                        warnings.warn(f"longnet: the CPU attention kernel did not build ({_failed}); using "
                                      f"PyTorch's kernel. Set {ENV}=aten to silence this.", RuntimeWarning,
                                      stacklevel=3)
    if _failed is not None and m == "longnet":
        raise RuntimeError(f"{ENV}=longnet but the CPU attention kernel did not build: {_failed}")
    return _module


def _plain(*tensors: Tensor) -> bool:
    # FakeTensors (torch.compile tracing, FakeTensorMode) and other subclasses have no data to read.
    return all(type(t) is torch.Tensor for t in tensors)


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _onednn_built_for_this_cpu() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def onednn_products() -> bool:
    """Whether float32 products run on oneDNN's brgemm micro-kernel (the conditions under which
    PyTorch's ``at::native::cpublas::brgemm`` uses it): x86, AVX2 or better, oneDNN enabled
    (the one part that can change while the process runs)."""
    return torch.backends.mkldnn.enabled and _onednn_built_for_this_cpu()


def wanted(q: Tensor, k: Tensor, causal: bool) -> bool:
    """Whether this call goes to longnet's kernel: at least :data:`MIN_ROWS` query rows on the CPU,
    plain tensors, the kernel available, and: float32, bfloat16 or float16 where
    :func:`onednn_products`; float32 causal calls and float64 calls of at most :data:`MAX_ROWS` rows."""
    if q.device.type != "cpu" or q.dtype not in _DTYPES or not _plain(q, k):
        return False
    if q.shape[-2] < MIN_ROWS or k.shape[-2] == 0:
        return False
    fast_products = q.dtype != torch.float64 and onednn_products()
    # float64 takes the kernel causal or not: its backward clamps p = e^(s - lse) to 1, which aten's does
    # not, and a mixture's lse merges scores rounded by other calls (at |s| ~ 1e17, |s| eps is ~20).
    tiles_only = q.shape[-2] <= MAX_ROWS and (q.dtype == torch.float64 or (causal and q.dtype == torch.float32))
    return (fast_products or tiles_only) and module() is not None


def fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """(out (Z, H, L, D), lse (Z, H, L)) like ``aten._scaled_dot_product_flash_attention_for_cpu``."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    return tuple(module().fwd(q, k, v, causal, float(scale), *FWD_BLOCKS))


def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
        scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like ``aten._scaled_dot_product_flash_attention_for_cpu_backward``."""
    do, q, k, v, out = (last_dim_contiguous(x) for x in (do, q, k, v, out))
    return tuple(module().bwd(do, q, k, v, out, lse.to(acc_dtype(q.dtype)), causal, float(scale), *BWD_BLOCKS))


# Band mode (:mod:`.band`): query rows per block. A block takes its rows' keys plus up to a segment
# on either side, so smaller blocks waste fewer scores and larger ones make larger products.
BAND_BLOCK = 16


def band_wanted(q: Tensor, k: Tensor) -> bool:
    """Whether the band of :mod:`.band` runs here for q, k (Z, H, L, D) (or (B, N, H, D)): CPU, a
    kernel dtype, plain tensors, and the kernel available. Any length: a band's products are small."""
    return q.device.type == "cpu" and q.dtype in _DTYPES and _plain(q, k) and module() is not None


def band_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, windows, phases,
             out: Optional[Tensor] = None, lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out (Z, H, L, D), lse (Z, H, L)) of the band (:mod:`.band`) in the accumulation dtype, merged
    into the given ``out`` and ``lse`` in place (the mixture's other patterns) or fresh;
    ``windows``, ``phases``: its patterns, clipped to L."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    return tuple(module().band_fwd(q, k, v, causal, float(scale), list(windows), list(phases), BAND_BLOCK, out, lse))


def band_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
             windows, phases, grads=None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the band at the given (merged) out and lse, in the accumulation dtype, added
    into the given ``grads`` (Z, H, L, D) in place or fresh."""
    do, q, k, v, out = (last_dim_contiguous(x.to(q.dtype)) for x in (do, q, k, v, out))
    return tuple(module().band_bwd(do, q, k, v, out, lse.to(acc_dtype(q.dtype)), causal, float(scale),
                                   list(windows), list(phases), BAND_BLOCK, grads))
