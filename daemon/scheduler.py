"""The model scheduler: per-model queues, one lane (worker process) per device.

A lane serves the resident model's queue and coalesces embedding requests
into one backend call. It switches to another model when the resident queue
is empty, or when another queue's oldest request has waited longer than the
aging bound; the next model is the one whose queue does the most work per
second of loading (the oldest head once past the aging bound). Loads happen
only in the lane loop, so they are single-flight, and a model with nothing
queued is never loaded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import worker_protocol as wp
from .calibration import CalibrationStore, ModelCosts
from .config import Config
from .memory_available import mem_available
from .model_registry import ModelPlan
from .prefetch import Prefetcher
from .scheduler_errors import (
    BackendFailed,
    BadRequest,
    Busy,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    SchedulerError,
    ShuttingDown,
)
from .vector_rows import VectorRows
from .worker_handle import WorkerDied, WorkerHandle, WorkerTimeout

log = logging.getLogger("npuserve.scheduler")

# A worker whose RSS stays this far above its pre-load baseline after every
# model is unloaded is replaced, so "unload" returns memory for certain.
RECYCLE_SLACK_BYTES = 48 * 1024 * 1024
LOAD_BACKOFF_MAX = 300.0
NPU_HANG_FLOOR = 5.0
# A preempting switch costs two loads; waiting 10x that keeps swaps under ~10 %.
AGING_SWAP_FACTOR = 10.0
# Loads faster than this count as this much when swaps are compared (unmeasured: 0).
MIN_SWAP_SECONDS = 0.05
# Memory a read-ahead leaves free beside the resident model, for what it still allocates.
PREFETCH_MARGIN_BYTES = 32 * 1024 * 1024
# Waiting for a batch's follow-ups costs at most this share of the swap it may save.
ANTICIPATE_SWAP_SHARE = 0.25
# Without a measurement yet, a load may take this long (slow SD cards).
COLD_LOAD_ALLOWANCE = 600.0


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


@dataclass
class ModelState:
    plan: ModelPlan
    state: str = "unloaded"  # unloaded | loading | ready | failed
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    costs: ModelCosts = field(default_factory=ModelCosts)  # load figures
    task_costs: dict[str, ModelCosts] = field(default_factory=dict)  # call figures per task
    loads: int = 0
    unloads: int = 0
    load_seconds_total: float = 0.0
    last_used: float = 0.0
    error: str | None = None
    retry_at: float = 0.0
    failures: int = 0
    dim: int | None = None
    # NPU circuit breaker (models with a CPU twin only).
    npu_failures: int = 0
    tripped: bool = False
    trip_reason: str | None = None
    probe_at: float = 0.0
    probe_backoff: float = 0.0

    @property
    def model_id(self) -> str:
        return self.plan.spec.model_id

    def head_age(self, now: float) -> float:
        return now - self.queue[0].enqueued if self.queue else 0.0

    def queued_items(self) -> int:
        return sum(j.items for j in self.queue)

    def service_seconds(self, task: str, items: int) -> float | None:
        costs = self.task_costs.get(task)
        return costs.service_seconds(items) if costs else None

    def queued_seconds(self) -> float | None:
        """Calibrated time to run everything queued; None if any task is unmeasured."""
        total = 0.0
        for job in self.queue:
            cost = self.service_seconds(job.task, job.items)
            if cost is None:
                return None
            total += cost
        return total


class Lane:
    """One device: one worker process, the models placed on it, and its loop."""

    def __init__(self, device: str, sched: Scheduler) -> None:
        self.device = device
        self.sched = sched
        self.worker = WorkerHandle(device, sched.log_level)
        self.models: dict[str, ModelState] = {}
        self.resident: list[str] = []  # least recently used first
        self.light: collections.deque[Job] = collections.deque()
        self.control: collections.deque[tuple[str, ModelState, asyncio.Future[str]]] = (
            collections.deque())
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.baseline_rss: int | None = None
        self.serving: str | None = None  # the model served last
        self.batch_ended: float | None = None  # when it last answered, until a swap waited
        self.prefetcher = Prefetcher()
        self.swaps = 0
        self.recycles = 0
        self.crashes = 0

    # --- picking work -----------------------------------------------------

    def pick(self, now: float) -> ModelState | None:
        """The model to serve next.

        fifo: the model of the oldest request. aging (default): the resident model
        keeps the device while its oldest request is not much younger than another
        queue's oldest - "much" being the switch hysteresis, at least a few swaps'
        worth - so requests that arrive while a model is resident ride along instead
        of forcing a swap each. A head that has waited past the aging bound switches
        at once, so a flood for one model cannot starve another - but only when it is
        older than the resident queue's head: while the resident model still serves older
        work, nobody is starving, and preempting it cost a third model's pipeline 2.2x
        the swaps of FIFO (bench/bench_scheduler.py --expand-model).
        """
        waiting = [m for m in self.models.values() if m.queue]
        if not waiting:
            return None
        oldest = max(waiting, key=lambda m: m.head_age(now))
        if self.sched.switching == "fifo":
            return oldest
        serving = self.models.get(self.serving or "")
        if serving is None or not serving.queue or serving.model_id not in self.resident:
            return self._next_visit(waiting, oldest, now)
        others = [m for m in waiting if m is not serving]
        if not others:
            return serving
        other = max(others, key=lambda m: m.head_age(now))
        age = other.head_age(now)
        if age <= serving.head_age(now):  # the resident queue holds the oldest work
            return serving
        if age > self.sched.aging_bound(serving, other):
            return other
        if age > serving.head_age(now) + self.sched.hysteresis(serving, other):
            return other
        return serving

    def _next_visit(self, waiting: list[ModelState], oldest: ModelState, now: float
                    ) -> ModelState:
        """The model to serve once the resident one has nothing queued.

        A resident model with work needs no swap: the oldest of those. Otherwise a swap is
        due, and it goes to the queue that does the most work per second of loading, so
        each swap serves as much as it can while the others' queues fill. On a QMD
        pipeline (expand -> embed -> rerank) that also moves a cheap embedding visit ahead
        of the reranker's, whose queue it feeds: the reranker is then loaded once for both
        (bench/scheduler_sim.py: 0.84 -> 0.71 swaps per query at 15 s pauses, FIFO 1.08;
        measured on a board emulation: 0.66 of FIFO's swaps, docs/benchmarks.md).
        The oldest head still goes first once past the aging bound, and while any queue's
        cost is unmeasured.
        """
        resident = [m for m in waiting if m.model_id in self.resident]
        if resident:
            return max(resident, key=lambda m: m.head_age(now))
        if oldest.head_age(now) > self.sched.aging_bound(oldest, oldest):
            return oldest
        work = {m.model_id: m.queued_seconds() for m in waiting}
        if any(w is None for w in work.values()):
            return oldest
        return max(waiting, key=lambda m: (work[m.model_id] or 0.0)
                   / max(MIN_SWAP_SECONDS, self.sched._swap_seconds(m)))

    def anticipation(self, model: ModelState, now: float) -> float:
        """Seconds to wait before swapping to `model`, for the follow-ups of the last batch.

        A pipeline client (QMD: expand -> embed -> rerank) sends its next stage as soon as
        a reply reaches it, a few milliseconds after the batch ends. A swap decided in that
        gap sees only the queues of the clients that are not in step, and serves them first:
        one straggler then stays out of step for good and doubles the loads (measured under
        the board emulation: 0.75 swaps per query instead of 0.375, docs/benchmarks.md). So
        a swap waits a moment after a batch (anticipatory scheduling, as disk schedulers do
        for the next read of a process), never more than a quarter of the swap it may save.
        """
        if (self.sched.switching != "aging" or self.batch_ended is None
                or model.model_id in self.resident):
            return 0.0
        window = min(self.sched.anticipate_s,
                     ANTICIPATE_SWAP_SHARE * self.sched._swap_seconds(model))
        return self.batch_ended + window - now

    def begin_visit(self, model: ModelState) -> None:
        self.serving = model.model_id

    def _prefetch_next(self, serving: ModelState) -> None:
        """While `serving` computes, read ahead the files of the model that the device
        will load next (by the same rule that will pick it), within the memory free beside
        the resident model: the swap then reads from memory instead of flash."""
        if not self.sched.prefetch:
            return
        others = [m for m in self.models.values()
                  if m.queue and m is not serving and m.model_id not in self.resident]
        if not others:
            return
        now = time.monotonic()
        nxt = self._next_visit(others, max(others, key=lambda m: m.head_age(now)), now)
        self.prefetcher.start(nxt.model_id, nxt.plan.files,
                              mem_available() - PREFETCH_MARGIN_BYTES)

    # --- loop ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self.wake.clear()
            await self._serve_control()
            await self._serve_light()
            now = time.monotonic()
            self._drop_dead(now)
            model = self.pick(now)
            if model is None:
                due = [m for m in self.models.values() if m.tripped and m.probe_at <= now]
                if due and not self.sched.stopping:
                    await self._probe(due[0])
                    continue
                timeout = await self._idle_unloads(now)
                probes = [m.probe_at - now for m in self.models.values() if m.tripped]
                if probes:
                    timeout = min([t for t in (timeout, *probes) if t is not None])
                if self.sched.stopping and not self._busy():
                    return
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            wait = self.anticipation(model, now)
            self.batch_ended = None  # one wait per batch: the pick after it is final
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if not await self._ensure_loaded(model):
                continue
            self.begin_visit(model)
            self._prefetch_next(model)
            await self._run_batch(model)

    def _busy(self) -> bool:
        return bool(self.light or self.control) or any(m.queue for m in self.models.values())

    def _drop_dead(self, now: float) -> None:
        """Expired requests get 504 and never run; cancelled ones are dropped."""
        for m in self.models.values():
            kept = collections.deque()
            for job in m.queue:
                if job.future.done():
                    self.sched.metrics["dropped_disconnected"] += 1
                    continue  # the client went away
                if now >= job.deadline:
                    job.future.set_exception(
                        DeadlineExceeded(
                            f"request waited {now - job.enqueued:.1f}s, past its deadline")
                    )
                    self.sched.metrics["deadline_expired"] += 1
                    continue
                kept.append(job)
            m.queue = kept

    async def _serve_control(self) -> None:
        """Admin preload/unload, run between batches so they never cut into one."""
        while self.control:
            action, model, future = self.control.popleft()
            if future.done():
                continue
            try:
                if action == "load":
                    ok = await self._ensure_loaded(model)
                    if not ok:
                        raise ModelUnavailable(model.error or "load failed")
                elif model.queue:
                    raise Busy(f"{model.plan.name} has {len(model.queue)} queued requests")
                else:
                    await self._unload(model)
                future.set_result(model.state)
            except SchedulerError as exc:
                future.set_exception(exc)

    async def _serve_light(self) -> None:
        while self.light:
            job = self.light.popleft()
            if job.future.done():
                continue
            try:
                reply = await self.worker.call(job.request, timeout=60.0)
            except (WorkerDied, WorkerTimeout) as exc:
                self._worker_lost(str(exc))
                job.future.set_exception(BackendFailed(f"tokenizer failed: {exc}"))
                continue
            _settle(job, reply)

    # --- residency ----------------------------------------------------------

    async def _ensure_loaded(self, model: ModelState) -> bool:
        if model.model_id in self.resident:
            self.resident.remove(model.model_id)
            self.resident.append(model.model_id)
            return True
        now = time.monotonic()
        if model.state == "failed" and now < model.retry_at:
            self._fail_queue(model, ModelUnavailable(model.error or "load failed",
                                                     retry_after=model.retry_at - now))
            return False
        # The load reads whatever the read-ahead has not: both at once would only share
        # the disk, and a read-ahead of another model would take the memory.
        self.prefetcher.cancel()
        for victim in self._victims_for(model):
            await self._unload(self.models[victim])
        model.state = "loading"
        allowance = self.sched.load_allowance(model)
        try:
            reply = await self.worker.call(wp.Load(model.plan.spec), timeout=allowance)
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            self._load_failed(model, f"worker died while loading: {exc}")
            return False
        if isinstance(reply, wp.Failure):
            self._load_failed(model, reply.error)
            return False
        assert isinstance(reply, wp.Loaded)
        if self.baseline_rss is None or not self.resident:
            self.baseline_rss = reply.rss_before
        model.state, model.error, model.failures = "ready", None, 0
        # keep_alive counts from the load too: a preloaded model with nothing queued yet
        # must not look idle since start-up and be unloaded at once.
        model.last_used = time.monotonic()
        model.loads += 1
        model.load_seconds_total += reply.seconds
        model.costs.observe_load(reply.seconds)
        model.dim = reply.dim
        model.costs.observe_footprint(reply.rss_after - reply.rss_before)
        self.resident.append(model.model_id)
        self.swaps += 1
        self.sched.metrics["loads"] += 1
        for job in model.queue:
            job.timing.load += reply.seconds
        # The queues at the swap say why it happened, for whoever reads the log.
        log.info("loaded %s on %s in %.2fs (queued: %s)", model.plan.name, self.device,
                 reply.seconds, ", ".join(f"{m.plan.name} {len(m.queue)}"
                                          for m in self.models.values()))
        if any(c.sec_per_item is None for c in model.task_costs.values()):
            await self._warm_up(model)
        self.sched.calibration.save()
        return True

    async def _warm_up(self, model: ModelState) -> None:
        """First load ever: time one small call so admission has a figure at once."""
        spec = model.plan.spec
        if "embed" in model.plan.tasks:
            task, req = "embed", wp.Embed(spec.model_id, ("warm-up " * 16,))
        elif "rerank" in model.plan.tasks:
            task, req = "rerank", wp.Rerank(spec.model_id, "warm-up", ("warm-up " * 16,), "")
        else:
            return  # a generation warm-up would cost more than it tells
        if model.task_costs[task].sec_per_item is not None:
            return
        start = time.monotonic()
        try:
            reply = await self.worker.call(req, timeout=self.sched.load_allowance(model))
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            return
        if not isinstance(reply, wp.Failure):
            model.task_costs[task].observe_call(1, time.monotonic() - start)

    def _victims_for(self, model: ModelState) -> list[str]:
        """Resident models to unload before `model` loads, per memory policy."""
        policy = self.sched.policy
        if policy == "resident" or not self.resident:
            return []
        if policy == "sequential":
            return list(self.resident)
        # auto: evict idle models, least recently used first, until it fits. The kernel
        # counts a loaded model's mapped weights as page cache it could drop - "available" -
        # but dropping them while the model serves would only make it read them again.
        need = self.sched.estimate_bytes(model)
        room = (mem_available() - self.sched.reserve_bytes
                - sum(self.sched.mapped_bytes(self.models[mid]) for mid in self.resident))
        room = min(room, self.sched.budget_room())
        victims: list[str] = []
        for mid in self.resident:
            if need <= room:
                break
            if not self.models[mid].queue:
                victims.append(mid)
                room += self.sched.estimate_bytes(self.models[mid])
        return victims if need <= room else list(self.resident)

    async def _unload(self, model: ModelState) -> None:
        if model.model_id not in self.resident:
            return
        self.resident.remove(model.model_id)
        model.state = "unloaded"
        model.unloads += 1
        self.sched.metrics["unloads"] += 1
        try:
            reply = await self.worker.call(wp.Unload(model.model_id), timeout=60.0)
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            return
        log.info("unloaded %s from %s", model.plan.name, self.device)
        if isinstance(reply, wp.Unloaded):
            # What unloading gave back includes what the model grew to while serving
            # (compute buffers, a generation's working set): the auto policy plans with it.
            model.costs.observe_footprint(reply.rss_before - reply.rss_after)
        if (
            not self.resident
            and isinstance(reply, wp.Unloaded)
            and self.baseline_rss is not None
            and reply.rss_after > self.baseline_rss + RECYCLE_SLACK_BYTES
        ):
            log.info("worker %s kept %d MB after unload: recycling it", self.device,
                     (reply.rss_after - self.baseline_rss) >> 20)
            await self.worker.stop()
            self.baseline_rss = None
            self.recycles += 1

    async def _idle_unloads(self, now: float) -> float | None:
        """Unload models idle past keep_alive; return seconds until the next one is due."""
        keep = self.sched.keep_alive
        if keep < 0:
            return None
        next_due: float | None = None
        for mid in list(self.resident):
            m = self.models[mid]
            due = m.last_used + keep
            if now >= due:
                await self._unload(m)
            else:
                next_due = min(next_due or due - now, due - now)
        return next_due

    def _load_failed(self, model: ModelState, reason: str) -> None:
        if model.plan.twin is not None:
            # An NPU model that cannot load: its work goes to the CPU twin.
            model.state, model.error = "failed", reason
            self.sched.trip(model, f"NPU load failed: {reason}", [])
            return
        model.failures += 1
        backoff = min(LOAD_BACKOFF_MAX, 2.0 ** model.failures)
        model.state, model.error = "failed", reason
        model.retry_at = time.monotonic() + backoff
        self.sched.metrics["load_failures"] += 1
        log.error("loading %s failed (retry in %.0fs): %s", model.plan.name, backoff, reason)
        self._fail_queue(model, ModelUnavailable(f"model {model.plan.name} cannot load: {reason}",
                                                 retry_after=backoff))

    def _fail_queue(self, model: ModelState, exc: SchedulerError) -> None:
        while model.queue:
            job = model.queue.popleft()
            if not job.future.done():
                job.future.set_exception(exc)

    def _worker_lost(self, reason: str) -> None:
        """Everything the worker held is gone; the next call starts a new one."""
        self.crashes += 1
        self.sched.metrics["worker_crashes"] += 1
        log.error("%s worker lost: %s", self.device, reason)
        for mid in self.resident:
            self.models[mid].state = "unloaded"
        self.resident.clear()
        self.baseline_rss = None

    # --- running ------------------------------------------------------------

    def _take(self, model: ModelState) -> list[Job]:
        first = model.queue.popleft()
        jobs = [first]
        if isinstance(first.request, wp.Expand):
            return jobs + self._take_expansions(model, first)
        if isinstance(first.request, wp.Embed):
            limit = self.sched.coalesce_texts
            total = first.items
            while model.queue and isinstance(model.queue[0].request, wp.Embed):
                nxt = model.queue[0]
                if total + nxt.items > limit or not self._may_coalesce(model, nxt):
                    break
                jobs.append(model.queue.popleft())
                total += nxt.items
        return jobs

    def _take_expansions(self, model: ModelState, first: Job) -> list[Job]:
        """Other expansions to generate beside `first`. With aging they may come from
        behind a rerank in the same model's queue (a rerank waits one batched step, not
        eight sequential ones); fifo takes only those next in line."""
        limit = self.sched.coalesce_expansions
        taken: list[Job] = []
        kept: list[Job] = []
        while model.queue and 1 + len(taken) < limit:
            job = model.queue.popleft()
            if isinstance(job.request, wp.Expand) and self._may_coalesce(model, job):
                taken.append(job)
            else:
                kept.append(job)
                if self.sched.switching == "fifo":
                    break
        model.queue.extendleft(reversed(kept))
        return taken

    def _may_coalesce(self, model: ModelState, job: Job) -> bool:
        """fifo (the comparison baseline) serves strictly in arrival order: a job joins
        the batch only if no other model's request is older."""
        if self.sched.switching != "fifo":
            return True
        return all(not m.queue or m.queue[0].enqueued >= job.enqueued
                   for m in self.models.values() if m is not model)

    async def _run_batch(self, model: ModelState) -> None:
        jobs = self._take(model)
        delay = jobs[0].not_before - time.monotonic()
        if delay > 0:  # a retry backs off without blocking the event loop
            await asyncio.sleep(min(delay, 1.0))
        start = time.monotonic()
        for job in jobs:
            job.timing.queued = start - job.enqueued - job.timing.load
        request = _merge(jobs)
        self.sched.metrics["backend_calls"] += 1
        self.sched.metrics["coalesced_requests"] += len(jobs) - 1
        try:
            reply = await self.worker.call(request, timeout=self.sched.run_allowance(model, jobs))
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            if not await self._npu_failed(model, jobs, str(exc)):
                self._retry_or_fail(model, jobs, exc)
            return
        elapsed = time.monotonic() - start
        model.last_used = time.monotonic()
        if isinstance(reply, wp.Failure) and reply.kind == "backend":
            if not await self._npu_failed(model, jobs, reply.error):
                self._retry_or_fail(model, jobs, RuntimeError(reply.error), reply.error)
            return
        model.npu_failures = 0
        self.sched.observe(model, jobs[0].task, sum(j.items for j in jobs), elapsed)
        for job in jobs:
            job.timing.inference = elapsed
        if isinstance(reply, wp.Vectors) and len(jobs) > 1:
            _split_vectors(jobs, reply)
        elif isinstance(reply, wp.LinesMany):
            for job, lines in zip(jobs, reply.items, strict=True):
                _settle(job, lines)
        else:
            for job in jobs:
                _settle(job, reply)
        self.batch_ended = time.monotonic()  # the replies are out: follow-ups may come

    async def _npu_failed(self, model: ModelState, jobs: list[Job], reason: str) -> bool:
        """The circuit breaker of an NPU model. The first failure re-initialises the
        model (unload; the retry loads it again); at the threshold its work moves to
        the CPU twin. True when the jobs were taken care of."""
        if model.plan.twin is None:
            return False
        model.npu_failures += 1
        self.sched.metrics["npu_failures"] += 1
        if model.npu_failures >= self.sched.npu_threshold:
            self.sched.trip(model, f"NPU failed {model.npu_failures} times: {reason}", jobs)
            return True
        log.warning("NPU call failed (%s): re-initialising %s", reason, model.plan.name)
        await self._unload(model)
        for job in reversed(jobs):
            if not job.future.done():
                model.queue.appendleft(job)
        return True

    async def _probe(self, model: ModelState) -> None:
        """Try a tripped NPU model again: load it and run one small inference."""
        now = time.monotonic()
        spec = model.plan.spec
        ok = False
        try:
            reply = await self.worker.call(wp.Load(spec), timeout=self.sched.load_allowance(model))
            if isinstance(reply, wp.Loaded):
                test = await self.worker.call(wp.Embed(spec.model_id, ("probe",)), timeout=30.0)
                ok = isinstance(test, wp.Vectors)
                if not ok:
                    await self.worker.call(wp.Unload(spec.model_id), timeout=30.0)
                else:
                    self.resident.append(spec.model_id)
                    model.state = "ready"
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
        if ok:
            self.sched.untrip(model)
        else:
            model.probe_backoff = min(600.0, max(model.probe_backoff * 2, 1.0))
            model.probe_at = now + model.probe_backoff
            log.info("NPU probe of %s failed; next in %.0fs", model.plan.name,
                     model.probe_backoff)

    def _retry_or_fail(self, model: ModelState, jobs: list[Job], exc: Exception,
                       backend_error: str | None = None) -> None:
        """One retry (on a fresh worker after a crash) while the deadline allows;
        a request that fails twice gets a clear error."""
        now = time.monotonic()
        expected = model.service_seconds(jobs[0].task, 1) or 0.0
        for job in reversed(jobs):
            job.attempts += 1
            if job.future.done():
                continue
            if job.attempts < 2 and now + expected < job.deadline:
                job.not_before = now + 0.05 * 2 ** job.attempts  # back off a little
                model.queue.appendleft(job)
                self.sched.metrics["retries"] += 1
            elif backend_error is not None:
                job.future.set_exception(BackendFailed(
                    f"backend failed twice on this request: {backend_error}"))
            else:
                job.future.set_exception(BackendFailed(
                    f"model worker crashed twice on this request ({exc}); it was restarted"))


def _retarget(req: wp.Request, model_id: str) -> wp.Request:
    """The same request for another model (the CPU twin)."""
    return dataclasses.replace(req, model_id=model_id)  # type: ignore[type-var]


def _merge(jobs: list[Job]) -> wp.Request:
    if len(jobs) == 1:
        return jobs[0].request
    first = jobs[0].request
    if isinstance(first, wp.Expand):
        return wp.ExpandMany(first.model_id, tuple(j.request for j in jobs))  # type: ignore[misc]
    assert isinstance(first, wp.Embed)
    texts: list[str] = []
    for job in jobs:
        assert isinstance(job.request, wp.Embed)
        texts.extend(job.request.texts)
    return wp.Embed(first.model_id, tuple(texts))


def _split_vectors(jobs: list[Job], reply: wp.Vectors) -> None:
    rows = reply.rows()
    pos = 0
    for job in jobs:
        n = job.items
        if not job.future.done():
            job.future.set_result(wp.Vectors(
                rows.slice(pos, pos + n).data, reply.dim, reply.truncated[pos:pos + n],
                reply.tokens * n // max(1, len(rows)), reply.seconds))
        pos += n


def _settle(job: Job, reply: wp.Reply) -> None:
    if job.future.done():
        return
    if isinstance(reply, wp.Failure):
        cls = {"bad_request": BadRequest, "unavailable": ModelUnavailable}.get(
            reply.kind, BackendFailed)
        job.future.set_exception(cls(reply.error))
    else:
        job.future.set_result(reply)


class Scheduler:
    """Owns the lanes; the HTTP layer calls submit() and gets replies or SchedulerErrors."""

    def __init__(self, cfg: Config, plans: dict[str, ModelPlan], task_model: dict[str, str],
                 log_level: int = logging.INFO) -> None:
        self.cfg = cfg
        self.plans = plans
        self.task_model = task_model
        self.log_level = log_level
        self.policy = cfg.get("scheduler.policy")
        self.apply_tunables(cfg)
        self.switching = cfg.get("scheduler.switching")
        self.npu_threshold = int(cfg.get("npu.failure_threshold"))
        self.npu_reprobe = float(cfg.get("npu.reprobe_seconds"))
        self.calibration = CalibrationStore(cfg.state_dir / "calibration.json")
        self._calls_since_save = 0
        self.stopping = False
        self.metrics: collections.Counter[str] = collections.Counter()
        self.lanes: dict[str, Lane] = {}
        for plan in plans.values():
            lane = self.lanes.setdefault(plan.device, Lane(plan.device, self))
            mid = plan.spec.model_id
            lane.models[mid] = ModelState(
                plan, costs=self.calibration.costs(mid),
                task_costs={t: self.calibration.costs(f"{mid}/{t}") for t in plan.tasks})

    def apply_tunables(self, cfg: Config) -> None:
        """Settings that may change while running (SIGHUP): timing and queue limits.
        Models, devices and the residency policy need a restart."""
        self.cfg = cfg
        self.keep_alive = float(cfg.get("scheduler.keep_alive"))
        self.aging_s = float(cfg.get("scheduler.aging_ms")) / 1000.0
        self.hysteresis_s = float(cfg.get("scheduler.switch_hysteresis_ms")) / 1000.0
        self.anticipate_s = float(cfg.get("scheduler.anticipate_ms")) / 1000.0
        self.coalesce_texts = int(cfg.get("scheduler.coalesce_texts"))
        self.coalesce_expansions = int(cfg.get("scheduler.coalesce_expansions"))
        self.prefetch = bool(cfg.get("scheduler.prefetch"))
        self.max_queue = int(cfg.get("scheduler.max_queue"))
        self.request_timeout = float(cfg.get("scheduler.request_timeout"))
        self.reserve_bytes = int(float(cfg.get("scheduler.memory_reserve_mb")) * 1024 * 1024)
        self.budget_bytes = int(float(cfg.get("scheduler.memory_budget_mb")) * 1024 * 1024)
        self.deadline_multiplier = float(cfg.get("scheduler.deadline_multiplier"))
        self.deadline_floor = float(cfg.get("scheduler.deadline_floor"))


    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.task = asyncio.create_task(lane.run(), name=f"lane-{lane.device}")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, let queued work finish within `timeout`, then stop workers."""
        self.stopping = True
        for lane in self.lanes.values():
            lane.wake.set()
        tasks = [lane.task for lane in self.lanes.values() if lane.task]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            for lane in self.lanes.values():
                for m in lane.models.values():
                    lane._fail_queue(m, ShuttingDown("server is shutting down"))
        for lane in self.lanes.values():
            lane.prefetcher.cancel()
            await lane.worker.stop()
        self.calibration.save()

    # --- estimates --------------------------------------------------------------

    def primary_state(self, task: str) -> ModelState:
        mid = self.task_model[task]
        return self.lanes[self.plans[mid].device].models[mid]

    def model_state(self, task: str) -> ModelState:
        """The model serving `task` now: the CPU twin while an NPU model is tripped."""
        model = self.primary_state(task)
        if model.tripped and model.plan.twin:
            return self._state(model.plan.twin)
        return model

    def _state(self, model_id: str) -> ModelState:
        return self.lanes[self.plans[model_id].device].models[model_id]

    def trip(self, model: ModelState, reason: str, jobs: list[Job]) -> None:
        """Move an NPU model's work (running jobs first, then its queue) to its CPU twin."""
        assert model.plan.twin is not None
        twin = self._state(model.plan.twin)
        first_trip = not model.tripped
        model.tripped, model.trip_reason = True, reason
        model.probe_backoff = self.npu_reprobe
        model.probe_at = time.monotonic() + self.npu_reprobe
        moved = [j for j in jobs + list(model.queue) if not j.future.done()]
        model.queue.clear()
        for job in moved:
            job.request = _retarget(job.request, twin.model_id)
            job.attempts = 0
        twin.queue = collections.deque(sorted(list(twin.queue) + moved,
                                              key=lambda j: j.enqueued))
        self.lane_of(twin).wake.set()
        if first_trip:
            self.metrics["npu_fallbacks"] += 1
            log.warning("%s falls back to the CPU twin %s: %s", model.plan.name,
                        twin.plan.name, reason)

    def untrip(self, model: ModelState) -> None:
        model.tripped, model.trip_reason, model.npu_failures = False, None, 0
        model.error = None
        self.metrics["npu_recoveries"] += 1
        log.info("%s is back on the NPU", model.plan.name)

    def observe(self, model: ModelState, task: str, items: int, seconds: float) -> None:
        model.task_costs[task].observe_call(items, seconds)
        self._calls_since_save += 1
        if self._calls_since_save >= 100:
            self.calibration.save()
            self._calls_since_save = 0

    def load_allowance(self, model: ModelState) -> float:
        """How long a load may take: generous while unmeasured, else 5x the worst seen."""
        if model.costs.load_seconds is None:
            return COLD_LOAD_ALLOWANCE
        return max(30.0, 5.0 * model.costs.load_seconds_max)

    def run_allowance(self, model: ModelState, jobs: list[Job]) -> float:
        """How long a running call may take before the worker counts as hung.

        Work already running is not abandoned at the request deadline (its
        result is still useful to the caller); only a call far beyond its
        measured cost is treated as a hang.
        """
        items = sum(j.items for j in jobs)
        expected = model.service_seconds(jobs[0].task, items)
        if model.plan.twin is not None and expected is not None:
            # An NPU call that "failed to submit" never returns: past ten times its
            # calibrated cost the worker is killed and the work retried or moved.
            return max(NPU_HANG_FLOOR, 10.0 * expected)
        remaining = max(j.deadline for j in jobs) - time.monotonic()
        return max(remaining, 30.0 + 10.0 * (expected or float(items)))

    def aging_bound(self, serving: ModelState, waiting: ModelState) -> float:
        """How long `waiting`'s head may wait before it preempts `serving`: the
        configured bound, or AGING_SWAP_FACTOR swaps (there and back) when loads
        are slow, so that switching never costs more than a small share of time."""
        swap = self._swap_seconds(waiting) + self._swap_seconds(serving)
        return max(self.aging_s, AGING_SWAP_FACTOR * swap)

    def hysteresis(self, serving: ModelState, waiting: ModelState) -> float:
        """How much older another queue's head must be before the device switches."""
        swap = self._swap_seconds(waiting) + self._swap_seconds(serving)
        return max(self.hysteresis_s, 2.0 * swap)

    def _swap_seconds(self, model: ModelState) -> float:
        """Cost of making `model` resident: its load (cold loads get the allowance)."""
        if model.costs.load_seconds is None:
            return 0.0
        return model.costs.load_seconds

    def expected_wait(self, lane: Lane, model: ModelState, task: str, items: int
                      ) -> float | None:
        """Seconds until a new request of `items` would finish; None while uncalibrated."""
        total = 0.0
        for m in lane.models.values():
            if m.queue:
                queued = m.queued_seconds()
                if queued is None:
                    return None
                total += queued
                if m.model_id not in lane.resident and m is not model:
                    total += self._swap_seconds(m)
        own = model.service_seconds(task, items)
        if own is None:
            return None
        total += own
        if model.model_id not in lane.resident:
            total += self._swap_seconds(model)
        return total

    def deadline_for(self, expected: float | None, cold: bool) -> float:
        """Seconds this request may take: a multiple of its calibrated wait (plus the
        aging bound, which later work for the resident model may use first), within
        [deadline_floor, request_timeout]; uncalibrated or cold, the full timeout."""
        if expected is None or cold:
            return self.request_timeout
        allowed = self.deadline_multiplier * (expected + self.aging_s)
        return min(self.request_timeout, max(self.deadline_floor, allowed))

    def recommended_timeout(self) -> float:
        """What a client should wait: the worst cold start plus a full queue of work."""
        worst = 0.0
        for m in self.all_models():
            load = m.costs.load_seconds_max or 0.0
            per = max((m.service_seconds(t, self.coalesce_texts) or 0.0 for t in m.plan.tasks),
                      default=0.0)
            worst = max(worst, load + per)
        return min(self.request_timeout, max(self.deadline_floor, self.deadline_multiplier * worst))

    def mapped_bytes(self, model: ModelState) -> int:
        """Bytes of the model's file a loaded model keeps mapped (GGUF weights)."""
        path = model.plan.spec.path
        return os.path.getsize(path) if os.path.isfile(path) else 0

    def budget_room(self) -> float:
        """What the memory budget leaves for another model: the budget less the footprints
        of the models resident on every device (an NPU's models live in the same RAM).
        The budget is the scheduler's own reckoning, so other programs' memory does not
        move it: an admin caps the daemon below what the board has free."""
        if not self.budget_bytes:
            return float("inf")
        held = sum(self.estimate_bytes(lane.models[mid])
                   for lane in self.lanes.values() for mid in lane.resident)
        return self.budget_bytes - held

    def estimate_bytes(self, model: ModelState) -> int:
        """A model's memory: the most it was seen to hold, else its file plus a margin."""
        if model.costs.footprint_bytes:
            return model.costs.footprint_bytes
        try:
            return os.path.getsize(model.plan.spec.path) + 64 * 1024 * 1024
        except OSError:
            return 0

    # --- submission ---------------------------------------------------------------

    async def submit(self, task: str, request: wp.Request, items: int) -> tuple[Any, Timing]:
        if self.stopping:
            raise ShuttingDown("server is shutting down", retry_after=5)
        model = self.model_state(task)
        lane = self.lanes[model.plan.device]
        now = time.monotonic()
        if model.state == "failed" and now < model.retry_at:
            raise ModelUnavailable(f"model {model.plan.name} cannot load: {model.error}",
                                   retry_after=model.retry_at - now)
        queued = sum(m.queued_items() for m in lane.models.values())
        expected = self.expected_wait(lane, model, task, items)
        if queued + items > self.max_queue:
            self.metrics["rejected_overload"] += 1
            raise Overloaded(f"queue full ({queued} items waiting)",
                             retry_after=expected or 1.0)
        if expected is not None and expected > self.request_timeout:
            self.metrics["rejected_overload"] += 1
            raise Overloaded(
                f"expected completion in {expected:.0f}s exceeds the {self.request_timeout:.0f}s"
                " limit", retry_after=expected - self.request_timeout)
        cold = model.costs.load_seconds is None and model.model_id not in lane.resident
        deadline = now + self.deadline_for(expected, cold)
        job = Job(task, request, items, now, deadline,
                  asyncio.get_running_loop().create_future())
        model.queue.append(job)
        lane.wake.set()
        try:
            reply = await job.future
        except asyncio.CancelledError:
            # The client disconnected: a queued job is skipped by the lane.
            job.future.cancel()
            raise
        return reply, job.timing

    async def count_tokens(self, task: str, texts: list[str]) -> list[int]:
        model = self.model_state(task)
        lane = self.lanes[model.plan.device]
        now = time.monotonic()
        job = Job("tokenize", wp.CountTokens(model.plan.spec, tuple(texts)), len(texts), now,
                  now + self.request_timeout, asyncio.get_running_loop().create_future())
        lane.light.append(job)
        lane.wake.set()
        reply = await job.future
        assert isinstance(reply, wp.TokenCounts)
        return list(reply.counts)

    async def control(self, action: str, model: ModelState) -> str:
        """Preload ("load") or unload a model; returns its state afterwards."""
        if self.stopping:
            raise ShuttingDown("server is shutting down", retry_after=5)
        lane = self.lane_of(model)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        lane.control.append((action, model, future))
        lane.wake.set()
        return await future

    def find_model(self, name: str) -> ModelState | None:
        """By task (embed/rerank/expand), model name or model id."""
        if name in self.task_model:
            return self.model_state(name)
        for m in self.all_models():
            if name in (m.plan.name, m.model_id):
                return m
        return None

    # --- convenience for routes -------------------------------------------------

    async def embed(self, texts: list[str]) -> tuple[VectorRows, list[bool], int, Timing]:
        mid = self.model_state("embed").model_id
        reply, timing = await self.submit("embed", wp.Embed(mid, tuple(texts)), len(texts))
        assert isinstance(reply, wp.Vectors)
        return reply.rows(), list(reply.truncated), reply.tokens, timing

    async def rerank(self, query: str, documents: list[str], instruction: str | None = None
                     ) -> tuple[list[float], list[bool], int, Timing]:
        mid = self.model_state("rerank").model_id
        if instruction is None:
            instruction = str(self.plans[mid].spec.option("instruction", ""))
        req = wp.Rerank(mid, query, tuple(documents), instruction)
        reply, timing = await self.submit("rerank", req, len(documents))
        assert isinstance(reply, wp.Scores)
        return list(reply.scores), list(reply.truncated), reply.tokens, timing

    async def expand(self, query: str, intent: str | None, include_lexical: bool
                     ) -> tuple[list[tuple[str, str]], Timing]:
        mid = self.model_state("expand").model_id
        reply, timing = await self.submit(
            "expand", wp.Expand(mid, query, intent, include_lexical), 1)
        assert isinstance(reply, wp.Lines)
        return [tuple(x) for x in reply.lines], timing  # type: ignore[misc]

    def model_name(self, task: str) -> str:
        return self.plans[self.task_model[task]].name

    def all_models(self) -> list[ModelState]:
        return [m for lane in self.lanes.values() for m in lane.models.values()]

    def lane_of(self, model: ModelState) -> Lane:
        return self.lanes[model.plan.device]

