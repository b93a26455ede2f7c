"""The scheduler's switching decisions on a simulated clock.

The real `Lane.pick` and `Lane._take` of daemon/scheduler.py (and the Scheduler's aging
bound and hysteresis, fed by simulated loads) decide what runs; QMD-style clients (expand
-> embed 3 -> rerank 10, pausing between queries as bench_scheduler.py's do) submit the
work; loads and calls cost what the board emulation measured (`--costs`, defaults from
docs/benchmarks.md, session 9). It answers in seconds what a real run answers in ten
minutes - which policy swaps less, and how that moves wall time - so that policies can be
compared before bench_scheduler.py measures the one kept. Its figures are a model, not
measurements: only bench_scheduler.py's go into docs/benchmarks.md as results. Checked
against real runs: within ~20 % of session 9's aging and FIFO, and of session 10's aging
with compute doubled for that slower machine, but it put FIFO there at 1.27 swaps per
query where the real clients fell into step at 0.575 (docs/benchmarks.md, session 10).

A reply reaches its client and the next stage comes back `--gap` seconds later (5 ms by
default, as over loopback HTTP), and the lane waits for follow-ups as `Lane.run` does
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
import heapq
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npuserve.daemon import worker_protocol as wp
from npuserve.daemon.config import load_config
from npuserve.daemon.model_registry import ModelPlan
from npuserve.daemon.scheduler import Job, Scheduler

# Seconds, from the board emulation (500 MB, 90 MB/s; session 9 runs): a load is the
# file read at 90 MB/s plus ~0.2 s; gemma-3 generates 8 expansions side by side in 4.4 s
# and one alone in 0.84 s; the F16 SmolLM2 reranks 10 documents in ~3.5 s; MiniLM
# embeds ~57 texts/s.
DEFAULT_COSTS = {"load_expand": 3.0, "load_embed": 0.7, "load_rerank": 3.1,
                 "expand_first": 0.84, "expand_more": 0.51,
                 "embed_call": 0.03, "embed_text": 0.018, "rerank": 3.5}
STAGES = ("expand", "embed", "rerank")


class _Pending:
    """Stands in for a job's future: the simulation settles jobs itself."""

    def done(self) -> bool:
        return False


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


def make_scheduler(switching: str, state: Path, settings: list[str]) -> Scheduler:
    overrides = {"state_dir": str(state), "scheduler.policy": "sequential",
                 "scheduler.switching": switching}
    overrides |= dict(s.split("=", 1) for s in settings)
    cfg = load_config(None, env={}, overrides=overrides)
    plans = {}
    for task in STAGES:
        kind = "llama_cpp_embed" if task == "embed" else "llama_cpp_generative"
        spec = wp.ModelSpec(task, kind, f"/nonexistent/{task}.gguf", 2048, 2)
        plans[task] = ModelPlan(spec, "cpu", task, tasks=[task])
    return Scheduler(cfg, plans, {t: t for t in STAGES})


def request_for(task: str) -> tuple[wp.Request, int]:
    if task == "expand":
        return wp.Expand(task, "q", None, True), 1
    if task == "embed":
        return wp.Embed(task, ("a", "b", "c")), 3
    return wp.Rerank(task, "q", tuple("d" * 10), ""), 10


def simulate(sched: Scheduler, clients: int, queries: int, think: float, seed: int,
             costs: dict[str, float], stagger: float = 0.0, gap: float = 0.0) -> Result:
    lane = sched.lanes["cpu"]
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
        job = Job(task, req, items, ev.time, float("inf"), _Pending())  # type: ignore[arg-type]
        job.client, job.stage = ev.client, ev.stage  # type: ignore[attr-defined]
        lane.models[task].queue.append(job)

    def next_query(c: int, at: float) -> None:
        if done[c] < queries:
            pause = think_rng[c].expovariate(1.0 / think) if think else 0.0
            heapq.heappush(events, Event(at + pause, c, 0))

    for c in range(clients):  # each client starts at its own time, then pauses as always
        next_query(c, random.Random(seed * 1000 + 500 + c).uniform(0.0, stagger))
    while events or any(m.queue for m in lane.models.values()):
        while events and events[0].time <= now:
            arrive(heapq.heappop(events))
        model = lane.pick(now)
        if model is None:
            now = events[0].time
            continue
        wait = lane.anticipation(model, now)  # as Lane.run: once per batch, then decide
        lane.batch_ended = None
        if wait > 0:
            now += wait
            continue
        if model.model_id not in lane.resident:
            lane.resident.clear()
            seconds = costs[f"load_{model.model_id}"] * rng.uniform(0.9, 1.1)
            now += seconds
            loads, loading = loads + 1, loading + seconds
            model.costs.observe_load(seconds)
            lane.resident.append(model.model_id)
            while events and events[0].time <= now:  # arrivals during the load
                arrive(heapq.heappop(events))
        lane.begin_visit(model)
        jobs = lane._take(model)
        seconds = call_seconds(model.model_id, jobs, costs, rng)
        now += seconds
        sched.observe(model, model.model_id, sum(j.items for j in jobs), seconds)
        lane.batch_ended = now
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
        with tempfile.TemporaryDirectory() as tmp:
            sched = make_scheduler(switching, Path(tmp), settings)
            out.append(simulate(sched, args.clients, args.queries, args.think, seed, costs,
                                args.stagger, args.gap))
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
