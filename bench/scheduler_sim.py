"""The scheduler's switching decisions on a simulated clock.

The production policy (daemon/sched/policy.py: `decide` and `take`, fed views built as a
lane builds them) decides what runs; QMD-style clients (expand -> embed 3 -> rerank 10,
pausing between queries as bench_scheduler.py's do) submit the work; loads and calls cost
what the board emulation measured (`--costs`, defaults from docs/benchmarks.md). It answers
in seconds what a real run answers in ten minutes - which policy swaps less, and how that
moves wall time - so that policies can be compared before bench_scheduler.py measures the
one kept. Its figures are a model, not measurements: only bench_scheduler.py's go into
docs/benchmarks.md as results. Checked against real runs: within ~20 % of aging and FIFO
with 15 s pauses, but it put FIFO in tight loops at 1.27 swaps per query where the real
clients fell into step at 0.575.

A reply reaches its client and the next stage comes back `--gap` seconds later (5 ms by
default, as over loopback HTTP), and the lane waits for follow-ups as the daemon's does
(scheduler.anticipate_ms). Without the gap the simulator missed what the real runs showed:
a swap decided in that gap serves a straggler first, who then stays out of step
(`--gap 0.005 --policies aging,aging:scheduler.anticipate_ms=0`).

The naive FIFO (one request per call, bench_scheduler.py's `fifo`) is
`fifo:scheduler.coalesce_expansions=1+scheduler.coalesce_texts=1`; plain `fifo` here merges
the requests next in line (bench_scheduler.py's `fifo-coalesce`).

Usage: python bench/scheduler_sim.py [--think 15] [--seeds 20] [--policies aging,fifo]
                                     [--stagger 10] [--gap 0.005]
                                     [--costs rerank=7.0,expand_first=1.68,...]
"""

from __future__ import annotations

import argparse
import collections
import heapq
import random
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

from npuserve.daemon.config import load_config
from npuserve.daemon.sched.calibration import ModelCosts
from npuserve.daemon.sched.jobs import Job
from npuserve.daemon.sched.policy import (
    LaneView,
    Load,
    Policy,
    QueueView,
    Serve,
    Wait,
    make_policy,
)
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.worker import protocol as wp

# Seconds, from the board emulation (500 MB, 90 MB/s; session 9 runs): a load is the
# file read at 90 MB/s plus ~0.2 s; gemma-3 generates 8 expansions side by side in 4.4 s
# and one alone in 0.84 s; the F16 SmolLM2 reranks 10 documents in ~3.5 s; MiniLM
# embeds ~57 texts/s.
DEFAULT_COSTS = {"load_expand": 3.0, "load_embed": 0.7, "load_rerank": 3.1,
                 "expand_first": 0.84, "expand_more": 0.51,
                 "embed_call": 0.03, "embed_text": 0.018, "rerank": 3.5}
STAGES = ("expand", "embed", "rerank")


@dataclass(order=True)
class Event:
    time: float
    client: int = field(compare=False)
    stage: int = field(compare=False)


@dataclass
class Result:
    loads: int
    loading: float
    wall: float
    p95: float


def call_seconds(task: str, jobs: list[Job], costs: dict[str, float],
                 rng: random.Random) -> float:
    if task == "expand":
        base = costs["expand_first"] + costs["expand_more"] * (len(jobs) - 1)
    elif task == "embed":
        base = costs["embed_call"] + costs["embed_text"] * sum(j.items for j in jobs)
    else:
        base = costs["rerank"] * len(jobs)
    return base * rng.uniform(0.9, 1.1)


@dataclass
class SimModel:
    """What a lane keeps per model, as far as the policy sees it."""

    name: str
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    load: ModelCosts = field(default_factory=ModelCosts)
    call: ModelCosts = field(default_factory=ModelCosts)

    def view(self, resident: bool) -> QueueView:
        work: float | None = 0.0
        for job in self.queue:
            cost = self.call.service_seconds(job.items)
            work = None if cost is None or work is None else work + cost
        return QueueView(self.name, head=self.queue[0].enqueued if self.queue else None,
                         work=work, swap=self.load.load_seconds or 0.0, resident=resident)


def make_policy_for(switching: str, settings: list[str]) -> Policy:
    overrides = {"scheduler.policy": "sequential", "scheduler.switching": switching}
    overrides |= dict(s.split("=", 1) for s in settings)
    return make_policy(SchedulerSettings.from_config(load_config(None, env={},
                                                                 overrides=overrides)))


def request_for(task: str) -> tuple[wp.Request, int]:
    if task == "expand":
        return wp.Expand(task, "q", None, True), 1
    if task == "embed":
        return wp.Embed(task, ("a", "b", "c")), 3
    return wp.Rerank(task, "q", tuple("d" * 10), ""), 10


def simulate(policy: Policy, clients: int, queries: int, think: float, seed: int,
             costs: dict[str, float], stagger: float = 0.0, gap: float = 0.0) -> Result:
    models = {task: SimModel(task) for task in STAGES}
    resident: list[str] = []
    serving: str | None = None
    batch_ended: float | None = None
    rng = random.Random(seed)
    think_rng = [random.Random(seed * 1000 + c) for c in range(clients)]
    events: list[Event] = []
    done = [0] * clients
    started = [0.0] * clients
    latencies: list[float] = []
    loads, loading, now = 0, 0.0, 0.0

    def arrive(ev: Event) -> None:
        task = STAGES[ev.stage]
        if ev.stage == 0:
            started[ev.client] = ev.time
        req, items = request_for(task)
        job = Job(task, req, items, ev.time, float("inf"), None)  # type: ignore[arg-type]
        job.client, job.stage = ev.client, ev.stage  # type: ignore[attr-defined]
        models[task].queue.append(job)

    def next_query(c: int, at: float) -> None:
        if done[c] < queries:
            pause = think_rng[c].expovariate(1.0 / think) if think else 0.0
            heapq.heappush(events, Event(at + pause, c, 0))

    for c in range(clients):  # each client starts at its own time, then pauses as always
        next_query(c, random.Random(seed * 1000 + 500 + c).uniform(0.0, stagger))
    while events or any(m.queue for m in models.values()):
        while events and events[0].time <= now:
            arrive(heapq.heappop(events))
        view = LaneView(tuple(m.view(m.name in resident) for m in models.values()),
                        tuple(resident), serving, batch_ended)
        decision = policy.decide(view, now)
        if not isinstance(decision, Serve | Load | Wait):
            now = events[0].time  # idle until the next arrival
            continue
        batch_ended = None  # as the lane: one wait per batch, the decision after it is final
        if isinstance(decision, Wait):
            now += decision.seconds
            continue
        model = models[decision.model_id]
        if isinstance(decision, Load):
            for victim in decision.evict:
                resident.remove(victim)
            seconds = costs[f"load_{model.name}"] * rng.uniform(0.9, 1.1)
            now += seconds
            loads, loading = loads + 1, loading + seconds
            model.load.observe_load(seconds)
            resident.append(model.name)
            while events and events[0].time <= now:  # arrivals during the load
                arrive(heapq.heappop(events))
        serving = model.name
        others = [m.queue[0].enqueued for m in models.values() if m is not model and m.queue]
        jobs = policy.take(model.queue, others)
        seconds = call_seconds(model.name, jobs, costs, rng)
        now += seconds
        model.call.observe_call(sum(j.items for j in jobs), seconds)
        batch_ended = now
        for job in jobs:
            c, stage = job.client, job.stage  # type: ignore[attr-defined]
            if stage + 1 < len(STAGES):  # the reply travels, the next stage comes back
                heapq.heappush(events, Event(now + gap, c, stage + 1))
            else:
                latencies.append(now - started[c])
                done[c] += 1
                next_query(c, now + gap)
    latencies.sort()
    return Result(loads, loading, now, latencies[max(0, -(-95 * len(latencies) // 100) - 1)])


def run(policy: str, args: argparse.Namespace, costs: dict[str, float]) -> list[Result]:
    switching, _, extra = policy.partition(":")
    settings = [s for s in extra.split("+") if s]
    out = []
    for seed in range(args.seeds):
        out.append(simulate(make_policy_for(switching, settings), args.clients, args.queries,
                            args.think, seed, costs, args.stagger, args.gap))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--think", type=float, default=15.0)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="clients start at uniform random times in [0, S] seconds")
    ap.add_argument("--gap", type=float, default=0.005,
                    help="seconds from a reply to the client's next stage arriving")
    ap.add_argument("--policies", default="aging,fifo",
                    help="switching[:key=value+key=value], e.g. aging:scheduler.aging_ms=5000")
    ap.add_argument("--costs", default="", help="overrides, e.g. load_expand=6,rerank=2")
    args = ap.parse_args()
    costs: dict[str, Any] = dict(DEFAULT_COSTS)
    for item in filter(None, args.costs.split(",")):
        key, value = item.split("=")
        costs[key] = float(value)
    results = {p: run(p, args, costs) for p in args.policies.split(",")}
    base = results[args.policies.split(",")[-1]]
    n = args.clients * args.queries
    for name, rs in results.items():
        med = {k: statistics.median(getattr(r, k) for r in rs)
               for k in ("loads", "loading", "wall", "p95")}
        ratio = statistics.median(r.wall / b.wall for r, b in zip(rs, base, strict=True))
        sw = statistics.median(r.loads / b.loads for r, b in zip(rs, base, strict=True))
        print(f"{name:40} swaps/query {med['loads'] / n:.3f}  loading {med['loading']:6.1f}s"
              f"  wall {med['wall']:6.1f}s  p95 {med['p95']:5.1f}s"
              f"  vs last: swaps {sw:.2f} wall {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
