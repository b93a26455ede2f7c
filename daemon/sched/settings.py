"""The scheduler's settings: one frozen, typed object read from the configuration once.

SIGHUP replaces the object (timing and queue limits apply live); residency, switching and
the NPU breaker's settings need a restart, as the server's reload says."""

from __future__ import annotations

from dataclasses import dataclass

from npuserve.daemon.config import Config

MB = 1024 * 1024


@dataclass(frozen=True)
class SchedulerSettings:
    residency: str = "auto"  # auto | sequential | resident
    switching: str = "aging"  # aging | fifo (fifo: benchmarks' baseline only)
    keep_alive: float = 300.0
    aging_s: float = 10.0
    hysteresis_s: float = 2.0
    anticipate_s: float = 0.05
    coalesce_texts: int = 64
    coalesce_expansions: int = 8
    prefetch: bool = False
    max_queue: int = 4096
    request_timeout: float = 300.0
    reserve_bytes: int = 512 * MB
    budget_bytes: int = 0
    deadline_multiplier: float = 4.0
    deadline_floor: float = 30.0
    npu_failure_threshold: int = 2
    npu_reprobe_s: float = 30.0

    @classmethod
    def from_config(cls, cfg: Config) -> SchedulerSettings:
        # The values were checked and converted when the configuration was read.
        v = cfg.values
        return cls(
            residency=v["scheduler.policy"],
            switching=v["scheduler.switching"],
            keep_alive=v["scheduler.keep_alive"],
            aging_s=v["scheduler.aging_ms"] / 1000.0,
            hysteresis_s=v["scheduler.switch_hysteresis_ms"] / 1000.0,
            anticipate_s=v["scheduler.anticipate_ms"] / 1000.0,
            coalesce_texts=v["scheduler.coalesce_texts"],
            coalesce_expansions=v["scheduler.coalesce_expansions"],
            prefetch=v["scheduler.prefetch"],
            max_queue=v["scheduler.max_queue"],
            request_timeout=v["scheduler.request_timeout"],
            reserve_bytes=int(v["scheduler.memory_reserve_mb"] * MB),
            budget_bytes=int(v["scheduler.memory_budget_mb"] * MB),
            deadline_multiplier=v["scheduler.deadline_multiplier"],
            deadline_floor=v["scheduler.deadline_floor"],
            npu_failure_threshold=v["npu.failure_threshold"],
            npu_reprobe_s=v["npu.reprobe_seconds"],
        )
