"""longnet's own CPU flash-attention kernel (``csrc/flash_cpu.cpp``), compiled on first use.

Why: PyTorch's CPU flash kernel skips masked scores only in whole tiles of 512 keys, so
a causal problem of S rows computes about S x 256 masked scores. The dilated op runs
causal problems of w / r kept rows (2,048-2,731 for the paper's pattern), where that is
25-30% more work than needed; ``longnet bench --breakdown`` measures it. This kernel's
forward takes the keys a whole 256-row query block sees in full-size products and its
diagonal in 32-row sub-blocks, each stopping at its own last key; its backward stops every
64-row block at its own last key. Measured on the 2-core AMD EPYC of the README, fp32,
against the aten kernel on the same inputs (one-off timings, about +-3%): causal 2,048-row
problems forward 0.85-0.91x and backward 0.82x its time, 512-row ones 0.59-0.62x and 0.60x;
at 16K rows (64-row blocks) forward 1.11x and backward 1.00x, and unmasked 2,048-row
problems 1.07x / 1.02x. So :func:`wanted` takes it for causal problems of at most
:data:`MAX_ROWS` rows only.

Which kernel runs is set by the environment variable ``LONGNET_CPU_KERNEL``:

* ``auto`` (default): this kernel where :func:`wanted` says so, if it builds; if the
  build fails (no C++ compiler), one warning and PyTorch's kernel everywhere;
* ``aten``: PyTorch's kernel everywhere;
* ``longnet``: like ``auto``, but a failed build is an error.

The build (``torch.utils.cpp_extension.load``: g++ and ninja, about 30 s, once per
machine and source version) goes to PyTorch's extension cache; ``-march=native`` makes
it for the machine it runs on. Same contract as aten's kernel: float32 and float64,
(Z, H, L, D) inputs with any strides whose last dimension is contiguous, lse in the
input dtype, out / grads laid out (Z, L, H, D) in memory.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

ENV = "LONGNET_CPU_KERNEL"
MODES = ("auto", "aten", "longnet")
MAX_ROWS = 4096  # longer causal problems waste little in aten's tiles; its larger blocks win there
_NAME = "longnet_flash_cpu"
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "flash_cpu.cpp")
# Forward: query rows per block, key columns per product, rows per diagonal sub-block.
# Backward: query rows, key columns. Measured best of {32, 64, 128, 256} x {256, 512} (x {32, 64}).
# (Within 3% of each other in the forward, about the noise of one-off timings here.)
FWD_BLOCKS = (256, 512, 32)
BWD_BLOCKS = (64, 256)

_lock = threading.Lock()
_module = None
_failed: Optional[str] = None


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES}, got {value!r}")
    return value


def _build():
    from torch.utils import cpp_extension
    build_dir = cpp_extension._get_build_directory(_NAME, verbose=False)
    if not any(f.startswith(_NAME) and f.endswith(".so") for f in os.listdir(build_dir)):
        print(f"longnet: building the CPU attention kernel into {build_dir} (once, about 30 s; "
              f"{ENV}=aten skips it)", file=sys.stderr, flush=True)
    # -ffast-math lets the exp loops vectorise; the kernel keeps every value finite for it.
    return cpp_extension.load(_NAME, [_SOURCE], extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=False)


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
                    _failed = f"{type(e).__name__}: {e}"
                    if m == "auto":
                        warnings.warn(f"longnet: the CPU attention kernel did not build ({_failed.splitlines()[0]}); "
                                      "using PyTorch's kernel. Install g++ and ninja, or set "
                                      f"{ENV}=aten to silence this.", RuntimeWarning, stacklevel=3)
    if _failed is not None and m == "longnet":
        raise RuntimeError(f"{ENV}=longnet but the CPU attention kernel did not build: {_failed}")
    return _module


def _plain(*tensors: Tensor) -> bool:
    # FakeTensors (torch.compile tracing, FakeTensorMode) and other subclasses have no data to read.
    return all(type(t) is torch.Tensor for t in tensors)


def wanted(q: Tensor, k: Tensor, causal: bool) -> bool:
    """Whether this call goes to longnet's kernel: causal, float32/float64 on the CPU, at most
    :data:`MAX_ROWS` query rows, plain tensors, and the kernel available."""
    return (causal and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and 0 < q.shape[-2] <= MAX_ROWS and k.shape[-2] > 0 and _plain(q, k) and module() is not None)


def _last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """(out (Z, H, L, D), lse (Z, H, L)) like ``aten._scaled_dot_product_flash_attention_for_cpu``."""
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    return tuple(module().fwd(q, k, v, causal, float(scale), *FWD_BLOCKS))


def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
        scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like ``aten._scaled_dot_product_flash_attention_for_cpu_backward``."""
    do, q, k, v, out = (_last_contiguous(x) for x in (do, q, k, v, out))
    return tuple(module().bwd(do, q, k, v, out, lse.to(q.dtype), causal, float(scale), *BWD_BLOCKS))
