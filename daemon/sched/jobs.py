"""A queued request (job) and where its time went."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
    # Background work (the index's own embedding) runs only when no interactive request
    # waits on its device, and queues behind every interactive request of its model.
    background: bool = False
    # A streamed generation's pieces, as the worker sends them (None: not streamed).
    on_partial: Callable[[str], None] | None = None
    streamed: bool = False  # pieces went out: a retry would repeat them
    # A long rerank runs in slices of documents; between them other work may run. `request`
    # holds what is left; `done` the slices' scores so far; `turn` when it queued again.
    done: list[wp.Scores] = field(default_factory=list)
    turn: float = 0.0

    @property
    def queued_since(self) -> float:
        """When it (or what is left of it) last joined its queue: what the policy ages."""
        return self.turn or self.enqueued
