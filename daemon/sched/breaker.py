"""The circuit breaker of an NPU model that has a CPU twin.

A failed NPU call re-initialises the model once; at the threshold the breaker trips and the
model's work moves to its CPU twin. While tripped, the NPU is probed with the smallest call
of the model's own task, backing off (doubling, at most PROBE_BACKOFF_MAX) so a board whose
NPU stays broken is not reloaded on a loop; a probe that succeeds closes the breaker."""

from __future__ import annotations

from dataclasses import dataclass

from npuserve.daemon.models.backends import probe_request
from npuserve.daemon.worker import protocol as wp

PROBE_BACKOFF_MAX = 600.0


@dataclass
class NpuBreaker:
    threshold: int
    reprobe_s: float
    failures: int = 0
    tripped: bool = False
    reason: str | None = None
    probe_at: float = 0.0
    backoff: float = 0.0
    probes: int = 0

    def call_failed(self) -> bool:
        """Count a failed call; True when the breaker should trip (else re-initialise)."""
        self.failures += 1
        return self.failures >= self.threshold

    def call_succeeded(self) -> None:
        self.failures = 0

    def trip(self, reason: str, now: float) -> bool:
        """Open the breaker; True on the first trip (not a repeat while already open)."""
        first = not self.tripped
        self.tripped, self.reason = True, reason
        if first:
            self.backoff = self.reprobe_s
            self.probe_at = now + self.reprobe_s
        return first

    def probe_due(self, now: float) -> bool:
        return self.tripped and self.probe_at <= now

    def next_probe(self) -> float | None:
        return self.probe_at if self.tripped else None

    def probe_failed(self, now: float) -> float:
        """Back off before the next probe; returns the new back-off in seconds."""
        self.probes += 1
        self.backoff = min(PROBE_BACKOFF_MAX, max(self.backoff * 2, 1.0))
        self.probe_at = now + self.backoff
        return self.backoff

    def probe_succeeded(self) -> None:
        self.probes += 1
        self.tripped, self.reason, self.failures = False, None, 0

    @staticmethod
    def probe_request(spec: wp.ModelSpec, tasks: list[str]) -> wp.Request:
        """The smallest call of the model's own first task (a rerank model gets a rerank)."""
        return probe_request(spec, tasks[0])
