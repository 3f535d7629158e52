"""The fused Triton kernels compiled for real GPU targets (sm_80, sm_90a) on CPU, with ptxas.

No GPU is needed: ``triton.compile`` lowers each kernel for a target and the
ptxas in the triton wheel reports registers and spills
(:mod:`longnet.backends.triton_targets`). A tile that fails to compile,
spills registers or needs more shared memory than an A100 (163 KiB) or H100
(227 KiB) offers fails here. The default suite compiles the head-dim-128
defaults (the largest tiles); ``-m slow`` compiles every tile the backend can
pick and every benchmark sweep config (``.ci/run`` runs it).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    pytest.skip("compiles real kernels; TRITON_INTERPRET replaces them with interpreted ones",
                allow_module_level=True)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

from longnet.backends import triton_backend as tb  # noqa: E402
from longnet.backends import triton_targets as tt  # noqa: E402
from longnet.bench import triton_kernel as bench  # noqa: E402

ARCHS = tuple(tt.ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_dim_128_defaults_compile_without_spills(arch):
    cap = tt.ARCHS[arch][0]
    cfg = tb.default_config(128, (cap // 10, cap % 10))
    results = [tt.compile_kernel(kernel, arch, 128, getattr(cfg, kernel)) for kernel in tt.KERNELS]
    assert tt.failures(results) == []
    assert all(r.registers > 0 and r.shared > 0 for r in results)
    if arch == "sm_90a":
        # 128 query rows per dq program: Hopper's tensor-core instructions, not mma.sync.
        assert {r.kernel: r.mma for r in results} == {"fwd": "wgmma", "dkdv": "wgmma", "dq": "wgmma"}


def test_tiles_differ_by_architecture_where_sm80_would_spill():
    assert tb.default_config(128, (8, 0)).fwd != tb.default_config(128, (9, 0)).fwd
    assert tb.default_config(128).dq[0] == tb.default_config(128, (8, 0)).dq[0] == 128
    assert tb.default_config(64, (8, 0)) == tb.default_config(64, (9, 0))


def test_checker_reports_spills_and_shared_memory():
    """The check can fail: a tile known to spill on sm_80 is reported, with what went wrong."""
    r = tt.compile_kernel("dkdv", "sm_80", 128, (128, 64, 8, 3))
    assert not r.error and r.spill_bytes > 0 and not r.ok and "spills" in r.problem()
    big = tt.CompileResult("fwd", "sm_80", "bfloat16", 128, (128, 128, 8, 3), True, True, shared=224 * 1024,
                           registers=200)
    assert not big.ok and "shared memory" in big.problem()


def test_preprocess_row_index_is_64_bit():
    """program_id(0) * BLOCK is computed in int64 (B*N*H rows may pass 2^31)."""
    ttir = tt.compiled("pre", "sm_90a", 64, (tb.PREPROCESS_ROWS, 0, 4, 1), mixture=False).asm["ttir"]
    pid = re.search(r"(%\S+) = tt.get_program_id x : i32", ttir).group(1)
    ext = re.search(rf"(%\S+) = arith.extsi {re.escape(pid)} : i32 to i64", ttir)
    assert ext, "the program id is not widened to int64"
    assert re.search(rf"arith.muli {re.escape(ext.group(1))}, %\S+ : i64", ttir)
    assert not re.search(rf"arith.muli {re.escape(pid)}\b", ttir), "an int32 multiply of the program id"


@pytest.mark.slow
def test_every_backend_tile_compiles_for_sm80_and_sm90a():
    """Every head dim, kernel and tile the backend can launch (defaults and _fit shrinks), causal
    or not, bf16 mixture and fp16 single-pattern variants, and _bwd_preprocess."""
    results = tt.check_backend_tiles()
    assert len(results) > 100
    assert tt.failures(results) == []


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
def test_benchmark_sweep_configs_fit(head_dim):
    problems = []
    for arch in ARCHS:
        cap = tt.ARCHS[arch][0]
        for spec in bench.sweep_configs(head_dim, (cap // 10, cap % 10)):
            why = tt.sweep_fits(spec, head_dim, arch)
            if why:
                problems.append(f"{arch} D={head_dim} {spec}: {why}")
    assert problems == []
