"""Logit rerank on the NPU path: SmolLM2's GGUF exported as a yes/no-logit graph, run by
the reference runtime (RKNNLite's interface over the ONNX twin), against the CPU backend
on the same GGUF. Untested on hardware."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import pytest

from npuserve.daemon.config import DEFAULT_INSTRUCTION, DEFAULT_RERANK_TEMPLATE
from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.models.backend_api import RerankOutput
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_generative import LlamaGenerativeBackend
from npuserve.fallback.llama_session import LlamaModel
from npuserve.npu.rerank_backend import NpuRerankBackend

from .conftest import rerank_gguf

QUERY = "how does apt verify package signatures"
DOCS = [
    "apt verifies the Release file's GPG signature with the keys in trusted.gpg.d, then"
    " checks every package's SHA256 hash against the signed index.",
    "Debian packages are checked by apt: the archive's InRelease file is signed, and each"
    " .deb must match the hash listed there.",
    "The RK3588 has a three-core NPU rated at 6 TOPS.",
    "Bananas are rich in potassium and easy to carry.",
    "sqlite's FTS5 ranks documents with bm25.",
    "To verify a signature with gpg, import the signer's key and run gpg --verify.",
    "apt-get install fetches packages over HTTP; integrity comes from the signed Release"
    " file, not from TLS.",
    "A recipe for sourdough bread needs flour, water, salt and time.",
    "Systemd units can be hardened with ProtectSystem=strict.",
    "Package signatures in Debian: apt refuses unsigned repositories unless told otherwise.",
]
LONG_DOC = "apt checks signatures. " * 120
TOKENIZER_TEXTS = [
    "Hello world", "  leading spaces and 12345 digits, 3.14", "Ünïcode — café 日本語 🙂",
    "tabs\tand\nnewlines\n\n  x", "it's we'll they're I'M", "x = {'a': [1,2]} // c; f_b(z)",
    DEFAULT_RERANK_TEMPLATE, "a" * 300, "<|im_start|>user\nhi<|im_end|>",
]


def npu_backend(path, cores: int = 1) -> NpuRerankBackend:
    return NpuRerankBackend(ModelSpec("r", "rknn_rerank", str(path), 0, 0, (
        ("npu_runtime", "reference"), ("npu_cores", cores),
        ("template", DEFAULT_RERANK_TEMPLATE))))


def test_tokenizer_rebuilt_from_the_gguf_gives_llama_cpp_ids(npu_rerank_model, models_dir):
    """The NPU prompt is the CPU prompt token for token: tokenizer.json is rebuilt from the
    GGUF; special tokens are parsed in the template, kept as text in a document."""
    b = npu_backend(npu_rerank_model)
    llama = LlamaModel(str(rerank_gguf(models_dir)), vocab_only=True)
    try:
        for special in (True, False):
            for text in TOKENIZER_TEXTS:
                assert b._encode(text, special=special) == llama.tokenize(
                    text, add_special=False, parse_special=special), (special, text)
    finally:
        llama.close()


def f32_twin(gguf_path: Path, out: Path) -> Path:
    """The same weights as an F32 GGUF (llama.cpp requantises Q4_1 to F32 exactly)."""
    from npuserve.fallback.llama_bindings import lib

    llama = lib()
    params = llama.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 0, True, 2  # 0: all F32
    assert llama.llama_model_quantize(str(gguf_path).encode(), str(out).encode(), params) == 0
    return out


def cpu_scores(gguf_path: Path, documents: list[str]) -> RerankOutput:
    cpu = LlamaGenerativeBackend(ModelSpec("c", "llama_cpp_generative", str(gguf_path), 2048,
                                           0, ()))
    cpu.load()
    try:
        return cpu.rerank(QUERY, documents, DEFAULT_INSTRUCTION)
    finally:
        cpu.unload()


@pytest.fixture(scope="module")
def npu_scores(npu_rerank_model) -> RerankOutput:
    npu = npu_backend(npu_rerank_model)
    npu.load()
    try:
        return npu.rerank(QUERY, DOCS + [LONG_DOC], DEFAULT_INSTRUCTION)
    finally:
        npu.unload()


def test_npu_rerank_graph_computes_what_llama_cpp_computes(npu_scores, models_dir,
                                                           tmp_path):
    """Against llama.cpp on the very weights the graph holds (the GGUF dequantised to
    F32), P(yes) agrees to float rounding: the export is the model, layer for layer."""
    exact = cpu_scores(f32_twin(rerank_gguf(models_dir), tmp_path / "f32.gguf"), DOCS)
    pairs = list(zip(npu_scores.scores[:10], exact.scores, strict=True))
    assert max(abs(a - b) for a, b in pairs) <= 0.002, pairs


def test_npu_rerank_scores_match_the_cpu_twin(npu_scores, models_dir):
    """The CPU twin computes from the Q4_1 blocks with 8-bit activations: close, not equal
    (measured: at most 0.036 apart over these documents)."""
    twin = cpu_scores(rerank_gguf(models_dir), DOCS + [LONG_DOC])
    pairs = list(zip(npu_scores.scores[:10], twin.scores[:10], strict=True))
    assert max(abs(a - b) for a, b in pairs) <= 0.06, pairs
    assert twin.truncated == [False] * 11  # the CPU's context (2048) holds the long one


def test_a_document_longer_than_the_largest_bucket_is_truncated(npu_scores):
    assert npu_scores.truncated == [False] * 10 + [True]
    assert all(0.0 < x < 1.0 for x in npu_scores.scores)


@pytest.fixture
async def npu_rerank_client(make_client, npu_rerank_model):
    async def make(**overrides):
        return await make_client(models__rerank__path=str(npu_rerank_model),
                                 npu__runtime="reference", npu__cores="1", **overrides)
    return make


async def test_daemon_serves_rerank_from_the_npu(npu_rerank_client, npu_scores):
    npu = await npu_rerank_client()
    health = await (await npu.get("/health")).json()
    assert health["devices"]["rerank"]["device"] == "npu"
    assert health["devices"]["generate"]["device"] == "cpu"  # QMD's name for expansion
    resp = await npu.post("/rerank", json={"query": QUERY, "documents": [
        {"file": f"d{i}.md", "text": t} for i, t in enumerate(DOCS[:4])]})
    assert resp.status == 200, await resp.text()
    served = {r["index"]: r["score"] for r in (await resp.json())["results"]}
    # The NPU's own scores (the CPU twin's differ by up to a few hundredths).
    assert [round(served[i], 5) for i in range(4)] == [
        round(x, 5) for x in npu_scores.scores[:4]]


async def test_forced_npu_failure_moves_rerank_to_the_cpu_twin(npu_rerank_client,
                                                              monkeypatch):
    # RKNNLite's failure value (None) from the third inference on: after the warm-up and
    # a first good request of one document.
    monkeypatch.setenv("RKNN_REFERENCE_FAULT", "none_after:2")
    npu = await npu_rerank_client()
    first = await npu.post("/rerank", json={"query": QUERY, "documents": [
        {"file": "a.md", "text": DOCS[0]}]})
    assert first.status == 200
    responses = await asyncio.gather(*[
        npu.post("/rerank", json={"query": f"{QUERY} {i}", "documents": [
            {"file": f"d{j}.md", "text": t} for j, t in enumerate(DOCS[:5])]})
        for i in range(4)])
    assert [r.status for r in responses] == [200] * 4, "no request failed"
    rerank = (await (await npu.get("/health")).json())["devices"]["rerank"]
    assert rerank["device"] == "cpu" and rerank["fallback_from"] == "npu"
    assert "inference returned None" in rerank["reason"]


def test_convert_refuses_a_model_it_cannot_export(models_dir, tmp_path):
    embed_gguf = next(models_dir.glob("all-minilm*.gguf"))
    run = subprocess.run(
        [sys.executable, "-m", "npuserve.daemon.cli", "convert", "--task", "rerank",
         "--from", str(embed_gguf), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "architecture 'bert'" in run.stderr
    assert not (tmp_path / "out").exists()


async def test_npu_rerank_falls_back_then_returns_when_the_npu_works_again(
        npu_rerank_client, monkeypatch, tmp_path):
    """The re-probe of a tripped NPU model used to load it beside the scheduler's accounting
    and always send an embedding: an NPU rerank model could never pass it, and was loaded
    again at every probe, for good. The probe now goes through the one load path and sends
    the model's own task; while the NPU keeps failing, probes back off."""
    fault = tmp_path / "fault"
    fault.write_text("none_after:0")  # every NPU inference returns None, as RKNNLite does
    monkeypatch.setenv("RKNN_REFERENCE_FAULT_FILE", str(fault))
    npu = await npu_rerank_client(npu__reprobe_seconds="1")
    sched = npu.app[SERVICES].scheduler
    body = {"query": QUERY, "documents": [{"file": f"d{i}.md", "text": t}
                                          for i, t in enumerate(DOCS[:3])]}

    def rerank_model():
        return sched.snapshot().tasks["rerank"]

    resp = await npu.post("/rerank", json=body)
    assert resp.status == 200, await resp.text()
    assert rerank_model().serving.device == "cpu" and rerank_model().primary.fallback
    # While the NPU fails: each probe is one accounted load, and they back off (1 s, then
    # 2, 4, 8 ... after each failure), not a reload loop.
    async def settled():
        """A snapshot taken between probes: a probe counts itself and is "loading" in the
        same step, and counts its load as it stops loading."""
        while (snap := sched.snapshot()).tasks["rerank"].primary.state == "loading":
            await asyncio.sleep(0.05)
        return snap

    start = asyncio.get_running_loop().time()
    first = await settled()
    await asyncio.sleep(8.0)
    last = await settled()
    elapsed = asyncio.get_running_loop().time() - start
    probes = last.events.get("npu_probes", 0) - first.events.get("npu_probes", 0)
    loads = last.tasks["rerank"].primary.loads - first.tasks["rerank"].primary.loads
    assert 1 <= probes <= 1 + math.log2(elapsed + 1), (probes, elapsed)
    # The old probe loaded beside the scheduler's accounting: no load was counted.
    assert loads == probes, "every probe loads through the scheduler's accounting"
    assert rerank_model().primary.fallback and not rerank_model().primary.resident
    # The NPU works again: the next probe (a rerank) passes and the work comes back.
    fault.write_text("")
    for _ in range(300):
        if not rerank_model().primary.fallback:
            break
        await asyncio.sleep(0.1)
    assert not rerank_model().primary.fallback, "the NPU took its work back"
    resp = await npu.post("/rerank", json=body)
    assert resp.status == 200
    health = await (await npu.get("/health")).json()
    assert health["devices"]["rerank"]["device"] == "npu"
    assert "fallback_from" not in health["devices"]["rerank"]


def high_id_documents(tokenizer_backend: NpuRerankBackend, n: int = 64) -> list[str]:
    """n documents whose tokens include ids above 32,767 (SmolLM2's vocabulary is 49,152):
    as int16 inputs those would wrap negative and read wrong embedding rows silently."""
    tok = tokenizer_backend._tokenizer()
    pieces = [tok.decode([i]) for i in range(32768, 49152, 97)]
    words = [p.strip() for p in pieces if p.strip().isalpha() and len(p.strip()) > 3]
    return [f"{DOCS[k % len(DOCS)]} {' '.join(words[k * 3:k * 3 + 3])}" for k in range(n)]


def test_float_inputs_score_ids_above_int16_as_llama_cpp(npu_rerank_model, models_dir,
                                                         tmp_path):
    """The graph takes float16 embedded tokens (looked up on the host), so ids past int16
    read their own rows: P(yes) within 0.01 of llama.cpp on the same weights."""
    npu = npu_backend(npu_rerank_model, cores=2)
    docs = high_id_documents(npu)
    high = [d for d in docs if max(npu._encode(d)) > 32767]
    assert len(high) >= 48, "the documents must carry ids above int16"
    npu.load()
    try:
        got = npu.rerank(QUERY, docs, DEFAULT_INSTRUCTION).scores
    finally:
        npu.unload()
    exact = cpu_scores(f32_twin(rerank_gguf(models_dir), tmp_path / "f32.gguf"), docs).scores
    worst = max(abs(a - b) for a, b in zip(got, exact, strict=True))
    assert worst <= 0.01, worst
    assert len({round(s, 3) for s in got}) > 8  # real, distinct scores
