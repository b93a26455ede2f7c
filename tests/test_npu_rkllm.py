"""The RKLLM backend against the reference librkllmrt (rkllm.h 1.3.0 over llama.cpp, built
here with gcc): every ctypes struct, callback, pause and abort of the backend runs for
real, on Qwen3-architecture GGUF twins. What it cannot show is the NPU: its speed, its w8a8
quantisation, and which reading of rkllm.h's open points the real runtime takes.
Untested on hardware."""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
from pathlib import Path

import numpy as np
import pytest

from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.models.backends import memory_estimate
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_generative import LlamaGenerativeBackend
from npuserve.npu import rkllm_api as api
from npuserve.npu import rkllm_backend
from npuserve.npu.reference_rkllm import reference_library
from npuserve.npu.rkllm_backend import RkllmBackend
from npuserve.npu.rkllm_convert import convert_rkllm
from tests.conftest import rerank_gguf
from tests.gguf_builders import LAST_POOLING, tiny_qwen3

TEXTS = [f"note {i}: " + " ".join(["qwen3", "on", "the", "board's", "npu", "with", "a",
                                    "cpu", "twin", "beside", "it"][: 2 + i % 10])
         for i in range(60)] + ["a cat sits on the mat", "Ünïcode text ✓",
                                 "schedulers and queues " * 40, "word " * 700]
DOCS = [f"Document {i}: " + text for i, text in enumerate(
    ["Cats sleep for most of the day.", "The stock market fell sharply.",
     "Threads can be pinned to cores with sched_setaffinity.", "mDNS finds services on a LAN.",
     "SQLite FTS5 gives full-text search.", "A kernel module is loaded with modprobe."] * 3)]
QUERIES = ["how long do cats sleep", "pin threads to cores", "full text search in sqlite"]
LINE = re.compile(r'^(lex|vec|hyde): [^\n]*$')
GREEDY = {"models__expand__temperature": "0", "models__expand__presence_penalty": "0",
          # The reference runtime's kernels: the CPU backend's flash attention off.
          "models__expand__flash_attn": "false"}


@pytest.fixture(scope="module")
def twins(models_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3-architecture GGUFs (an embedder with last-token pooling, a causal LM)
    and the RKLLM directories around them."""
    root = tmp_path_factory.mktemp("rkllm")
    smol = rerank_gguf(models_dir)
    embed = tiny_qwen3(smol, root / "qwen3-embed.gguf", pooling=LAST_POOLING)
    causal = tiny_qwen3(smol, root / "qwen3-causal.gguf", seed=5)
    return {"embed_gguf": embed, "causal_gguf": causal,
            "embed_dir": convert_rkllm(embed, root / "embed-rkllm", "qwen3-embed", "embed",
                                       max_context_len=512),
            "causal_dir": convert_rkllm(causal, root / "causal-rkllm", "qwen3-causal",
                                        "rerank", max_context_len=2048)}


def _npu(twins: dict[str, Path]) -> dict[str, str]:
    return {"npu__runtime": "reference",
            "models__embed__path": str(twins["embed_dir"]),
            "models__embed__cpu_path": str(twins["embed_gguf"]),
            "models__rerank__path": str(twins["causal_dir"]),
            "models__rerank__cpu_path": str(twins["causal_gguf"]),
            "models__expand__path": str(twins["causal_dir"]),
            "models__expand__cpu_path": str(twins["causal_gguf"])}


def _cpu(twins: dict[str, Path]) -> dict[str, str]:
    return {"models__embed__path": str(twins["embed_gguf"]),
            "models__rerank__path": str(twins["causal_gguf"]),
            "models__expand__path": str(twins["causal_gguf"])}


# --- the ctypes binding -----------------------------------------------------------------

def test_ctypes_structs_have_the_reference_librarys_layout():
    lib = ctypes.CDLL(str(reference_library()))
    out = (ctypes.c_size_t * 32)()
    n = lib.rkllm_reference_layout(out, 32)
    assert list(out[:n]) == api.layout()


def test_a_librkllmrt_of_another_version_is_refused_by_name(tmp_path):
    old = tmp_path / "librkllmrt.so"
    old.write_bytes(b"\x7fELF...rkllm-runtime version: 1.2.1\x00...")
    with pytest.raises(api.RkllmError, match=r"librkllmrt 1\.2\.1; npuserve speaks rkllm\.h"
                                             r" 1\.3\.0 only"):
        api.open_library(old)
    junk = tmp_path / "libother.so"
    junk.write_bytes(b"\x7fELF nothing")
    with pytest.raises(api.RkllmError, match="not a librkllmrt"):
        api.open_library(junk)


def test_a_paused_run_holds_its_token_or_not_as_the_reading_says(twins, monkeypatch):
    """rkllm.h does not say whether a run paused by its callback has evaluated the token it
    reported; the reference runtime implements both readings, and the backend asks."""
    rt = api.Rkllm(api.open_library(reference_library()), twins["causal_gguf"], 256, 1)
    try:
        prompt = [1, 2, 3, 4, 5]
        for writes, held in (("0", 5), ("1", 6)):
            monkeypatch.setenv("RKLLM_REFERENCE_PAUSE_WRITES_KV", writes)
            rt.clear()
            seen: list[int] = []
            rt.run(prompt, api.INFER_GENERATE,
                   lambda state, res, seen=seen: seen.append(res.token_id) or api.PAUSE)
            assert len(seen) == 1 and rt.kv_size() == held
    finally:
        rt.destroy()


# --- the three tasks through HTTP, against the CPU backend on the same GGUF -------------

async def test_rkllm_embeddings_match_the_cpu_backend(make_client, twins):
    npu = await make_client(**_npu(twins))
    cpu = await make_client(**_cpu(twins))
    health = await (await npu.get("/health")).json()
    assert health["devices"]["embed"]["device"] == "npu"
    a = await (await npu.post("/embed-batch", json={"texts": TEXTS})).json()
    b = await (await cpu.post("/embed-batch", json={"texts": TEXTS})).json()
    assert len(a) == len(b) == 64
    cos = [float(np.dot(x["embedding"], y["embedding"])) for x, y in zip(a, b, strict=True)]
    assert min(cos) >= 0.999, [(i, round(c, 4)) for i, c in enumerate(cos) if c < 0.999]
    assert a[63]["truncated"] is True and a[0]["truncated"] is False
    assert abs(float(np.linalg.norm(a[5]["embedding"])) - 1.0) < 1e-5


async def test_rkllm_rerank_and_expansion_match_the_cpu_backend(make_client, twins):
    npu = await make_client(**_npu(twins), **GREEDY)
    cpu = await make_client(**_cpu(twins), **GREEDY)
    health = await (await npu.get("/health")).json()
    # /health names expansion's model "generate", as QMD's health check does.
    assert {health["devices"][t]["device"] for t in ("rerank", "generate")} == {"npu"}
    for query in QUERIES:
        body = {"query": query, "documents": [{"file": f"{i}.md", "text": d}
                                              for i, d in enumerate(DOCS)]}
        got = await (await npu.post("/rerank", json=body)).json()
        want = await (await cpu.post("/rerank", json=body)).json()
        a = {r["file"]: r["score"] for r in got["results"]}
        b = {r["file"]: r["score"] for r in want["results"]}
        assert a.keys() == b.keys() and len(a) == len(DOCS)
        worst = max(abs(a[f] - b[f]) for f in a)
        assert worst <= 0.01, (query, worst)
    for query in QUERIES:
        got = await npu.post("/expand", json={"query": query})
        want = await cpu.post("/expand", json={"query": query})
        assert got.status == want.status == 200
        lines, cpu_lines = await got.json(), await want.json()
        assert lines and all(LINE.match(f"{x['type']}: {x['text']}") for x in lines)
        # Greedy on both sides, the same kernels: the grammar steered both the same way.
        assert lines == cpu_lines, query


async def test_chat_completions_on_rkllm_match_the_cpu_backend(make_client, twins):
    """Free generation, a JSON-constrained one, and QMD's expansion asked through chat
    completions (OpenAI-shaped QMD clients): the same text as the CPU backend's."""
    npu = await make_client(**_npu(twins), **GREEDY)
    cpu = await make_client(**_cpu(twins), **GREEDY)
    hello = [{"role": "user", "content": "hello there"}]
    expansion = [{"role": "user", "content": "/no_think Expand this search query: cats"}]
    bodies = [{"messages": hello, "max_tokens": 12, "temperature": 0},
              {"messages": hello, "max_tokens": 40, "temperature": 0,
               "response_format": {"type": "json_object"}},
              {"messages": expansion, "max_tokens": 400, "temperature": 0}]
    texts = []
    for body in bodies:
        got = await npu.post("/v1/chat/completions", json=body)
        want = await cpu.post("/v1/chat/completions", json=body)
        assert got.status == want.status == 200
        a, b = (await got.json())["choices"][0], (await want.json())["choices"][0]
        assert (a["message"]["content"], a["finish_reason"]) == \
            (b["message"]["content"], b["finish_reason"]), body
        texts.append(a["message"]["content"])
    assert texts[0]
    json.loads(texts[1])  # the grammar made it JSON
    lines = (await (await npu.post("/expand", json={"query": "cats"})).json())
    assert texts[2] == "".join(f"{x['type']}: {x['text']}\n" for x in lines)


@pytest.mark.parametrize("writes,strict", [("0", "0"), ("1", "0"), ("0", "1")],
                         ids=["paused-token-not-in-cache", "paused-token-in-cache",
                              "ranges-refused"])
def test_refused_tokens_are_redrawn_on_the_host_under_each_reading(twins, monkeypatch, writes,
                                                                   strict):
    """Expansion under the grammar pauses the runtime at each refused token; the same
    greedy text comes out whether or not the paused token was already in the KV cache, and
    whether or not the runtime clears a range of the cache after such a run."""
    rewinds: list[tuple[int, int]] = []
    original = rkllm_backend._Generation._redraw

    def counted(self):
        before = self.full_rewinds
        tok = original(self)
        rewinds.append((1, self.full_rewinds - before))
        return tok

    monkeypatch.setattr(rkllm_backend._Generation, "_redraw", counted)
    spec = ModelSpec("q", "rkllm", str(twins["causal_dir"]), 2048, 1,
                     (("npu_runtime", "reference"), ("temperature", 0.0),
                      ("presence_penalty", 0.0), ("expand_flash_attn", False)))
    cpu = LlamaGenerativeBackend(ModelSpec("c", "llama_cpp_generative",
                                           str(twins["causal_gguf"]), 2048, 1, spec.options))
    cpu.load()
    want = cpu.expand("kernel module loading", None, True).raw
    cpu.unload()
    monkeypatch.setenv("RKLLM_REFERENCE_PAUSE_WRITES_KV", writes)
    monkeypatch.setenv("RKLLM_REFERENCE_STRICT_RANGES", strict)
    backend = RkllmBackend(spec)
    backend.load()
    try:
        got = backend.expand("kernel module loading", None, True).raw
    finally:
        backend.unload()
    assert rewinds, "the grammar never refused the runtime's token"
    assert sum(full for _, full in rewinds) == (len(rewinds) if strict == "1" else 0)
    assert got == want
    lines = got.split("\n")
    assert lines[-1] == "" and all(LINE.match(line) for line in lines[:-1]), got


def test_a_cancelled_expansion_stops_the_run_and_the_model_serves_on(twins, monkeypatch):
    """A client that leaves mid-generation (the worker's cancel flag, set by SIGUSR1) pauses
    the run from its callback; the call raises Cancelled and the next request is served
    from a clean cache."""
    from npuserve.daemon.worker import cancel
    from npuserve.fallback import llama_sampling

    spec = ModelSpec("q", "rkllm", str(twins["causal_dir"]), 2048, 1,
                     (("npu_runtime", "reference"), ("temperature", 0.0),
                      ("presence_penalty", 0.0)))
    backend = RkllmBackend(spec)
    backend.load()
    want = backend.expand("kernel module loading", None, True).raw
    pieces = []
    real_piece = llama_sampling.piece

    def leave_after_five(model, tok):
        pieces.append(tok)
        if len(pieces) == 5:
            cancel._on_signal(cancel.SIGNAL, None)  # what the worker's handler does
        return real_piece(model, tok)

    monkeypatch.setattr(llama_sampling, "piece", leave_after_five)
    try:
        with pytest.raises(cancel.Cancelled):
            backend.expand("kernel module loading", None, True)
        assert len(pieces) == 5, "the run went on after the client left"
        cancel.reset()
        assert backend.expand("kernel module loading", None, True).raw == want
    finally:
        cancel.reset()
        backend.unload()


# --- failures: as the RKNN path handles them -------------------------------------------

async def test_rkllm_run_errors_move_the_work_to_the_cpu_twin(make_client, twins,
                                                              monkeypatch):
    # From the third run on, the callback gets RKLLM_RUN_ERROR and rkllm_run returns -1.
    monkeypatch.setenv("RKLLM_REFERENCE_FAULT", "error_after:2")
    npu = await make_client(**_npu(twins))
    responses = await asyncio.gather(*[
        npu.post("/embed-batch", json={"texts": [f"{i} {t}" for t in TEXTS[:6]]})
        for i in range(5)])
    assert [r.status for r in responses] == [200] * 5, "no request failed"
    embed = (await (await npu.get("/health")).json())["devices"]["embed"]
    assert embed["device"] == "cpu" and embed["fallback_from"] == "npu"
    assert "RKLLM_RUN_ERROR" in embed["reason"]


async def test_rkllm_that_cannot_init_serves_from_the_cpu_and_comes_back(make_client, twins,
                                                                         monkeypatch):
    monkeypatch.setenv("RKLLM_REFERENCE_FAULT", "init_fail")
    npu = await make_client(**_npu(twins), npu__reprobe_seconds="1")
    sched = npu.app[SERVICES].scheduler
    resp = await npu.post("/rerank", json={"query": "cats", "documents": DOCS[:3]})
    assert resp.status == 200
    rerank = (await (await npu.get("/health")).json())["devices"]["rerank"]
    assert rerank["device"] == "cpu" and "rkllm_init" in rerank["reason"]
    monkeypatch.delenv("RKLLM_REFERENCE_FAULT")
    sched.lanes["npu"].worker.kill_now()  # a new worker (clean env) probes again
    for _ in range(100):
        if not sched.snapshot().tasks["rerank"].primary.fallback:
            break
        await asyncio.sleep(0.1)
    assert not sched.snapshot().tasks["rerank"].primary.fallback
    assert (await (await npu.get("/health")).json())["devices"]["rerank"]["device"] == "npu"


async def test_hung_rkllm_run_is_killed_and_the_request_still_answered(make_client, twins,
                                                                       monkeypatch):
    monkeypatch.setenv("RKLLM_REFERENCE_FAULT", "hang_after:1")
    npu = await make_client(**_npu(twins))
    sched = npu.app[SERVICES].scheduler
    resp = await npu.post("/embed", json={"text": "the warm-up was run one"})
    assert resp.status == 200
    assert sched.snapshot().events.get("worker_crashes", 0) >= 1, "the hung worker was killed"
    assert len((await resp.json())["embedding"]) == 64


def test_memory_estimate_counts_the_model_and_its_kv_cache(twins):
    spec = ModelSpec("m", "rkllm", str(twins["causal_dir"]), 2048, 1,
                     (("npu_runtime", "reference"),))
    size = twins["causal_gguf"].stat().st_size
    # 2 layers x 2048 positions x 2 KV heads x 16 dims x K and V x fp16
    kv = 2 * 2048 * 2 * 16 * 2 * 2
    assert memory_estimate(spec) == size + kv + 64 * 1024 * 1024
    half = ModelSpec("m", "rkllm", str(twins["causal_dir"]), 1024, 1,
                     (("npu_runtime", "reference"),))
    assert memory_estimate(half) == size + kv // 2 + 64 * 1024 * 1024
