"""The NPU path on x86: the RKNNLite backends run against the reference runtime
(RKNNLite's interface over the model's ONNX twin). Untested on hardware."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.models.backend_api import ModelLoadError
from npuserve.daemon.models.backends import memory_estimate
from npuserve.daemon.models.registry import npu_model_problems
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.npu import detect as detect_module
from npuserve.npu.detect import NpuReport, detect
from npuserve.npu.embed_backend import NpuEmbedBackend
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


async def test_sequential_keeps_one_model_on_each_device_at_once(npu_client):
    """Embedding on the NPU beside rerank on the CPU: under `sequential` each device
    holds one model, so interleaved embeds and reranks never unload the CPU's model."""
    npu = await npu_client(scheduler__policy="sequential")
    sched = npu.app[SERVICES].scheduler
    cpu, dev = sched.lanes["cpu"], sched.lanes["npu"]
    docs = [{"file": f"{i}.md", "text": TEXTS[i]} for i in range(3)]
    seen: list[tuple[int, int]] = []

    async def watch() -> None:
        while True:
            seen.append((len(cpu.resident), len(dev.resident)))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    calls = []
    for i in range(4):
        calls.append(npu.post("/rerank", json={"query": f"schedulers {i}", "documents": docs}))
        calls.append(npu.post("/embed-batch", json={"texts": TEXTS[i * 5:i * 5 + 5]}))
    responses = await asyncio.gather(*calls)
    watcher.cancel()
    assert [r.status for r in responses] == [200] * len(responses)
    assert max(c for c, _ in seen) == 1 and max(n for _, n in seen) == 1
    assert (1, 1) in seen, "the NPU's and the CPU's models were never resident together"
    # One load each: the embeds did not evict the reranker, nor the reranks the embedder.
    assert (cpu.swaps, dev.swaps) == (1, 1)


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
    assert sched.snapshot().events.get("worker_crashes", 0) >= 1, "the hung worker was killed"
    assert len((await resp.json())["embedding"]) == 384


async def test_npu_reprobe_returns_work_to_the_npu(npu_client, monkeypatch):
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "init_fail")
    npu = await npu_client(npu__reprobe_seconds="1")
    sched = npu.app[SERVICES].scheduler
    assert (await npu.post("/embed", json={"text": "x"})).status == 200
    assert sched.snapshot().tasks["embed"].primary.fallback
    monkeypatch.delenv("RKNN_REFERENCE_FAULT")
    # The NPU lane's worker died with nothing; a new one (clean env) is spawned to probe.
    sched.lanes["npu"].worker.kill_now()
    for _ in range(100):
        if not sched.snapshot().tasks["embed"].primary.fallback:
            break
        await asyncio.sleep(0.1)
    assert not sched.snapshot().tasks["embed"].primary.fallback
    health = await (await npu.get("/health")).json()
    assert health["devices"]["embed"]["device"] == "npu"


def _inputs(seq_len: int = 128, dtype: type = np.float16) -> list[np.ndarray]:
    return [np.zeros((1, seq_len, 384), dtype), np.ones((1, seq_len), dtype)]


def test_reference_runtime_failure_conventions(npu_model, monkeypatch, caplog):
    rk = ReferenceRKNNLite()
    assert rk.load_rknn(str(npu_model / "missing.rknn")) == -1
    assert rk.init_runtime() == -1  # nothing loaded
    assert rk.load_rknn(str(npu_model / "model_128.rknn")) == 0
    assert rk.init_runtime(core_mask=5) == -1  # masks 5 and 6 are rejected
    assert rk.inference(inputs=_inputs()) is None  # not initialised
    assert rk.init_runtime(core_mask=ReferenceRKNNLite.NPU_CORE_1) == 0
    out = rk.inference(inputs=_inputs())
    assert out is not None and out[0].shape == (1, 384)
    assert rk.inference(inputs=_inputs(dtype=np.float32)) is not None  # converted, as RKNNLite
    with caplog.at_level(logging.ERROR):
        assert rk.inference(inputs=_inputs(64)) is None  # wrong shape
        assert rk.inference(inputs=_inputs()[:1]) is None  # too few
        ids = [np.zeros((1, 128, 384), np.int64), np.ones((1, 128), np.int64)]
        assert rk.inference(inputs=ids) is None  # int64: not an RKNN input dtype
    assert "unsupported dtype int64" in caplog.text
    rk.release()


def test_a_graph_with_int64_inputs_does_not_initialise(tmp_path, caplog):
    """What npuserve's graphs took before: RKNNLite documents no int64 input."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)], "ids",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
         str(tmp_path / "model_8.onnx"))
    rk = ReferenceRKNNLite()
    assert rk.load_rknn(str(tmp_path / "model_8.rknn")) == 0
    with caplog.at_level(logging.ERROR):
        assert rk.init_runtime() == -1
    assert "input 'input_ids' is tensor(int64)" in caplog.text


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
        pool.run(_inputs())
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


@pytest.fixture
def model_built_by_2_5(npu_model, tmp_path):
    """The MiniLM model directory, as if rknn-toolkit2 2.5.0 had built its graphs."""
    out = tmp_path / "minilm-2.5"
    out.mkdir()
    for f in npu_model.iterdir():
        if f.name != "manifest.json":
            (out / f.name).symlink_to(f)
    manifest = json.loads((npu_model / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"toolkit_version": "2.5.0"}))
    return out


def test_doctor_names_a_model_newer_than_the_boards_runtime(make_config, model_built_by_2_5):
    cfg = make_config(models__embed__path=str(model_built_by_2_5))
    [(problem, fix)] = npu_model_problems(
        cfg, NpuReport(runtime_version="1.5.0 (e6fe0c678@2023-05-25T08:09:20)"))
    assert "rknn-toolkit2 2.5.0" in problem and "librknnrt 1.5.0" in problem
    assert "Invalid RKNN model version" in problem
    assert "librknnrt.so 2.5.0 or newer" in fix and "rknn-toolkit2 1.5.0" in fix
    # A runtime as new as the toolkit (or newer, or of unknown version) is no problem.
    for newer in ("2.5.0 (abc)", "2.6.1", None):
        assert npu_model_problems(cfg, NpuReport(runtime_version=newer)) == []


def test_refused_graph_says_the_versions_do_not_match(model_built_by_2_5, tmp_path,
                                                     monkeypatch):
    """RKNNLite only logs why init_runtime returned -1; the load error - what /health shows
    - names the version mismatch when the board's librknnrt is older than the toolkit."""
    lib = tmp_path / "librknnrt.so"
    lib.write_bytes(b"\x7fELF\x00librknnrt version: 1.5.0 (e6fe0c678@2023-05-25)\x00")
    monkeypatch.setattr(detect_module, "RUNTIME_LIBS", (str(lib),))
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "init_fail")
    backend = NpuEmbedBackend(ModelSpec("m", "rknn_embed", str(model_built_by_2_5), 512, 1,
                                        (("npu_cores", 1), ("npu_runtime", "reference"))))
    with pytest.raises(ModelLoadError) as refused:
        backend.load()
    assert "init_runtime" in str(refused.value)
    assert "built by rknn-toolkit2 2.5.0, newer than this board's librknnrt 1.5.0" in str(
        refused.value)
    lib.write_bytes(b"\x00librknnrt version: 2.5.0 (abc)\x00")  # versions agree: no guess
    with pytest.raises(ModelLoadError) as refused:
        backend.load()
    assert "init_runtime" in str(refused.value) and "rknn-toolkit2" not in str(refused.value)


def test_a_large_graph_gets_one_context_and_memory_counts_each_copy(npu_model, npu_rerank_model,
                                                                     tmp_path):
    """Each RKNNLite context holds a graph twice (RKNNLite keeps the .rknn bytes, librknnrt
    its own copy): a graph above 128 MB gets one context, not one per core, and the plan
    counts graphs x contexts x 2 + the token table."""
    small = ContextPool(npu_model / "model_128.rknn", 3, "reference")
    big = ContextPool(npu_rerank_model / "model_128.rknn", 3, "reference")  # 478 MB twin
    try:
        assert (len(small.contexts), len(big.contexts)) == (3, 1)
    finally:
        small.release()
        big.release()
    # The board's files (sizes as rknn-toolkit2 2.5.0 wrote them for the rk3588).
    mb = 1024 * 1024
    for name, src, size in (("minilm", npu_model, 23 * mb), ("smollm2", npu_rerank_model,
                                                             252 * mb)):
        board = tmp_path / name
        board.mkdir()
        (board / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
        manifest = json.loads((src / "manifest.json").read_text())
        for bucket in manifest["buckets"]:
            with open(board / bucket["rknn"], "wb") as f:
                f.truncate(size)  # sparse: only its size is read
        table = src / manifest["token_embeddings"]
        (board / table.name).symlink_to(table)
        spec = ModelSpec("m", "rknn_embed", str(board), 512, 2,
                         (("npu_cores", 3), ("npu_runtime", "rknnlite")))
        per_core = 3 if name == "minilm" else 1
        assert memory_estimate(spec) == (2 * size * per_core * 2 + table.stat().st_size)
