"""``longnet selftest --gpu``: one command that validates longnet on a fresh GPU machine.

    longnet selftest --gpu                 # about 8 minutes on one H100/H200
    longnet selftest --gpu --dry-run       # on any machine: check the plan, run it small on CPU

It writes ``selftest.md`` and ``selftest.json`` to ``--out`` and runs, in order
(each step checked against the remaining ``--budget-s``; what does not fit is
reported as skipped):

1. correctness: every CUDA path against the dense float64 reference
   (``backend="reference"`` on the same dtype-rounded inputs), out, lse and
   dq, dk, dv with an lse gradient too: the triton backend, the torch backend on
   FlashAttention-2 and on efficient attention (``LONGNET_CUDA_KERNEL=efficient``),
   the math path; fp16, bf16, fp32; causal and not; segment phases, the local
   window, an awkward N, head dims 16 to 128;
2. with 2 or more GPUs, sequence parallelism over NCCL (one process per GPU)
   against the same reference, halo exchanges included;
3. a benchmark table: triton, the torch backend, dense SDPA (flash) and
   flash-attn if installed, in ms and TFLOP/s at 16K, 64K and 256K tokens;
4. the largest N whose one-layer fwd+bwd fits, and 1M tokens bf16 fwd+bwd time
   and peak memory.

A check passes when every quantity is within the tolerance table below (the
tests' table, tests/helpers.py: max |got - want| <= atol + rtol |want|, ratio
<= 1, and rows with no key are -inf in both). Every failure is reported and the
run carries on; the exit status is 1 when a check failed or raised, else 0.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .backends.numerics import TOLERANCE
from .fileio import atomic_write_json, atomic_write_text
from .patterns import DilatedPattern, validate_pattern, validate_phases

__all__ = ["Check", "Outcome", "build_plan", "check_plan", "run_plan", "render_markdown", "add_arguments", "run"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One attention problem: (B, N, H, D) and a pattern (with phases)."""

    name: str
    b: int
    n: int
    h: int
    d: int
    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    segment_phases: Tuple[int, ...] = ()

    def phases(self) -> Optional[Tuple[int, ...]]:
        return self.segment_phases or None


_LOCAL = DilatedPattern((256, 512), (1, 2)).with_local_window(64)
CASES = (
    Case("paper-like", 2, 1024, 4, 64, (128, 256, 512), (1, 2, 4)),
    Case("phases", 1, 1024, 4, 64, (128, 256), (1, 2), (64, 128)),
    Case("local-window", 1, 1024, 4, 64, _LOCAL.segment_lengths, _LOCAL.dilation_rates, _LOCAL.segment_phases),
    Case("awkward-n", 1, 1000, 3, 64, (96, 384, 2048), (1, 3, 8)),
    Case("d16", 1, 512, 4, 16, (64, 256), (1, 2)),
    Case("d32", 1, 512, 4, 32, (64, 256), (1, 2)),
    Case("d128", 1, 512, 4, 128, (64, 256), (1, 2)),
)
# (variant name, backend, dtype, LONGNET_CUDA_KERNEL or None)
VARIANTS = (
    ("triton-fp16", "triton", "fp16", None), ("triton-bf16", "triton", "bf16", None),
    ("torch-flash-fp16", "torch", "fp16", None), ("torch-flash-bf16", "torch", "bf16", None),
    ("torch-efficient-fp16", "torch", "fp16", "efficient"), ("torch-efficient-fp32", "torch", "fp32", None),
    ("math-fp32", "math", "fp32", None), ("math-bf16", "math", "bf16", None),
)
BENCH_NS = (16 << 10, 64 << 10, 256 << 10)
BENCH_BACKENDS = ("triton", "torch", "sdpa", "flash-attn")


@dataclass
class Check:
    """One step of the plan: ``run(ctx)`` returns a dict of measurements and raises ``CheckFailed``."""

    name: str
    group: str
    params: dict
    run: Callable[["Context"], dict] = field(repr=False, compare=False)
    estimate_s: float = 1.0


@dataclass
class Outcome:
    name: str
    group: str
    status: str  # pass, fail, error, skipped
    seconds: float
    params: dict
    detail: dict
    message: str = ""


class SkipCheck(Exception):
    """A check that cannot run here (the message says why); reported as skipped."""


class CheckFailed(Exception):
    """A check ran and measured something outside its bound; ``detail`` holds the measurements."""

    def __init__(self, message: str, detail: dict):
        super().__init__(message)
        self.detail = detail


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    cache: dict = field(default_factory=dict)


# ---------------------------------------------------------------- correctness

def tolerance_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str) -> float:
    """max |actual - expected| / (atol + rtol |expected|) over finite expected entries; inf when
    the non-finite entries (rows with no key) differ."""
    atol, rtol = TOLERANCE[dtype][kind]
    a, e = actual.double(), expected.double()
    ok = torch.isfinite(e)
    if not torch.equal(ok, torch.isfinite(a)):
        return float("inf")
    if not ok.any():
        return 0.0
    return float(((a - e).abs() / (atol + rtol * e.abs()))[ok].max())


def _inputs(case: Case, dtype: torch.dtype, device: torch.device, causal: bool):
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{case.name} {causal}".encode()))
    shape = (case.b, case.n, case.h, case.d)
    qkv = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(3)]
    do = torch.randn(shape, generator=gen).to(device)
    dl = torch.randn(shape[:3], generator=gen).to(device)
    return qkv, do, dl


def _grads(q, k, v, do, dl, case: Case, causal: bool, backend: str):
    from .functional import dilated_attention
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = dilated_attention(*leaves, case.segment_lengths, case.dilation_rates, is_causal=causal,
                                 backend=backend, return_lse=True, segment_phases=case.phases())
    # Rows with no key have lse = -inf: their lse gradient is left out (it would be NaN).
    dl = torch.where(torch.isfinite(lse), dl.to(lse.dtype), torch.zeros_like(lse))
    loss = (out.double() * do.double()).sum() + (torch.nan_to_num(lse, neginf=0.0).double() * dl.double()).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad,
            "dv": leaves[2].grad}


def _reference(ctx: Context, case: Case, dtype: torch.dtype, causal: bool):
    key = ("ref", case, dtype, causal)
    if key not in ctx.cache:
        (q, k, v), do, dl = _inputs(case, dtype, ctx.device, causal)
        want = _grads(*(x.double() for x in (q, k, v)), do, dl, case, causal, "reference")
        ctx.cache[key] = ((q, k, v, do, dl), want)
    return ctx.cache[key]


def _need_backend(backend: str) -> None:
    from .backends.registry import available_backends
    if backend == "triton" and backend not in available_backends():
        raise SkipCheck("the triton backend is not available here (pip install -e '.[triton]')")


def correctness_check(case: Case, variant: str, backend: str, dtype_name: str, kernel: Optional[str],
                      causal: bool) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        _need_backend(backend)
        dtype = DTYPES[dtype_name]
        small = case
        if ctx.dry_run:  # CPU: the code path at a quarter of the length, not the GPU numerics
            small = replace(case, b=1, n=max(64, case.n // 4))
            dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        (q, k, v, do, dl), want = _reference(ctx, small, dtype, causal)
        old = os.environ.get("LONGNET_CUDA_KERNEL")
        if kernel:
            os.environ["LONGNET_CUDA_KERNEL"] = kernel
        try:
            got = _grads(q, k, v, do, dl, small, causal, backend)
        finally:
            if kernel and old is None:
                os.environ.pop("LONGNET_CUDA_KERNEL", None)
            elif kernel:
                os.environ["LONGNET_CUDA_KERNEL"] = old
        ratios = {name: tolerance_ratio(got[name], want[name], dtype, "grad" if name[0] == "d" else name)
                  for name in want}
        detail = {"tolerance_ratio": ratios, "dtype": str(dtype).replace("torch.", "")}
        bad = sorted(n for n, x in ratios.items() if not x <= 1.0)
        if bad:
            raise CheckFailed(f"{', '.join(bad)} outside the tolerance (ratio {max(ratios.values()):.3g})", detail)
        return detail
    return run


def _correctness_plan(ctx_gpu: bool) -> List[Check]:
    checks = []
    for case in CASES:
        for variant, backend, dtype_name, kernel in VARIANTS:
            if backend == "triton" and case.d not in (16, 32, 64, 128):
                continue
            for causal in (False, True):
                params = dict(case=asdict(case), variant=variant, backend=backend, dtype=dtype_name,
                              cuda_kernel=kernel, causal=causal)
                name = f"{case.name} {variant} {'causal' if causal else 'full'}"
                checks.append(Check(name, "correctness", params,
                                    correctness_check(case, variant, backend, dtype_name, kernel, causal), 0.5))
    return checks


# ---------------------------------------------------------------- sequence parallelism over NCCL

# L per rank 256: a local pattern, cross-rank spans and a halo pattern (phase 64 < w = 128 <= L).
SP_CASE = Case("sp", 1, 0, 4, 64, (128, 512, 1024, 128), (1, 2, 4, 1), (0, 0, 0, 64))
SP_BLOCK = 256


def _sp_case(world: int) -> Case:
    return Case(f"sp-{world}", SP_CASE.b, SP_BLOCK * world, SP_CASE.h, SP_CASE.d, SP_CASE.segment_lengths,
                SP_CASE.dilation_rates, SP_CASE.segment_phases)


def _sp_worker(rank: int, world: int, store: str, dtype_name: str, causal: bool, result_dir: str,
               dry_run: bool) -> None:
    """One rank: its block of the op over the process group against the float64 reference's rows.
    GPU: NCCL, one GPU per rank; dry run: gloo on CPU in float32 (the harness, not NCCL)."""
    import datetime
    import torch.distributed as dist
    if dry_run:
        device, backend, dtype_name = torch.device("cpu"), "gloo", "fp32"
        torch.set_num_threads(1)
    else:
        device, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    # A user's own process group (no device_id): the lazy-init case the plan must handle.
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    res: dict = {}
    try:
        case, dtype = _sp_case(world), DTYPES[dtype_name]
        ctx = Context(device, dry_run=False)
        (q, k, v, do, dl), want = _reference(ctx, case, dtype, causal)
        rows = slice(rank * SP_BLOCK, (rank + 1) * SP_BLOCK)
        from .functional import dilated_attention
        leaves = [x[:, rows].detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = dilated_attention(*leaves, case.segment_lengths, case.dilation_rates, is_causal=causal,
                                     return_lse=True, segment_phases=case.phases(), group=dist.group.WORLD)
        dlr = torch.where(torch.isfinite(lse), dl[:, rows].to(lse.dtype), torch.zeros_like(lse))
        ((out.double() * do[:, rows].double()).sum()
         + (torch.nan_to_num(lse, neginf=0.0).double() * dlr.double()).sum()).backward()
        got = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
        res["tolerance_ratio"] = {n: tolerance_ratio(got[n].detach(), want[n][:, rows], dtype,
                                                     "grad" if n[0] == "d" else n) for n in got}
    except Exception:
        res["error"] = traceback.format_exc(limit=4)
    finally:
        atomic_write_json(os.path.join(result_dir, f"rank{rank}.json"), res)
        dist.destroy_process_group()


def sp_check(world: int, dtype_name: str, causal: bool, timeout_s: float) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        import json
        import tempfile
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as tmp:
            procs = mp.start_processes(_sp_worker, args=(world, os.path.join(tmp, "store"), dtype_name, causal, tmp,
                                                         ctx.dry_run), nprocs=world, join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s
            while not procs.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in procs.processes:
                        p.kill()
                    raise CheckFailed(f"no result after {timeout_s:.0f} s: a hang (killed)", {})
            per_rank = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        errors = [r.get("error") for r in per_rank if r.get("error")]
        if errors:
            raise RuntimeError(errors[0])
        worst = {n: max(r["tolerance_ratio"][n] for r in per_rank) for n in per_rank[0]["tolerance_ratio"]}
        detail = {"tolerance_ratio": worst, "world": world}
        bad = sorted(n for n, x in worst.items() if not x <= 1.0)
        if bad:
            raise CheckFailed(f"{', '.join(bad)} outside the tolerance on some rank", detail)
        return detail
    return run


def _sp_plan(n_gpus: int) -> List[Check]:
    worlds = sorted({w for w in (2, 4, n_gpus) if 2 <= w <= min(n_gpus, 8)})
    return [Check(f"sp world={w} {dt} {'causal' if c else 'full'}", "sequence-parallel",
                  dict(world=w, dtype=dt, causal=c, block_length=SP_BLOCK, case=asdict(_sp_case(w))),
                  sp_check(w, dt, c, 120.0), 20.0)
            for w in worlds for dt in ("bf16",) for c in (False, True)]


# ---------------------------------------------------------------- benchmark and capacity

def _flash_attn_call(mode: str, q, k, v, do, causal: bool):
    from flash_attn import flash_attn_func
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return flash_attn_func(q, k, v, causal=causal)
        return fwd
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwdbwd():
        for x in leaves:
            x.grad = None
        out = flash_attn_func(*leaves, causal=causal)
        out.backward(do)
        return out
    return fwdbwd


def bench_check(backend: str, n: int, mode: str, heads: int = 16, head_dim: int = 128) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        from .bench import common
        from .bench import triton_kernel as tk
        from .patterns import dense_flops
        pattern = DilatedPattern.paper()
        _need_backend(backend)
        if backend != "flash-attn":
            return tk.measure(backend, mode, n, heads, head_dim, True, torch.bfloat16, pattern, 25, 100)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn((1, n, heads, head_dim), device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(4))
        ms = common.gpu_median_ms(_flash_attn_call(mode, q, k, v, do, True), 25, 100)
        flops = dense_flops(n, heads, head_dim, causal=True, backward=mode == "fwdbwd")
        return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "note": ""}
    return run


def _bench_plan(have_flash_attn: bool) -> List[Check]:
    checks = []
    for n in BENCH_NS:
        for backend in BENCH_BACKENDS:
            if backend == "flash-attn" and not have_flash_attn:
                continue
            for mode in ("fwd", "fwdbwd"):
                checks.append(Check(f"bench {backend} N={n // 1024}K {mode}", "benchmark",
                                    dict(backend=backend, n=n, mode=mode, heads=16, head_dim=128, dtype="bf16",
                                         causal=True, pattern="paper"), bench_check(backend, n, mode), 4.0))
    return checks


def largest_n_check(cap: int) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        from .bench import triton_kernel as tk
        return {"largest_n": tk.largest_n(torch.bfloat16, DilatedPattern.paper(), cap), "cap": cap,
                "heads": 12, "head_dim": 64}
    return run


def million_check(n: int = 1 << 20) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        from .bench import common
        pattern = DilatedPattern.paper()
        q, k, v, do = (torch.randn((1, n, 12, 64), device="cuda", dtype=torch.bfloat16) for _ in range(4))
        fn = common.attention_call(None, "fwdbwd", q, k, v, do, pattern, True)
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated()
        return {"n": n, "ms": ms, "peak_bytes": peak, "peak_above_inputs_bytes": peak - base,
                "backend": "auto", "heads": 12, "head_dim": 64}
    return run


# ---------------------------------------------------------------- the plan

def environment() -> dict:
    """What this machine is: versions, GPUs, optional packages."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": [], "triton": None, "flash_attn": None}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1)})
    for mod in ("triton", "flash_attn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: either way it is not benchmarked
            pass
    return env


def build_plan(n_gpus: int, have_flash_attn: bool, max_n_cap: int = 16 << 20) -> List[Check]:
    """Every check, in the order they run: correctness, sequence parallelism, benchmark, capacity."""
    checks = _correctness_plan(n_gpus > 0) + _sp_plan(n_gpus) + _bench_plan(have_flash_attn)
    checks.append(Check("largest N (one layer fwd+bwd, bf16, H=12, D=64)", "capacity", dict(cap=max_n_cap),
                        largest_n_check(max_n_cap), 60.0))
    checks.append(Check("1M tokens bf16 fwd+bwd", "capacity", dict(n=1 << 20), million_check(), 20.0))
    return checks


def check_plan(checks: Sequence[Check], n_gpus: int) -> List[str]:
    """Problems with the plan itself (empty: it is consistent): names, patterns, the SP split rule,
    backends and dtypes, and coverage of what the GPU validation must include."""
    from .backends.registry import BACKENDS
    from .backends.sequence_parallel import check_sequence_parallel
    problems = []
    names = [c.name for c in checks]
    problems += [f"duplicate check name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for c in checks:
        case = c.params.get("case")
        try:
            if case:
                w, _ = validate_pattern(case["segment_lengths"], case["dilation_rates"])
                validate_phases(case["segment_phases"] or None, w)
            if c.group == "sequence-parallel":
                check_sequence_parallel(c.params["block_length"], c.params["world"], case["segment_lengths"],
                                        case["dilation_rates"], segment_phases=case["segment_phases"])
        except ValueError as e:
            problems.append(f"{c.name}: {e}")
        backend = c.params.get("backend")
        if c.group == "correctness" and backend not in set(BACKENDS) | {"triton"}:
            problems.append(f"{c.name}: unknown backend {backend!r}")
    covered = {(c.params["backend"], c.params["dtype"], c.params["causal"]) for c in checks
               if c.group == "correctness"}
    for need in (("triton", "bf16", True), ("torch", "fp16", False), ("torch", "fp32", True), ("math", "fp32", True)):
        if need not in covered:
            problems.append(f"no correctness check of backend={need[0]} dtype={need[1]} causal={need[2]}")
    dims = {c.params["case"]["d"] for c in checks if c.group == "correctness"}
    if not {16, 32, 64, 128} <= dims:
        problems.append(f"correctness covers head dims {sorted(dims)}, not 16 to 128")
    if n_gpus >= 2 and not any(c.group == "sequence-parallel" for c in checks):
        problems.append("2 or more GPUs but no sequence-parallel check")
    return problems


def run_plan(checks: Sequence[Check], ctx: Context, budget_s: float,
             log: Callable[[str], None] = print) -> List[Outcome]:
    """Run every check, carrying on after failures; a check whose estimate no longer fits the budget
    is skipped (correctness checks always run: they are what "pass" means)."""
    outcomes = []
    start = time.monotonic()
    for c in checks:
        left = budget_s - (time.monotonic() - start)
        if c.group != "correctness" and c.estimate_s > left:
            outcomes.append(Outcome(c.name, c.group, "skipped", 0.0, c.params, {},
                                    f"time budget: {left:.0f} s left, needs about {c.estimate_s:.0f} s"))
            log(f"SKIP  {c.name}: {outcomes[-1].message}")
            continue
        t0 = time.monotonic()
        try:
            detail, status, message = c.run(ctx), "pass", ""
        except CheckFailed as e:
            detail, status, message = e.detail, "fail", str(e)
        except SkipCheck as e:
            detail, status, message = {}, "skipped", str(e)
        except Exception as e:  # reported with its traceback; the run carries on
            detail, status = {"traceback": traceback.format_exc(limit=6)}, "error"
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        outcomes.append(Outcome(c.name, c.group, status, time.monotonic() - t0, c.params, detail, message))
        if status != "skipped" or not ctx.dry_run:
            log(f"{status.upper():5} {c.name} ({outcomes[-1].seconds:.1f} s){': ' + message if message else ''}")
    return outcomes


# ---------------------------------------------------------------- report

def _worst(o: Outcome) -> str:
    ratios = o.detail.get("tolerance_ratio")
    return f"{max(ratios.values()):.3g}" if ratios else ""


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]


def render_markdown(env: dict, outcomes: Sequence[Outcome], dry_run: bool) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "error", "skipped")}
    gpus = ", ".join(f"{g['name']} (sm{g['capability']}, {g['memory_gib']} GiB)" for g in env["gpus"]) or "none"
    lines = [f"# longnet selftest{' (dry run on CPU)' if dry_run else ''}", "",
             f"GPUs: {gpus}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"flash-attn {env['flash_attn']}", "",
             f"**{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
             f"{counts['skipped']} skipped.** A correctness check passes when out, lse, dq, dk and dv are all "
             "within the tolerance table (ratio <= 1) against the float64 reference.", ""]
    bad = [o for o in outcomes if o.status in ("fail", "error")]
    if bad:
        lines += ["## Failures", ""] + _table(["check", "status", "message"],
                                              [(o.name, o.status, o.message.replace("|", "/")) for o in bad]) + [""]
    for group, title in (("correctness", "Correctness"), ("sequence-parallel", "Sequence parallelism (NCCL)")):
        rows = [(o.name, o.status, _worst(o), f"{o.seconds:.1f}") for o in outcomes if o.group == group]
        if rows:
            lines += [f"## {title}", ""] + _table(["check", "status", "worst ratio", "s"], rows) + [""]
    rows = [(o.params["backend"], f"{o.params['n'] // 1024}K", o.params["mode"],
             f"{o.detail['ms']:.2f}" if "ms" in o.detail else "", f"{o.detail['tflops']:.1f}" if "tflops" in o.detail
             else "", o.status if o.status != "pass" else o.detail.get("note", ""))
            for o in outcomes if o.group == "benchmark"]
    if rows:
        lines += ["## Benchmark (bf16, causal, H=16, D=128, paper pattern; dense for sdpa and flash-attn)", ""]
        lines += _table(["backend", "N", "mode", "ms", "TFLOP/s", "note"], rows) + [""]
    cap = [o for o in outcomes if o.group == "capacity"]
    if cap:
        lines += ["## Capacity", ""] + [f"- {o.name}: {o.status} {o.message} "
                                         f"{ {k: v for k, v in o.detail.items() if k != 'traceback'} }" for o in cap]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, env: dict, outcomes: Sequence[Outcome], dry_run: bool) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "selftest.md"), os.path.join(out_dir, "selftest.json")
    atomic_write_text(md, render_markdown(env, outcomes, dry_run))
    atomic_write_json(js, {"environment": env, "dry_run": dry_run, "outcomes": [asdict(o) for o in outcomes]})
    return md, js


# ---------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="validate the CUDA paths on this machine's GPUs (required)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the plan and run its correctness checks small on CPU (torch and math backends)")
    p.add_argument("--out", default="selftest-report", help="directory of selftest.md and selftest.json")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="time budget in seconds; benchmark and capacity steps that do not fit are skipped")
    p.add_argument("--only", default="", help="run only the checks whose name contains this text")
    p.add_argument("--max-n-cap", type=int, default=16 << 20, help="upper end of the largest-N search")


def _dry_run_checks(checks: Sequence[Check]) -> List[Check]:
    """The plan as a CPU can run it: one correctness check per (case, backend, causal) of the torch
    and math backends in float32 at a quarter of the length, and the two-rank sequence-parallel
    checks over gloo; everything else is listed as skipped."""
    seen, out = set(), []
    for c in checks:
        key = (c.params.get("case", {}).get("name"), c.params.get("backend"), c.params.get("causal"))
        runnable = (c.group == "correctness" and c.params["backend"] in ("torch", "math") and key not in seen
                    or c.group == "sequence-parallel" and c.params["world"] == 2)
        if runnable:
            seen.add(key)
            out.append(c)
        else:
            out.append(Check(c.name, c.group, c.params, _skip("dry run: needs a GPU"), 0.0))
    return out


def _skip(reason: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        raise SkipCheck(reason)
    return run


def run(args) -> int:
    if not args.gpu:
        print("longnet selftest: pass --gpu (validate the CUDA paths); --dry-run checks the plan on CPU")
        return 2
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus == 0 and not args.dry_run:
        print(f"longnet selftest --gpu: no CUDA GPU on this machine (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}): nothing to validate. Run it on a GPU machine; "
              "--dry-run checks the plan here.")
        return 0
    env = environment()
    plan = build_plan(n_gpus if not args.dry_run else 4, env["flash_attn"] is not None or args.dry_run,
                      args.max_n_cap)
    problems = check_plan(plan, n_gpus if not args.dry_run else 4)
    for msg in problems:
        print(f"plan problem: {msg}")
    if args.only:
        plan = [c for c in plan if args.only in c.name]
    ctx = Context(torch.device("cuda" if not args.dry_run else "cpu"), dry_run=args.dry_run)
    if args.dry_run:
        plan = _dry_run_checks(plan)
    outcomes = run_plan(plan, ctx, args.budget_s)
    md, js = write_report(args.out, env, outcomes, args.dry_run)
    failed = [o for o in outcomes if o.status in ("fail", "error")]
    print(f"{len(plan)} checks: {sum(o.status == 'pass' for o in outcomes)} passed, {len(failed)} failed; "
          f"report: {md}, {js}")
    return 1 if failed or problems else 0

