"""The scheduler under real concurrency with the real default models."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from npuserve.daemon.http.services import SERVICES

PASSAGE = "apt resolves dependencies, downloads archives and unpacks them in order. " * 3
DOCS = [{"file": f"{i}.md", "text": f"document {i} about cats and naps"} for i in range(4)]


def _sched(client):
    return client.app[SERVICES].scheduler


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _flood_then_rerank(client) -> tuple[int, int]:
    """300 one-text embeds, a rerank 0.2 s in: how many embeds finished before the rerank,
    and how many after."""
    order: list[str] = []

    async def embed(i: int) -> None:
        resp = await client.post("/embed", json={"text": f"{i} {PASSAGE}"})
        assert resp.status == 200
        order.append("embed")

    async def rerank() -> None:
        await asyncio.sleep(0.2)
        # Its own session: the flood holds all of the test client's connections.
        async with aiohttp.ClientSession() as other:
            resp = await other.post(client.make_url("/rerank"),
                                    json={"query": "cats", "documents": DOCS})
            assert resp.status == 200
        order.append("rerank")

    await client.post("/embed", json={"text": "warm"})
    await asyncio.gather(rerank(), *[embed(i) for i in range(300)])
    pos = order.index("rerank")
    return pos, len(order) - pos - 1


async def test_aging_bound_prevents_starvation(make_client):
    client = await make_client(scheduler__aging_ms="300", scheduler__coalesce_texts="32")
    before, after = await _flood_then_rerank(client)
    # The rerank was served while much of the flood was still queued (the effective
    # bound also scales with measured swap times, so how much depends on the machine).
    assert after > 60, (before, after)
    assert _sched(client).snapshot().events.get("loads", 0) >= 3  # embed -> rerank -> embed again


async def test_aging_bound_never_preempts_older_work(make_client):
    """Reranks queued first, an embed just after: past a tiny aging bound the embed still
    waits, because the resident model is serving older requests (nobody starves) - one
    swap, not two."""
    client = await make_client(scheduler__aging_ms="100", scheduler__switch_hysteresis_ms="0")
    sched = _sched(client)
    await client.post("/rerank", json={"query": "warm", "documents": DOCS})  # S resident
    loads = sched.snapshot().events.get("loads", 0)
    order: list[str] = []
    docs = [{"file": f"{i}.md", "text": PASSAGE} for i in range(6)]

    async def rerank(i: int) -> None:
        resp = await client.post("/rerank", json={"query": f"apt {i}", "documents": docs})
        assert resp.status == 200
        order.append(f"rerank{i}")

    async def embed() -> None:
        await asyncio.sleep(0.05)
        resp = await client.post("/embed", json={"text": "later"})
        assert resp.status == 200
        order.append("embed")

    await asyncio.gather(*[rerank(i) for i in range(4)], embed())
    assert order[-1] == "embed", order
    assert sched.snapshot().events.get("loads", 0) - loads == 1  # the embedding model, once


async def test_hysteresis_serves_the_older_request_of_another_model(make_client):
    """With the aging bound out of reach, the rerank still goes before embeds that
    arrived well after it (once it is older than their head by the hysteresis)."""
    client = await make_client(scheduler__aging_ms="1000000", scheduler__coalesce_texts="32",
                               scheduler__switch_hysteresis_ms="500")
    before, after = await _flood_then_rerank(client)
    assert after > 60, (before, after)


async def test_fifo_switching_is_selectable(make_client):
    client = await make_client(scheduler__switching="fifo")
    before, after = await _flood_then_rerank(client)
    assert before + after == 300 and _sched(client).settings.switching == "fifo"


async def test_overload_is_503_with_retry_after_from_calibration(make_client):
    client = await make_client(scheduler__request_timeout="2")
    sched = _sched(client)
    # Calibrate: the first load measures a warm-up call, real calls refine it.
    for _ in range(3):
        assert (await client.post("/embed-batch", json={"texts": [PASSAGE] * 16})).status == 200
    calls = sched.snapshot().events.get("backend_calls", 0)
    resp = await client.post("/embed-batch", json={"texts": [PASSAGE] * 512})
    assert resp.status == 503
    body = await resp.json()
    assert "exceeds" in body["error"]
    # The refusal comes from the request's own tokens: 512 passages' worth.
    per_token = sched.snapshot().tasks["embed"].serving.seconds_per_token["embed"]
    tokens = 512 * len(PASSAGE) * 0.5  # at most a token per two characters of English
    expected = per_token * tokens
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= expected + 1, (retry_after, expected)
    assert sched.snapshot().events.get("backend_calls", 0) == calls, (
        "refused work never reached the backend")


async def test_full_queue_is_503(make_client):
    client = await make_client(scheduler__max_queue="8")
    resp = await client.post("/embed-batch", json={"texts": ["x"] * 9})
    assert resp.status == 503 and "queue full" in (await resp.json())["error"]
    assert "Retry-After" in resp.headers


async def test_calibration_persists_across_restarts(make_client, state_dir):
    first = await make_client()
    assert (await first.post("/embed-batch", json={"texts": [PASSAGE] * 8})).status == 200
    await first.close()  # runs the scheduler's stop(), which saves
    data = json.loads((state_dir / "calibration.json").read_text())
    mid = _sched(first).task_model["embed"]
    assert data["models"][mid]["load_seconds"] > 0
    assert len(data["models"][f"{mid}/embed"]["rates"]) >= 1  # seconds per token, measured
    # A new daemon knows the costs before loading anything: it can refuse at once.
    second = await make_client(scheduler__request_timeout="1")
    resp = await second.post("/embed-batch", json={"texts": [PASSAGE] * 512})
    assert resp.status == 503
    assert _sched(second).snapshot().tasks["embed"].serving.loads == 0


async def test_disconnected_client_work_is_dropped(client):
    sched = _sched(client)
    # Busy long enough (several seconds) that the rerank is still queued when its client
    # gives up: embedding got fast enough that 64 passages were done before that.
    texts = [f"{i} {PASSAGE * 3}" for i in range(192)]
    busy = asyncio.create_task(client.post("/embed-batch", json={"texts": texts}))
    await asyncio.sleep(0.3)
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/rerank", json={"query": "q", "documents": DOCS},
                          timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await busy).status == 200
    for _ in range(200):
        if sched.snapshot().events.get("dropped_disconnected", 0):
            break
        await asyncio.sleep(0.05)
    assert sched.snapshot().events.get("dropped_disconnected", 0) == 1
    assert sched.snapshot().tasks["rerank"].serving.loads == 0, (
        "nobody was waiting: no load, no compute")


async def test_keep_alive_unloads_idle_model(make_client):
    client = await make_client(scheduler__keep_alive="0.5")
    sched = _sched(client)
    lane = sched.lanes["cpu"]
    await client.post("/embed", json={"text": "x"})
    assert lane.resident
    for _ in range(100):
        if not lane.resident:
            break
        await asyncio.sleep(0.05)
    assert not lane.resident and sched.snapshot().tasks["embed"].serving.unloads == 1


async def test_preloaded_model_stays_for_keep_alive(make_client):
    client = await make_client(scheduler__keep_alive="60")
    lane = _sched(client).lanes["cpu"]
    assert (await client.post("/admin/models/embed/load")).status == 200
    await asyncio.sleep(0.5)  # the lane has run its idle check by now
    assert len(lane.resident) == 1, "a preloaded model must not count as idle since start-up"


async def _peak_worker_rss(client, rounds: int = 3) -> int:
    lane = _sched(client).lanes["cpu"]
    peak = 0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            if lane.worker.pid:
                try:
                    peak = max(peak, _rss(lane.worker.pid))
                except OSError:
                    pass
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    for _ in range(rounds):
        await asyncio.gather(
            client.post("/embed-batch", json={"texts": [PASSAGE] * 8}),
            client.post("/rerank", json={"query": "cats", "documents": DOCS}))
    done = True
    await sampler
    return peak


async def test_sequential_holds_one_model_resident_state_and_rss(make_client):
    seq = await make_client(scheduler__policy="sequential")
    res = await make_client(scheduler__policy="resident")
    seq_peak = await _peak_worker_rss(seq)
    res_peak = await _peak_worker_rss(res)
    assert len(_sched(res).lanes["cpu"].resident) == 2
    assert len(_sched(seq).lanes["cpu"].resident) <= 1
    # The embedding model's weights (46 MB) are never resident beside SmolLM2.
    assert seq_peak < res_peak - 30 * 1024 * 1024, (seq_peak >> 20, res_peak >> 20)


async def test_admin_preload_unload_and_listing(client):
    resp = await client.post("/admin/models/rerank/load")
    assert resp.status == 200 and (await resp.json())["state"] == "ready"
    ps = await (await client.get("/api/ps")).json()
    assert [m["name"] for m in ps["models"]] == ["smollm2-135m-instruct"]
    listing = await (await client.get("/admin/models")).json()
    resident = {m["name"]: m["resident"] for m in listing["models"]}
    assert resident == {"all-minilm-l6-v2": False, "smollm2-135m-instruct": True}
    resp = await client.post("/admin/models/smollm2-135m-instruct/unload")
    assert (await resp.json())["state"] == "unloaded"
    assert (await (await client.get("/api/ps")).json())["models"] == []
    missing = await client.post("/admin/models/nope/load")
    assert missing.status == 404 and "nope" in (await missing.json())["error"]
    status = await (await client.get("/status")).json()
    assert status["runtime"]["policy"] == "sequential"
    assert status["runtime"]["recommended_client_timeout"] > 0


async def test_admin_needs_key_when_set(make_client):
    client = await make_client(server__api_key="k")
    assert (await client.post("/admin/models/embed/load")).status == 401
    ok = await client.post("/admin/models/embed/load", headers={"Authorization": "Bearer k"})
    assert ok.status == 200


async def test_concurrent_pipelines_share_model_loads(client):
    """Six QMD-style queries at once (expand -> embed -> rerank) move stage by stage,
    so each model is loaded a few times, not once per query and stage."""
    sched = _sched(client)

    async def query(i: int) -> None:
        exp = await client.post("/expand", json={"query": f"cats nap {i}"})
        lines = await exp.json()
        texts = [f"query: {line['text']}" for line in lines][:3]
        assert (await client.post("/embed-batch", json={"texts": texts})).status == 200
        rr = await client.post("/rerank", json={"query": f"cats nap {i}", "documents": DOCS})
        assert rr.status == 200

    await asyncio.gather(*[query(i) for i in range(6)])
    assert sched.snapshot().events.get("loads", 0) <= 6, sched.snapshot().events.get("loads", 0)


async def _embed_then_rerank(client, rounds: int = 2) -> int:
    """Alternate the two models; the most models resident at once on the CPU lane."""
    lane = _sched(client).lanes["cpu"]
    most = 0
    for i in range(rounds):
        for resp in await asyncio.gather(
                client.post("/embed", json={"text": f"{i} {PASSAGE}"})):
            assert resp.status == 200
        most = max(most, len(lane.resident))
        resp = await client.post("/rerank", json={"query": f"cats {i}", "documents": DOCS})
        assert resp.status == 200
        most = max(most, len(lane.resident))
    return most


async def test_auto_keeps_both_models_where_memory_allows(make_client):
    client = await make_client(scheduler__policy="auto")
    assert await _embed_then_rerank(client) == 2
    sched = _sched(client)
    assert sched.snapshot().events.get("loads", 0) == 2, "no swap: each model loaded once"
    # Footprints were measured (what the policy plans with, persisted for next time).
    listing = await (await client.get("/admin/models")).json()
    sizes = {m["name"]: m["calibration"]["footprint_bytes"] for m in listing["models"]}
    assert all(s > 10 * 2**20 for s in sizes.values()), sizes
    assert all(m.footprint_bytes == sizes[m.name] for m in sched.snapshot().models)


async def test_auto_takes_turns_when_memory_is_short(make_client):
    # A memory budget with room for either model (the larger one's first estimate, its
    # file plus a margin) but not for both. A budget, not a reserve cut from MemAvailable:
    # that figure moves with every other program (a previous test's worker exiting freed
    # enough for both models once), the scheduler's own reckoning does not.
    files = [m.path for m in _sched(await make_client()).snapshot().models]
    larger = max(os.path.getsize(f) for f in files)
    budget_mb = (larger >> 20) + 64 + 8
    client = await make_client(scheduler__policy="auto",
                               scheduler__memory_budget_mb=str(budget_mb))
    assert await _embed_then_rerank(client) == 1
    assert _sched(client).snapshot().events.get("loads", 0) >= 3, "the models took turns"
    # Under the same budget, the rerank model alone stays resident: no swap to serve it.
    loads = _sched(client).snapshot().events.get("loads", 0)
    for i in range(2):
        resp = await client.post("/rerank", json={"query": f"dogs {i}", "documents": DOCS})
        assert resp.status == 200
    assert _sched(client).snapshot().events.get("loads", 0) == loads


async def test_auto_takes_turns_when_the_reserve_leaves_no_room(make_client):
    from npuserve.daemon.sched.memory import mem_available

    # A reserve above all the memory there is: however much other programs free meanwhile,
    # no second model fits beside the first - and each still loads, alone.
    reserve_mb = (mem_available() >> 20) + 64 * 1024
    client = await make_client(scheduler__policy="auto",
                               scheduler__memory_reserve_mb=str(reserve_mb))
    assert await _embed_then_rerank(client) == 1
    assert _sched(client).snapshot().events.get("loads", 0) >= 3, "the models took turns"


@pytest.mark.parametrize("anticipate_ms,first", [(50, "rerank"), (0, "expand")])
async def test_a_swap_waits_for_the_next_stage_of_the_batch_just_served(make_client,
                                                                       anticipate_ms, first):
    """Six pipelines finish their embeddings in one call and send their reranks a few ms
    later; one straggler's expansion waits already. With anticipation the device sees the
    six reranks before it swaps and loads the reranker first (the most work per load);
    deciding at once (0) it can only see the straggler, and serves it first."""
    # Expansion on its own model (another context size makes it one), three on one device.
    client = await make_client(models__expand__n_ctx=1536, models__expand__max_tokens=8,
                               scheduler__anticipate_ms=anticipate_ms)
    lane = _sched(client).lanes["cpu"]
    assert len(lane.models) == 3
    docs = [{"file": f"{i}.md", "text": PASSAGE} for i in range(3)]
    # Calibration: every model loaded and timed once; the embedder is resident after.
    assert (await client.post("/expand", json={"query": "cats"})).status == 200
    assert (await client.post("/rerank", json={"query": "cats", "documents": docs})).status == 200
    assert (await client.post("/embed", json={"text": "warm"})).status == 200
    done: list[str] = []

    async def pipeline(i: int) -> None:
        await asyncio.sleep(0.1)  # queued behind the long embedding below, all six together
        texts = [f"{i} {k} {PASSAGE}" for k in range(4)]
        assert (await client.post("/embed-batch", json={"texts": texts})).status == 200
        resp = await client.post("/rerank", json={"query": f"cats {i}", "documents": docs})
        assert resp.status == 200
        done.append("rerank")

    async def straggler() -> None:
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as own:  # the pipelines hold the test client's
            resp = await own.post(client.make_url("/expand"), json={"query": "dogs"})
            assert resp.status == 200
        done.append("expand")

    busy = client.post("/embed-batch", json={"texts": [f"{k} {PASSAGE}" for k in range(48)]})
    responses = await asyncio.gather(busy, straggler(), *[pipeline(i) for i in range(6)])
    assert responses[0].status == 200
    assert done[0] == first, done
    assert done.count("rerank") == 6


async def test_a_long_rerank_lets_another_models_request_in_between_its_slices(client):
    """A rerank runs in slices of a few seconds: an /embed sent while it runs is answered
    before the rerank ends (not after the whole of it), and the rerank still answers every
    document, in its place."""
    docs = [{"file": f"{i}.md", "text": f"document {i} " + "cats sleep a lot " * 60}
            for i in range(12)]
    docs[7]["text"] = "Cats sleep twelve to sixteen hours a day. " * 10
    await client.post("/rerank", json={"query": "warm", "documents": docs[:1]})  # measured
    costs = _sched(client)._primary("rerank").task_costs["rerank"]
    per_char = costs.tokens_per_char
    rerank = asyncio.ensure_future(client.post("/rerank", json={
        "query": "how long do cats sleep", "documents": docs}))
    await asyncio.sleep(1.0)  # its first slice is running
    embed = await client.post("/embed", json={"text": "hello"})
    assert embed.status == 200
    assert not rerank.done(), "the /embed waited for the whole rerank"
    resp = await rerank
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert sorted(r["index"] for r in results) == list(range(12))
    assert all(r["file"] == f"{r['index']}.md" for r in results)
    assert _sched(client).snapshot().events["backend_calls"] >= 4  # warm-up, 2+ slices, embed
    # Each slice is measured on its own text: the tokenizer's figure does not drift.
    assert abs(costs.tokens_per_char - per_char) < 0.25 * per_char
