"""The NPU path on x86: the RKNNLite backends run against the reference runtime
(RKNNLite's interface over the model's ONNX twin). Untested on hardware."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from npuserve.daemon.app import SERVICES
from npuserve.npu.detect import detect
from npuserve.npu.reference_runtime import ReferenceRKNNLite
from npuserve.npu.rknn_runtime import ContextPool, NpuError

TEXTS = [f"sample {i}: " + " ".join(["retrieval", "on", "small", "boards", "with", "an",
                                      "npu", "and", "a", "cpu", "fallback"][: 3 + i % 9])
         for i in range(60)] + ["a cat sits on the mat", "Ünïcode text",
                                 "a longer passage about schedulers and queues " * 30,
                                 "word " * 700]
# (A single "word" over 100 characters is [UNK] to Hugging Face's WordPiece but split by
# llama.cpp's: the two CPU/NPU tokenizers differ there, so it is not in this set.)


@pytest.fixture
async def npu_client(make_client, npu_model):
    async def make(**overrides):
        return await make_client(models__embed__path=str(npu_model), npu__runtime="reference",
                                 **overrides)
    return make


async def test_npu_embeddings_match_the_cpu_backend(npu_client, client):
    npu = await npu_client()
    health = await (await npu.get("/health")).json()
    assert health["devices"]["embed"]["device"] == "npu"
    a = await (await npu.post("/embed-batch", json={"texts": TEXTS})).json()
    b = await (await client.post("/embed-batch", json={"texts": TEXTS})).json()
    assert len(a) == len(b) == 64
    cos = [float(np.dot(x["embedding"], y["embedding"])) for x, y in zip(a, b, strict=True)]
    assert min(cos) >= 0.999, [(i, round(c, 4)) for i, c in enumerate(cos) if c < 0.999]
    assert a[63]["truncated"] is True and a[0]["truncated"] is False
    # Both buckets were used: short texts in 128, the long ones in 512.
    tok = await (await npu.post("/tokenize", json={"text": TEXTS[62]})).json()
    assert 128 < tok["tokens"] <= 512


async def test_forced_npu_failure_is_absorbed_by_the_cpu_twin(npu_client, monkeypatch):
    # The reference runtime starts returning None (RKNNLite's failure value) on its
    # third inference: after the warm-up and one good batch.
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "none_after:2")
    npu = await npu_client()
    first = await npu.post("/embed", json={"text": "served on the npu"})
    assert first.status == 200
    responses = await asyncio.gather(*[
        npu.post("/embed-batch", json={"texts": [f"{i} {t}" for t in TEXTS[:8]]})
        for i in range(6)])
    assert [r.status for r in responses] == [200] * 6, "no request failed"
    health = await (await npu.get("/health")).json()
    assert health["ok"] is True
    embed = health["devices"]["embed"]
    assert embed["device"] == "cpu" and embed["fallback_from"] == "npu"
    assert "inference returned None" in embed["reason"]
    metrics = await (await npu.get("/metrics")).text()
    assert 'npuserve_npu_fallback{model="all-minilm-l6-v2-npu",device="npu"} 1' in metrics
    # The twin's vectors are the same model's: a later request still matches.
    again = await (await npu.post("/embed", json={"text": "served on the npu"})).json()
    assert float(np.dot(again["embedding"], (await first.json())["embedding"])) > 0.999


async def test_npu_that_cannot_initialise_serves_from_the_cpu(npu_client, monkeypatch):
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "init_fail")
    npu = await npu_client()
    resp = await npu.post("/embed", json={"text": "hello"})
    assert resp.status == 200
    embed = (await (await npu.get("/health")).json())["devices"]["embed"]
    assert embed["device"] == "cpu" and "NPU load failed" in embed["reason"]
    assert "init_runtime" in embed["reason"]


async def test_hung_npu_call_is_killed_and_retried(npu_client, monkeypatch):
    # "failed to submit" then a hang: the second inference of a worker never returns.
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "hang_after:1")
    npu = await npu_client()
    sched = npu.app[SERVICES].scheduler
    resp = await npu.post("/embed", json={"text": "the warm-up was call one"})
    assert resp.status == 200
    assert sched.metrics["worker_crashes"] >= 1, "the hung worker was killed"
    assert len((await resp.json())["embedding"]) == 384


async def test_npu_reprobe_returns_work_to_the_npu(npu_client, monkeypatch):
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "init_fail")
    npu = await npu_client(npu__reprobe_seconds="1")
    sched = npu.app[SERVICES].scheduler
    assert (await npu.post("/embed", json={"text": "x"})).status == 200
    assert sched.primary_state("embed").tripped
    monkeypatch.delenv("RKNN_REFERENCE_FAULT")
    # The NPU lane's worker died with nothing; a new one (clean env) is spawned to probe.
    sched.lanes["npu"].worker.kill_now()
    for _ in range(100):
        if not sched.primary_state("embed").tripped:
            break
        await asyncio.sleep(0.1)
    assert not sched.primary_state("embed").tripped
    health = await (await npu.get("/health")).json()
    assert health["devices"]["embed"]["device"] == "npu"


def test_reference_runtime_failure_conventions(npu_model, monkeypatch, caplog):
    rk = ReferenceRKNNLite()
    assert rk.load_rknn(str(npu_model / "missing.rknn")) == -1
    assert rk.init_runtime() == -1  # nothing loaded
    assert rk.load_rknn(str(npu_model / "model_128.rknn")) == 0
    assert rk.init_runtime(core_mask=5) == -1  # masks 5 and 6 are rejected
    assert rk.inference(inputs=[np.zeros((1, 128), np.int64)] * 2) is None
    assert rk.init_runtime(core_mask=ReferenceRKNNLite.NPU_CORE_1) == 0
    out = rk.inference(inputs=[np.zeros((1, 128), np.int64), np.ones((1, 128), np.int64)])
    assert out is not None and out[0].shape == (1, 384)
    assert rk.inference(inputs=[np.zeros((1, 64), np.int64)] * 2) is None  # wrong shape
    rk.release()


def test_context_pool_turns_minus_one_and_none_into_errors(npu_model, monkeypatch, caplog):
    with pytest.raises(NpuError, match="load_rknn"):
        ContextPool(npu_model / "nope.rknn", 3, "reference")
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "init_fail")
    with pytest.raises(NpuError, match="init_runtime"):
        ContextPool(npu_model / "model_128.rknn", 3, "reference")
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "none_after:0")
    pool = ContextPool(npu_model / "model_128.rknn", 3, "reference")
    assert [c.core_mask for c in pool.contexts] == [1, 2, 4]  # one context per core
    with caplog.at_level(logging.ERROR), pytest.raises(NpuError, match="returned None"):
        pool.run([np.zeros((1, 128), np.int64), np.ones((1, 128), np.int64)])
    pool.release()


def test_detection_on_this_machine_and_on_a_board_tree(tmp_path):
    report = detect()
    assert not report.usable and report.problems  # x86 CI: no NPU
    board = tmp_path / "board"
    (board / "proc/device-tree").mkdir(parents=True)
    (board / "proc/device-tree/compatible").write_bytes(b"rockchip,rk3588\x00")
    (board / "dev/accel").mkdir(parents=True)
    (board / "dev/accel/accel0").touch()
    rep = detect(str(board))
    assert rep.soc == "rk3588"
    assert any("rocket" in p for p, _ in rep.problems)
    (board / "dev/rknpu").touch()
    (board / "proc/rknpu").mkdir()
    (board / "proc/rknpu/version").write_text("RKNPU driver: v0.9.8\n")
    (board / "usr/lib").mkdir(parents=True)
    (board / "usr/lib/librknnrt.so").write_bytes(b"\x00librknnrt version: 2.3.2 (abc)\x00")
    rep = detect(str(board))
    assert rep.device_node == "/dev/rknpu" and rep.driver_version == "0.9.8"
    assert rep.runtime_version == "2.3.2 (abc)"
    if not rep.rknnlite_importable:  # x86 CI: no rknnlite; on Python 3.13 doctor says why
        future = detect(str(board), python=(3, 13))
        assert any("no wheel for Python 3.13" in p for p, _ in future.problems)
        assert not future.usable
