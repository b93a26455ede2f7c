"""The model scheduler: per-model queues, one lane (worker process) per device.

The HTTP layer calls `embed`, `rerank`, `expand`, `count_tokens` and `control`, and reads
`snapshot()`; it gets named results or an `errors.SchedulerError`. Requests queue per
model; each lane carries out what the policy (sched/policy.py) decides for its device.
Admission, deadlines and allowances come from the measured costs (sched/costs.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from npuserve.daemon.config import TASK_CTX_DEFAULT, Config
from npuserve.daemon.errors import ModelUnavailable, NotSupported, Overloaded, ShuttingDown
from npuserve.daemon.models.fingerprint import DigestCache
from npuserve.daemon.models.registry import ModelPlan
from npuserve.daemon.sched import costs
from npuserve.daemon.sched.breaker import NpuBreaker
from npuserve.daemon.sched.calibration import CalibrationStore
from npuserve.daemon.sched.jobs import Job, Timing
from npuserve.daemon.sched.lane import Clock, Lane, LaneContext, MonotonicClock, Worker, retarget
from npuserve.daemon.sched.memory import mem_available
from npuserve.daemon.sched.model import ModelState
from npuserve.daemon.sched.policy import make_policy
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.sched.sizing import EXPANSION_TOKENS, FIT_SHARE, Admission, Sizer, Work
from npuserve.daemon.sched.views import (
    DeviceView,
    EmbedResult,
    ExpandResult,
    GenerateRequest,
    GenerateResult,
    ModelView,
    RerankResult,
    SchedulerSnapshot,
    TaskView,
)
from npuserve.daemon.worker import protocol as wp
from npuserve.daemon.worker.handle import WorkerHandle

log = logging.getLogger("npuserve.scheduler")
WorkerFactory = Callable[[str], Worker]


class Scheduler:
    """Owns the lanes and the per-model records; the one place requests enter."""

    def __init__(self, plans: dict[str, ModelPlan], task_model: dict[str, str],
                 settings: SchedulerSettings, calibration: CalibrationStore, *,
                 worker_factory: WorkerFactory | None = None, clock: Clock | None = None,
                 memory_probe: Callable[[], int] = mem_available,
                 log_level: int = logging.INFO, digests: DigestCache | None = None) -> None:
        self.plans = plans
        self.task_model = task_model
        self.calibration = calibration
        self.digests = digests or DigestCache(None)
        self._fingerprint: str | None = None
        make_worker = worker_factory or (lambda device: WorkerHandle(device, log_level))
        self.ctx = LaneContext(
            settings=settings, policy=make_policy(settings), clock=clock or MonotonicClock(),
            memory_probe=memory_probe, calibration=calibration,
            events=collections.Counter(), to_twin=self._to_twin,
            held_elsewhere=self._held_elsewhere)
        self.lanes: dict[str, Lane] = {}
        for plan in plans.values():
            lane = self.lanes.get(plan.device)
            if lane is None:
                lane = self.lanes[plan.device] = Lane(plan.device, make_worker(plan.device),
                                                      self.ctx)
            mid = plan.spec.model_id
            lane.models[mid] = ModelState(
                plan, costs=calibration.costs(mid),
                task_costs={t: calibration.costs(f"{mid}/{t}") for t in plan.tasks},
                breaker=(NpuBreaker(settings.npu_failure_threshold, settings.npu_reprobe_s)
                         if plan.twin else None))

    @classmethod
    def from_config(cls, cfg: Config, plans: dict[str, ModelPlan], task_model: dict[str, str],
                    log_level: int = logging.INFO, **kwargs: Any) -> Scheduler:
        return cls(plans, task_model, SchedulerSettings.from_config(cfg),
                   CalibrationStore(cfg.state_dir / "calibration.json"),
                   log_level=log_level, digests=DigestCache(cfg.state_dir / "fingerprints.json"),
                   **kwargs)

    @property
    def settings(self) -> SchedulerSettings:
        return self.ctx.settings

    def apply_settings(self, settings: SchedulerSettings) -> None:
        """SIGHUP: timing and queue limits apply live; residency, switching and the NPU
        breaker keep the values they started with (they need a restart)."""
        kept = self.ctx.settings
        settings = dataclasses.replace(
            settings, residency=kept.residency, switching=kept.switching,
            npu_failure_threshold=kept.npu_failure_threshold, npu_reprobe_s=kept.npu_reprobe_s)
        self.ctx.settings = settings
        self.ctx.policy = make_policy(settings)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.task = asyncio.create_task(lane.run(), name=f"lane-{lane.device}")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, let queued work finish within `timeout`, then stop workers."""
        self.ctx.stopping = True
        for lane in self.lanes.values():
            lane.wake.set()
        tasks = [lane.task for lane in self.lanes.values() if lane.task]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            for lane in self.lanes.values():
                for m in lane.models.values():
                    lane.fail_queue(m, ShuttingDown("server is shutting down"))
        for lane in self.lanes.values():
            lane.prefetcher.cancel()
            await lane.worker.stop()
        self.calibration.save()

    # --- routing ------------------------------------------------------------------------

    def _state(self, model_id: str) -> ModelState:
        return self.lanes[self.plans[model_id].device].models[model_id]

    def _primary(self, task: str) -> ModelState:
        return self._state(self.task_model[task])

    def _serving(self, task: str) -> ModelState:
        """The model serving `task` now: the CPU twin while an NPU model is tripped."""
        model = self._primary(task)
        if model.tripped and model.plan.twin:
            return self._state(model.plan.twin)
        return model

    def _lane(self, model: ModelState) -> Lane:
        return self.lanes[model.plan.device]

    def _to_twin(self, model: ModelState, reason: str, jobs: list[Job]) -> None:
        """Trip an NPU model's breaker and move its work (running jobs first, then its
        queue) to its CPU twin."""
        assert model.breaker is not None and model.plan.twin is not None
        twin = self._state(model.plan.twin)
        first = model.breaker.trip(reason, self.ctx.clock.now())
        moved = [j for j in jobs + list(model.queue) if not j.future.done()]
        model.queue.clear()
        for job in moved:
            job.request = retarget(job.request, twin.model_id)
            job.attempts = 0
        twin.queue = collections.deque(sorted(list(twin.queue) + moved,
                                              key=lambda j: (j.background, j.enqueued)))
        self._lane(twin).wake.set()
        self._lane(model).wake.set()  # its probe is now due some time: re-plan the sleep
        if first:
            self.ctx.events["npu_fallbacks"] += 1
            log.warning("%s falls back to the CPU twin %s: %s", model.plan.name,
                        twin.plan.name, reason)

    def _held_elsewhere(self, lane: Lane) -> int:
        """Footprints of the models resident on the other devices: an NPU's models live
        in the same RAM, and the memory budget counts them all."""
        return sum(costs.estimate_bytes(other.models[mid])
                   for other in self.lanes.values() if other is not lane
                   for mid in other.resident)

    # --- admission ----------------------------------------------------------------------

    def _wait_before(self, lane: Lane, model: ModelState, background: bool
                     ) -> float | None:
        """Seconds of work queued on the lane ahead of a new request for `model` (loads
        included; background work only ahead of background work); None while any of it is
        uncalibrated."""
        total = 0.0
        for m in lane.models.values():
            if m.queue and (background or not m.background_only):
                queued = m.queued_seconds(interactive_only=not background)
                if queued is None:
                    return None
                total += queued
                if m.model_id not in lane.resident and m is not model:
                    total += costs.swap_seconds(m)
        if model.model_id not in lane.resident:
            total += costs.swap_seconds(model)
        return total

    def _admit(self, task: str, work: Work, background: bool = False) -> Admission:
        """The model to queue on, the request's token estimate, the cap its documents are
        cut to (to fit the deadline instead of being refused) and its deadline - or a
        SchedulerError at once."""
        settings = self.ctx.settings
        if self.ctx.stopping:
            raise ShuttingDown("server is shutting down", retry_after=5)
        model = self._serving(task)
        lane = self._lane(model)
        now = self.ctx.clock.now()
        if model.backoff.waiting(now):
            raise ModelUnavailable(f"model {model.plan.name} cannot load: {model.backoff.error}",
                                   retry_after=model.backoff.retry_at - now)
        queued = sum(m.queued_items() for m in lane.models.values())
        sizer = Sizer(model.task_costs[task], model.plan.spec.n_ctx or TASK_CTX_DEFAULT[task])
        wait = self._wait_before(lane, model, background)
        rate = model.task_costs[task].sec_per_token
        cap = sizer.fit(work, wait, rate, FIT_SHARE * settings.request_timeout)
        tokens = sizer.tokens(work, cap)
        expected = None if wait is None or rate is None else wait + rate * tokens
        if queued + work.items > settings.max_queue:
            self.ctx.events["rejected_overload"] += 1
            raise Overloaded(f"queue full ({queued} items waiting)",
                             retry_after=expected or 1.0)
        if expected is not None and expected > settings.request_timeout:
            self.ctx.events["rejected_overload"] += 1
            raise Overloaded(
                f"expected completion in {expected:.0f}s exceeds the"
                f" {settings.request_timeout:.0f}s limit",
                retry_after=expected - settings.request_timeout)
        if cap:
            self.ctx.events["truncated_to_fit"] += 1
        cold = model.costs.load_seconds is None and model.model_id not in lane.resident
        return Admission(model, lane, tokens, cap,
                         now + costs.deadline_for(settings, expected, cold))

    async def _submit(self, task: str, make: Callable[[str, int], wp.Request], work: Work,
                      background: bool = False,
                      on_partial: Callable[[str], None] | None = None) -> tuple[Any, Timing]:
        admitted = self._admit(task, work, background)
        job = Job(task, make(admitted.model.model_id, admitted.cap), work.items,
                  self.ctx.clock.now(), admitted.deadline,
                  asyncio.get_running_loop().create_future(), tokens=admitted.tokens,
                  # A generation's tokens are mostly generated: its prompt's characters say
                  # nothing of the tokenizer, so they do not calibrate tokens per character.
                  chars=0 if work.generated else work.total_chars, background=background,
                  on_partial=on_partial)
        admitted.model.enqueue(job)
        admitted.lane.wake.set()
        try:
            reply = await job.future
        except asyncio.CancelledError:
            job.future.cancel()  # the client disconnected: a queued job is skipped
            raise
        return reply, job.timing

    # --- the calls ----------------------------------------------------------------------

    def rerank_window(self, query: str, documents: list[str], seconds: float) -> int:
        """Characters of each document with which one rerank call of `documents` runs in
        about `seconds` by the reranker's measured cost; 0: whole documents fit (or the
        cost is not measured yet)."""
        model = self._serving("rerank")
        costs_ = model.task_costs["rerank"]
        instruction = str(model.plan.spec.option("instruction", ""))
        work = Work(len(documents), tuple(len(d) for d in documents),
                    prefix_chars=len(query) + len(instruction), cuttable=True)
        sizer = Sizer(costs_, model.plan.spec.n_ctx or TASK_CTX_DEFAULT["rerank"])
        cap = sizer.fit(work, 0.0, costs_.sec_per_token, seconds)
        tokens_per_char = costs_.tokens_for(1_000_000) / 1_000_000
        return int(cap / tokens_per_char) if cap else 0

    def texts_within(self, task: str, texts: list[str], seconds: float) -> int:
        """How many of `texts`, from the first, one call of `task` runs in about `seconds`
        by the serving model's measured cost (at least one; all while unmeasured)."""
        model = self._serving(task)
        costs_ = model.task_costs[task]
        if costs_.sec_per_token is None:
            return len(texts)
        sizer = Sizer(costs_, model.plan.spec.n_ctx or TASK_CTX_DEFAULT[task])
        spent = 0.0
        for n, text in enumerate(texts):
            spent += costs_.sec_per_token * sizer.tokens(Work(1, (len(text),)))
            if spent > seconds:
                return max(1, n)
        return len(texts)

    @property
    def known_fingerprint(self) -> str | None:
        """The embedding fingerprint once something has asked for it (None before)."""
        return self._fingerprint

    async def embedding_fingerprint(self) -> str:
        """The identity of the vectors /embed gives: the digest of the embedding model's
        files (of the configured model: its CPU twin serves its vectors when it falls
        back), read once, off the event loop."""
        if self._fingerprint is None:
            plan = self._primary("embed").plan
            if plan.files:
                self._fingerprint = await asyncio.to_thread(self.digests.digest, plan.files)
            else:  # a remote server's model: its name is all there is to know
                self._fingerprint = f"{plan.spec.kind}:{plan.name}"
        return self._fingerprint

    async def embed(self, texts: list[str], background: bool = False) -> EmbedResult:
        """Vectors of `texts`. `background`: work nobody waits for (the index's own
        embedding), run when no interactive request waits on the device."""
        work = Work(len(texts), tuple(len(t) for t in texts))
        reply, timing = await self._submit(
            "embed", lambda mid, _: wp.Embed(mid, tuple(texts)), work, background)
        assert isinstance(reply, wp.Vectors)
        return EmbedResult(reply.rows(), list(reply.truncated), reply.tokens, timing,
                           self.model_name("embed"), await self.embedding_fingerprint())

    async def rerank(self, query: str, documents: list[str], instruction: str | None = None
                     ) -> RerankResult:
        if instruction is None:
            instruction = str(self._primary("rerank").plan.spec.option("instruction", ""))
        text = instruction
        work = Work(len(documents), tuple(len(d) for d in documents),
                    prefix_chars=len(query) + len(text), cuttable=True)
        reply, timing = await self._submit(
            "rerank", lambda mid, cap: wp.Rerank(mid, query, tuple(documents), text, cap), work)
        assert isinstance(reply, wp.Scores)
        return RerankResult(list(reply.scores), list(reply.truncated), reply.tokens, timing,
                            self.model_name("rerank"))

    async def generate(self, request: GenerateRequest,
                       on_piece: Callable[[str], None] | None = None) -> GenerateResult:
        """Free generation on the expansion model; `on_piece` (streaming) gets the text
        as it is generated. Runs alone (never merged with another call)."""
        if "generate" not in self.task_model:
            raise NotSupported(
                f"the expansion model {self.model_name('expand')} cannot generate text"
                " through its backend")
        work = Work(1, (), prefix_chars=request.chars, generated=request.max_tokens)

        def make(mid: str, _cap: int) -> wp.Request:
            # The worker's request is the client's, addressed to a model, streamed or not.
            fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
            return wp.Generate(mid, stream=on_piece is not None, **fields)

        reply, timing = await self._submit("generate", make, work, on_partial=on_piece)
        assert isinstance(reply, wp.Generated)
        return GenerateResult(reply.text, reply.prompt_tokens, reply.completion_tokens,
                              reply.finish_reason, timing, self.model_name("generate"))

    async def expand(self, query: str, intent: str | None, include_lexical: bool
                     ) -> ExpandResult:
        work = Work(1, (), prefix_chars=len(query) + len(intent or ""),
                    generated=EXPANSION_TOKENS)
        reply, timing = await self._submit(
            "expand", lambda mid, _: wp.Expand(mid, query, intent, include_lexical), work)
        assert isinstance(reply, wp.Lines)
        return ExpandResult([(t, s) for t, s in reply.lines], timing, self.model_name("expand"))

    async def count_tokens(self, task: str, texts: list[str]) -> list[int]:
        """Token counts from the task's tokenizer, without loading or swapping its model."""
        model = self._serving(task)
        reply = await self._light(model, wp.CountTokens(model.plan.spec, tuple(texts)),
                                  len(texts))
        assert isinstance(reply, wp.TokenCounts)
        return list(reply.counts)

    async def token_ids(self, task: str, text: str, add_special: bool = True
                        ) -> tuple[list[int], int]:
        """The task model's token ids of `text` and its context length, without loading or
        swapping the model."""
        model = self._serving(task)
        reply = await self._light(model, wp.TokenIdsOf(model.plan.spec, text, add_special), 1)
        assert isinstance(reply, wp.TokenIds)
        return list(reply.ids), model.plan.spec.n_ctx or TASK_CTX_DEFAULT[task]

    async def _light(self, model: ModelState, request: wp.Request, items: int) -> wp.Reply:
        """A tokenizer call, run between batches (no model needs to be loaded for it)."""
        lane = self._lane(model)
        now = self.ctx.clock.now()
        job = Job("tokenize", request, items, now, now + self.ctx.settings.request_timeout,
                  asyncio.get_running_loop().create_future())
        lane.light.append(job)
        lane.wake.set()
        return await job.future

    async def control(self, action: str, name: str) -> str:
        """Preload ("load") or unload a model by task, name or id; its state afterwards.
        Raises KeyError for an unknown name."""
        if self.ctx.stopping:
            raise ShuttingDown("server is shutting down", retry_after=5)
        model = self._find(name)
        if model is None:
            raise KeyError(name)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        lane = self._lane(model)
        lane.control.append((action, model, future))
        lane.wake.set()
        return await future

    def _find(self, name: str) -> ModelState | None:
        if name in self.task_model:
            return self._serving(name)
        return next((m for lane in self.lanes.values() for m in lane.models.values()
                     if name in (m.plan.name, m.model_id)), None)

    def model_name(self, task: str) -> str:
        # Generation is the expansion model's, also where its backend cannot generate.
        model = self.task_model.get(task) or self.task_model["expand" if task == "generate"
                                                            else task]
        return self.plans[model].name

    # --- what others may see ------------------------------------------------------------

    def load(self) -> tuple[int, float]:
        """(items queued, seconds of interactive work queued on the busiest device): what a
        client spreading calls over several daemons weighs them by."""
        queued, wait = 0, 0.0
        for lane in self.lanes.values():
            queued += sum(m.queued_items() for m in lane.models.values())
            wait = max(wait, sum(m.queued_seconds(interactive_only=True) or 0.0
                                 for m in lane.models.values() if m.queue))
        return queued, wait

    def recommended_timeout(self) -> float:
        """What a client should wait: the worst cold start plus a full queue of work."""
        settings = self.ctx.settings
        worst = 0.0
        for lane in self.lanes.values():
            for m in lane.models.values():
                load = m.costs.load_seconds_max or 0.0
                per = max((m.service_seconds(t, m.plan.spec.n_ctx or TASK_CTX_DEFAULT[t]) or 0.0
                           for t in m.plan.tasks), default=0.0)
                worst = max(worst, load + per)
        return min(settings.request_timeout,
                   max(settings.deadline_floor, settings.deadline_multiplier * worst))

    def snapshot(self) -> SchedulerSnapshot:
        now = self.ctx.clock.now()
        views = {m.model_id: self._model_view(lane, m, now)
                 for lane in self.lanes.values() for m in lane.models.values()}
        tasks = {task: TaskView(task, views[self._primary(task).model_id],
                                views[self._serving(task).model_id])
                 for task in self.task_model}
        devices = tuple(DeviceView(lane.device, lane.worker.pid, tuple(lane.resident),
                                   lane.swaps, lane.crashes, lane.recycles,
                                   lane.prefetcher.bytes_read)
                        for lane in self.lanes.values())
        s = self.ctx.settings
        return SchedulerSnapshot(s.residency, s.switching, s.keep_alive,
                                 self.recommended_timeout(), tuple(views.values()), devices,
                                 tasks, dict(self.ctx.events))

    def _model_view(self, lane: Lane, m: ModelState, now: float) -> ModelView:
        plan, breaker = m.plan, m.breaker
        return ModelView(
            name=plan.name, id=m.model_id, kind=plan.spec.kind, path=plan.spec.path,
            n_ctx=plan.spec.n_ctx, tasks=tuple(plan.tasks), device=plan.device,
            device_reason=plan.device_reason, state=lane.state_of(m),
            resident=m.model_id in lane.resident, queue_depth=len(m.queue),
            oldest_wait_seconds=m.head_age(now), loads=m.counters.loads,
            unloads=m.counters.unloads, load_seconds_total=m.counters.load_seconds_total,
            error=m.backoff.error,
            load_retry_in=max(0.0, m.backoff.retry_at - now) if m.backoff.waiting(now) else 0.0,
            load_seconds=m.costs.load_seconds, load_seconds_max=m.costs.load_seconds_max,
            load_allowance=costs.load_allowance(m), footprint_bytes=costs.estimate_bytes(m),
            seconds_per_token={t: c.sec_per_token for t, c in m.task_costs.items()},
            samples={t: c.samples for t, c in m.task_costs.items()},
            has_twin=breaker is not None, fallback=m.tripped,
            fallback_reason=breaker.reason if breaker else None)

