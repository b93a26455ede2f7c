"""Reading the next model ahead: files really land in the page cache, within the budget,
and the scheduler does it for the model it will load next while another one computes."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import re

import pytest

from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.sched.prefetch import CHUNK_BYTES, Prefetcher

PASSAGE = "apt resolves dependencies, downloads archives and unpacks them in order. " * 3


def cached_fraction(path: str) -> float:
    """Share of the file's pages in the page cache, by mincore(2): unlike a probing read,
    it starts no readahead of its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    return sum(b & 1 for b in vec.raw) / pages


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def cold_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(8 * CHUNK_BYTES))
    _evict(str(path))
    if cached_fraction(str(path)) > 0.1:
        pytest.skip("this file system keeps the file cached (tmpfs?)")
    return str(path)


def _finish(p: Prefetcher) -> None:
    assert p._thread is not None
    p._thread.join(30)


def test_prefetch_puts_the_file_in_the_page_cache(cold_file):
    p = Prefetcher()
    p.start("m", [cold_file], budget=1 << 40)
    _finish(p)
    assert cached_fraction(cold_file) == 1.0
    assert p.bytes_read == 8 * CHUNK_BYTES
    p.start("m", [cold_file], budget=1 << 40)  # the same model again: already read
    assert p.bytes_read == 8 * CHUNK_BYTES


def test_prefetch_stays_within_its_budget(cold_file):
    p = Prefetcher()
    p.start("m", [cold_file], budget=2 * CHUNK_BYTES)
    _finish(p)
    assert p.bytes_read == 2 * CHUNK_BYTES
    assert cached_fraction(cold_file) == 0.25  # the first two of eight chunks, no more
    p.start("m2", [cold_file], budget=CHUNK_BYTES - 1)  # less than a chunk: nothing
    assert p.target is None and p.bytes_read == 2 * CHUNK_BYTES


async def _rerank_embed_rerank(client) -> None:
    """A rerank running, a second rerank queued behind it, then an embed: the device serves
    the second rerank next (same model, the older request, no swap) and loads the
    embedding model after. (With the embed first, which goes next depends on the measured
    swap time: the switching hysteresis.)"""
    # Few enough documents that a rerank is one call: a longer one is cut into ~5 s slices,
    # and the embed would be served between them (tests/test_scheduler.py).
    docs = [{"file": f"{i}.md", "text": PASSAGE} for i in range(4)]

    async def call(delay: float, path: str, body: dict) -> None:
        await asyncio.sleep(delay)
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()

    await asyncio.gather(call(0.0, "/rerank", {"query": "apt a", "documents": docs}),
                         call(0.1, "/rerank", {"query": "apt b", "documents": docs}),
                         call(0.2, "/embed", {"text": "later"}))


def _prefetched(metrics: str) -> int:
    found = re.search(r'npuserve_prefetch_bytes_total\{device="cpu"\} (\S+)', metrics)
    assert found, metrics
    return int(float(found.group(1)))


async def test_scheduler_reads_the_next_model_ahead(make_client, models_dir):
    client = await make_client(scheduler__prefetch="true")
    sched = client.app[SERVICES].scheduler
    embed_file = sched.plans[sched.task_model["embed"]].files[0]
    assert (await client.post("/rerank", json={"query": "warm", "documents": [
        {"file": "a.md", "text": "warm"}]})).status == 200  # the reranker is resident
    _evict(embed_file)
    await _rerank_embed_rerank(client)
    # The whole embedding model was read while the second rerank ran, before its load.
    runtime = await (await client.get("/admin/models")).json()
    assert runtime["devices"]["cpu"]["prefetched_bytes"] == os.path.getsize(embed_file)
    assert _prefetched(await (await client.get("/metrics")).text()) > 0
    assert sched.snapshot().events.get("loads", 0) == 2


async def test_prefetch_is_off_by_default(make_client):
    client = await make_client()
    assert (await client.post("/rerank", json={"query": "warm", "documents": [
        {"file": "a.md", "text": "warm"}]})).status == 200
    await _rerank_embed_rerank(client)
    assert _prefetched(await (await client.get("/metrics")).text()) == 0
