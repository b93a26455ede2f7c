"""The scheduling policy: what a device does next, as a pure function of what it sees.

`decide(view, now)` reads a frozen view of one lane (its models' queues, what is resident,
the memory left, the time the last batch ended) and answers with one decision; the lane
carries the decision out and is the one record of what is loaded. Nothing here waits,
loads or reads a clock, so the rules are tested on a fake clock in microseconds
(tests/test_policy.py) and replayed by bench/scheduler_sim.py exactly as the daemon runs them.

Two switching rules implement `Policy`: `AgingPolicy`, the daemon's, and `FifoPolicy`, the
arrival-order baseline that benchmarks compare it with (config `scheduler.switching`).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from npuserve.daemon.sched.jobs import Job
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.worker import protocol as wp

# A preempting switch costs two loads; waiting 10x that keeps swaps under ~10 %.
AGING_SWAP_FACTOR = 10.0
# Loads faster than this count as this much when swaps are compared (unmeasured: 0).
MIN_SWAP_SECONDS = 0.05
# Waiting for a batch's follow-ups costs at most this share of the swap it may save.
ANTICIPATE_SWAP_SHARE = 0.25
# A long rerank runs in slices of about this many seconds (at least one document each):
# another request waits for one slice, not the whole rerank. Each slice evaluates the
# query's prefix again (~100 tokens beside a QMD chunk's ~900).
RERANK_SLICE_SECONDS = 5.0


# --- what the policy sees ---------------------------------------------------------------


@dataclass(frozen=True)
class QueueView:
    """One model of the lane, as the policy sees it."""

    model_id: str
    head: float | None = None  # when the oldest queued request arrived; None: nothing queued
    work: float | None = 0.0  # calibrated seconds to run the queue; None: a task unmeasured
    swap: float = 0.0  # measured seconds to load it (0: never measured)
    resident: bool = False
    footprint: int = 0  # bytes it needs loaded (measured, else the backend's estimate)
    mapped: int = 0  # bytes of its files it keeps mapped while loaded
    last_used: float = 0.0
    retry_at: float = 0.0  # a failed load is retried from then on
    probe_at: float | None = None  # tripped NPU model: when it may be probed again
    background_only: bool = False  # all it has queued is background work


    @property
    def waiting(self) -> bool:
        return self.head is not None

    def age(self, now: float) -> float:
        return 0.0 if self.head is None else now - self.head


@dataclass(frozen=True)
class LaneView:
    models: tuple[QueueView, ...]
    resident: tuple[str, ...] = ()  # least recently used first
    serving: str | None = None  # the model whose batch ran last
    batch_ended: float | None = None  # when that batch answered, until one decision used it
    mem_available: int = 1 << 62  # MemAvailable (capped by the cgroup), bytes
    held_elsewhere: int = 0  # footprints resident on the other devices (the budget's share)
    stopping: bool = False  # the daemon is shutting down: no probes

    def model(self, model_id: str) -> QueueView:
        return next(m for m in self.models if m.model_id == model_id)


# --- what it answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    """Run a batch of this resident model's queue."""

    model_id: str


@dataclass(frozen=True)
class Load:
    """Unload `evict` (least recently used first), load the model, then serve it."""

    model_id: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    """The model's last load failed and its back-off has not passed: answer its queue 503."""

    model_id: str
    retry_after: float


@dataclass(frozen=True)
class Wait:
    """Decide again in `seconds` (the follow-ups of the batch just served may come)."""

    seconds: float
    model_id: str


@dataclass(frozen=True)
class Probe:
    """Nothing is queued and a tripped NPU model is due: load it and try one small call."""

    model_id: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unload:
    """Models idle past keep_alive."""

    model_ids: tuple[str, ...]


@dataclass(frozen=True)
class Idle:
    """Nothing to do until woken, or `timeout` seconds (the next unload or probe due)."""

    timeout: float | None


Decision = Serve | Load | Reject | Wait | Probe | Unload | Idle


# --- the policies ----------------------------------------------------------------------


class Policy:
    """What both switching rules share: residency (which models to evict for a load),
    idle unloads, probes, and the batch a visit takes."""

    name = "base"

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings

    def decide(self, view: LaneView, now: float) -> Decision:
        waiting = [m for m in view.models if m.waiting]
        if not waiting:
            return self._idle(view, now)
        # Priority: background work (the index's embedding) runs, and makes a model load,
        # only while no interactive request waits on this device.
        interactive = [m for m in waiting if not m.background_only]
        model = self.pick(view, interactive or waiting, now)
        wait = self.anticipation(view, model, now)
        if wait > 0:
            return Wait(wait, model.model_id)
        if model.resident:
            return Serve(model.model_id)
        if model.retry_at > now:
            return Reject(model.model_id, model.retry_at - now)
        return Load(model.model_id, self.victims(view, model))

    # -- switching (the two rules differ here) --

    def pick(self, view: LaneView, waiting: list[QueueView], now: float) -> QueueView:
        raise NotImplementedError

    def anticipation(self, view: LaneView, model: QueueView, now: float) -> float:
        return 0.0

    def joins_batch(self, job: Job, other_heads: Sequence[float]) -> bool:
        """May `job` join the batch being taken, given the other models' oldest requests?"""
        return True

    def rerank_slice(self, documents: int, tokens_per_document: float,
                     sec_per_token: float | None) -> int:
        """How many of a rerank's documents the next call takes: those that run within
        RERANK_SLICE_SECONDS by the measured cost (all while unmeasured), at least one."""
        if sec_per_token is None or tokens_per_document <= 0:
            return documents
        fit = int(RERANK_SLICE_SECONDS / (sec_per_token * tokens_per_document))
        return max(1, min(documents, fit))

    def passes_other_tasks(self) -> bool:
        """May a batch of expansions take expansions queued behind another task's request?"""
        return True

    # -- residency --

    def victims(self, view: LaneView, model: QueueView) -> tuple[str, ...]:
        """Resident models to unload before `model` loads.

        resident: none. sequential: all. auto: idle models, least recently used first,
        until the model's footprint fits the memory available less the reserve - where a
        loaded model's mapped weights count as used: the kernel calls them page cache it
        could drop, but dropping them while the model serves would only make it read them
        again - and the memory budget; if it cannot fit that way, everything."""
        residency = self.settings.residency
        if residency == "resident" or not view.resident:
            return ()
        if residency == "sequential":
            return view.resident
        resident = [view.model(mid) for mid in view.resident]
        room = (view.mem_available - self.settings.reserve_bytes
                - sum(m.mapped for m in resident))
        if self.settings.budget_bytes:
            held = view.held_elsewhere + sum(m.footprint for m in resident)
            room = min(room, self.settings.budget_bytes - held)
        victims: list[str] = []
        for m in resident:
            if model.footprint <= room:
                break
            if not m.waiting:
                victims.append(m.model_id)
                room += m.footprint
        return tuple(victims) if model.footprint <= room else view.resident

    # -- idle --

    def _idle(self, view: LaneView, now: float) -> Decision:
        due = [m for m in view.models if m.probe_at is not None and m.probe_at <= now]
        if due and not view.stopping:
            return Probe(due[0].model_id, self.victims(view, due[0]))
        keep = self.settings.keep_alive
        timeouts = [m.probe_at - now for m in view.models if m.probe_at is not None]
        if keep >= 0:
            idle = tuple(mid for mid in view.resident
                         if view.model(mid).last_used + keep <= now)
            if idle:
                return Unload(idle)
            timeouts += [view.model(mid).last_used + keep - now for mid in view.resident]
        return Idle(min(timeouts) if timeouts else None)

    # -- batches --

    def take(self, queue: collections.deque[Job], other_heads: Sequence[float]) -> list[Job]:
        """Pop the batch to run from the front of `queue`: embeddings merged up to
        coalesce_texts, expansions generated side by side up to coalesce_expansions."""
        first = queue.popleft()
        jobs = [first]
        if isinstance(first.request, wp.Expand):
            return jobs + self._take_expansions(queue, other_heads)
        if isinstance(first.request, wp.Embed):
            total = first.items
            while queue and isinstance(queue[0].request, wp.Embed):
                nxt = queue[0]
                if nxt.background and not first.background:
                    break  # an interactive call is not made longer by background texts
                if (total + nxt.items > self.settings.coalesce_texts
                        or not self.joins_batch(nxt, other_heads)):
                    break
                jobs.append(queue.popleft())
                total += nxt.items
        return jobs

    def _take_expansions(self, queue: collections.deque[Job], other_heads: Sequence[float]
                         ) -> list[Job]:
        """Other expansions to generate beside the first. Under aging they may come from
        behind a rerank in the same model's queue (a rerank waits one batched step, not
        eight sequential ones)."""
        taken: list[Job] = []
        kept: list[Job] = []
        while queue and 1 + len(taken) < self.settings.coalesce_expansions:
            job = queue.popleft()
            if isinstance(job.request, wp.Expand) and self.joins_batch(job, other_heads):
                taken.append(job)
            else:
                kept.append(job)
                if not self.passes_other_tasks():
                    break
        queue.extendleft(reversed(kept))
        return taken

    # -- bounds, from the measured swap costs --

    def aging_bound(self, serving: QueueView, waiting: QueueView) -> float:
        """How long `waiting`'s head may wait before it preempts `serving`: the configured
        bound, or AGING_SWAP_FACTOR swaps (there and back) when loads are slow, so that
        switching never costs more than a small share of time."""
        return max(self.settings.aging_s, AGING_SWAP_FACTOR * (waiting.swap + serving.swap))

    def hysteresis(self, serving: QueueView, waiting: QueueView) -> float:
        """How much older another queue's head must be before the device switches."""
        return max(self.settings.hysteresis_s, 2.0 * (waiting.swap + serving.swap))


class AgingPolicy(Policy):
    """The daemon's switching rule: the resident model keeps the device while its oldest
    request is not much younger than another queue's oldest, swaps go where each load
    serves the most work, a head past the aging bound goes first, and a swap right after
    a batch waits for that batch's follow-ups."""

    name = "aging"

    def pick(self, view: LaneView, waiting: list[QueueView], now: float) -> QueueView:
        """The resident model keeps the device while its oldest request is not much younger
        than another queue's oldest - "much" being the switch hysteresis, at least a few
        swaps' worth - so requests that arrive while a model is resident ride along instead
        of forcing a swap each. A head that has waited past the aging bound switches at
        once, so a flood for one model cannot starve another - but only when it is older
        than the resident queue's head: while the resident model still serves older work,
        nobody is starving, and preempting it cost a third model's pipeline 2.2x the swaps
        of FIFO (docs/benchmarks.md, design notes)."""
        serving = next((m for m in waiting if m.model_id == view.serving and m.resident), None)
        if serving is None:
            return self.next_visit(waiting, now)
        others = [m for m in waiting if m is not serving]
        if not others:
            return serving
        other = max(others, key=lambda m: m.age(now))
        age = other.age(now)
        if age <= serving.age(now):  # the resident queue holds the oldest work
            return serving
        if age > self.aging_bound(serving, other):
            return other
        if age > serving.age(now) + self.hysteresis(serving, other):
            return other
        return serving

    def next_visit(self, waiting: list[QueueView], now: float) -> QueueView:
        """The model to serve once the one served last has nothing queued.

        A resident model with work needs no swap: the oldest of those. Otherwise a swap is
        due, and it goes to the queue that does the most work per second of loading, so
        each swap serves as much as it can while the others' queues fill. On a QMD pipeline
        (expand -> embed -> rerank) that also moves a cheap embedding visit ahead of the
        reranker's, whose queue it feeds: the reranker is then loaded once for both. The
        oldest head still goes first once past the aging bound, and while any queue's cost
        is unmeasured."""
        resident = [m for m in waiting if m.resident]
        if resident:
            return max(resident, key=lambda m: m.age(now))
        oldest = max(waiting, key=lambda m: m.age(now))
        if oldest.age(now) > self.aging_bound(oldest, oldest):
            return oldest
        if any(m.work is None for m in waiting):
            return oldest
        return max(waiting, key=lambda m: (m.work or 0.0) / max(MIN_SWAP_SECONDS, m.swap))

    def anticipation(self, view: LaneView, model: QueueView, now: float) -> float:
        """Seconds to wait before swapping to `model`, for the follow-ups of the last batch.

        A pipeline client (QMD: expand -> embed -> rerank) sends its next stage as soon as a
        reply reaches it, a few milliseconds after the batch ends. A swap decided in that gap
        sees only the queues of the clients that are not in step, and serves them first: one
        straggler then stays out of step for good and doubles the loads (measured under the
        board emulation: 0.75 swaps per query instead of 0.375). So a swap waits a moment
        after a batch (anticipatory scheduling, as disk schedulers do for the next read of a
        process), never more than a quarter of the swap it may save."""
        if view.batch_ended is None or model.resident:
            return 0.0
        window = min(self.settings.anticipate_s, ANTICIPATE_SWAP_SHARE * model.swap)
        return view.batch_ended + window - now


class FifoPolicy(Policy):
    """Strict arrival order: the model of the oldest request goes next, and a batch takes
    only requests no other model's request is older than. The baseline benchmarks compare
    aging with; not meant for production."""

    name = "fifo"

    def pick(self, view: LaneView, waiting: list[QueueView], now: float) -> QueueView:
        return max(waiting, key=lambda m: m.age(now))

    def joins_batch(self, job: Job, other_heads: Sequence[float]) -> bool:
        return all(head >= job.enqueued for head in other_heads)

    def passes_other_tasks(self) -> bool:
        return False


POLICIES: dict[str, type[Policy]] = {"aging": AgingPolicy, "fifo": FifoPolicy}


def make_policy(settings: SchedulerSettings) -> Policy:
    return POLICIES[settings.switching](settings)
