"""Compile the fused Triton kernels for real GPU targets on any machine, no GPU needed.

``triton.compile`` lowers a kernel for a :class:`GPUTarget` (sm_80: A100;
sm_90a: H100/H200) down to a cubin with the ptxas that ships in the triton
wheel; ``ptxas -v`` on the same PTX then reports registers and spills, and
the kernel's metadata its shared memory. :func:`check_backend_tiles` does
that for every tile :mod:`.triton_backend` can pick (its per-arch defaults and
the smaller tiles ``_fit`` shrinks them to for short segments), forward and
backward, so a tile change that no longer compiles, spills or needs more
shared memory than the GPU has is caught on CPU (tests/test_triton_compile.py).

Launch signatures mirror what Triton's launcher specialises for a real call:
pointers and the strides of q, k, v, out and the gradients are multiples of
16; the lse strides are not, and its head stride is the constant 1.
Needs the triton package with its NVIDIA backend; must run with
``TRITON_INTERPRET`` unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import triton

from . import triton_backend as tb

__all__ = ["ARCHS", "SHARED_LIMIT", "CompileResult", "compiled", "compile_kernel", "failures", "sweep_fits", "backend_tiles", "check_backend_tiles"]

# Target name -> (capability, max shared memory per block with the opt-in, bytes).
ARCHS: Dict[str, Tuple[int, int]] = {"sm_80": (80, 163 * 1024), "sm_90a": (90, 227 * 1024)}
SHARED_LIMIT = {name: lim for name, (_, lim) in ARCHS.items()}
KERNELS = ("fwd", "dkdv", "dq")
_FN = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel", "pre": "_bwd_preprocess"}
# Pointers that hold the inputs' dtype; the others are float32 (or the output dtype, see below).
_INPUT_PTRS = {"Q", "K", "V", "DO"}
_OUTPUT_PTRS = {"O", "DQ", "DK", "DV"}
_FP32_PTRS = {"LSE", "DELTA", "DLSE"}
_FLOAT_SCALARS = {"qk_scale", "scale"}
_INT_SCALARS = {"N", "H", "W", "R", "PH"}  # upper-case like the pointers
_TT = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass
class CompileResult:
    """One compiled kernel: what it is, and what ptxas says about it (error: why it failed)."""

    kernel: str
    arch: str
    dtype: str
    head_dim: int
    tile: Tuple[int, int, int, int]
    causal: bool
    mixture: bool
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    mma: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared <= SHARED_LIMIT[self.arch]

    def problem(self) -> str:
        """'' when fine, else one line: the compile error, the spill or the shared memory over the limit."""
        if self.error:
            return self.error
        if self.spill_bytes:
            return f"spills {self.spill_bytes} bytes"
        if self.shared > SHARED_LIMIT[self.arch]:
            return f"needs {self.shared} bytes of shared memory, the limit is {SHARED_LIMIT[self.arch]}"
        return ""

    def row(self) -> dict:
        return dict(asdict(self), ok=self.ok, problem=self.problem())


def _pointer_type(name: str, dtype: str, mixture: bool) -> str:
    if name in _INPUT_PTRS:
        return "*" + _TT[dtype]
    if name in _OUTPUT_PTRS:
        # A mixture merges and sums in float32 buffers; a single pattern writes the input dtype.
        return "*fp32" if mixture else "*" + _TT[dtype]
    return "*fp32" if name in _FP32_PTRS else "*i32"


def _signature(fn, dtype: str, mixture: bool, constexprs: dict):
    """(signature, constexprs, attrs) for ``triton.compile`` of ``fn`` as a real launch specialises it."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            if name not in consts:
                consts[name] = p.default if p.default is not p.empty else False
        elif name.isupper() and name not in _INT_SCALARS:
            sig[name] = _pointer_type(name, dtype, mixture)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name == "s_lh":
            sig[name], consts[name] = "constexpr", 1
        elif name.startswith("s_") and not name.startswith("s_l"):
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, consts, attrs


@functools.lru_cache(maxsize=None)
def _ptxas(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def _ptxas_usage(ptx: str, arch: str) -> Tuple[int, int]:
    """(registers, spill bytes) of a kernel's PTX as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(ARCHS[arch][0]), "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-400:]}")
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", res.stderr)), default=0)
    spills = sum(int(a) + int(b) for a, b in
                 re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr))
    return regs, spills


def _constexprs(kernel: str, head_dim: int, tile, causal: bool, mixture: bool) -> dict:
    outer, inner = tile[0], tile[1]
    if kernel == "pre":
        return dict(HEAD_DIM=head_dim, BLOCK=outer, HAS_DLSE=True)
    blocks = {"fwd": (outer, inner), "dkdv": (inner, outer), "dq": (outer, inner)}[kernel]
    c = dict(HEAD_DIM=head_dim, BLOCK_M=blocks[0], BLOCK_N=blocks[1], CAUSAL=causal, DOT_PREC="tf32", UPCAST=False)
    c["MERGE" if kernel == "fwd" else "ACCUM"] = mixture
    return c


def compiled(kernel: str, arch: str, head_dim: int, tile: Tuple[int, int, int, int], *,
             dtype: str = "bfloat16", causal: bool = True, mixture: bool = True):
    """Triton's compiled kernel (``.asm``: ttir, ttgir, llir, ptx, cubin; ``.metadata``); raises on errors."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if tb.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled for a GPU")
    fn = getattr(tb, _FN[kernel])
    sig, consts, attrs = _signature(fn, dtype, mixture, _constexprs(kernel, head_dim, tile, causal, mixture))
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", ARCHS[arch][0], 32),
                          options={"num_warps": tile[2], "num_stages": tile[3]})


def compile_kernel(kernel: str, arch: str, head_dim: int, tile: Tuple[int, int, int, int], *,
                   dtype: str = "bfloat16", causal: bool = True, mixture: bool = True) -> CompileResult:
    """Compile one kernel ("fwd", "dkdv", "dq" or "pre") for ``arch`` ("sm_80", "sm_90a").

    ``tile``: (outer, inner, num_warps, num_stages) as in :class:`.triton_backend.BlockConfig`
    (for "pre": (rows per program, -, num_warps, num_stages)); ``mixture``: the merging
    variant (float32 outputs) rather than a single pattern's (outputs in ``dtype``).
    """
    res = CompileResult(kernel, arch, dtype, head_dim, tuple(tile), causal, mixture)
    try:
        k = compiled(kernel, arch, head_dim, tile, dtype=dtype, causal=causal, mixture=mixture)
        res.shared = int(k.metadata.shared)
        ptx = k.asm["ptx"]
        res.mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
        res.registers, res.spill_bytes = _ptxas_usage(ptx, arch)
    except Exception as e:  # a compile error is a result here, reported with the kernel it belongs to
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return res


def backend_tiles(head_dim: int, arch: str) -> Dict[str, List[Tuple[int, int, int, int]]]:
    """Every tile the backend can launch at ``head_dim`` on ``arch``: the default and its ``_fit`` shrinks."""
    cfg = tb.default_config(head_dim, capability=(ARCHS[arch][0] // 10, ARCHS[arch][0] % 10))
    out = {}
    for kernel in KERNELS:
        block = getattr(cfg, kernel)
        kept = [16 << i for i in range(block[0].bit_length()) if (16 << i) <= block[0]]
        out[kernel] = sorted({tb._fit(block, n) for n in kept}, reverse=True)
    return out


def check_backend_tiles(archs: Iterable[str] = tuple(ARCHS), head_dims: Iterable[int] = tb.SUPPORTED_HEAD_DIMS,
                        causal: Iterable[bool] = (True, False)) -> List[CompileResult]:
    """Compile every kernel at every tile the backend can pick (bf16 mixture, and the fp16
    single-pattern variant at the default tile), plus ``_bwd_preprocess``."""
    results = []
    for arch in archs:
        for d in head_dims:
            for kernel, tiles in backend_tiles(d, arch).items():
                for tile in tiles:
                    for c in causal:
                        results.append(compile_kernel(kernel, arch, d, tile, causal=c))
                results.append(compile_kernel(kernel, arch, d, tiles[0], dtype="float16", mixture=False))
            results.append(compile_kernel("pre", arch, d, (tb.PREPROCESS_ROWS, 0, 4, 1), mixture=False))
    return results


def failures(results: Iterable[CompileResult]) -> List[str]:
    """One line per result that is not ok."""
    return [f"{r.kernel} {r.arch} D={r.head_dim} tile={r.tile} {r.dtype} causal={r.causal} "
            f"mixture={r.mixture}: {r.problem()}" for r in results if not r.ok]


def sweep_fits(spec: str, head_dim: int, arch: str) -> Optional[str]:
    """Why a ``LONGNET_TRITON_CONFIG`` spec does not fit ``arch`` at ``head_dim`` (None: it fits)."""
    cfg = tb.parse_config(spec)
    for kernel in KERNELS:
        r = compile_kernel(kernel, arch, head_dim, getattr(cfg, kernel))
        if not r.ok:
            return f"{kernel}: {r.problem()}"
    return None
