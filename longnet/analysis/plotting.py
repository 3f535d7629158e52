"""Drawings of patterns, count matrices and reach: matplotlib (Agg), PNGs of an exact pixel size."""


from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..fileio import atomic_savefig

from .counting import check_pattern, keep_masks

__all__ = ["plot_patterns", "plot_count_matrix", "plot_depth_matrix", "plot_depth_vs_n", "png_size"]


def _figure(size: Tuple[int, int]):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    return fig, plt


def _save(fig, path: str) -> str:
    """Write atomically at the figure's exact pixel size (no tight bbox, which would resize it)."""
    return atomic_savefig(fig, path, dpi=fig.dpi)


def png_size(path: str) -> Tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR header; ValueError if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _bin_mean(x: np.ndarray, bins: int) -> Tuple[np.ndarray, int]:
    """Mean over the last axis in chunks so at most ``bins`` remain; returns (values, chunk)."""
    n = x.shape[-1]
    b = max(1, -(-n // bins))
    nb = -(-n // b)
    pad = nb * b - n
    xf = x.astype(np.float64)
    s = np.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], nb, b).sum(-1)
    counts = np.full(nb, b, dtype=np.float64)
    counts[-1] = b - pad
    return s / counts, b


def plot_patterns(pattern, n: int, num_heads: int, path: str, *, size=(1200, 900),
                  max_pixels: int = 512, zoom: int = 256) -> str:
    """Each pattern's kept rows per head (rows: heads, columns: positions) and segment edges.

    Left column: the whole sequence, binned to at most ``max_pixels`` columns
    (a pixel's value is the fraction of its positions kept). Right column,
    when N > ``zoom``: positions 0..zoom-1, one pixel per position. The last
    row counts how many patterns keep each row; red marks rows kept by none.
    """
    pat = check_pattern(pattern)
    masks = keep_masks(pat, n, num_heads)  # (K, H, N)
    cover = masks.sum(0)                   # (H, N)
    fig, plt = _figure(size)
    zoomed = n > zoom
    ncols = 2 if zoomed else 1
    k = len(pat)
    axes = fig.subplots(k + 1, ncols, squeeze=False)
    import matplotlib.colors as mcolors
    cover_cmap = mcolors.ListedColormap(["#d62728"] + [plt.cm.Blues(x) for x in np.linspace(0.3, 1, k)])

    def draw(ax, img, lo, hi, w, binned, cmap, vmax, title):
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax,
                  extent=(lo - 0.5, hi - 0.5, num_heads - 0.5, -0.5))
        if w is not None:
            edges = np.arange((lo // w + 1) * w, hi, w)
            if edges.size <= 64:
                for e in edges:
                    ax.axvline(e - 0.5, color="orange", lw=0.8)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_ylabel("head", fontsize=7)

    _, b = _bin_mean(masks[0], max_pixels)
    for row in range(k + 1):
        for col in range(ncols):
            ax = axes[row, col]
            hi = n if col == 0 else zoom
            if row < k:
                w, r = pat.segment_lengths[row], pat.dilation_rates[row]
                m = masks[row][:, :hi]
                cmap, vmax = "Greys", 1
                title = f"pattern {row}: w={w}, r={r} (kept rows black, segment edges orange)"
            else:
                m, w, cmap, vmax = cover[:, :hi], None, cover_cmap, k
                title = "patterns keeping each row (red: kept by none)"
            if col == 0:
                img, bb = _bin_mean(m, max_pixels)
                if bb > 1:
                    title += f" [binned: {bb} positions/pixel]"
            else:
                img, bb = m.astype(np.float64), 1
                title += f" [zoom 0..{zoom - 1}]"
            draw(ax, img, 0, hi, w, bb > 1, cmap, vmax, title)
        axes[row, 0].set_xlabel("position" if row == k else "", fontsize=7)
    fig.suptitle(f"{pat}  N={n}  H={num_heads}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.06, hspace=0.9, wspace=0.12)
    return _save(fig, path)


def plot_count_matrix(c_blocks: np.ndarray, n: int, block: int, path: str, *, title: str,
                      size=(1200, 900), label: str = "C") -> str:
    """Draw block sums of C (nb, nb) as the mean C per entry of each tile (log colour scale).

    Rows are queries p, columns keys j, like ``C[p, j]``.
    """
    import matplotlib.colors as mcolors
    nb = c_blocks.shape[0]
    sizes = np.full(nb, block, dtype=np.float64)
    sizes[-1] = n - block * (nb - 1)
    mean = c_blocks / (sizes[:, None] * sizes[None, :])
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    pos = mean[mean > 0]
    vmin = pos.min() if pos.size else 1.0
    vmax = max(pos.max() if pos.size else 1.0, vmin * 1.0001)
    shown = np.ma.masked_where(mean <= 0, mean)
    if block > 1:
        # Block means span orders of magnitude (dense near-diagonal tiles, sparse far ones).
        cmap, norm = plt.get_cmap("viridis").copy(), mcolors.LogNorm(vmin=vmin, vmax=vmax)
    else:
        levels = int(round(vmax))
        cmap = plt.get_cmap("viridis", max(levels, 1)).copy()
        norm = mcolors.Normalize(vmin=0.5, vmax=levels + 0.5)
    cmap = cmap.with_extremes(bad="white")
    im = ax.imshow(shown, cmap=cmap, interpolation="nearest", norm=norm,
                   extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, label=(label + " (mean per entry of a block)") if block > 1 else label)
    if block == 1 and levels <= 20:
        cb.set_ticks(range(1, levels + 1))
    if block > 1:
        title += f"\ndownsampled: each pixel is a {block}x{block} block of (query, key) pairs"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position p")
    fig.subplots_adjust(left=0.08, right=0.95, top=0.9, bottom=0.08)
    return _save(fig, path)


def plot_depth_matrix(depth: np.ndarray, path: str, *, title: str, size=(1200, 900),
                      max_pixels: int = 512, causal: bool = False) -> str:
    """Draw layers-to-reach ``D[i, j]`` (target i, source j); grey = never connected.

    Downsampled by the max over tiles, so a tile shows its worst pair. When
    causal, pairs with j > i are not pairs at all and stay white.
    """
    n = depth.shape[0]
    b = max(1, -(-n // max_pixels))
    nb = -(-n // b)
    d = np.full((nb * b, nb * b), -2, dtype=np.int32)  # -2: padding / not a pair
    d[:n, :n] = depth
    if causal:
        d[:n, :n][np.triu(np.ones((n, n), dtype=bool), k=1)] = -2
    tiles = d.reshape(nb, b, nb, b)
    never = (tiles == -1).any(axis=(1, 3))
    worst = tiles.max(axis=(1, 3)).astype(np.float64)  # -2 (below vmin, white) for non-pairs only
    top = max(int(depth.max()), 1)
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    cmap = plt.get_cmap("magma_r", top + 1).with_extremes(bad="lightgrey", under="white")
    im = ax.imshow(np.ma.masked_where(never, worst), cmap=cmap, vmin=-0.5, vmax=top + 0.5,
                   interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, label="layers for j to reach i")
    if top <= 20:
        cb.set_ticks(range(0, top + 1))
    if b > 1:
        title += f"\ndownsampled: each pixel is the worst pair of a {b}x{b} block"
    ax.set_title(title + "  (grey: never connected)", fontsize=10)
    ax.set_xlabel("source token j")
    ax.set_ylabel("target token i")
    fig.subplots_adjust(left=0.08, right=0.95, top=0.9, bottom=0.08)
    return _save(fig, path)


def plot_depth_vs_n(curves: Dict[str, list], path: str, *, title: str, size=(1200, 900)) -> str:
    """Max depth against N (log2 axis) for each curve of :func:`reach.depth_vs_n` rows,
    plus the paper's estimate; hollow markers mean some pairs are never connected."""
    fig, plt = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    est = None
    for label, rows in curves.items():
        ns = [r["n"] for r in rows]
        ds = [r["max_depth"] if r["max_depth"] is not None else np.nan for r in rows]
        line, = ax.plot(ns, ds, "-", label=label)
        full = [r["never_connected"] == 0 for r in rows]
        ax.plot([x for x, f in zip(ns, full) if f], [y for y, f in zip(ds, full) if f], "o",
                color=line.get_color())
        if not all(full):
            ax.plot([x for x, f in zip(ns, full) if not f], [y for y, f in zip(ds, full) if not f], "o",
                    mfc="none", color=line.get_color(), label=label + ": some pairs never connected")
        est = rows
    if est:
        ax.plot([r["n"] for r in est], [r["paper_estimate"] for r in est], "k--",
                label="paper estimate log_a(N(a-1)/w0)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (largest segment = N)")
    ax.set_ylabel("max layers over all token pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.92, bottom=0.08)
    return _save(fig, path)
