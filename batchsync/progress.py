"""Progress of long work, reported to whoever listens: a line that updates itself on a terminal, nothing
otherwise (the log already says what is done). The library only calls ``report``; the CLI picks the listener.

    set_listener(TerminalProgress(sys.stderr))
    report("export newsletter", 250_000)
"""

from __future__ import annotations

import time
from typing import Protocol, TextIO


class Listener(Protocol):
    """Whoever is told how far long work got: a label and the count done so far."""

    def __call__(self, label: str, done: int) -> None: ...


def _silent(label: str, done: int) -> None:
    return None


_listener: Listener = _silent


def set_listener(listener: Listener | None) -> None:
    global _listener
    _listener = listener or _silent


def report(label: str, done: int) -> None:
    _listener(label, done)


class TerminalProgress:
    """Rewrites one line on a terminal, at most ten times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0

    def __call__(self, label: str, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self.stream.write(f"\r{label}: {done:,} rows ")
            self.stream.flush()
