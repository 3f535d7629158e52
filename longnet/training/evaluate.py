"""``longnet eval``: bits-per-byte of a checkpoint, and loss against prompt length.

    longnet eval --checkpoint runs/tiny [--data SPEC] [--split valid|test] [--context N]
                 [--max-windows K] [--prompt-lengths 128,256,512,1024]

Bits-per-byte is the mean next-byte cross-entropy in bits over non-overlapping windows
of ``--context`` bytes (every byte after a window's first is predicted once);
perplexity is ``2 ** bpb`` per byte. ``--prompt-lengths`` reproduces the paper's
long-context prompting experiment: the loss of a fixed suffix (``--suffix-length``
bytes) given prefixes of growing length before it, averaged over ``--max-windows``
places in the split.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ..argtypes import positive_int, positive_int_list

__all__ = ["evaluate_lm", "evaluate_passkey", "prompt_length_curve", "add_arguments", "run",
           "autocast_context", "pick_device"]

LN2 = math.log(2.0)


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; anything else must be a valid torch device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return dev


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA for precision "auto"/"bf16", on CPU for "bf16"; else nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_lm(model, data: np.ndarray, seq_len: int, *, max_windows: Optional[int] = None,
                batch_size: int = 8, device=None, precision: str = "auto") -> Dict[str, float]:
    """Mean next-token loss over the deterministic windows of ``data``.

    Returns ``loss`` (nats/token), ``bpb`` (bits/token), ``ppl`` (per token), ``tokens``, ``windows``.
    """
    from .data import iter_eval_windows
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, windows = 0.0, 0, 0
    try:
        for x, y in iter_eval_windows(data, seq_len, batch_size=batch_size, max_windows=max_windows):
            x, y = x.to(device), y.to(device)
            with autocast_context(torch.device(device), precision):
                logits = model(x)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
            windows += x.shape[0]
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / LN2, "ppl": math.exp(loss), "tokens": count, "windows": windows}


@torch.no_grad()
def evaluate_passkey(model, task, num_sequences: int, *, batch_size: int = 8, seed: int = 1234, device=None,
                     precision: str = "auto") -> Dict[str, float]:
    """Loss and retrieval accuracy on ``num_sequences`` fixed passkey sequences (drawn with ``seed``)."""
    device = device or next(model.parameters()).device
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    total = count = 0.0
    hits = digits = 0.0
    seqs = 0
    try:
        while seqs < num_sequences:
            b = min(batch_size, num_sequences - seqs)
            x, y, mask = task.batch(b, rng)
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with autocast_context(torch.device(device), precision):
                logits = model(x)
            logits = logits.float()
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
            hits += task.accuracy(logits, y, mask) * b
            digits += task.digit_accuracy(logits, y, mask) * b
            seqs += b
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / LN2, "ppl": math.exp(loss), "accuracy": hits / seqs,
            "digit_accuracy": digits / seqs, "sequences": seqs}


@torch.no_grad()
def prompt_length_curve(model, data: np.ndarray, prompt_lengths: Sequence[int], *, suffix_length: int = 128,
                        num_windows: int = 8, batch_size: int = 8, device=None,
                        precision: str = "auto") -> List[Dict[str, float]]:
    """Loss of the same suffixes given prefixes of each length in ``prompt_lengths``.

    Picks ``num_windows`` evenly spaced suffix starts t (each with at least max(prompt_lengths)
    bytes before it). The suffix is the S bytes ``data[t : t + S]``; for a prefix length L the
    model reads ``data[t - L : t + S - 1]`` and only its predictions of the suffix are scored.
    Returns one dict per L: ``prompt_length``, ``loss`` (nats/byte), ``bpb``.
    """
    device = device or next(model.parameters()).device
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
    was_training = model.training
    model.eval()
    rows = []
    try:
        for L in lengths:
            total, count = 0.0, 0
            for i in range(0, num_windows, batch_size):
                t = starts[i:i + batch_size]
                # Input bytes t-L .. t+S-2 predict targets t-L+1 .. t+S-1; score the last S (the suffix).
                idx = (t - L)[:, None] + np.arange(L + suffix_length, dtype=np.int64)[None, :]
                w = torch.from_numpy(np.asarray(data[idx], dtype=np.int64)).to(device)
                x, y = w[:, :-1], w[:, 1:]
                with autocast_context(torch.device(device), precision):
                    logits = model(x)
                logits = logits[:, L - 1:].float()
                tgt = y[:, L - 1:]
                total += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
                count += tgt.numel()
            loss = total / count
            rows.append({"prompt_length": L, "loss": loss, "bpb": loss / LN2})
    finally:
        model.train(was_training)
    return rows


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


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_checkpoint, load_model
    from ..config import xpos_max_length
    from .data import LongNetDataError, PasskeyTask, open_corpus
    try:
        device = pick_device(args.device)
        info = load_checkpoint(args.checkpoint)
        mcfg, tcfg = info["model_config"], info["train_config"]
        spec = args.data if args.data is not None else (info["data"] or "builtin")
        context = args.context or tcfg.seq_len
        if mcfg.xpos and context > xpos_max_length(mcfg.xpos_scale_base):
            raise ValueError(f"--context {context} is too long for this model's XPOS "
                             f"(at most {xpos_max_length(mcfg.xpos_scale_base)})")
        if args.prompt_lengths and mcfg.xpos and \
                max(args.prompt_lengths) + args.suffix_length > xpos_max_length(mcfg.xpos_scale_base):
            raise ValueError("--prompt-lengths plus --suffix-length exceed this model's XPOS limit of "
                             f"{xpos_max_length(mcfg.xpos_scale_base)} bytes")
        model = load_model(info["dir"], map_location=device)
        if spec == "passkey":
            task = PasskeyTask(context, tcfg.passkey_distance or None, key_digits=tcfg.passkey_digits,
                               seed=tcfg.seed)
            corpus = None
        else:
            corpus = open_corpus(spec, cache_dir=args.cache_dir)
            data = corpus.split(args.split)
            if data.size < context + 1:
                raise ValueError(f"the {args.split} split has {data.size:,} bytes, fewer than --context + 1 = "
                                 f"{context + 1}; use a smaller --context")
    except (ValueError, TypeError, CheckpointError, LongNetDataError) as e:
        print(f"longnet eval: error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint {info['dir']} (step {info['step']}, {model.num_parameters():,} parameters)")
    t0 = time.perf_counter()
    if corpus is None:
        n = args.max_windows or 256
        res = evaluate_passkey(model, task, n, batch_size=args.batch_size, device=device,
                               precision=tcfg.precision)
        print(f"passkey (seq_len {context}, distance {task.distance or 'random'}): accuracy {res['accuracy']:.3f}, "
              f"digit accuracy {res['digit_accuracy']:.3f}, loss {res['loss']:.4f} nats/byte, "
              f"bpb {res['bpb']:.4f} over {res['sequences']} sequences ({time.perf_counter() - t0:.1f} s)")
        return 0
    res = evaluate_lm(model, data, context, max_windows=args.max_windows, batch_size=args.batch_size,
                      device=device, precision=tcfg.precision)
    print(f"{spec} {args.split}: bpb {res['bpb']:.4f}, perplexity {res['ppl']:.3f} per byte, "
          f"loss {res['loss']:.4f} nats/byte over {res['tokens']:,} bytes ({res['windows']} windows of {context}; "
          f"{time.perf_counter() - t0:.1f} s)")
    if args.prompt_lengths:
        rows = prompt_length_curve(model, data, args.prompt_lengths, suffix_length=args.suffix_length,
                                   num_windows=args.max_windows or 8, batch_size=args.batch_size, device=device,
                                   precision=tcfg.precision)
        print(f"loss of a fixed {args.suffix_length}-byte suffix against prompt length:")
        print(f"  {'prompt':>8}  {'loss':>8}  {'bpb':>7}")
        for r in rows:
            print(f"  {r['prompt_length']:>8}  {r['loss']:>8.4f}  {r['bpb']:>7.4f}")
    return 0
