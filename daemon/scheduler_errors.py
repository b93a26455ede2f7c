"""Errors the scheduler answers requests with; each knows its HTTP status."""

from __future__ import annotations

import math


class SchedulerError(RuntimeError):
    status = 500

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def retry_after_header(self) -> str | None:
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


class Overloaded(SchedulerError):
    """Expected completion is past the deadline, or the queue is full."""

    status = 503


class ModelUnavailable(SchedulerError):
    """The model cannot load now (missing file, failed load in backoff)."""

    status = 503


class ShuttingDown(SchedulerError):
    status = 503


class DeadlineExceeded(SchedulerError):
    """The request waited past its deadline and was never run."""

    status = 504


class BadRequest(SchedulerError):
    """The backend refused the input (e.g. a query too long for the context)."""

    status = 400


class BackendFailed(SchedulerError):
    """The backend failed, or its worker crashed twice on this request."""

    status = 500


class Busy(SchedulerError):
    """The model has queued work; it cannot be unloaded now."""

    status = 409
