"""What the scheduler keeps per model: its queue, its measured costs, its counters, its load
back-off and (NPU models with a CPU twin) its circuit breaker. Which models are loaded is
not here: the lane of the model's device is the one record of that."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from npuserve.daemon.models.registry import ModelPlan
from npuserve.daemon.sched.breaker import NpuBreaker
from npuserve.daemon.sched.calibration import ModelCosts
from npuserve.daemon.sched.jobs import Job

LOAD_BACKOFF_MAX = 300.0


@dataclass
class Counters:
    loads: int = 0
    unloads: int = 0
    load_seconds_total: float = 0.0


@dataclass
class LoadBackoff:
    """A model that failed to load is retried after an exponential back-off, not on every
    request; until then its requests are answered 503 at once."""

    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0

    def failed(self, reason: str, now: float) -> float:
        self.failures += 1
        backoff = min(LOAD_BACKOFF_MAX, 2.0 ** self.failures)
        self.error, self.retry_at = reason, now + backoff
        return backoff

    def succeeded(self) -> None:
        self.error, self.failures, self.retry_at = None, 0, 0.0

    def waiting(self, now: float) -> bool:
        return self.error is not None and now < self.retry_at


@dataclass
class ModelState:
    plan: ModelPlan
    costs: ModelCosts = field(default_factory=ModelCosts)  # load figures
    task_costs: dict[str, ModelCosts] = field(default_factory=dict)  # call figures per task
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    counters: Counters = field(default_factory=Counters)
    backoff: LoadBackoff = field(default_factory=LoadBackoff)
    breaker: NpuBreaker | None = None  # NPU models with a CPU twin only
    last_used: float = 0.0
    dim: int | None = None
    # Read from the model's files once, not at every decision; forgotten at each load, so
    # a file replaced meanwhile is read again.
    estimated_bytes: int | None = None
    file_bytes: int | None = None

    @property
    def model_id(self) -> str:
        return self.plan.spec.model_id

    @property
    def tripped(self) -> bool:
        return self.breaker is not None and self.breaker.tripped

    def head_age(self, now: float) -> float:
        return now - self.queue[0].queued_since if self.queue else 0.0

    def queued_items(self) -> int:
        return sum(j.items for j in self.queue)

    def enqueue(self, job: Job) -> None:
        """Queue `job`: an interactive one ahead of queued background work, each in the
        order it came."""
        if not job.background:
            for i, queued in enumerate(self.queue):
                if queued.background:
                    self.queue.insert(i, job)
                    return
        self.queue.append(job)

    @property
    def background_only(self) -> bool:
        """Something is queued, and all of it is background work."""
        return bool(self.queue) and all(j.background for j in self.queue)

    def service_seconds(self, task: str, tokens: float) -> float | None:
        costs = self.task_costs.get(task)
        return costs.service_seconds(tokens) if costs else None

    def queued_seconds(self, interactive_only: bool = False) -> float | None:
        """Calibrated time to run everything queued (or its interactive part); None if any
        task is unmeasured."""
        total = 0.0
        for job in self.queue:
            if interactive_only and job.background:
                continue
            cost = self.service_seconds(job.task, job.tokens)
            if cost is None:
                return None
            total += cost
        return total
