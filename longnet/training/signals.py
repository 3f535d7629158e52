"""Stopping a run cleanly: the first SIGINT, SIGTERM or SIGHUP asks to stop after the current step."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Dict, List, Optional


__all__ = ["StopFlag", "stop_signals"]


def stop_signals() -> List[int]:
    return [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


class StopFlag:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP asks to stop after the current step; a
    second one, or any after :meth:`abort_on_signal`, raises KeyboardInterrupt at once.

    ``debounce_s``: a repeat this soon after the first counts as the same request (torchrun
    forwards a terminal's SIGINT, and schedulers' SIGTERM, to workers that already got it).
    A stop adopted from another rank (:meth:`agree`) is not this process's first signal: its
    own first one still only asks to stop.
    """

    def __init__(self, debounce_s: float = 0.0, quiet: bool = False):
        self.requested, self.at_once = False, False
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None  # when this process got its first signal
        self.debounce_s, self.quiet = debounce_s, quiet
        self.previous: Dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it (Ctrl-C: 130)."""
        return 128 + int(self.signum or signal.SIGINT)

    def __enter__(self):
        for sig in stop_signals():
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: plain KeyboardInterrupt handling only
                pass
        return self

    def _handle(self, signum, frame):
        if self.received_at is not None and not self.at_once:
            if time.monotonic() - self.received_at < self.debounce_s:
                return
            self.at_once = True  # a second signal
        if self.at_once:
            self.signum = signum
            raise KeyboardInterrupt
        self.received_at = time.monotonic()
        if not self.requested:  # else keep the signal agreed with the other ranks (one exit code)
            self.requested, self.signum = True, signum
        if not self.quiet:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            try:
                print(f"\n[longnet] {name}: stopping after this step and saving a checkpoint "
                      f"({name} again to stop at once)", file=sys.stderr, flush=True)
            except OSError:  # SIGHUP: the terminal may be gone
                pass

    def votes(self) -> List[bool]:
        """One flag per stop signal: which one this process received (all False: none)."""
        return [self.requested and self.signum == sig for sig in stop_signals()]

    def agree(self, votes: List[bool]) -> bool:
        """Adopt the first signal any process voted for (see :meth:`votes`), so that every
        process stops, and exits with the same code; returns whether to stop."""
        for sig, vote in zip(stop_signals(), votes):
            if vote:
                self.requested, self.signum = True, sig
                return True
        return False

    def abort_on_signal(self) -> None:
        """From now on a signal raises KeyboardInterrupt at once (a pending request too)."""
        self.at_once = True
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
