"""Stopping a running call whose clients have all gone.

The daemon sends the worker SIGUSR1 (worker/handle.py: `interrupt`); the handler only sets
a flag, and backends call `check()` where they can stop cleanly - between documents of a
rerank, between generated tokens - which raises `Cancelled`. A native call in progress
(one llama_decode) finishes first: Python runs signal handlers between bytecodes. The flag
is cleared before every request, so a signal that arrives after its call ended cancels
nothing else.
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNAL = signal.SIGUSR1
_requested = False


class Cancelled(Exception):
    """The call was cancelled: every client waiting for it went away."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True


def install() -> None:
    signal.signal(SIGNAL, _on_signal)


def reset() -> None:
    global _requested
    _requested = False


def check() -> None:
    if _requested:
        raise Cancelled("every client of this call went away")


def requested() -> bool:
    """Whether the call should stop: for code that may not raise (a C callback)."""
    return _requested
