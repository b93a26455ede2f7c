"""arm64 smoke test under user-mode emulation (no binfmt): Debian 12's arm64 python3, the
aarch64 wheels of every dependency that has them (rknn-toolkit-lite2 included) and the
project, run with `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3`.

It shows the project imports and serves on aarch64: the NPU runtime module and RKNNLite
import, doctor explains there is no NPU, the daemon starts, the index (apsw + sqlite-vec's
aarch64 builds) works, and embeddings come through the NPU backend's code path on the
reference runtime (onnxruntime's aarch64 build) and match the x86 result.
Not covered: llama-cpp-python (no aarch64 wheel; compiling it under emulation takes
hours), so the CPU backends are unverified on aarch64 here; and no real NPU.

Needs qemu-user-static and mmdebstrap (CI installs them); skipped without them unless
NPUSERVE_TEST_REQUIRE_PACKAGING=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.npu.embed_backend import NpuEmbedBackend

from .conftest import free_port, http_json

ROOT = Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("NPUSERVE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PLATFORMS = ["manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64"]
# The runtime dependencies that have aarch64 wheels; llama-cpp-python has none. Listed by
# hand because pip judges the `platform_machine == 'aarch64'` marker by this x86 host.
# onnxruntime (the reference runtime, test-only) is pinned: its newer aarch64 builds die
# with SIGSEGV at import under qemu-user (seen with 1.31.1); 1.19.2 runs.
ARM_WHEELS = ["rknn-toolkit-lite2", "apsw", "sqlite-vec", "gguf", "safetensors",
              "huggingface_hub", "onnxruntime==1.19.2", "tokenizers"]

pytestmark = pytest.mark.slow


def _require() -> None:
    missing = [t for t in ("qemu-aarch64-static", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        reason = f"needs {', '.join(missing)} (apt-get install qemu-user-static mmdebstrap)"
        if os.environ.get("NPUSERVE_TEST_REQUIRE_PACKAGING") == "1":
            pytest.fail(f"arm64 smoke test required but {reason}")
        pytest.skip(reason)


def _run(*cmd: str | Path, env: dict | None = None, timeout: float = 900) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def arm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An extracted Debian 12 arm64 root, a site directory of aarch64 wheels, and a
    wrapper that runs the arm64 python3 under qemu (also used for the model workers)."""
    _require()
    base = tmp_path_factory.mktemp("arm64")
    root, site, wheels = base / "root", base / "site", base / "wheels"
    _run("mmdebstrap", "--variant=extract", "--architectures=arm64",
         "--include=python3,libpython3.11-stdlib,libgomp1,libstdc++6", "bookworm", root, MIRROR)
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, ROOT)
    (project,) = wheels.glob("npuserve-*.whl")
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    _run(sys.executable, "-m", "pip", "install", "--quiet", "--target", site,
         "--only-binary=:all:", *platform_args, "--python-version", "3.11",
         "--implementation", "cp", f"npuserve[npu] @ {project.as_uri()}", *ARM_WHEELS)
    wrapper = base / "python3-arm64"
    wrapper.write_text(f"#!/bin/sh\nexec qemu-aarch64-static -L {root} "
                       f"{root}/usr/bin/python3.11 \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(base),
           "NPUSERVE_WORKER_PYTHON": str(wrapper)}
    yield {"python": str(wrapper), "state": str(base / "state"), **{"env": json.dumps(env)}}


def _py(arm: dict[str, str], *args: str, timeout: float = 300) -> str:
    return _run(arm["python"], *args, env=json.loads(arm["env"]), timeout=timeout)


def test_imports_on_aarch64(arm):
    out = _py(arm, "-c", "import platform; from rknnlite.api import RKNNLite;"
              "import npuserve.npu.rknn_runtime as r, npuserve.daemon.server;"
              "print(platform.machine(), RKNNLite.__name__, r.__name__)")
    assert out.split() == ["aarch64", "RKNNLite", "npuserve.npu.rknn_runtime"]


def test_doctor_on_aarch64_reports_no_npu(arm):
    res = subprocess.run([arm["python"], "-m", "npuserve.daemon.cli", "doctor",
                          "--state-dir", arm["state"]], capture_output=True, text=True,
                         env=json.loads(arm["env"]), timeout=300)
    assert res.returncode == 1  # not ready: no NPU here and no llama-cpp-python
    assert "no usable NPU: models run on the CPU" in res.stdout
    assert "llama-cpp-python (CPU backend): MISSING" in res.stdout and "fix:" in res.stdout


def test_daemon_serves_on_aarch64(arm, npu_model: Path, client_vectors_x86):
    port = free_port()
    proc = subprocess.Popen(
        [arm["python"], "-m", "npuserve.daemon.cli", "serve", "--state-dir", arm["state"],
         "--port", str(port), "--set", f"models.embed.path={npu_model}",
         "--set", "models.embed.device=npu", "--set", "npu.runtime=reference"],
        env=json.loads(arm["env"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status, health = http_json(base + "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the arm64 daemon never answered"
                time.sleep(1)
        assert health["devices"]["embed"]["device"] == "npu"
        # Embeddings through the NPU backend's code (reference runtime) on aarch64.
        status, body = http_json(base + "/v1/embeddings", {"input": TEXTS, "model": "x"},
                                 timeout=300)
        assert status == 200, body
        vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        cosine = np.sum(vectors * client_vectors_x86, axis=1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(client_vectors_x86, axis=1))
        assert cosine.min() > 0.999, cosine
        # The index: apsw's and sqlite-vec's aarch64 builds.
        assert http_json(base + "/collections", {"name": "arm"})[0] == 201
        status, _ = http_json(base + "/collections/arm/documents",
                          {"documents": [{"path": "a.md", "body": "rockchip boards"}]})
        assert status == 200
        status, hits = http_json(base + "/search?q=rockchip")
        assert [h["displayPath"] for h in hits["results"]] == ["arm/a.md"]
        # Rerank needs llama-cpp-python, absent on aarch64 here: a clear 503, not a crash.
        status, err = http_json(base + "/rerank", {"query": "q", "documents": ["d"]})
        assert status == 503 and "error" in err, (status, err)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]


TEXTS = ["an RK3588 board with a three-core NPU", "sqlite full text search", "hello"]


@pytest.fixture
def client_vectors_x86(npu_model: Path) -> np.ndarray:
    """The same texts through the same NPU backend on this x86 host."""
    backend = NpuEmbedBackend(ModelSpec("x86", "rknn_embed", str(npu_model), 512, 1,
                                        (("npu_cores", 1), ("npu_runtime", "reference"))))
    backend.load()
    try:
        return np.asarray(backend.embed(TEXTS).vectors, dtype=np.float32)
    finally:
        backend.unload()
