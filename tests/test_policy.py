"""The scheduling policy on a fake clock: no models, no worker, no sleeps - each of the
behaviours the daemon was measured to need (docs/benchmarks.md, design notes), driven
through `decide()` with views built as a lane builds them."""

from __future__ import annotations

import collections
import dataclasses

from npuserve.daemon.models.registry import ModelPlan
from npuserve.daemon.sched.jobs import Job
from npuserve.daemon.sched.model import ModelState
from npuserve.daemon.sched.policy import (
    AgingPolicy,
    FifoPolicy,
    Idle,
    LaneView,
    Load,
    Probe,
    QueueView,
    Reject,
    Serve,
    Unload,
    Wait,
    make_policy,
)
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.worker import protocol as wp

MB = 1024 * 1024
NOW = 1000.0
# Session 9's board emulation: loads of 3.0 / 0.7 / 3.1 s, calls of 0.8 s (one expansion),
# 0.02 s (a text), 0.35 s (a document).
LOAD = {"expand": 3.0, "embed": 0.7, "rerank": 3.1}
PER_ITEM = {"expand": 0.8, "embed": 0.02, "rerank": 0.35}


def settings(**kw: object) -> SchedulerSettings:
    base = {"residency": "sequential", "aging_s": 10.0, "hysteresis_s": 2.0,
            "anticipate_s": 0.05, "keep_alive": -1.0}
    return SchedulerSettings(**(base | kw))  # type: ignore[arg-type]


def queue(task: str, items: int = 0, age: float = 0.0, resident: bool = False,
          **kw: object) -> QueueView:
    """A model with `items` queued, the oldest `age` seconds ago."""
    return QueueView(task, head=NOW - age if items else None,
                     work=PER_ITEM[task] * items if items else 0.0, swap=LOAD[task],
                     resident=resident, **kw)  # type: ignore[arg-type]


def lane(*models: QueueView, **kw: object) -> LaneView:
    resident = tuple(m.model_id for m in models if m.resident)
    return LaneView(models=models, resident=resident, **kw)  # type: ignore[arg-type]


def test_a_swap_goes_to_the_queue_with_most_work_per_load_second():
    """With the model served last idle, the device loads the model whose queue does the
    most work per second of loading, not the one with the oldest request."""
    policy = AgingPolicy(settings())
    view = lane(queue("embed", resident=True),
                queue("expand", 1, age=8.0),     # 0.8 s of work for a 3.0 s load
                queue("rerank", 10, age=2.0),    # 3.5 s of work for a 3.1 s load
                serving="embed")
    assert policy.decide(view, NOW) == Load("rerank", ("embed",))
    eight = dataclasses.replace(view.model("expand"), work=8 * 0.8)  # 6.4 s for 3.0 s
    view = lane(view.model("embed"), eight, view.model("rerank"), serving="embed")
    assert policy.decide(view, NOW) == Load("expand", ("embed",))


def test_the_oldest_goes_first_once_past_the_aging_bound():
    policy = AgingPolicy(settings())
    expand, rerank = queue("expand", 1, age=8.0), queue("rerank", 10, age=2.0)
    bound = policy.aging_bound(expand, expand)
    assert bound == 10 * 2 * LOAD["expand"], "ten swaps there and back once loads are slow"
    view = lane(queue("embed", resident=True), expand, rerank, serving="embed")
    assert policy.decide(view, NOW).model_id == "rerank"  # type: ignore[union-attr]
    assert policy.decide(view, NOW + bound).model_id == "expand"  # type: ignore[union-attr]
    # The bound is the configured one while loads are quick.
    quick = dataclasses.replace(expand, swap=0.1)
    assert policy.aging_bound(quick, quick) == 10.0


def test_the_resident_model_keeps_the_device_within_the_hysteresis():
    policy = AgingPolicy(settings(hysteresis_s=2.0))
    swap = LOAD["embed"] + LOAD["rerank"]
    hysteresis = policy.hysteresis(queue("embed"), queue("rerank"))
    assert hysteresis == max(2.0, 2 * swap)
    for other_age, served in [(1.0 + hysteresis - 0.01, "embed"),
                              (1.0 + hysteresis + 0.01, "rerank")]:
        view = lane(queue("embed", 3, age=1.0, resident=True),
                    queue("rerank", 10, age=other_age), serving="embed")
        assert policy.decide(view, NOW).model_id == served  # type: ignore[union-attr]


def test_a_flood_never_starves_another_queue_but_older_work_is_not_preempted():
    policy = AgingPolicy(settings(aging_s=0.3, hysteresis_s=100.0))
    bound = policy.aging_bound(queue("embed"), queue("rerank"))
    # A flood of embeddings (its head young: new requests keep arriving) and a rerank
    # past the aging bound: the rerank goes next, whatever the hysteresis says.
    flood = queue("embed", 300, age=0.01, resident=True)
    view = lane(flood, queue("rerank", 4, age=bound + 0.1), serving="embed")
    assert policy.decide(view, NOW) == Load("rerank", ("embed",))
    # But while the resident queue holds the older work, nobody starves: no preemption.
    view = lane(queue("rerank", 6, age=bound + 5.0, resident=True),
                queue("embed", 1, age=bound + 1.0), serving="rerank")
    assert policy.decide(view, NOW) == Serve("rerank")


def test_a_swap_right_after_a_batch_waits_for_its_follow_ups():
    """The straggler of docs/benchmarks.md: the embeddings of six pipelines just answered,
    their reranks come back a few ms later; one expansion waits already. Deciding at once
    serves the straggler; waiting anticipate_ms lets the six reranks be seen."""
    policy = AgingPolicy(settings(anticipate_s=0.05))
    ended = NOW - 0.001
    straggler = lane(queue("embed", resident=True), queue("expand", 1, age=0.5),
                     queue("rerank"), serving="embed", batch_ended=ended)
    wait = policy.decide(straggler, NOW)
    assert isinstance(wait, Wait) and abs(wait.seconds - 0.049) < 1e-9
    # The window is at most a quarter of the swap it may save.
    quick = dataclasses.replace(straggler.model("expand"), swap=0.08)
    short = policy.decide(lane(straggler.model("embed"), quick, straggler.model("rerank"),
                               serving="embed", batch_ended=ended), NOW)
    assert isinstance(short, Wait) and abs(short.seconds - (0.02 - 0.001)) < 1e-9
    # After the wait the lane clears batch_ended: the six reranks are there, and win.
    later = NOW + wait.seconds
    after = lane(queue("embed", resident=True), queue("expand", 1, age=0.55),
                 queue("rerank", 60, age=0.045), serving="embed")
    assert policy.decide(after, later) == Load("rerank", ("embed",))
    # No wait for a model already resident, none under FIFO, none with anticipate_ms = 0.
    resident = lane(queue("embed", 2, age=0.01, resident=True), serving="embed",
                    batch_ended=ended)
    assert policy.decide(resident, NOW) == Serve("embed")
    assert isinstance(FifoPolicy(settings()).decide(straggler, NOW), Load)
    assert isinstance(AgingPolicy(settings(anticipate_s=0.0)).decide(straggler, NOW), Load)


def test_memory_budget_evicts_idle_models_least_recently_used_first():
    policy = AgingPolicy(settings(residency="auto", reserve_bytes=0, budget_bytes=400 * MB))
    a = queue("embed", resident=True, footprint=150 * MB)
    b = queue("rerank", resident=True, footprint=150 * MB)
    new = queue("expand", 1, age=1.0, footprint=200 * MB)
    view = LaneView(models=(a, b, new), resident=("embed", "rerank"), mem_available=8 << 30)
    # 300 MB held of 400: the 200 MB model needs one idle model out, the older one.
    assert policy.decide(view, NOW) == Load("expand", ("embed",))
    # Models on the other device count against the same budget.
    assert policy.decide(dataclasses.replace(view, held_elsewhere=100 * MB), NOW) == Load(
        "expand", ("embed", "rerank"))
    # A model with queued work is not evicted to make room: if nothing else frees enough,
    # the device takes turns (all out).
    busy_a = dataclasses.replace(a, head=NOW - 0.1, work=0.02)
    busy = LaneView(models=(busy_a, b, new), resident=("embed", "rerank"),
                    mem_available=8 << 30, held_elsewhere=100 * MB)
    assert policy.victims(busy, new) == ("embed", "rerank")
    # With room in the budget nothing is evicted.
    roomy = AgingPolicy(settings(residency="auto", reserve_bytes=0, budget_bytes=1 << 40))
    assert roomy.decide(view, NOW) == Load("expand", ())


def test_auto_counts_mapped_weights_and_the_reserve_against_available_memory():
    policy = AgingPolicy(settings(residency="auto", reserve_bytes=100 * MB))
    a = queue("embed", resident=True, footprint=50 * MB, mapped=300 * MB)
    new = queue("rerank", 1, age=1.0, footprint=200 * MB)
    view = LaneView(models=(a, new), resident=("embed",), mem_available=550 * MB)
    assert policy.decide(view, NOW) == Load("rerank", ("embed",))  # 550-100-300 < 200
    view = dataclasses.replace(view, mem_available=700 * MB)
    assert policy.decide(view, NOW) == Load("rerank", ())
    # sequential: always one at a time; resident: never evict.
    assert AgingPolicy(settings(residency="sequential")).victims(view, new) == ("embed",)
    assert AgingPolicy(settings(residency="resident")).victims(view, new) == ()


def test_a_failed_load_in_back_off_is_answered_at_once():
    policy = AgingPolicy(settings())
    view = lane(queue("embed", 1, age=0.1, retry_at=NOW + 4.0))
    assert policy.decide(view, NOW) == Reject("embed", 4.0)
    assert policy.decide(view, NOW + 5.0) == Load("embed", ())


def test_idle_devices_unload_after_keep_alive_and_probe_a_tripped_npu_model():
    policy = AgingPolicy(settings(keep_alive=30.0))
    view = lane(queue("embed", resident=True, last_used=NOW - 10.0),
                queue("rerank", probe_at=NOW + 5.0))
    assert policy.decide(view, NOW) == Idle(5.0)  # the probe is due first
    assert policy.decide(view, NOW + 5.0) == Probe("rerank", ("embed",))
    assert policy.decide(dataclasses.replace(view, stopping=True), NOW + 5.0) == Idle(-0.0)
    later = lane(queue("embed", resident=True, last_used=NOW - 10.0))
    assert policy.decide(later, NOW) == Idle(20.0)
    assert policy.decide(later, NOW + 20.0) == Unload(("embed",))
    assert AgingPolicy(settings(keep_alive=-1.0)).decide(later, NOW + 1e6) == Idle(None)


def _job(task: str, request: wp.Request, items: int, enqueued: float) -> Job:
    return Job(task, request, items, enqueued, NOW + 300, None)  # type: ignore[arg-type]


def test_batches_merge_embeddings_and_expansions_past_a_rerank():
    policy = AgingPolicy(settings(coalesce_texts=5, coalesce_expansions=3))
    embeds = collections.deque(_job("embed", wp.Embed("m", ("a", "b")), 2, NOW + i)
                               for i in range(3))
    assert [j.items for j in policy.take(embeds, [])] == [2, 2]  # 4 texts; 6 would pass 5
    assert len(embeds) == 1
    mixed = collections.deque([
        _job("expand", wp.Expand("m", "q1", None, True), 1, NOW),
        _job("rerank", wp.Rerank("m", "q", ("d",), ""), 1, NOW + 1),
        _job("expand", wp.Expand("m", "q2", None, True), 1, NOW + 2),
        _job("expand", wp.Expand("m", "q3", None, True), 1, NOW + 3)])
    taken = policy.take(mixed, [])
    assert [j.request.query for j in taken] == ["q1", "q2", "q3"]  # type: ignore[union-attr]
    assert [j.task for j in mixed] == ["rerank"]  # the rerank keeps its place


def test_fifo_serves_strictly_in_arrival_order():
    policy = make_policy(settings(switching="fifo"))
    assert isinstance(policy, FifoPolicy)
    view = lane(queue("embed", 3, age=0.5, resident=True), queue("rerank", 1, age=0.6),
                serving="embed")
    assert policy.decide(view, NOW) == Load("rerank", ("embed",))
    # A batch takes only requests no other model's request is older than.
    embeds = collections.deque(_job("embed", wp.Embed("m", ("a",)), 1, NOW + i)
                               for i in range(3))
    assert len(policy.take(embeds, [NOW + 1.5])) == 2
    mixed = collections.deque([
        _job("expand", wp.Expand("m", "q1", None, True), 1, NOW),
        _job("rerank", wp.Rerank("m", "q", ("d",), ""), 1, NOW + 1),
        _job("expand", wp.Expand("m", "q2", None, True), 1, NOW + 2)])
    assert len(policy.take(mixed, [])) == 1  # stops at the rerank


def test_background_embedding_yields_to_interactive_requests():
    """The index's own embedding (background) neither keeps the device nor makes a model
    load while an interactive request waits, and an interactive call is not made longer by
    background texts; with nothing interactive waiting it runs."""
    policy = AgingPolicy(settings(coalesce_texts=64))
    older_background = queue("embed", 32, age=60.0, resident=True, background_only=True)
    view = lane(older_background, queue("rerank", 1, age=0.1), serving="embed")
    assert policy.decide(view, NOW) == Load("rerank", ("embed",))
    alone = lane(older_background, queue("rerank"), serving="rerank")
    assert policy.decide(alone, NOW) == Serve("embed")

    model = ModelState(ModelPlan(wp.ModelSpec("m", "llama-embed", "m.gguf", 512, 1), "cpu", "m"))
    for i, background in enumerate([True, False, True, False]):
        model.enqueue(dataclasses.replace(
            _job("embed", wp.Embed("m", (f"t{i}",)), 1, NOW + i), background=background))
    assert [j.request.texts for j in model.queue] == [  # type: ignore[union-attr]
        ("t1",), ("t3",), ("t0",), ("t2",)]
    taken = policy.take(model.queue, [])
    assert [j.background for j in taken] == [False, False]
    assert model.background_only and len(model.queue) == 2
