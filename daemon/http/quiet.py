"""Refusals are logged as one line per class, at most once per interval - not as a
traceback per malformed request. A flood of bad requests filled 7.4 MB of log with 16,672
aiohttp tracebacks in 8 s; the operator needs to know that it happens, not each case."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError

INTERVAL = 10.0
REFUSALS = (HttpProcessingError, ConnectionError, asyncio.CancelledError, TimeoutError)


class Gate:
    """Lets one event per key through each interval, counting the ones it held back."""

    def __init__(self, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.seen: dict[str, tuple[float, int]] = {}

    def admit(self, key: str) -> str | None:
        """None to stay quiet; else a suffix naming how many were left out since."""
        now = self.clock()
        last, left_out = self.seen.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self.seen[key] = (last, left_out + 1)
            return None
        self.seen[key] = (now, 0)
        return f" ({left_out} more since the last)" if left_out else ""


class RefusalLog(logging.Filter):
    """On aiohttp's server logger: its 'Error handling request' for a malformed request or
    a vanished client becomes one WARNING line per exception class and interval."""

    def __init__(self, gate: Gate | None = None) -> None:
        super().__init__()
        self.gate = gate or Gate()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, REFUSALS):
            return True  # anything else is a bug, and keeps its traceback
        more = self.gate.admit(type(exc).__name__)
        if more is None:
            return False
        record.msg, record.args = f"refused a request: {type(exc).__name__}: {exc}{more}", ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class Throttled:
    """Our own refusal lines: one per key and interval."""

    def __init__(self, logger: logging.Logger, gate: Gate | None = None) -> None:
        self.logger = logger
        self.gate = gate or Gate()

    def warn(self, key: str, msg: str, *args: object) -> None:
        more = self.gate.admit(key)
        if more is not None:
            self.logger.warning(msg + more, *args)


def install(logger_name: str = "aiohttp.server") -> RefusalLog:
    """Once per logger (build_app runs once per app, tests build many)."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, RefusalLog):
            return existing
    refusal = RefusalLog()
    logger.addFilter(refusal)
    return refusal
