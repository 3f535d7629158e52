"""``longnet generate``: sample bytes from a checkpoint.

    longnet generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 300

The prompt is encoded as UTF-8 bytes; decoding uses the dilated key/value cache
(``--no-cache`` recomputes a full forward per token instead: same tokens, much slower).
Prints the prompt, then the continuation byte by byte as it is sampled (flushed), then
the speed on stderr. Ctrl-C stops generating and keeps what was printed: the command
ends the line, says how many bytes it generated, and exits with 130.

``--prompt-file PATH`` holds one prompt per line (empty lines skipped); several prompts of
any lengths run as one batch, and each result, printed under a ``==> prompt i <==`` header,
is the one that prompt gives alone with the same ``--seed`` (every prompt samples from its
own generator seeded with it).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import sys
import time
from typing import Callable, Iterator, List, TextIO, Tuple

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
    src.add_argument("--prompt-file", default=None, metavar="PATH",
                     help="prompts, one per line, generated as one batch (each as if alone)")
    parser.add_argument("--max-new-tokens", type=nonneg_int, default=256, metavar="N",
                        help="bytes to generate (default 256)")
    parser.add_argument("--temperature", type=_temperature, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=nonneg_int, default=40,
                        help="sample from the k most likely bytes; 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--no-cache", action="store_true", help="full forward per token (for comparison)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="also write the prompt and its continuation to FILE as raw bytes (stdout shows "
                             "bytes that are not UTF-8 as U+FFFD); several prompts go to FILE.0, FILE.1, ...")


def _read_prompts(args: argparse.Namespace) -> List[bytes]:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                prompts = [line.rstrip(b"\r\n") for line in f]
        except OSError as e:
            raise ValueError(f"--prompt-file {args.prompt_file!r}: {e.strerror}") from None
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"--prompt-file {args.prompt_file!r} holds no prompt; write one prompt per line")
        return prompts
    prompt_bytes = (args.prompt if args.prompt is not None else "\n").encode(
        "utf-8", "surrogateescape")  # argv bytes that are not UTF-8 come back as they were given
    if not prompt_bytes:
        raise ValueError("the prompt is empty; pass --prompt TEXT with at least one character")
    return [prompt_bytes]


def _start(args: argparse.Namespace) -> Tuple[List[bytes], Callable[[], Iterator[Tensor]]]:
    """Load the model and check everything; returns (prompts, a function starting the stream of new tokens (B,))."""
    from ..device import pick_device
    from .checkpoint import load_model
    device = pick_device(args.device)
    prompts = _read_prompts(args)
    model = load_model(args.checkpoint, map_location=device)
    vocab = model.config.vocab_size
    top = max(max(p) for p in prompts)
    if top >= vocab:
        raise ValueError(f"the prompt has byte values up to {top}, outside this model's vocabulary of {vocab}")
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()).item())
    # One generator per prompt, all seeded alike: a prompt's tokens do not depend on the batch.
    gens = [torch.Generator(device=device).manual_seed(seed) for _ in prompts]
    batch = [torch.tensor(list(p), dtype=torch.long, device=device) for p in prompts]
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, use_cache=not args.no_cache, generator=gens)
    # stream() checks its arguments (the XPOS length limit included) before it returns.
    stream = model.stream(batch, args.max_new_tokens, **kw)
    return prompts, lambda: stream


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


def write_batch(prompts: List[bytes], stream: Iterator[Tensor], out: TextIO) -> Tuple[int, bool]:
    """Collect the batch's new tokens (B,) per step, then write each prompt and its continuation under a header."""
    rows: List[List[int]] = [[] for _ in prompts]
    interrupted = False
    try:
        with contextlib.closing(stream):
            for tok in stream:
                for row, t in zip(rows, tok.tolist()):
                    row.append(t)
    except KeyboardInterrupt:
        interrupted = True
    for i, (p, row) in enumerate(zip(prompts, rows)):
        text = (p + bytes(t for t in row if t < 256)).decode("utf-8", errors="replace")
        out.write(f"==> prompt {i} <==\n{text}\n")
    out.flush()
    return sum(map(len, rows)), interrupted


def _rows_of_one(stream: Iterator[Tensor]) -> Iterator[Tensor]:
    """The tokens (1,) of a batch of one prompt as 0-d tensors; closing this closes ``stream``."""
    with contextlib.closing(stream):
        for tok in stream:
            yield tok[0]


def _recorded(stream: Iterator[Tensor], rows: List[List[int]]) -> Iterator[Tensor]:
    """``stream`` (tokens (B,) per step), appending each prompt's tokens to its row of ``rows``."""
    with contextlib.closing(stream):
        for tok in stream:
            for row, t in zip(rows, tok.tolist()):
                row.append(int(t))
            yield tok


def _write_raw(path: str, prompts: List[bytes], rows: List[List[int]]) -> List[str]:
    """The --output files: each prompt and its continuation as raw bytes, written atomically."""
    from ..fileio import atomic_path
    paths = [path] if len(prompts) == 1 else [f"{path}.{i}" for i in range(len(prompts))]
    for p, row, dst in zip(prompts, rows, paths):
        with atomic_path(dst) as tmp, open(tmp, "wb") as f:
            f.write(p + bytes(t for t in row if t < 256))
    return paths


def _check_output(path) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--output {path!r}: expected a file in a folder you can write to")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    try:
        _check_output(args.output)
        prompts, start = _start(args)
    except (ValueError, TypeError, CheckpointError) as e:
        print(f"longnet generate: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows: List[List[int]] = [[] for _ in prompts]
    if len(prompts) == 1:
        count, interrupted = write_stream(prompts[0], _rows_of_one(_recorded(start(), rows)), sys.stdout)
    else:
        count, interrupted = write_batch(prompts, _recorded(start(), rows), sys.stdout)
    dt = time.perf_counter() - t0
    if args.output is not None:
        print(f"[longnet] raw bytes in {', '.join(_write_raw(args.output, prompts, rows))}", file=sys.stderr)
    wanted = args.max_new_tokens * len(prompts)
    if interrupted:
        print(f"[longnet] interrupted: kept the {count} of {wanted} bytes generated so far "
              "(printed above)", file=sys.stderr)
    print(f"[longnet] {count} bytes in {dt:.2f} s ({count / max(dt, 1e-9):.1f} bytes/s, "
          f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}, "
          f"{'no cache' if args.no_cache else 'dilated KV cache'})", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0
