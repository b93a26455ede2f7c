"""What every route reaches through the request: the services of this daemon, and the small
helpers of a JSON answer. Routes import from here, never from app.py (which imports them)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from npuserve.daemon.config import Config
from npuserve.daemon.http.metrics import Registry
from npuserve.daemon.http.validation import Limits
from npuserve.daemon.sched.jobs import Timing
from npuserve.daemon.sched.scheduler import Scheduler

if TYPE_CHECKING:
    from npuserve.daemon.index.service import IndexService


@dataclass
class Services:
    cfg: Config
    scheduler: Scheduler
    metrics: Registry
    limits: Limits
    max_body: int
    started: float = field(default_factory=time.time)
    index: IndexService | None = None  # None while the index is off or could not open
    draining: bool = False  # SIGTERM received: new requests get 503, in-flight ones finish
    inflight: int = 0  # requests being handled now (the drain waits for these)


SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def json_error(status: int, message: str, headers: dict[str, str] | None = None,
               **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def timing_headers(timing: Timing) -> dict[str, str]:
    """TEI-style timing headers, in milliseconds."""
    return {
        "x-queue-time": f"{timing.queued * 1000:.1f}",
        "x-load-time": f"{timing.load * 1000:.1f}",
        "x-inference-time": f"{timing.inference * 1000:.1f}",
    }


def embedding_headers(timing: Timing, fingerprint: str) -> dict[str, str]:
    """Timing headers, and the identity of the vectors (models/fingerprint.py)."""
    return timing_headers(timing) | {"X-Embedding-Fingerprint": fingerprint}
