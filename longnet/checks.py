"""Argument checks shared by the library's functions: one rule each, one-line errors.

Each names the argument and what was expected, so a bad value never reaches a kernel or a
file. (The CLI's argparse value types live in :mod:`longnet.argtypes`.)
"""

from __future__ import annotations

import numbers

__all__ = ["check_int", "one_line"]


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters (then "..."), for error
    messages that quote it."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def check_int(name: str, value, minimum: int = 1, maximum=None) -> int:
    """``value`` as an int when it is an integer (not a bool) in [minimum, maximum]; else ValueError.

    numpy and torch integer scalars are accepted (``numbers.Integral``).
    """
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {_what(minimum, maximum)}, got {value!r}")
    return int(value)


def _what(minimum: int, maximum) -> str:
    if maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    return {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")


def check_short_conv(width, name: str = "short_conv") -> int:
    """The short convolution's width (``short_conv``): 0 (off) or an integer >= 2."""
    width = check_int(name, width, minimum=0)
    if width == 1:
        raise ValueError(f"{name} must be 0 (off) or a width >= 2, got 1")
    return width
