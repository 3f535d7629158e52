"""argparse value types shared by the CLI commands: each names what it expected."""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type accepting integers >= ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    parse.__name__ = "positive_int" if minimum == 1 else f"int_ge_{minimum}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_int_list(text: str) -> List[int]:
    """"128,256,512" -> [128, 256, 512]; every value positive."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 128,256,512, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def int_between(minimum: int, maximum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type accepting integers in [minimum, maximum]; ``why`` explains the maximum."""
    at_least = int_at_least(minimum)

    def parse(text: str) -> int:
        v = at_least(text)
        if v > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}{why}, got {v}")
        return v

    parse.__name__ = f"int_in_{minimum}_{maximum}"
    return parse


def output_file(text: str) -> str:
    """A file to write: not a folder, in a folder that exists. '' passes through (write nothing)."""
    if text == "":
        return text
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"expected a file name, got the folder {text!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into the folder of {text!r}: {folder}")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: created when missing, but neither it nor a parent may be a file."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"expected a folder, but {path!r} is a file")
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {path!r}")
    return text


def pattern_from_flags(segment_lengths: Optional[str], dilation_rates: Optional[str]):
    """The DilatedPattern of ``--segment-lengths``/``--dilation-rates``; None when neither is given.

    Raises ValueError naming the flags (not the Python arguments) when one is missing or bad.
    """
    from .patterns import DilatedPattern  # lazily: the value types stay importable without torch
    if not segment_lengths and not dilation_rates:
        return None
    if not (segment_lengths and dilation_rates):
        raise ValueError("give both --segment-lengths and --dilation-rates (e.g. 8,16,32 and 1,2,4)")
    try:
        return DilatedPattern.parse(segment_lengths, dilation_rates)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace("segment_lengths", "--segment-lengths")
                         .replace("dilation_rates", "--dilation-rates")) from None
