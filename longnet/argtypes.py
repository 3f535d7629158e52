"""argparse value types shared by the CLI commands: each names what it expected."""

from __future__ import annotations

import argparse
from typing import Callable, List


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
