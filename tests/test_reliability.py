"""The reliability suite: load, faults, graceful shutdown. Real daemon processes, real
models, loopback only. `python bench/reliability.py` runs it at full size (60 s, 32
clients) and prints the table; CI runs it shorter (NPUSERVE_TEST_LOAD_SECONDS)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_embed import LlamaEmbedBackend

from .reliability_support import (
    LOAD_CLIENTS,
    LOAD_SECONDS,
    Daemon,
    LoadStats,
    Sample,
    children,
    cosine,
    pick,
    record,
    sample_process,
)

pytestmark = pytest.mark.slow

WORDS = ("board npu kernel module cache vector index query rerank embed socket mount "
         "journal service config model token batch queue swap memory latency").split()
# Realistic ratios for a LAN of retrieval agents: mostly embeddings and searches, some
# reranks and ingests, a little expansion and hybrid query, the odd status probe.
MIX = {"embed": 44, "embed_batch": 24, "openai": 24, "ollama": 10, "rerank": 12,
       "cohere": 6, "search": 24, "vsearch": 12, "put": 16, "get": 8, "expand": 1,
       "query": 1, "health": 4, "metrics": 2, "status": 2}
# As an operator of a LAN appliance would set it: a request that cannot be answered
# within 30 s is refused at once (503 + Retry-After) or, if it waited too long, 504.
DAEMON_ARGS = ("--set", "scheduler.keep_alive=-1", "--set", "scheduler.request_timeout=30")


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"note {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
            for i in range(n)]


@pytest.fixture(scope="module")
def reference(models_dir: Path) -> dict[str, np.ndarray]:
    """The pool's vectors computed directly with llama-cpp-python, outside the daemon."""
    texts = _texts(48, 1)
    backend = LlamaEmbedBackend(ModelSpec("direct", "llama_cpp_embed",
                                          str(models_dir / "all-minilm-l6-v2-f16.gguf"),
                                          512, max(1, os.cpu_count() or 1)))
    backend.load()
    try:
        vectors = backend.embed(texts).vectors
    finally:
        backend.unload()
    return dict(zip(texts, vectors, strict=True))


def _state(tmp_path: Path, models_dir: Path, copy_models: bool = False) -> Path:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    if copy_models:
        shutil.copytree(models_dir, state / "models",
                        ignore=shutil.ignore_patterns("*-npu"))
    else:
        (state / "models").symlink_to(models_dir)
    return state


async def _call(session: aiohttp.ClientSession, method: str, url: str,
                json_body: object = None) -> tuple[int, dict, object]:
    async with session.request(method, url, json=json_body) as resp:
        ctype = resp.headers.get("Content-Type", "")
        body = await resp.json() if "json" in ctype else await resp.text()
        return resp.status, dict(resp.headers), body


class Client:
    """One agent: picks an operation by the mix, sends it, checks the answer."""

    def __init__(self, n: int, base: str, ref: dict[str, np.ndarray], stats: LoadStats,
                 collection: str) -> None:
        self.n, self.base, self.ref, self.stats = n, base, ref, stats
        self.rng = random.Random(1000 + n)
        self.texts = list(ref)
        self.collection = collection
        self.version = 0

    def _expect_vectors(self, texts: list[str], vectors: list[list[float]], op: str) -> None:
        for text, vec in zip(texts, vectors, strict=True):
            if cosine(np.asarray(vec, np.float32), self.ref[text]) < 0.9999:
                self.stats.mismatches.append(f"{op}: vector for {text!r} does not match")

    async def run_one(self, session: aiohttp.ClientSession) -> None:
        op = pick(MIX, self.rng)
        texts = self.rng.sample(self.texts, 3)
        start = time.perf_counter()
        status, headers, body = await getattr(self, "op_" + op)(session, texts)
        self.stats.add(op, status, time.perf_counter() - start)
        if status == 503 and "Retry-After" not in headers:
            self.stats.undesigned.append(f"{op}: 503 without Retry-After")
        elif not (200 <= status < 300 or status in (503, 504)):
            self.stats.undesigned.append(f"{op}: {status} {str(body)[:200]}")
        elif status >= 500 and not (isinstance(body, dict) and "error" in body):
            self.stats.undesigned.append(f"{op}: {status} without a JSON error")

    async def op_embed(self, s, texts):
        st, h, b = await _call(s, "POST", self.base + "/embed", {"text": texts[0]})
        if st == 200:
            self._expect_vectors(texts[:1], [b["embedding"]], "embed")
        return st, h, b

    async def op_embed_batch(self, s, texts):
        st, h, b = await _call(s, "POST", self.base + "/embed-batch", {"texts": texts})
        if st == 200:
            self._expect_vectors(texts, [r["embedding"] for r in b], "embed-batch")
        return st, h, b

    async def op_openai(self, s, texts):
        st, h, b = await _call(s, "POST", self.base + "/v1/embeddings",
                               {"input": texts[:2], "model": "x"})
        if st == 200:
            ordered = sorted(b["data"], key=lambda d: d["index"])
            self._expect_vectors(texts[:2], [d["embedding"] for d in ordered], "openai")
        return st, h, b

    async def op_ollama(self, s, texts):
        st, h, b = await _call(s, "POST", self.base + "/api/embed", {"input": texts[:1]})
        if st == 200:
            self._expect_vectors(texts[:1], b["embeddings"], "ollama")
        return st, h, b

    async def op_rerank(self, s, texts):
        files = [f"c{self.n}/{i}-{self.rng.randrange(10**6)}.md" for i in range(3)]
        docs = [{"file": f, "text": t} for f, t in zip(files, texts, strict=True)]
        st, h, b = await _call(s, "POST", self.base + "/rerank",
                               {"query": "npu", "documents": docs})
        if st == 200:
            got = {r["file"]: r["index"] for r in b["results"]}
            if got != {f: i for i, f in enumerate(files)}:
                self.stats.mismatches.append(f"rerank: files {got} for {files}")
        return st, h, b

    async def op_cohere(self, s, texts):
        st, h, b = await _call(s, "POST", self.base + "/v1/rerank",
                               {"query": "kernel", "documents": texts, "top_n": 2,
                                "return_documents": True})
        if st == 200:
            for r in b["results"]:
                if r["document"]["text"] != texts[r["index"]]:
                    self.stats.mismatches.append("v1/rerank: document does not echo its index")
        return st, h, b

    async def op_search(self, s, texts):
        word = self.rng.choice(WORDS)
        return await _call(s, "GET", f"{self.base}/search?q={word}&limit=5")

    async def op_vsearch(self, s, texts):
        return await _call(s, "POST", self.base + "/vsearch", {"query": texts[0], "limit": 5})

    async def op_put(self, s, texts):
        self.version += 1
        path = f"agent{self.n}/doc{self.rng.randrange(4)}.md"
        body = f"# agent {self.n} v{self.version}\n\n" + "\n".join(texts)
        st, h, b = await _call(s, "PUT", f"{self.base}/collections/{self.collection}/"
                               f"documents/{path}", {"body": body})
        if st in (200, 201):
            self.stats.acked_docs[path] = body
        return st, h, b

    async def op_get(self, s, texts):
        mine = [p for p in self.stats.acked_docs if p.startswith(f"agent{self.n}/")]
        if not mine:
            return await _call(s, "GET", self.base + "/collections")
        path = self.rng.choice(mine)
        expected = self.stats.acked_docs[path]
        st, h, b = await _call(s, "GET", f"{self.base}/collections/{self.collection}/"
                               f"documents/{path}")
        if st == 200 and b.get("body") != expected:
            self.stats.mismatches.append(f"get {path}: not the last acknowledged body")
        return st, h, b

    async def op_expand(self, s, texts):
        return await _call(s, "POST", self.base + "/expand", {"query": texts[0]})

    async def op_query(self, s, texts):
        return await _call(s, "POST", self.base + "/query", {"query": texts[0], "limit": 3})

    async def op_health(self, s, texts):
        return await _call(s, "GET", self.base + "/health")

    async def op_metrics(self, s, texts):
        return await _call(s, "GET", self.base + "/metrics")

    async def op_status(self, s, texts):
        return await _call(s, "GET", self.base + "/status")


async def _agent(client: Client, until: float) -> None:
    timeout = aiohttp.ClientTimeout(total=90)  # past the daemon's 30 s deadline: a hang
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            try:
                await client.run_one(session)
            except (aiohttp.ClientError, TimeoutError) as exc:
                client.stats.undesigned.append(f"connection: {type(exc).__name__}: {exc}")


def _flat(samples: list[Sample], warmup: float) -> tuple[float, float, int]:
    """(main RSS growth MB, total RSS peak MB, fd growth) from warm-up end to the end."""
    after = [s for s in samples if s.t >= warmup]
    if len(after) < 4:
        return 0.0, 0.0, 0
    k = max(1, len(after) // 4)
    head, tail = after[:k], after[-k:]
    rss_growth = (np.median([s.main_rss_kb for s in tail])
                  - np.median([s.main_rss_kb for s in head])) / 1024
    fd_growth = int(np.median([s.fds for s in tail]) - np.median([s.fds for s in head]))
    return float(rss_growth), max(s.total_rss_kb for s in samples) / 1024, fd_growth


async def test_load_mixed_endpoints(tmp_path, models_dir, reference):
    state = _state(tmp_path, models_dir)
    daemon = Daemon(state, *DAEMON_ARGS).start()
    stats = LoadStats()
    samples: list[Sample] = []
    try:
        async with aiohttp.ClientSession() as s:
            assert (await _call(s, "POST", daemon.url + "/collections", {"name": "load"}))[0] \
                == 201
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_process(daemon.proc.pid, samples, stop))
        until = time.monotonic() + LOAD_SECONDS
        clients = [Client(i, daemon.url, reference, stats, "load") for i in range(LOAD_CLIENTS)]
        await asyncio.gather(*(_agent(c, until) for c in clients))
        stop.set()
        await sampler
        # Every acknowledged document is there with its last acknowledged body.
        lost = 0
        async with aiohttp.ClientSession() as s:
            for path, body in stats.acked_docs.items():
                st, _, got = await _call(s, "GET", f"{daemon.url}/collections/load/"
                                         f"documents/{path}")
                lost += st != 200 or got.get("body") != body
        assert daemon.alive(), daemon.output()[-3000:]
    finally:
        code = daemon.stop()
    rss_growth, rss_peak, fd_growth = _flat(samples, warmup=LOAD_SECONDS / 4)
    record("load", {
        "seconds": LOAD_SECONDS, "clients": LOAD_CLIENTS, "requests": stats.requests,
        "by_class": stats.by_class, "p50_ms": round(stats.percentile(50) * 1000, 1),
        "p99_ms": round(stats.percentile(99) * 1000, 1),
        "p99_embed_ms": round(stats.percentile(99, "embed") * 1000, 1),
        "undesigned": len(stats.undesigned), "mismatches": len(stats.mismatches),
        "docs_acked": len(stats.acked_docs), "docs_lost": lost,
        "main_rss_growth_mb": round(rss_growth, 1), "peak_rss_mb": round(rss_peak, 1),
        "fd_growth": fd_growth})
    assert not stats.undesigned, stats.undesigned[:10]
    assert not stats.mismatches, stats.mismatches[:10]
    assert lost == 0
    assert stats.by_class.get("2xx", 0) > stats.requests * 0.5, stats.by_class
    # Flat after warm-up: the server process (models live in workers, which load and
    # unload by design) keeps its memory and descriptors.
    assert rss_growth < 25, samples[-5:]
    assert fd_growth <= 8, samples[-5:]
    assert code == 0


# --- faults --------------------------------------------------------------------------

def _worker_pids(daemon_pid: int) -> list[int]:
    """Model workers (`python -m npuserve.daemon.worker` children)."""
    out = []
    for pid in children(daemon_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"npuserve.daemon.worker" in cmd:
            out.append(pid)
    return out


async def _metric(session: aiohttp.ClientSession, base: str, name: str) -> float:
    _, _, text = await _call(session, "GET", base + "/metrics")
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _until(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(every)
    return False


def _integrity(db: Path) -> str:
    import apsw

    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _needs_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("NPUSERVE_TEST_REQUIRE_PACKAGING") == "1":
            pytest.fail("this fault needs root (mount)")
        pytest.skip("needs root to mount a small or read-only file system")


async def test_fault_worker_killed_mid_batch(tmp_path, models_dir, reference):
    # The default deadline: this is about the kill, not about admission under load.
    daemon = Daemon(_state(tmp_path, models_dir), "--set", "scheduler.keep_alive=-1").start()
    texts = list(reference)  # 10 batches of 48: about a second of work, so the kill
    try:                       # lands mid-batch even with packing's speed
        async with aiohttp.ClientSession() as s:
            assert (await _call(s, "POST", daemon.url + "/embed", {"text": "warm"}))[0] == 200
            calls = [asyncio.create_task(_call(s, "POST", daemon.url + "/embed-batch",
                                               {"texts": texts})) for _ in range(10)]
            await asyncio.sleep(0.15)
            [worker] = _worker_pids(daemon.proc.pid)
            os.kill(worker, signal.SIGKILL)
            results = await asyncio.gather(*calls)
            restarts = await _metric(s, daemon.url, "npuserve_worker_restarts_total")
            health = await _call(s, "GET", daemon.url + "/health")
        ok = [r for r in results if r[0] == 200]
        for _, _, body in ok:
            for text, item in zip(texts, body, strict=True):
                assert cosine(np.asarray(item["embedding"], np.float32), reference[text]) > 0.9999
        record("faults", {"fault": "model worker SIGKILL mid-batch", "survived": daemon.alive(),
                          "affected": f"{len(ok)}/10 batches completed on a fresh worker",
                          "reported": f"npuserve_worker_restarts_total={restarts:g}",
                          "recovered": health[0] == 200})
        assert len(ok) == 10, [r[:1] + (str(r[2])[:200],) for r in results]
        assert restarts >= 1 and health[0] == 200 and daemon.alive()
    finally:
        assert daemon.stop() == 0


async def test_fault_npu_runtime_fails_and_recovers(tmp_path, models_dir, npu_model):
    fault = tmp_path / "npu-fault"
    fault.write_text("")
    daemon = Daemon(_state(tmp_path, models_dir), *DAEMON_ARGS,
                    "--set", f"models.embed.path={npu_model}", "--set", "npu.runtime=reference",
                    "--set", "npu.reprobe_seconds=1",
                    env={"RKNN_REFERENCE_FAULT_FILE": str(fault)}).start()
    try:
        async with aiohttp.ClientSession() as s:
            async def device() -> dict:
                return (await _call(s, "GET", daemon.url + "/health"))[2]["devices"]["embed"]

            assert (await _call(s, "POST", daemon.url + "/embed", {"text": "warm"}))[0] == 200
            assert (await device())["device"] == "npu"
            fault.write_text("none_after:0")  # every NPU inference now returns None
            results = await asyncio.gather(*(
                _call(s, "POST", daemon.url + "/embed", {"text": f"during fault {i}"})
                for i in range(12)))
            during = await device()
            fault.write_text("")  # the fault goes: the background re-probe brings it back

            async def back() -> bool:
                d = await device()
                return d["device"] == "npu" and "fallback_from" not in d

            recovered = await _until(back, 60)
        statuses = [r[0] for r in results]
        record("faults", {"fault": "NPU runtime returns None (reference runtime)",
                          "survived": daemon.alive(),
                          "affected": f"{statuses.count(200)}/12 completed on the CPU twin",
                          "reported": f"health: fallback_from={during.get('fallback_from')}",
                          "recovered": recovered})
        assert statuses == [200] * 12, results
        assert during["device"] == "cpu" and during["fallback_from"] == "npu", during
        assert recovered
    finally:
        assert daemon.stop() == 0


async def test_fault_corrupt_model_file(tmp_path, models_dir):
    state = _state(tmp_path, models_dir, copy_models=True)
    model = state / "models" / "all-minilm-l6-v2-f16.gguf"
    daemon = Daemon(state, "--set", "scheduler.keep_alive=0").start()
    try:
        async with aiohttp.ClientSession() as s:
            assert (await _call(s, "POST", daemon.url + "/embed", {"text": "warm"}))[0] == 200
            original = model.read_bytes()[:1 << 16]
            with open(model, "r+b") as f:
                f.write(os.urandom(1 << 16))  # the header and the first tensors: garbage
            await asyncio.sleep(0.5)  # keep_alive=0: unloaded, so the next call reloads
            st, headers, body = await _call(s, "POST", daemon.url + "/embed", {"text": "x"})
            other = await _call(s, "POST", daemon.url + "/rerank",
                                {"query": "q", "documents": [{"file": "a", "text": "b"}]})
            health = await _call(s, "GET", daemon.url + "/health")
            with open(model, "r+b") as f:
                f.write(original)

            async def serves() -> bool:
                return (await _call(s, "POST", daemon.url + "/embed", {"text": "x"}))[0] == 200

            recovered = await _until(serves, 60)
        record("faults", {"fault": "corrupt embedding model file", "survived": daemon.alive(),
                          "affected": f"embed answered {st} with a reason; rerank {other[0]}",
                          "reported": "health 503: " + str(health[2].get("error"))[:60],
                          "recovered": recovered})
        assert st == 503 and "Retry-After" in headers and "cannot load" in body["error"], body
        assert other[0] == 200  # the other model is unaffected
        assert health[0] == 503 and "load failed" in health[2]["error"]
        assert recovered
    finally:
        assert daemon.stop() == 0


async def _ingest(s, base: str, path: str, body: str) -> tuple[int, dict]:
    st, _, got = await _call(s, "PUT", f"{base}/collections/docs/documents/{path}",
                             {"body": body})
    return st, got


async def test_fault_disk_full_during_ingest(tmp_path, models_dir):
    _needs_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    daemon = None
    try:
        state = _state(mnt, models_dir)
        daemon = Daemon(state, *DAEMON_ARGS).start()
        filler = mnt / "filler"
        acked: dict[str, str] = {}
        rng = random.Random(7)
        async with aiohttp.ClientSession() as s:
            assert (await _call(s, "POST", daemon.url + "/collections", {"name": "docs"}))[0] \
                == 201
            free = shutil.disk_usage(mnt).free
            filler.write_bytes(b"\0" * max(0, free - (1200 << 10)))  # leave about 1.2 MB
            refused = None
            for i in range(200):
                body = f"# doc {i}\n\n" + " ".join(rng.choice(WORDS) for _ in range(12000))
                st, got = await _ingest(s, daemon.url, f"d{i}.md", body)
                if st in (200, 201):
                    acked[f"d{i}.md"] = body
                    continue
                refused = (i, st, got, body)
                break
            assert refused is not None, "the disk never filled"
            i, st, got, body = refused
            health = (await _call(s, "GET", daemon.url + "/health"))[2]
            failures = await _metric(s, daemon.url, "npuserve_index_write_failures_total")
            lost = 0
            for path, text in acked.items():
                code, _, doc = await _call(s, "GET", f"{daemon.url}/collections/docs/"
                                          f"documents/{path}")
                lost += code != 200 or doc["body"] != text
            half = (await _call(s, "GET", f"{daemon.url}/collections/docs/documents/d{i}.md"))[0]
            filler.unlink()  # the fault goes
            again, _ = await _ingest(s, daemon.url, f"d{i}.md", body)
            health_after = (await _call(s, "GET", daemon.url + "/health"))[2]
        alive = daemon.alive()
        assert daemon.stop() == 0
        integrity = _integrity(state / "index.sqlite")
        record("faults", {"fault": "disk full during ingest (6 MB tmpfs)", "survived": alive,
                          "affected": f"{len(acked)} ingests acknowledged, then {st}: "
                                      f"{got.get('error', '')[:40]}",
                          "reported": f"health index.writable=false; failures={failures:g}",
                          "recovered": again in (200, 201),
                          "index": f"integrity {integrity}, {lost} lost"})
        assert st == 507 and "full" in got["error"], (st, got)
        assert health["index"]["writable"] is False and failures >= 1
        assert lost == 0 and half == 404  # nothing of the refused document was stored
        assert again in (200, 201) and "index" not in health_after
        assert integrity == "ok"
    finally:
        if daemon is not None and daemon.alive():
            daemon.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_fault_read_only_database(tmp_path, models_dir):
    """The state directory's file system turns read-only (an operator's remount, a failing
    SD card): the daemon restarted on it still serves searches, refuses writes with 503,
    and takes writes again once the file system is writable, without a restart."""
    _needs_root()
    state = _state(tmp_path, models_dir)
    daemon = Daemon(state, *DAEMON_ARGS).start()
    async with aiohttp.ClientSession() as s:
        assert (await _call(s, "POST", daemon.url + "/collections", {"name": "docs"}))[0] == 201
        assert (await _ingest(s, daemon.url, "before.md", "written before the fault"))[0] == 201
    assert daemon.stop() == 0
    subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
    mounted = True
    daemon = Daemon(state, *DAEMON_ARGS)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True)
        daemon.log = tmp_path / "daemon-ro.log"  # the state directory cannot take a log now
        daemon.start()
        async with aiohttp.ClientSession() as s:
            st, got = await _ingest(s, daemon.url, "during.md", "refused")
            search = await _call(s, "GET", daemon.url + "/search?q=fault")
            health = (await _call(s, "GET", daemon.url + "/health"))[2]
            subprocess.run(["mount", "-o", "remount,rw,bind", str(state)], check=True)
            again, _ = await _ingest(s, daemon.url, "during.md", "accepted after the fault")
            missing = (await _call(s, "GET", f"{daemon.url}/collections/docs/documents/"
                                   "before.md"))[0] != 200
            health_after = (await _call(s, "GET", daemon.url + "/health"))[2]
        alive = daemon.alive()
        assert daemon.stop() == 0
        subprocess.run(["umount", str(state)], check=True)
        mounted = False
        integrity = _integrity(state / "index.sqlite")
        hits = [h["displayPath"] for h in search[2]["results"]] if search[0] == 200 else []
        record("faults", {"fault": "state file system read-only", "survived": alive,
                          "affected": f"ingest {st}: {got.get('error', '')[:40]}; "
                                      f"search {search[0]}",
                          "reported": "health index.writable=false",
                          "recovered": again in (200, 201),
                          "index": f"integrity {integrity}, {int(missing)} lost"})
        assert st == 503 and "nothing was stored" in got["error"], (st, got)
        assert hits == ["docs/before.md"]  # reads go on
        assert health["index"]["writable"] is False and "index" not in health_after
        assert again in (200, 201) and not missing and integrity == "ok"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(state)], check=False)
        if daemon.alive():
            daemon.stop()


# --- graceful shutdown -------------------------------------------------------------

async def test_sigterm_under_load_drains_then_restart_loses_nothing(tmp_path, models_dir,
                                                                    reference):
    state = _state(tmp_path, models_dir)
    args = ("--set", "scheduler.keep_alive=-1", "--set", "server.shutdown_timeout=60")
    daemon = Daemon(state, *args).start()
    texts = list(reference)
    acked: dict[str, str] = {}
    outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered, outcome)
    sigterm_at: list[float] = []

    async def agent(n: int) -> None:
        rng = random.Random(n)
        async with aiohttp.ClientSession() as s:
            for k in range(10_000):
                sent = time.monotonic()
                path, body = f"a{n}/{k}.md", " ".join(rng.sample(texts, 3))
                try:
                    if k % 3 == 0:  # a rerank takes seconds: some are running at SIGTERM
                        docs = [{"file": f"f{i}", "text": t} for i, t in
                                enumerate(rng.sample(texts, 4))]
                        st, h, b = await _call(s, "POST", daemon.url + "/rerank",
                                               {"query": "npu", "documents": docs})
                    else:
                        st, h, b = await _call(s, "PUT", f"{daemon.url}/collections/c/"
                                               f"documents/{path}", {"body": body})
                        if st in (200, 201):
                            acked[path] = body
                    outcome: int | str = st if st != 503 or "Retry-After" in h else "503-bare"
                except aiohttp.ClientConnectorError:
                    outcome = "refused"  # the listener has closed: the drain is over
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    outcome = "closed"  # a kept-alive connection closed (or reset) under it
                except aiohttp.ClientError as exc:
                    outcome = f"error:{type(exc).__name__}"
                outcomes.append((sent, time.monotonic(), outcome))
                if outcome == "refused":
                    return

    async with aiohttp.ClientSession() as s:
        assert (await _call(s, "POST", daemon.url + "/collections", {"name": "c"}))[0] == 201
    agents = [asyncio.create_task(agent(n)) for n in range(8)]
    await asyncio.sleep(4)
    sigterm_at.append(time.monotonic())
    daemon.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.proc.wait, 120)
    await asyncio.wait_for(asyncio.gather(*agents), 60)
    restarted = Daemon(state, *args).start()
    try:
        async with aiohttp.ClientSession() as s:
            lost = 0
            for path, body in acked.items():
                st, _, doc = await _call(s, "GET", f"{restarted.url}/collections/c/"
                                         f"documents/{path}")
                lost += st != 200 or doc["body"] != body
    finally:
        assert restarted.stop() == 0
    t = sigterm_at[0]
    in_flight = [o for sent, done, o in outcomes if sent < t <= done]
    after = [o for sent, _, o in outcomes if sent >= t]
    record("shutdown", {"in_flight": len(in_flight),
                        "in_flight_completed": sum(o in (200, 201) for o in in_flight),
                        "new_503": after.count(503), "refused_after_close": after.count("refused"),
                        "exit_code": code, "docs_acked": len(acked), "docs_lost": lost})
    assert code == 0, daemon.output()[-3000:]
    assert in_flight and all(o in (200, 201) for o in in_flight), in_flight
    assert after.count(503) >= 1, after  # told to go elsewhere, not dropped
    # After the drain the listener is gone: a new connection is refused, and a request
    # racing the close of a kept-alive connection sees it closed or reset. Never a 5xx or
    # a hang. (Requests in flight at SIGTERM are held to 2xx above.)
    assert set(after) <= {503, "refused", "closed"}, after
    assert lost == 0
