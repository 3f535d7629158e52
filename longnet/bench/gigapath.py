"""Benchmark: Prov-GigaPath's 12-layer, 768-wide slide encoder on longnet.compat vs the original code.

    python -m longnet.bench.gigapath [--tiles 1000,10000,50000] [--dtypes fp32,bf16]
        [--original /path/to/prov-gigapath] [--csv docs/gigapath_bench.csv]

Random weights, one slide (batch 1) of ``tiles`` tiles with distinct random
grid cells, forward pass under ``no_grad``. Every point runs in a fresh
process, so its peak resident memory (``getrusage`` ``ru_maxrss``: exact, not
sampled) is its own. Reported: build time, forward time (after a 64-tile
warm-up call), peak RSS after building the model and at the end.

``--original`` runs GigaPath's own ``LongNetViT`` from a checkout as well, on
the CPU, with its flash-attn call replaced by PyTorch's exact CPU flash
attention (which returns (out, lse)) and stand-ins for the training-only
imports (:func:`stub_training_imports`). Its peak includes the fixed
(1 + 1000^2, 768) position table and the float64 array it is built from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import types
from typing import Dict, List, Optional

import torch

from ..report import Column, format_table, write_csv
from .common import DTYPES

__all__ = ["stub_training_imports", "run_point", "main"]

IN_CHANS = 1536


def stub_training_imports() -> None:
    """Stand-ins for what torchscale/GigaPath import only for training or downloads
    (fairscale's wrappers, timm's registry and drop_path, huggingface_hub)."""
    def identity(module, *args, **kwargs):
        return module

    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep

    mods = {name: types.ModuleType(name) for name in (
        "fairscale", "fairscale.nn", "timm", "timm.models", "timm.models.layers", "timm.models.registry",
        "huggingface_hub")}
    mods["fairscale.nn"].checkpoint_wrapper = mods["fairscale.nn"].wrap = identity
    mods["timm.models.layers"].drop_path = drop_path
    mods["timm.models.registry"].register_model = lambda fn: fn
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    sys.modules.update(mods)


def _cpu_flash(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """flash_attn_func's contract on (b, l, h, d) -> (out, lse (b, h, l)), with PyTorch's exact CPU kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, is_causal, scale=softmax_scale)[:2]
    return out.transpose(1, 2), lse


def _original_model_imports(checkout: str):
    """GigaPath's slide_encoder module from ``checkout``, with flash-attn replaced and stand-ins installed."""
    if checkout not in sys.path:
        sys.path[:0] = [checkout, os.path.join(checkout, "gigapath")]  # its copy imports itself as `torchscale`
    stub_training_imports()
    import torchscale.component.multihead_attention as mha
    from gigapath import slide_encoder
    mha.flash_attn_func = _cpu_flash
    return slide_encoder


def _original_model(checkout: str):
    """GigaPath's own 12-layer 768-d LongNetViT from ``checkout``, runnable on the CPU."""
    slide_encoder = _original_model_imports(checkout)
    optimal = slide_encoder.LongNetViT.get_optimal_segment_length
    # Under numpy >= 2 its segment string reads "[np.int64(1024), ...]", which its config cannot eval.
    slide_encoder.LongNetViT.get_optimal_segment_length = lambda self, *a: str(
        [int(x) for x in re.findall(r"\d+", optimal(self, *a).replace("np.int64", ""))])
    return slide_encoder.gigapath_slide_enc12l768d(in_chans=IN_CHANS)


def _inputs(tiles: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(1000 * 1000, generator=g)[:tiles]
    coords = torch.stack([cells // 1000, cells % 1000], -1).float()[None] * 256
    return torch.randn(1, tiles, IN_CHANS, generator=g).to(dtype), coords


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_point(impl: str, tiles: int, dtype_name: str, original: Optional[str]) -> Dict[str, object]:
    """One measurement in this process (call it in a fresh one): build, warm up, time one forward."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    base = _peak_mib()
    start = time.perf_counter()
    if impl == "longnet":
        from ..compat.gigapath import build_model
        model = build_model("gigapath_slide_enc12l768d", IN_CHANS)
    else:
        model = _original_model(original)
    model = model.to(dtype).eval()
    build_s = time.perf_counter() - start
    built = _peak_mib()
    with torch.no_grad():
        model(*_inputs(64, dtype, seed=1))
        x, coords = _inputs(tiles, dtype)
        start = time.perf_counter()
        out = model(x, coords)[0]
        forward_s = time.perf_counter() - start
    return {"impl": impl, "tiles": tiles, "dtype": dtype_name, "build_s": round(build_s, 2),
            "forward_s": round(forward_s, 2), "peak_built_mib": round(built), "peak_mib": round(_peak_mib()),
            "start_mib": round(base), "finite": bool(torch.isfinite(out).all()), "threads": torch.get_num_threads()}


def _original_encoder(checkout: str):
    """GigaPath's own 12-layer LongNet encoder (no ViT wrapper, so no position table), runnable on the CPU."""
    _original_model_imports(checkout)
    from gigapath.torchscale.model.LongNet import make_longnet_from_name
    from ..compat.gigapath import optimal_segment_length
    return make_longnet_from_name("LongNet_12_layers_768_dim", segment_length=optimal_segment_length())


def interleaved(checkout: str, tiles: int, dtype_name: str, repeats: int) -> Dict[str, object]:
    """Encoder forward of the original and of compat with the same weights, alternated in one process.

    Both see the same load, so the time ratio is fair; the outputs are compared too.
    """
    from ..compat.torchscale import make_longnet_from_name
    from ..compat.gigapath import optimal_segment_length
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    original = _original_encoder(checkout).to(dtype).eval()
    ours = make_longnet_from_name("LongNet_12_layers_768_dim", segment_length=optimal_segment_length())
    ours.load_state_dict(original.state_dict(), strict=True)
    ours = ours.to(dtype).eval()
    x = torch.randn(1, tiles + 1, 768).to(dtype)
    times: Dict[str, List[float]] = {"original": [], "longnet": []}
    outs = {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in (("original", original), ("longnet", ours)):
                start = time.perf_counter()
                outs[name] = model(src_tokens=None, token_embeddings=x)["encoder_out"]
                times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    diff = float((outs["original"].double() - outs["longnet"].double()).abs().max())
    return {"tiles": tiles, "dtype": dtype_name, "original_s": round(med["original"], 2),
            "longnet_s": round(med["longnet"], 2), "ratio": round(med["longnet"] / med["original"], 3),
            "max_abs_diff": diff, "repeats": repeats}


COLUMNS = [Column("impl", "impl", width=9, align="<"), Column("tiles", "tiles", width=7),
           Column("dtype", "dtype", width=6), Column("build s", "build_s", ".1f", 8),
           Column("forward s", "forward_s", ".1f", 10), Column("peak MiB (built)", "peak_built_mib", "", 17),
           Column("peak MiB", "peak_mib", "", 9), Column("note", "note", width=30, align="<")]


def _spawn(impl: str, tiles: int, dtype: str, original: Optional[str], timeout: int) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "longnet.bench.gigapath", "--point", f"{impl},{tiles},{dtype}"]
    if original:
        cmd += ["--original", original]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "tiles": tiles, "dtype": dtype, "note": f"over {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        last = (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]
        return {"impl": impl, "tiles": tiles, "dtype": dtype, "note": last[:60]}
    row = json.loads(lines[-1])
    row["note"] = "" if row.pop("finite") else "non-finite output"
    return row


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="GigaPath slide encoder: longnet.compat vs the original, CPU")
    ap.add_argument("--tiles", default="1000,10000,50000", help="comma-separated tile counts")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32, bf16, fp16, fp64")
    ap.add_argument("--original", default=None, help="prov-gigapath checkout: also run the original code")
    ap.add_argument("--original-max-tiles", type=int, default=50000, help="largest tile count for the original")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--csv", default=None, help="write the rows here")
    ap.add_argument("--plan", default=None,
                    help="explicit points in this order, e.g. longnet:50000:fp32,original:1000:bf16 "
                         "(instead of --tiles x --dtypes)")
    ap.add_argument("--interleave", default=None,
                    help="tiles:dtype[,...]: the original's and compat's encoders (same weights, no position "
                         "table) alternated in one process, for a fair time ratio and an output comparison")
    ap.add_argument("--repeats", type=int, default=3, help="calls of each encoder per --interleave point")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.interleave:
        if not args.original:
            ap.error("--interleave needs --original")
        for item in args.interleave.split(","):
            tiles, dtype = item.split(":")
            print(json.dumps(interleaved(args.original, int(tiles), dtype, args.repeats)), flush=True)
        return
    if args.point:
        impl, tiles, dtype = args.point.split(",")
        print(json.dumps(run_point(impl, int(tiles), dtype, args.original)), flush=True)
        return
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            ap.error(f"--dtypes must name dtypes of {sorted(DTYPES)}, got {name!r}")
    rows = []
    fields = ["impl", "tiles", "dtype", "build_s", "forward_s", "peak_built_mib", "peak_mib", "start_mib",
              "threads", "note"]
    for impl, tiles, dtype in _plan(args, ap):
        rows.append(_spawn(impl, tiles, dtype, args.original, args.timeout))
        print(format_table(rows[-1:], COLUMNS, header=len(rows) == 1), flush=True)
        if args.csv:  # after every point, so a long run that is stopped keeps what it measured
            write_csv(rows, args.csv, fieldnames=fields)


def _plan(args, ap) -> List[tuple]:
    """(impl, tiles, dtype) points: --plan as given, else every tile count x dtype (original where asked)."""
    if args.plan:
        points = []
        for item in args.plan.split(","):
            impl, tiles, dtype = item.split(":")
            if impl not in ("longnet", "original") or dtype not in DTYPES or (impl == "original" and not args.original):
                ap.error(f"--plan items must be longnet|original:TILES:DTYPE (original needs --original), got {item!r}")
            points.append((impl, int(tiles), dtype))
        return points
    return [(impl, tiles, dtype) for tiles in (int(t) for t in args.tiles.split(","))
            for dtype in args.dtypes.split(",")
            for impl in ["longnet"] + (["original"] if args.original and tiles <= args.original_max_tiles else [])]


if __name__ == "__main__":
    main()
