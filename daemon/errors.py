"""Every error a request can be answered with. Each knows its HTTP status (and Retry-After),
so the HTTP layer maps errors in one place, its error middleware, whatever room raised them:
validation (400), the scheduler (503/504/409), the index (400/404/409, 507 on a full disk)."""

from __future__ import annotations

import math


class ApiError(Exception):
    """Answered with `status` and {"error": message}."""

    status = 500

    def __init__(self, message: str, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if status is not None:
            self.status = status

    def retry_after_header(self) -> str | None:
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))

    def headers(self) -> dict[str, str]:
        retry = self.retry_after_header()
        return {"Retry-After": retry} if retry else {}


class InvalidRequest(ApiError, ValueError):
    """The request itself is wrong (a field, a limit, the JSON)."""

    status = 400


class IndexError_(ApiError, ValueError):  # noqa: N801 - IndexError is a builtin
    """A client error about the index (400 unless `status` says otherwise)."""

    status = 400

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status=status)


class StorageError(ApiError):
    """The index could not be written (disk full, read-only, I/O error). The transaction
    was rolled back: nothing of the request was stored. The client may retry once an
    operator has fixed it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, retry_after=30.0, status=status)


class SchedulerError(ApiError):
    """What the scheduler answers a request with instead of a result."""


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


class NotSupported(SchedulerError):
    """The configured model or backend cannot do what was asked (501)."""

    status = 501
