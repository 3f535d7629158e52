"""``longnet eval``: bits-per-byte of a checkpoint, and loss against prompt length.

    longnet eval --checkpoint runs/tiny [--data SPEC] [--split valid|test] [--context N]
                 [--max-windows K] [--prompt-lengths 128,256,512,1024] [--no-progress]

Bits-per-byte is the mean next-byte cross-entropy in bits over non-overlapping windows
of ``--context`` bytes (every byte after a window's first is predicted once);
perplexity is ``2 ** bpb`` per byte. ``--prompt-lengths`` reproduces the paper's
long-context prompting experiment: the loss of a fixed suffix (``--suffix-length``
bytes) given prefixes of growing length before it, averaged over ``--max-windows``
places in the split. A progress bar (stderr) follows the windows.

``--position-loss`` measures the causal blind spot of docs/design.md §2.1 instead: the mean loss
at each query position over ``--max-windows`` (default 128) random windows, grouped by
the position's residue modulo the smallest segment length; the boundary spike is the
worst group's mean over the median group's (1.0: no boundary effect)::

    longnet eval --checkpoint runs/tiny --position-loss --context 512 --position-png pos.png

:func:`next_token_loss` is the one place where a loss is computed: training, every
evaluation here and the evaluation on a device mesh call it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..argtypes import (
    int_at_least,
    nonneg_int,
    output_file,
    positive_int,
    positive_int_list,
)
from ..checks import check_int
from ..device import autocast_context, check_precision, pick_device
from .context import TrainContext

__all__ = ["next_token_loss", "mean_loss", "loss_stats", "evaluate_lm", "evaluate_passkey",
           "prompt_length_curve", "add_arguments", "run", "weighted_loss", "position_loss", "BoundarySpike", "boundary_spike",
           "passkey_by_distance", "position_loss_panels"]

LN2 = math.log(2.0)


def next_token_loss(model, x: Tensor, y: Tensor, *, precision: str = "auto", first: int = 0,
                    reduction: str = "mean") -> Tuple[Tensor, Tensor]:
    """Cross-entropy of ``model``'s predictions of y from x, both (B, N) token ids.

    Only positions ``first`` .. N-1 are scored. Returns (loss, logits (B, N - first, V) in
    float32); the forward runs under :func:`autocast_context` of x's device.
    """
    with autocast_context(x.device, precision):
        logits = model(x)
    logits = logits[:, first:].float()
    loss = F.cross_entropy(logits.flatten(0, 1), y[:, first:].flatten(), reduction=reduction)
    return loss, logits


def loss_stats(total_nats: float, tokens: float) -> Dict[str, float]:
    """``loss`` (nats/token), ``bpb`` (bits/token), ``ppl`` (per token) and ``tokens`` of a summed loss."""
    loss = total_nats / tokens
    return {"loss": loss, "bpb": loss / LN2, "ppl": math.exp(loss), "tokens": int(tokens)}


@torch.no_grad()
def mean_loss(model, batches: Iterable[Tuple[Tensor, ...]], *, device, precision: str = "auto", first: int = 0,
              all_reduce_sum: Optional[Callable] = None,
              on_logits: Optional[Callable] = None, progress: bool = False, total: Optional[int] = None,
              desc: str = "eval") -> Dict[str, float]:
    """Mean next-token loss of ``model`` (in eval mode) over ``batches`` of (x, y, ...) tensors.

    Each batch is moved to ``device`` and scored by :func:`next_token_loss`; ``on_logits(logits,
    batch)`` sees every batch's logits. The sums go through ``all_reduce_sum`` when given (a
    mesh's), so every rank returns the same :func:`loss_stats`. ``progress`` shows a bar of ``total`` batches.
    """
    was_training = model.training
    model.eval()
    nats = count = 0.0
    try:
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress,
                          dynamic_ncols=True, mininterval=0.5):
            batch = tuple(t.to(device) for t in batch)
            loss, logits = next_token_loss(model, batch[0], batch[1], precision=precision, first=first,
                                           reduction="sum")
            nats += float(loss)
            count += batch[1][:, first:].numel()
            if on_logits is not None:
                on_logits(logits, batch)
    finally:
        model.train(was_training)
    if all_reduce_sum is not None:
        nats, count = all_reduce_sum([nats, count])
    return loss_stats(nats, count)


def _device_of(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def evaluate_lm(model, data: np.ndarray, seq_len: int, *, max_windows: Optional[int] = None,
                batch_size: int = 8, device=None, precision: str = "auto", ctx: Optional[TrainContext] = None,
                progress: bool = False) -> Dict[str, float]:
    """Mean next-token loss over the deterministic windows of ``data`` (:func:`iter_eval_windows`).

    With a mesh ``ctx`` each rank scores its share and every rank returns the same numbers.
    Returns ``loss`` (nats/token), ``bpb`` (bits/token), ``ppl`` (per token), ``tokens``, ``windows``.
    """
    from .data import iter_eval_windows, num_eval_windows
    ctx = ctx if ctx is not None else TrainContext(_device_of(model, device))
    windows = num_eval_windows(int(data.size), seq_len, max_windows=max_windows)
    batches = iter_eval_windows(data, seq_len, batch_size=batch_size, max_windows=max_windows)
    res = mean_loss(model, ctx.eval_shards(batches), device=ctx.device, precision=precision,
                    all_reduce_sum=ctx.all_reduce_sum, progress=progress, total=-(-windows // batch_size),
                    desc="windows")
    res["windows"] = windows
    return res


def evaluate_passkey(model, task, num_sequences: int, *, batch_size: int = 8, seed: int = 1234, device=None,
                     precision: str = "auto", progress: bool = False) -> Dict[str, float]:
    """Loss and retrieval accuracy on ``num_sequences`` fixed passkey sequences (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    sizes = _batch_sizes(num_sequences, batch_size)
    hits = [0.0, 0.0]  # sequences all right, digits right (each weighted by batch rows)

    def score(logits: Tensor, batch: Tuple[Tensor, ...]) -> None:
        _, y, mask = batch
        hits[0] += task.accuracy(logits, y, mask) * y.shape[0]
        hits[1] += task.digit_accuracy(logits, y, mask) * y.shape[0]

    res = mean_loss(model, (task.batch(b, rng) for b in sizes), device=_device_of(model, device),
                    precision=precision, on_logits=score, progress=progress, total=len(sizes), desc="sequences")
    res.update(accuracy=hits[0] / num_sequences, digit_accuracy=hits[1] / num_sequences, sequences=num_sequences)
    return res


def prompt_length_curve(model, data: np.ndarray, prompt_lengths: Sequence[int], *, suffix_length: int = 128,
                        num_windows: int = 8, batch_size: int = 8, device=None, precision: str = "auto",
                        progress: bool = False) -> List[Dict[str, float]]:
    """Loss of the same suffixes given prefixes of each length in ``prompt_lengths``.

    Picks ``num_windows`` evenly spaced suffix starts t (each with at least max(prompt_lengths)
    bytes before it). The suffix is the S bytes ``data[t : t + S]``; for a prefix length L the
    model reads ``data[t - L : t + S - 1]`` and only its predictions of the suffix are scored.
    Returns one dict per L: ``prompt_length``, ``loss`` (nats/byte), ``bpb``.
    """
    lengths = sorted(set(int(n) for n in prompt_lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"prompt lengths must be positive integers, got {list(prompt_lengths)}")
    longest = lengths[-1]
    room = int(data.size) - longest - suffix_length
    if room < 1:
        raise ValueError(f"the split has {data.size:,} bytes, too few for prompt length {longest} plus a "
                         f"{suffix_length}-byte suffix; use shorter --prompt-lengths")
    num_windows = max(1, min(num_windows, room))
    starts = longest + (np.arange(num_windows, dtype=np.int64) * room) // num_windows

    def windows(L: int):
        for i in range(0, num_windows, batch_size):
            # Input bytes t-L .. t+S-2 predict targets t-L+1 .. t+S-1; the last S are the suffix.
            idx = (starts[i:i + batch_size] - L)[:, None] + np.arange(L + suffix_length, dtype=np.int64)[None, :]
            w = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))
            yield w[:, :-1], w[:, 1:]

    rows = []
    for L in lengths:
        res = mean_loss(model, windows(L), device=_device_of(model, device), precision=precision, first=L - 1,
                        progress=progress, total=-(-num_windows // batch_size), desc=f"prompt {L}")
        rows.append({"prompt_length": L, "loss": res["loss"], "bpb": res["bpb"]})
    return rows


def weighted_loss(per_token: Tensor, weights: Tensor) -> Tensor:
    """``mean(weights * per_token)``: per_token (B, N) losses, weights (N,) or (B, N).

    The weights are scaled by the caller to mean 1 over a whole sequence
    (:meth:`longnet.training.data.PasskeyTask.loss_weights`), so this is the weighted mean
    loss, and the mean over equal shards of a sequence is the whole sequence's.
    """
    if per_token.dim() != 2 or weights.shape not in (per_token.shape[1:], per_token.shape):
        raise ValueError(f"expected per_token (B, N) and weights (N,) or (B, N); got {tuple(per_token.shape)} "
                         f"and {tuple(weights.shape)}")
    return (per_token * weights.to(per_token.dtype)).mean()


def _batch_sizes(total: int, batch_size: int) -> List[int]:
    """``total`` items in batches of ``batch_size`` (the last one may be smaller)."""
    return [min(batch_size, total - i) for i in range(0, total, batch_size)]


def position_loss(model, data: np.ndarray, seq_len: int, *, num_windows: int = 128, seed: int = 0,
                  batch_size: int = 8, device=None, precision: str = "auto", progress: bool = False) -> np.ndarray:
    """Mean next-token loss (nats) at each query position over ``num_windows`` random windows.

    Windows of seq_len + 1 bytes start at offsets drawn like training batches
    (:class:`~longnet.training.data.RandomWindowSampler` with ``seed``), so the same seed
    gives the same windows for every model. Query position p reads x[0..p] and predicts
    y[p]. Returns float64 (seq_len,).
    """
    from .data import RandomWindowSampler
    check_int("num_windows", num_windows)
    sampler = RandomWindowSampler(data, batch_size, seq_len, seed=seed)
    sizes = _batch_sizes(num_windows, batch_size)
    total = torch.zeros(seq_len, dtype=torch.float64)

    def add(logits: Tensor, batch: Tuple[Tensor, ...]) -> None:  # logits (B, N, V), y (B, N)
        y = batch[1]
        nats = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, N)
        total.add_(nats.sum(0).double().cpu())

    batches = (tuple(t[:b] for t in sampler.next_batch()) for b in sizes)
    mean_loss(model, batches, device=_device_of(model, device), precision=precision, on_logits=add,
              progress=progress, total=len(sizes), desc="windows")
    return (total / num_windows).numpy()


@dataclass(frozen=True)
class BoundarySpike:
    """Loss by residue of the query position: ``group_means[g]`` is the mean loss of positions
    p >= ``skip`` with p % ``period`` == g; ``spike`` = worst group's mean / the median group's."""

    spike: float
    period: int
    skip: int
    median: float
    group_means: np.ndarray  # (period,)

    def worst(self, k: int = 3) -> List[Tuple[int, float]]:
        """The k residues with the highest mean loss, as (residue, mean / median), worst first."""
        order = np.argsort(-self.group_means, kind="stable")[:k]
        return [(int(g), float(self.group_means[g] / self.median)) for g in order]


def boundary_spike(losses, period: int, *, skip: Optional[int] = None) -> BoundarySpike:
    """Group query positions by their residue modulo ``period`` (the smallest segment length);
    spike = the worst group's mean loss over the median group's (1.0: no boundary effect).

    ``losses`` (N,): mean loss per query position (:func:`position_loss`). Positions below
    ``skip`` (default ``period``: the first segment) are left out: they have little context
    whatever the pattern, and would inflate residues 0, 1, 2, ... The rest must hold every
    residue at least once.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or not np.isfinite(losses).all():
        raise ValueError(f"losses must be a 1-D array of finite numbers, got shape {losses.shape}")
    check_int("period", period, minimum=2)
    skip = int(period if skip is None else skip)
    if skip < 0 or losses.size - skip < period:
        raise ValueError(f"{losses.size} positions minus skip={skip} leave fewer than one full period of {period}; "
                         "use longer windows or a smaller skip")
    pos = np.arange(skip, losses.size)
    sums = np.bincount(pos % period, weights=losses[skip:], minlength=period)
    means = sums / np.bincount(pos % period, minlength=period)
    median = float(np.median(means))
    if median <= 0:
        raise ValueError(f"the median group's mean loss is {median}; a spike needs positive losses")
    return BoundarySpike(float(means.max() / median), int(period), skip, median, means)


def passkey_by_distance(model, seq_len: int, distances: Sequence[int], *, num_sequences: int = 64,
                        key_digits: int = 5, batch_size: int = 8, seed: int = 1234, device=None,
                        precision: str = "auto", progress: bool = False) -> List[Dict[str, float]]:
    """Passkey retrieval at each distance: ``num_sequences`` sequences of ``seq_len`` per distance.

    Returns one dict per distance: ``distance``, ``accuracy`` (whole key right), ``digit_accuracy``
    (chance 0.1), ``loss`` (nats/byte over the sequence).
    """
    from .data import PasskeyTask
    rows = []
    for d in distances:
        task = PasskeyTask(seq_len, int(d), key_digits=key_digits)
        res = evaluate_passkey(model, task, num_sequences, batch_size=batch_size, seed=seed, device=device,
                               precision=precision, progress=progress)
        rows.append({"distance": int(d), "accuracy": res["accuracy"], "digit_accuracy": res["digit_accuracy"],
                     "loss": res["loss"]})
    return rows


def position_loss_panels(curves: Dict[str, Tuple[np.ndarray, BoundarySpike]], smooth: int = 1) -> list:
    """Two plot panels (:class:`longnet.report.Panel`) for models' position losses:
    loss against query position (moving mean over ``smooth`` positions; log x), and each
    group's mean loss over the median group's against the residue (the boundary spikes)."""
    from ..report import Panel, Series
    by_pos = Panel("loss against position in the window", "bytes read (query position + 1)", "loss (nats/byte)",
                   xscale=("log", {}))
    by_res = Panel("loss by position modulo the period", "position mod period", "group mean / median")
    for label, (losses, spike) in curves.items():
        k = max(1, min(int(smooth), losses.size))
        curve = np.convolve(losses, np.ones(k) / k, mode="valid")
        by_pos.series.append(Series(label, np.arange(curve.size) + (k + 1) / 2, curve, "-"))
        by_res.series.append(Series(f"{label} (mod {spike.period}, spike {spike.spike:.2f})",
                                    np.arange(spike.period), spike.group_means / spike.median, "-"))
    return [by_pos, by_res]


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a `longnet train --out` folder (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="builtin, enwik8:PATH, text:PATH or passkey (default: the data it was trained on)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"), help="which split (default valid)")
    parser.add_argument("--context", type=positive_int, default=None, metavar="N",
                        help="window length in bytes (default: the training seq_len)")
    parser.add_argument("--max-windows", type=positive_int, default=None, metavar="K",
                        help="evaluate at most K windows (default: the whole split; passkey: 256 sequences)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    parser.add_argument("--prompt-lengths", type=positive_int_list, default=None, metavar="L1,L2,...",
                        help="also print the loss of a fixed suffix given prefixes of these lengths")
    parser.add_argument("--suffix-length", type=positive_int, default=128, metavar="S",
                        help="suffix length for --prompt-lengths (default 128)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--cache-dir", default=None, help="data cache folder (default $LONGNET_CACHE or ~/.cache/longnet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--position-loss", action="store_true",
                        help="instead of bits-per-byte: the mean loss at each query position over --max-windows "
                             "random windows (default 128) of --context bytes, and the boundary spike (the worst "
                             "residue's mean loss over the median residue's, positions modulo --period)")
    parser.add_argument("--period", type=int_at_least(2), default=None, metavar="P",
                        help="with --position-loss: group positions modulo P (default: the smallest segment length)")
    parser.add_argument("--seed", type=nonneg_int, default=0,
                        help="with --position-loss: seed of the windows (default 0)")
    parser.add_argument("--position-csv", type=output_file, default=None, metavar="FILE",
                        help="with --position-loss: write position, loss, residue rows to this CSV")
    parser.add_argument("--position-png", type=output_file, default=None, metavar="FILE",
                        help="with --position-loss: plot loss against position and by residue to this PNG")


def _load(args: argparse.Namespace) -> Dict:
    """Everything ``run`` needs, checked before any evaluation starts (raises ValueError)."""
    from ..config import xpos_max_length
    from .checkpoint import load_checkpoint, load_model
    from .data import PasskeyTask, open_corpus
    device = pick_device(args.device)
    info = load_checkpoint(args.checkpoint)
    mcfg, tcfg = info["model_config"], info["train_config"]
    spec = args.data if args.data is not None else (info["data"] or "builtin")
    context = args.context or tcfg.seq_len
    limit = xpos_max_length(mcfg.xpos_scale_base) if mcfg.xpos else None
    if limit is not None and context > limit:
        raise ValueError(f"--context {context} is too long for this model's XPOS (at most {limit})")
    if limit is not None and args.prompt_lengths and max(args.prompt_lengths) + args.suffix_length > limit:
        raise ValueError(f"--prompt-lengths plus --suffix-length exceed this model's XPOS limit of {limit} bytes")
    check_precision(device, tcfg.precision)
    out = {"device": device, "info": info, "precision": tcfg.precision, "spec": spec, "context": context,
           "model": load_model(info["dir"], map_location=device)}
    if spec == "passkey":
        out["task"] = PasskeyTask(context, tcfg.passkey_distance or None, key_digits=tcfg.passkey_digits,
                                  seed=tcfg.seed)
        return out
    out["data"] = open_corpus(spec, cache_dir=args.cache_dir).split(args.split)
    if out["data"].size < context + 1:
        raise ValueError(f"the {args.split} split has {out['data'].size:,} bytes, fewer than --context + 1 = "
                         f"{context + 1}; use a smaller --context")
    return out


def _report(args: argparse.Namespace, job: Dict) -> None:
    model, device, precision, context = job["model"], job["device"], job["precision"], job["context"]
    progress = not args.no_progress
    t0 = time.perf_counter()
    if "task" in job:
        res = evaluate_passkey(model, job["task"], args.max_windows or 256, batch_size=args.batch_size,
                               device=device, precision=precision, progress=progress)
        print(f"passkey (seq_len {context}, distance {job['task'].distance or 'random'}): accuracy "
              f"{res['accuracy']:.3f}, digit accuracy {res['digit_accuracy']:.3f}, loss {res['loss']:.4f} nats/byte, "
              f"bpb {res['bpb']:.4f} over {res['sequences']} sequences ({time.perf_counter() - t0:.1f} s)")
        return
    res = evaluate_lm(model, job["data"], context, max_windows=args.max_windows, batch_size=args.batch_size,
                      device=device, precision=precision, progress=progress)
    print(f"{job['spec']} {args.split}: bpb {res['bpb']:.4f}, perplexity {res['ppl']:.3f} per byte, "
          f"loss {res['loss']:.4f} nats/byte over {res['tokens']:,} bytes ({res['windows']} windows of {context}; "
          f"{time.perf_counter() - t0:.1f} s)")
    if args.prompt_lengths:
        rows = prompt_length_curve(model, job["data"], args.prompt_lengths, suffix_length=args.suffix_length,
                                   num_windows=args.max_windows or 8, batch_size=args.batch_size, device=device,
                                   precision=precision, progress=progress)
        print(f"loss of a fixed {args.suffix_length}-byte suffix against prompt length:")
        print(f"  {'prompt':>8}  {'loss':>8}  {'bpb':>7}")
        for r in rows:
            print(f"  {r['prompt_length']:>8}  {r['loss']:>8.4f}  {r['bpb']:>7.4f}")


def _check_position_args(args: argparse.Namespace, job: Dict) -> None:
    """Settings of --position-loss against the checkpoint (raises ValueError before any work)."""
    if "task" in job:
        raise ValueError("--position-loss needs a corpus, not the passkey task; pass --data builtin (or another "
                         "corpus)")
    period = args.period or min(job["model"].config.segment_lengths)
    if period < 2 or job["context"] < 2 * period:
        raise ValueError(f"--position-loss groups positions after the first segment by residue modulo {period}: "
                         f"--context ({job['context']}) must be at least twice that (pass a larger --context or "
                         "a smaller --period >= 2)")
    job["period"] = period


def _report_positions(args: argparse.Namespace, job: Dict) -> None:
    """--position-loss: print the boundary spike and the worst residues; write the CSV/PNG asked for."""
    windows, context = args.max_windows or 128, job["context"]
    losses = position_loss(job["model"], job["data"], context, num_windows=windows, seed=args.seed,
                           batch_size=args.batch_size, device=job["device"], precision=job["precision"],
                           progress=not args.no_progress)
    spike = boundary_spike(losses, job["period"])
    print(f"{job['spec']} {args.split}: mean loss {losses.mean():.4f} nats/byte at each of {context} query positions "
          f"over {windows} random windows (seed {args.seed})")
    print(f"boundary spike (positions >= {spike.skip} by residue mod {spike.period}): {spike.spike:.3f}; worst "
          "residues: " + ", ".join(f"{g} ({r:.3f}x median)" for g, r in spike.worst(5)))
    if args.position_csv:
        from ..report import write_csv
        write_csv([{"position": p, "loss": float(v), "residue": p % spike.period} for p, v in enumerate(losses)],
                  args.position_csv)
        print(f"per-position losses: {args.position_csv}")
    if args.position_png:
        from ..report import plot_panels
        label = f"step {job['info']['step']}"
        plot_panels(position_loss_panels({label: (losses, spike)}, smooth=max(1, spike.period // 16)),
                    args.position_png, f"{job['info']['dir']}: loss by query position ({windows} windows of {context})")
        print(f"plot: {args.position_png}")


def run(args: argparse.Namespace) -> int:
    try:
        job = _load(args)
        if args.position_loss:
            _check_position_args(args, job)
    except (ValueError, TypeError) as e:  # CheckpointError and LongNetDataError are ValueErrors
        print(f"longnet eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    info = job["info"]
    print(f"checkpoint {info['dir']} (step {info['step']}, {job['model'].num_parameters():,} parameters)")
    try:
        (_report_positions if args.position_loss else _report)(args, job)
    except KeyboardInterrupt:
        print("\nlongnet eval: interrupted", file=sys.stderr)
        return 130
    return 0
