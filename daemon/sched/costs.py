"""How long things may take and how much memory they hold, from the measured costs.

Pure functions of a model's calibration and the settings: admission (503 + Retry-After),
deadlines, the allowance of a running call or a load, and the memory a model is planned with.
"""

from __future__ import annotations

import os

from npuserve.daemon.models.backends import memory_estimate
from npuserve.daemon.sched.jobs import Job
from npuserve.daemon.sched.model import ModelState
from npuserve.daemon.sched.settings import SchedulerSettings

NPU_HANG_FLOOR = 5.0
# Without a measurement yet, a load may take this long (slow SD cards).
COLD_LOAD_ALLOWANCE = 600.0


def swap_seconds(model: ModelState) -> float:
    """Cost of making `model` resident: its measured load (0 until measured)."""
    return model.costs.load_seconds or 0.0


def load_allowance(model: ModelState) -> float:
    """How long a load may take: generous while unmeasured, else 5x the worst seen."""
    if model.costs.load_seconds is None:
        return COLD_LOAD_ALLOWANCE
    return max(30.0, 5.0 * model.costs.load_seconds_max)


def run_allowance(model: ModelState, jobs: list[Job], now: float) -> float:
    """How long a running call may take before the worker counts as hung.

    Work already running is not abandoned at the request deadline (its result is still
    useful to the caller); only a call far beyond its measured cost is treated as a hang.
    """
    tokens = sum(j.tokens for j in jobs)
    expected = model.service_seconds(jobs[0].task, tokens)
    if model.breaker is not None and expected is not None:
        # An NPU call that "failed to submit" never returns: past ten times its
        # calibrated cost the worker is killed and the work retried or moved.
        return max(NPU_HANG_FLOOR, 10.0 * expected)
    # Its own tokens: a long document's call gets a long allowance (a 95,000-character
    # document was killed mid-call when the allowance came from a per-document average).
    remaining = max(j.deadline for j in jobs) - now
    return max(remaining, 30.0 + 10.0 * (expected or 0.0))


def deadline_for(settings: SchedulerSettings, expected: float | None, cold: bool) -> float:
    """Seconds this request may take: a multiple of its calibrated wait (plus the aging
    bound, which later work for the resident model may use first), within
    [deadline_floor, request_timeout]; uncalibrated or cold, the full timeout."""
    if expected is None or cold:
        return settings.request_timeout
    allowed = settings.deadline_multiplier * (expected + settings.aging_s)
    return min(settings.request_timeout, max(settings.deadline_floor, allowed))


def estimate_bytes(model: ModelState) -> int:
    """A model's memory: the most it was seen to hold, else its backend's estimate."""
    if model.costs.footprint_bytes:
        return model.costs.footprint_bytes
    if model.estimated_bytes is None:
        model.estimated_bytes = memory_estimate(model.plan.spec)
    return model.estimated_bytes


def mapped_bytes(model: ModelState) -> int:
    """Bytes of the model's file a loaded model keeps mapped (GGUF weights)."""
    if model.file_bytes is None:
        path = model.plan.spec.path
        model.file_bytes = os.path.getsize(path) if os.path.isfile(path) else 0
    return model.file_bytes
