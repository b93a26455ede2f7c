"""A queued request (job) and where its time went."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from npuserve.daemon.worker import protocol as wp


@dataclass
class Timing:
    queued: float = 0.0
    load: float = 0.0
    inference: float = 0.0


@dataclass
class Job:
    task: str
    request: wp.Request
    items: int
    enqueued: float
    deadline: float
    future: asyncio.Future[Any]
    timing: Timing = field(default_factory=Timing)
    attempts: int = 0
    not_before: float = 0.0
    tokens: float = 0.0  # estimated before it runs: what admission and allowances count
    chars: int = 0  # of its input text, to calibrate the token estimate
