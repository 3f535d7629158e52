"""``longnet generate``: sample bytes from a checkpoint.

    longnet generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 300

The prompt is encoded as UTF-8 bytes; decoding uses the dilated key/value cache
(``--no-cache`` recomputes a full forward per token instead: same tokens, much slower).
Prints the prompt, then the continuation byte by byte as it is sampled (flushed), then
the speed on stderr. Ctrl-C stops generating and keeps what was printed: the command
ends the line, says how many bytes it generated, and exits with 130.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import sys
import time
from typing import Iterator, TextIO, Tuple

import torch
from torch import Tensor

from ..argtypes import nonneg_int

__all__ = ["add_arguments", "run", "write_stream"]

# The conventional exit status of a program stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


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


def _read_prompt(args: argparse.Namespace) -> bytes:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                prompt_bytes = f.read()
        except OSError as e:
            raise ValueError(f"--prompt-file {args.prompt_file!r}: {e.strerror}") from None
    else:
        prompt_bytes = (args.prompt if args.prompt is not None else "\n").encode(
        "utf-8", "surrogateescape")  # argv bytes that are not UTF-8 come back as they were given
    if not prompt_bytes:
        raise ValueError("the prompt is empty; pass --prompt TEXT with at least one character")
    return prompt_bytes


def _start(args: argparse.Namespace) -> Tuple[bytes, Iterator[Tensor]]:
    """Load the model and check everything; returns (prompt bytes, the stream of new tokens)."""
    from ..device import pick_device
    from .checkpoint import load_model
    device = pick_device(args.device)
    prompt_bytes = _read_prompt(args)
    model = load_model(args.checkpoint, map_location=device)
    vocab = model.config.vocab_size
    if max(prompt_bytes) >= vocab:
        raise ValueError(f"the prompt has byte values up to {max(prompt_bytes)}, outside this model's "
                         f"vocabulary of {vocab}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    prompt = torch.tensor(list(prompt_bytes), dtype=torch.long, device=device)
    # stream() checks its arguments (the XPOS length limit included) before it returns.
    stream = model.stream(prompt, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k or None, use_cache=not args.no_cache)
    return prompt_bytes, stream


def write_stream(prompt: bytes, stream: Iterator[Tensor], out: TextIO) -> Tuple[int, bool]:
    """Write the prompt, then each new byte as it comes (flushed); returns (new tokens, interrupted).

    Bytes are decoded as UTF-8 incrementally (a character split across tokens is printed
    once whole; invalid bytes become U+FFFD); token ids past 255 are not bytes and are
    skipped. Ctrl-C (KeyboardInterrupt) stops the stream and keeps what was written.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(decoder.decode(prompt))
    out.flush()
    count, interrupted = 0, False
    try:
        with contextlib.closing(stream):
            for tok in stream:
                count += 1
                t = int(tok)
                if t < 256:
                    out.write(decoder.decode(bytes((t,))))
                    out.flush()
    except KeyboardInterrupt:
        interrupted = True
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    return count, interrupted


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    try:
        prompt_bytes, stream = _start(args)
    except (ValueError, TypeError, CheckpointError) as e:
        print(f"longnet generate: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    count, interrupted = write_stream(prompt_bytes, stream, sys.stdout)
    dt = time.perf_counter() - t0
    if interrupted:
        print(f"[longnet] interrupted: kept the {count} of {args.max_new_tokens} bytes generated so far "
              "(printed above)", file=sys.stderr)
    print(f"[longnet] {count} bytes in {dt:.2f} s ({count / max(dt, 1e-9):.1f} bytes/s, "
          f"{'no cache' if args.no_cache else 'dilated KV cache'})", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0
