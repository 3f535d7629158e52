"""``longnet generate``: sample bytes from a checkpoint.

    longnet generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 300

The prompt is encoded as UTF-8 bytes; decoding uses the dilated key/value cache
(``--no-cache`` recomputes a full forward per token instead: same tokens, much slower).
Prints the prompt followed by the continuation, then the speed on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from ..argtypes import nonneg_int

__all__ = ["add_arguments", "run"]




def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a `longnet train --out` folder (its latest checkpoint) or a checkpoints/step_* folder")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (UTF-8)")
    src.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from a file")
    parser.add_argument("--max-new-tokens", type=nonneg_int, default=256, metavar="N",
                        help="bytes to generate (default 256)")
    parser.add_argument("--temperature", type=_temperature, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=nonneg_int, default=40,
                        help="sample from the k most likely bytes; 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--no-cache", action="store_true", help="full forward per token (for comparison)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_model
    from .evaluate import pick_device
    try:
        device = pick_device(args.device)
        if args.prompt_file is not None:
            try:
                with open(args.prompt_file, "rb") as f:
                    prompt_bytes = f.read()
            except OSError as e:
                raise ValueError(f"--prompt-file {args.prompt_file!r}: {e.strerror}") from None
        else:
            prompt_bytes = (args.prompt if args.prompt is not None else "\n").encode("utf-8")
        if not prompt_bytes:
            raise ValueError("the prompt is empty; pass --prompt TEXT with at least one character")
        model = load_model(args.checkpoint, map_location=device)
        vocab = model.config.vocab_size
        if max(prompt_bytes) >= vocab:
            raise ValueError(f"the prompt has byte values up to {max(prompt_bytes)}, outside this model's "
                             f"vocabulary of {vocab}")
    except (ValueError, TypeError, CheckpointError) as e:
        print(f"longnet generate: error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    prompt = torch.tensor(list(prompt_bytes), dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, use_cache=not args.no_cache)
    dt = time.perf_counter() - t0
    new = bytes(int(t) for t in out[len(prompt_bytes):].tolist() if int(t) < 256)
    sys.stdout.write((prompt_bytes + new).decode("utf-8", errors="replace"))
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[longnet] {args.max_new_tokens} bytes in {dt:.2f} s ({args.max_new_tokens / max(dt, 1e-9):.1f} bytes/s, "
          f"{'no cache' if args.no_cache else 'dilated KV cache'})", file=sys.stderr)
    return 0
