"""One device: its worker process, the models placed on it, and the loop that carries out
the policy's decisions. The lane is the one record of which models are loaded there.

Everything outside the lane comes in through `LaneContext`: the settings, the policy, the
clock, the memory probe, the calibration store, the event counters and the two things only
the scheduler can do (move an NPU model's work to its CPU twin on another lane; tell how
much the other lanes hold). The worker comes from an injected factory.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from npuserve.daemon.errors import (
    BackendFailed,
    BadRequest,
    Busy,
    DeadlineExceeded,
    ModelUnavailable,
    SchedulerError,
)
from npuserve.daemon.sched import costs
from npuserve.daemon.sched.calibration import CalibrationStore
from npuserve.daemon.sched.jobs import Job
from npuserve.daemon.sched.model import ModelState
from npuserve.daemon.sched.policy import (
    Decision,
    Idle,
    LaneView,
    Load,
    Policy,
    Probe,
    QueueView,
    Reject,
    Serve,
    Unload,
    Wait,
)
from npuserve.daemon.sched.prefetch import Prefetcher
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.worker import protocol as wp
from npuserve.daemon.worker.handle import WorkerDied, WorkerTimeout

log = logging.getLogger("npuserve.scheduler")

# A worker whose RSS stays this far above its pre-load baseline after every
# model is unloaded is replaced, so "unload" returns memory for certain.
RECYCLE_SLACK_BYTES = 48 * 1024 * 1024
# Memory a read-ahead leaves free beside the resident model, for what it still allocates.
PREFETCH_MARGIN_BYTES = 32 * 1024 * 1024
PROBE_CALL_TIMEOUT = 30.0


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Worker(Protocol):
    """What a lane needs of its worker process (worker/handle.py's WorkerHandle)."""

    @property
    def pid(self) -> int | None: ...

    async def call(self, req: wp.Request, timeout: float | None = None,
                   on_partial: Callable[[wp.Partial], None] | None = None) -> wp.Reply: ...

    async def stop(self) -> None: ...

    def interrupt(self) -> None: ...

    def kill_now(self) -> None: ...


@dataclass
class LaneContext:
    settings: SchedulerSettings
    policy: Policy
    clock: Clock
    memory_probe: Callable[[], int]
    calibration: CalibrationStore
    events: collections.Counter[str]
    to_twin: Callable[[ModelState, str, list[Job]], None]
    held_elsewhere: Callable[[Lane], int]
    stopping: bool = False


Control = tuple[str, ModelState, asyncio.Future[str]]


class Lane:
    def __init__(self, device: str, worker: Worker, ctx: LaneContext) -> None:
        self.device = device
        self.worker = worker
        self.ctx = ctx
        self.models: dict[str, ModelState] = {}
        self.resident: list[str] = []  # least recently used first: what is loaded here
        self.loading: str | None = None
        self.light: collections.deque[Job] = collections.deque()
        self.control: collections.deque[Control] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.baseline_rss: int | None = None
        self.serving: str | None = None  # the model served last
        self.batch_ended: float | None = None  # when it last answered, until one decision
        self.prefetcher = Prefetcher()
        self.running: list[Job] = []  # the batch in the worker now
        self.swaps = 0
        self.recycles = 0
        self.crashes = 0

    # --- what the policy sees ---------------------------------------------------------

    def view(self, now: float, loading: bool = False) -> LaneView:
        """What the policy sees; `loading`: a load is planned whatever the queues say."""
        models = tuple(self._queue_view(m) for m in self.models.values())
        # Memory is read only where the auto policy may plan a load with it (files and
        # /proc are not read at every decision).
        may_load = self.ctx.settings.residency == "auto" and (loading or any(
            not m.resident and (m.waiting or m.probe_at is not None) for m in models))
        return LaneView(
            models=models,
            resident=tuple(self.resident),
            serving=self.serving,
            batch_ended=self.batch_ended,
            mem_available=self.ctx.memory_probe() if may_load else LaneView.mem_available,
            held_elsewhere=self.ctx.held_elsewhere(self) if may_load else 0,
            stopping=self.ctx.stopping,
        )

    def _queue_view(self, m: ModelState) -> QueueView:
        resident = m.model_id in self.resident
        return QueueView(
            model_id=m.model_id,
            head=m.queue[0].queued_since if m.queue else None,
            work=m.queued_seconds(),
            swap=costs.swap_seconds(m),
            resident=resident,
            footprint=costs.estimate_bytes(m),
            mapped=costs.mapped_bytes(m) if resident else 0,
            last_used=m.last_used,
            retry_at=m.backoff.retry_at if m.backoff.waiting(self.ctx.clock.now()) else 0.0,
            probe_at=m.breaker.next_probe() if m.breaker else None,
            background_only=m.background_only,
        )

    def state_of(self, model: ModelState) -> str:
        if self.loading == model.model_id:
            return "loading"
        if model.model_id in self.resident:
            return "ready"
        return "failed" if model.backoff.error is not None else "unloaded"

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """The lane's loop. A bug in one step fails that step's requests with a clear error
        and the loop goes on: a dead loop would leave every later request waiting."""
        while True:
            try:
                if await self._step():
                    return
            except Exception as exc:
                log.exception("%s lane: a scheduling step failed", self.device)
                self.ctx.events["lane_errors"] += 1
                for job in self.running:
                    if not job.future.done():
                        job.future.set_exception(BackendFailed(f"internal error: {exc}"))
            self.running = []

    async def _step(self) -> bool:
        """One decision, carried out; True when the lane is to stop."""
        self.wake.clear()
        await self._serve_control()
        await self._serve_light()
        now = self.ctx.clock.now()
        self._drop_dead(now)
        decision = self.ctx.policy.decide(self.view(now), now)
        if isinstance(decision, Serve | Load | Reject | Wait):
            self.batch_ended = None  # one wait per batch: the decision after it is final
        return await self._carry_out(decision)

    async def _carry_out(self, decision: Decision) -> bool:
        if isinstance(decision, Idle):
            if self.ctx.stopping and not self._busy():
                return True
            await self._sleep(decision.timeout)
        elif isinstance(decision, Wait):
            await self.ctx.clock.sleep(decision.seconds)
        elif isinstance(decision, Unload):
            for mid in decision.model_ids:
                await self._unload(self.models[mid])
        elif isinstance(decision, Probe):
            await self._probe(self.models[decision.model_id], decision.evict)
        elif isinstance(decision, Reject):
            model = self.models[decision.model_id]
            self.fail_queue(model, ModelUnavailable(
                f"model {model.plan.name} cannot load: {model.backoff.error}",
                retry_after=decision.retry_after))
        elif isinstance(decision, Load):
            model = self.models[decision.model_id]
            error = await self._load(model, decision.evict)
            if error is not None:
                self._load_failed(model, error)
            else:
                await self._visit(model)
        else:
            model = self.models[decision.model_id]
            self._touch(model)
            await self._visit(model)
        return False

    async def _sleep(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass

    def _busy(self) -> bool:
        return bool(self.light or self.control) or any(m.queue for m in self.models.values())

    def _touch(self, model: ModelState) -> None:
        self.resident.remove(model.model_id)
        self.resident.append(model.model_id)

    async def _visit(self, model: ModelState) -> None:
        self.serving = model.model_id
        self._prefetch_next(model)
        await self._run_batch(model)

    def _drop_dead(self, now: float) -> None:
        """Expired requests get 504 and never run; cancelled ones are dropped."""
        for m in self.models.values():
            kept: collections.deque[Job] = collections.deque()
            for job in m.queue:
                if job.future.done():
                    self.ctx.events["dropped_disconnected"] += 1
                    continue  # the client went away
                if now >= job.deadline:
                    job.future.set_exception(DeadlineExceeded(
                        f"request waited {now - job.enqueued:.1f}s, past its deadline"))
                    self.ctx.events["deadline_expired"] += 1
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
                    await self._preload(model)
                elif model.queue:
                    raise Busy(f"{model.plan.name} has {len(model.queue)} queued requests")
                else:
                    await self._unload(model)
                future.set_result(self.state_of(model))
            except SchedulerError as exc:
                future.set_exception(exc)

    async def _preload(self, model: ModelState) -> None:
        if model.model_id in self.resident:
            self._touch(model)
            return
        now = self.ctx.clock.now()
        if model.backoff.waiting(now):
            raise ModelUnavailable(f"model {model.plan.name} cannot load: {model.backoff.error}",
                                   retry_after=model.backoff.retry_at - now)
        view = self.view(now, loading=True)
        error = await self._load(model, self.ctx.policy.victims(view, view.model(model.model_id)))
        if error is not None:
            self._load_failed(model, error)
            raise ModelUnavailable(model.backoff.error or "load failed")

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
            settle(job, reply)

    # --- residency ----------------------------------------------------------------------

    async def _load(self, model: ModelState, evict: tuple[str, ...]) -> str | None:
        """Unload `evict`, load `model`, account for it. None on success, else why not."""
        # The load reads whatever the read-ahead has not: both at once would only share
        # the disk, and a read-ahead of another model would take the memory.
        self.prefetcher.cancel()
        for victim in evict:
            await self._unload(self.models[victim])
        self.loading = model.model_id
        try:
            reply = await self.worker.call(wp.Load(model.plan.spec),
                                           timeout=costs.load_allowance(model))
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            return f"worker died while loading: {exc}"
        finally:
            self.loading = None
        if isinstance(reply, wp.Failure):
            return reply.error
        assert isinstance(reply, wp.Loaded)
        self._loaded(model, reply)
        if any(c.sec_per_token is None for c in model.task_costs.values()):
            await self._warm_up(model)
        self.ctx.calibration.save()
        return None

    def _loaded(self, model: ModelState, reply: wp.Loaded) -> None:
        if self.baseline_rss is None or not self.resident:
            self.baseline_rss = reply.rss_before
        model.backoff.succeeded()
        model.estimated_bytes = model.file_bytes = None  # read the loaded files afresh
        # keep_alive counts from the load too: a preloaded model with nothing queued yet
        # must not look idle since start-up and be unloaded at once.
        model.last_used = self.ctx.clock.now()
        model.counters.loads += 1
        model.counters.load_seconds_total += reply.seconds
        model.costs.observe_load(reply.seconds)
        model.costs.observe_footprint(reply.rss_after - reply.rss_before)
        model.dim = reply.dim
        self.resident.append(model.model_id)
        self.swaps += 1
        self.ctx.events["loads"] += 1
        for job in model.queue:
            job.timing.load += reply.seconds
        # The queues at the swap say why it happened, for whoever reads the log.
        log.info("loaded %s on %s in %.2fs (queued: %s)", model.plan.name, self.device,
                 reply.seconds, ", ".join(f"{m.plan.name} {len(m.queue)}"
                                          for m in self.models.values()))

    async def _warm_up(self, model: ModelState) -> None:
        """First load ever: time one small call so admission has a figure at once."""
        task = next((t for t in ("embed", "rerank") if t in model.plan.tasks), None)
        if task is None or model.task_costs[task].sec_per_token is not None:
            return  # a generation warm-up would cost more than it tells
        spec = model.plan.spec
        req: wp.Request = (wp.Embed(spec.model_id, ("warm-up " * 16,)) if task == "embed"
                           else wp.Rerank(spec.model_id, "warm-up", ("warm-up " * 16,), ""))
        start = self.ctx.clock.now()
        try:
            reply = await self.worker.call(req, timeout=costs.load_allowance(model))
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            return
        if isinstance(reply, wp.Vectors | wp.Scores):
            model.task_costs[task].observe_call(reply.tokens, self.ctx.clock.now() - start)

    async def _unload(self, model: ModelState) -> None:
        if model.model_id not in self.resident:
            return
        self.resident.remove(model.model_id)
        model.counters.unloads += 1
        self.ctx.events["unloads"] += 1
        try:
            reply = await self.worker.call(wp.Unload(model.model_id), timeout=60.0)
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            return
        log.info("unloaded %s from %s", model.plan.name, self.device)
        if not isinstance(reply, wp.Unloaded):
            return
        # What unloading gave back includes what the model grew to while serving
        # (compute buffers, a generation's working set): the auto policy plans with it.
        model.costs.observe_footprint(reply.rss_before - reply.rss_after)
        if (not self.resident and self.baseline_rss is not None
                and reply.rss_after > self.baseline_rss + RECYCLE_SLACK_BYTES):
            log.info("worker %s kept %d MB after unload: recycling it", self.device,
                     (reply.rss_after - self.baseline_rss) >> 20)
            await self.worker.stop()
            self.baseline_rss = None
            self.recycles += 1

    def _load_failed(self, model: ModelState, reason: str) -> None:
        if model.breaker is not None:
            # An NPU model that cannot load: its work goes to the CPU twin.
            model.backoff.error = reason
            self.ctx.to_twin(model, f"NPU load failed: {reason}", [])
            return
        backoff = model.backoff.failed(reason, self.ctx.clock.now())
        self.ctx.events["load_failures"] += 1
        log.error("loading %s failed (retry in %.0fs): %s", model.plan.name, backoff, reason)
        self.fail_queue(model, ModelUnavailable(f"model {model.plan.name} cannot load: {reason}",
                                                 retry_after=backoff))

    def fail_queue(self, model: ModelState, exc: SchedulerError) -> None:
        while model.queue:
            job = model.queue.popleft()
            if not job.future.done():
                job.future.set_exception(exc)

    def _worker_lost(self, reason: str) -> None:
        """Everything the worker held is gone; the next call starts a new one."""
        self.crashes += 1
        self.ctx.events["worker_crashes"] += 1
        log.error("%s worker lost: %s", self.device, reason)
        self.resident.clear()
        self.baseline_rss = None

    def _prefetch_next(self, serving: ModelState) -> None:
        """While `serving` computes, read ahead the files of the model that the device will
        load next (by the rule that will pick it), within the memory free beside the
        resident model: the swap then reads from memory instead of flash."""
        if not self.ctx.settings.prefetch:
            return
        now = self.ctx.clock.now()
        others = [self._queue_view(m) for m in self.models.values()
                  if m.queue and m is not serving and m.model_id not in self.resident]
        if not others:
            return
        view = LaneView(models=tuple(others))
        nxt = self.models[self.ctx.policy.pick(view, others, now).model_id]
        self.prefetcher.start(nxt.model_id, nxt.plan.files,
                              self.ctx.memory_probe() - PREFETCH_MARGIN_BYTES)

    # --- NPU probes ---------------------------------------------------------------------

    async def _probe(self, model: ModelState, evict: tuple[str, ...]) -> None:
        """Try a tripped NPU model again, through the same load as any other (eviction,
        accounting), with the smallest call of its own task."""
        breaker = model.breaker
        assert breaker is not None
        self.ctx.events["npu_probes"] += 1
        ok = False
        error = await self._load(model, evict)
        if error is None:
            request = breaker.probe_request(model.plan.spec, model.plan.tasks)
            try:
                reply = await self.worker.call(request, timeout=PROBE_CALL_TIMEOUT)
                ok = not isinstance(reply, wp.Failure)
                error = reply.error if isinstance(reply, wp.Failure) else None
            except (WorkerDied, WorkerTimeout) as exc:
                self._worker_lost(str(exc))
                error = str(exc)
            if not ok:
                await self._unload(model)
        if ok:
            breaker.probe_succeeded()
            model.backoff.succeeded()
            self.ctx.events["npu_recoveries"] += 1
            log.info("%s is back on the NPU", model.plan.name)
        else:
            backoff = breaker.probe_failed(self.ctx.clock.now())
            log.info("NPU probe of %s failed (%s); next in %.0fs", model.plan.name, error,
                     backoff)

    # --- running ------------------------------------------------------------------------

    async def _run_batch(self, model: ModelState) -> None:
        other_heads = [m.queue[0].queued_since for m in self.models.values()
                       if m is not model and m.queue]
        jobs = self.running = self.ctx.policy.take(model.queue, other_heads)
        delay = jobs[0].not_before - self.ctx.clock.now()
        if delay > 0:  # a retry backs off without blocking the event loop
            await self.ctx.clock.sleep(min(delay, 1.0))
        start = self.ctx.clock.now()
        for job in jobs:
            if not job.done:  # a later slice's wait is not the request's queueing
                job.timing.queued = start - job.enqueued - job.timing.load
        self.ctx.events["backend_calls"] += 1
        self.ctx.events["coalesced_requests"] += len(jobs) - 1
        request = self._slice(model, jobs)
        reply = await self._call(model, jobs, start, request)
        if reply is None:
            return
        elapsed = self.ctx.clock.now() - start
        if isinstance(request, wp.Rerank) and isinstance(reply, wp.Scores) and (
                jobs[0].done or request != jobs[0].request):
            whole = self._slice_done(model, jobs[0], request, reply, elapsed)
            if whole is not None:
                await self._answer(model, jobs, whole, elapsed, measured=True)
            return
        await self._answer(model, jobs, reply, elapsed)

    def _slice(self, model: ModelState, jobs: list[Job]) -> wp.Request:
        """The call to make: the batch, or the next slice of one long rerank (so that
        another model's request waits seconds, not the whole rerank)."""
        request = merge(jobs)
        if len(jobs) != 1 or not isinstance(request, wp.Rerank):
            return request
        rate = model.task_costs["rerank"].sec_per_token
        job = jobs[0]
        per_doc = job.tokens / max(1, len(request.documents) + sum(
            len(s.scores) for s in job.done))
        n = self.ctx.policy.rerank_slice(len(request.documents), per_doc, rate)
        return dataclasses.replace(request, documents=request.documents[:n])

    def _slice_done(self, model: ModelState, job: Job, sent: wp.Rerank, reply: wp.Scores,
                    elapsed: float) -> wp.Scores | None:
        """Measure a slice and keep its scores; queue the rest of the rerank again (at the
        head of its model's queue), or, the last slice done, return the whole reply."""
        assert isinstance(job.request, wp.Rerank)
        # The slice's own characters: the job's would make a slice's tokens per character
        # look a fraction of what the tokenizer makes.
        chars = (len(sent.query) + len(sent.instruction)
                 + sum(len(d) for d in sent.documents))
        self.observe(model, [job], reply.tokens, elapsed, chars)
        job.done.append(reply)
        left = job.request.documents[len(sent.documents):]
        if not left:
            return wp.Scores(tuple(s for part in job.done for s in part.scores),
                             tuple(t for part in job.done for t in part.truncated),
                             sum(part.tokens for part in job.done),
                             sum(part.seconds for part in job.done))
        model.last_used = self.ctx.clock.now()
        job.request = dataclasses.replace(job.request, documents=left)
        job.turn = self.ctx.clock.now()
        if not job.future.done():
            model.queue.appendleft(job)
        self.batch_ended = self.ctx.clock.now()
        return None

    async def _call(self, model: ModelState, jobs: list[Job], start: float,
                    request: wp.Request) -> wp.Reply | None:
        """The batch's backend call; None when the worker was lost (its jobs were then
        retried, moved to the CPU twin or failed)."""
        abandoned = self._interrupt_when_abandoned(jobs)
        try:
            return await self.worker.call(request,
                                          timeout=costs.run_allowance(model, jobs, start),
                                          on_partial=_stream_to(jobs))
        except (WorkerDied, WorkerTimeout) as exc:
            self._worker_lost(str(exc))
            if not await self._npu_failed(model, jobs, str(exc)):
                self._retry_or_fail(model, jobs, exc)
            return None
        finally:
            abandoned.cancel()

    async def _answer(self, model: ModelState, jobs: list[Job], reply: wp.Reply,
                      elapsed: float, measured: bool = False) -> None:
        """Measure the call, then give each job its share of the reply."""
        model.last_used = self.ctx.clock.now()
        if isinstance(reply, wp.Failure) and reply.kind == "cancelled":
            self.ctx.events["cancelled_running"] += 1  # nobody waits: no retry, no figure
            self.batch_ended = self.ctx.clock.now()
            return
        if isinstance(reply, wp.Failure) and reply.kind == "backend":
            if not await self._npu_failed(model, jobs, reply.error):
                self._retry_or_fail(model, jobs, RuntimeError(reply.error), reply.error)
            return
        if model.breaker is not None:
            model.breaker.call_succeeded()
        if not isinstance(reply, wp.Failure) and not measured:
            # Only calls that ran are measured: a refused one (too long for the context)
            # answers in milliseconds and would make the model look fast.
            self.observe(model, jobs, reply_tokens(reply), elapsed)
        for job in jobs:
            job.timing.inference = elapsed
        deliver(jobs, reply)
        self.batch_ended = self.ctx.clock.now()  # the replies are out: follow-ups may come

    def _interrupt_when_abandoned(self, jobs: list[Job]) -> asyncio.Task[None]:
        """Stop the running call once every client of the batch has gone (their futures
        are cancelled on disconnect); the worker stops between documents or tokens."""

        async def watch() -> None:
            await asyncio.wait([j.future for j in jobs])
            if all(j.future.cancelled() for j in jobs):
                self.worker.interrupt()

        return asyncio.create_task(watch())

    def observe(self, model: ModelState, jobs: list[Job], tokens: int, seconds: float,
                chars: int | None = None) -> None:
        model.task_costs[jobs[0].task].observe_call(
            tokens, seconds, sum(j.chars for j in jobs) if chars is None else chars, len(jobs))
        self.ctx.calibration.note_call()

    async def _npu_failed(self, model: ModelState, jobs: list[Job], reason: str) -> bool:
        """The circuit breaker of an NPU model. The first failure re-initialises the model
        (unload; the retry loads it again); at the threshold its work moves to the CPU twin
        and the model is unloaded. True when the jobs were taken care of."""
        breaker = model.breaker
        if breaker is None:
            return False
        self.ctx.events["npu_failures"] += 1
        if breaker.call_failed():
            self.ctx.to_twin(model, f"NPU failed {breaker.failures} times: {reason}", jobs)
            await self._unload(model)
            return True
        log.warning("NPU call failed (%s): re-initialising %s", reason, model.plan.name)
        await self._unload(model)
        for job in reversed(jobs):
            if not job.future.done():
                model.queue.appendleft(job)
        return True

    def _retry_or_fail(self, model: ModelState, jobs: list[Job], exc: Exception,
                       backend_error: str | None = None) -> None:
        """One retry (on a fresh worker after a crash) while the deadline allows; a
        request that fails twice gets a clear error."""
        now = self.ctx.clock.now()
        expected = model.service_seconds(jobs[0].task, min(j.tokens for j in jobs)) or 0.0
        for job in reversed(jobs):
            job.attempts += 1
            if job.future.done():
                continue
            if job.attempts < 2 and now + expected < job.deadline and not job.streamed:
                job.not_before = now + 0.05 * 2 ** job.attempts  # back off a little
                model.queue.appendleft(job)
                self.ctx.events["retries"] += 1
            elif backend_error is not None:
                job.future.set_exception(BackendFailed(
                    f"backend failed twice on this request: {backend_error}"))
            else:
                job.future.set_exception(BackendFailed(
                    f"model worker crashed twice on this request ({exc}); it was restarted"))


def _stream_to(jobs: list[Job]) -> Callable[[wp.Partial], None] | None:
    """Where a streamed call's pieces go: its one job's client (generations run alone)."""
    job = jobs[0]
    sink = job.on_partial
    if len(jobs) != 1 or sink is None:
        return None

    def deliver_piece(piece: wp.Partial) -> None:
        if not job.future.done():
            job.streamed = True
            sink(piece.text)

    return deliver_piece


def reply_tokens(reply: wp.Reply) -> int:
    """Tokens a call evaluated and generated, as its backend counted them."""
    if isinstance(reply, wp.LinesMany):
        return sum(item.tokens for item in reply.items)
    return int(getattr(reply, "tokens", 0))


def retarget(req: wp.Request, model_id: str) -> wp.Request:
    """The same request for another model (the CPU twin)."""
    return dataclasses.replace(req, model_id=model_id)  # type: ignore[type-var]


def merge(jobs: list[Job]) -> wp.Request:
    """One backend call for a batch: texts concatenated, expansions side by side."""
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


def deliver(jobs: list[Job], reply: wp.Reply) -> None:
    """Each job of a batch gets its own share of the reply."""
    if isinstance(reply, wp.Vectors) and len(jobs) > 1:
        rows = reply.rows()
        pos = 0
        for job in jobs:
            n = job.items
            settle(job, wp.Vectors(rows.slice(pos, pos + n).data, reply.dim,
                                   reply.truncated[pos:pos + n],
                                   reply.tokens * n // max(1, len(rows)), reply.seconds))
            pos += n
    elif isinstance(reply, wp.LinesMany):
        for job, lines in zip(jobs, reply.items, strict=True):
            settle(job, lines)
    else:
        for job in jobs:
            settle(job, reply)


FAILURE_KINDS: dict[str, type[SchedulerError]] = {
    "bad_request": BadRequest, "unavailable": ModelUnavailable}


def settle(job: Job, reply: wp.Reply) -> None:
    if job.future.done():
        return
    if isinstance(reply, wp.Failure):
        job.future.set_exception(FAILURE_KINDS.get(reply.kind, BackendFailed)(reply.error))
    else:
        job.future.set_result(reply)
