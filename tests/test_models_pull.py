"""`npuserve models pull` against a local server standing in for the Hugging Face hub
(huggingface_hub honours HF_ENDPOINT): resume after a dropped connection, checksum
verification, registration in the config file with its comments kept."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

from npuserve.daemon.config import load_config, render_example, set_config_key
from npuserve.daemon.models.pull import PRESETS

REPO, FILE = "npuserve-test/minilm-gguf", "all-minilm-l6-v2-f16.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """Serves one LFS file the way the hub does: HEAD with X-Linked-Etag (its sha256),
    X-Linked-Size and X-Repo-Commit; GET honouring Range; optionally cuts the first GET."""

    def __init__(self, blob: bytes, cut_first: bool, advertised_sha: str | None = None):
        self.blob, self.cut_first = blob, cut_first
        self.sha = advertised_sha or hashlib.sha256(blob).hexdigest()
        self.ranges: list[str] = []
        self.gets = 0

    def headers(self) -> dict[str, str]:
        return {"X-Repo-Commit": COMMIT, "ETag": '"gitblobsha"', "X-Linked-Etag": f'"{self.sha}"',
                "X-Linked-Size": str(len(self.blob)), "Accept-Ranges": "bytes"}

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["path"] != f"{REPO}/resolve/main/{FILE}":
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound"})
        return await self.send(request)

    async def send(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(headers={**self.headers(), "Content-Length": str(len(self.blob))})
        self.gets += 1
        start = 0
        if "Range" in request.headers:
            self.ranges.append(request.headers["Range"])
            start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0])
        body = self.blob[start:]
        resp = web.StreamResponse(status=206 if start else 200, headers=self.headers())
        resp.content_length = len(body)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(self.blob) - 1}/{len(self.blob)}"
        await resp.prepare(request)
        if self.gets == 1 and self.cut_first:
            await resp.write(body[: len(body) // 3])
            request.transport.close()  # the connection drops a third of the way in
            return resp
        for i in range(0, len(body), 1 << 20):
            await resp.write(body[i:i + (1 << 20)])
        await resp.write_eof()
        return resp


async def _serve(hub: Hub, aiohttp_server) -> str:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", hub.resolve)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def _pull(endpoint: str, state: Path, config: Path, *extra: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUSERVE_", "HF_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(state / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "npuserve.daemon.cli", "models", "pull", REPO, FILE,
        "--task", "embed", "--config", str(config), "--state-dir", str(state), *extra,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.fixture
def blob(models_dir: Path) -> bytes:
    return (models_dir / FILE).read_bytes()  # a real GGUF, so the registered model loads


async def test_pull_resumes_verifies_and_registers(tmp_path: Path, blob: bytes, aiohttp_server):
    hub = Hub(blob, cut_first=True)
    endpoint = await _serve(hub, aiohttp_server)
    config = tmp_path / "config.toml"
    config.write_text(render_example())
    code, out = await _pull(endpoint, tmp_path / "state", config)
    assert code == 0, out
    assert hub.ranges and hub.ranges[0].startswith("bytes="), "the download did not resume"
    assert int(hub.ranges[0].removeprefix("bytes=").split("-")[0]) > 0
    path = tmp_path / "state" / "models" / REPO.replace("/", "--") / FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hub.sha
    cfg = load_config(config, env={})
    assert cfg.get("models.embed.path") == str(path)
    assert cfg.get("models.rerank.path") == ""  # only the task asked for
    assert config.read_text().count("# model file or directory") == 3  # comments kept
    # The daemon's own planner resolves the task to the pulled file.
    lst = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "npuserve.daemon.cli", "models", "list", "--config", str(config),
        "--state-dir", str(tmp_path / "state"), stdout=asyncio.subprocess.PIPE)
    listing = (await lst.communicate())[0].decode()
    assert "embed" in listing and str(path) in listing, listing
    manifest = json.loads((tmp_path / "state" / "models" / "manifest.json").read_text())
    record = manifest["models"]["all-minilm-l6-v2-f16"]
    assert record["source"] == f"hf:{REPO}@{COMMIT}" and record["sha256"] == hub.sha


async def test_pull_with_wrong_checksum_registers_nothing(tmp_path: Path, blob: bytes,
                                                          aiohttp_server):
    hub = Hub(blob, cut_first=False, advertised_sha="ab" * 32)
    endpoint = await _serve(hub, aiohttp_server)
    config = tmp_path / "config.toml"
    config.write_text(render_example())
    before = config.read_text()
    code, out = await _pull(endpoint, tmp_path / "state", config)
    assert code == 1 and "sha256" in out and "expected " + "ab" * 32 in out, out
    assert config.read_text() == before
    assert not (tmp_path / "state" / "models" / REPO.replace("/", "--") / FILE).exists()


async def test_pull_of_missing_file_fails_clearly(tmp_path: Path, aiohttp_server):
    hub = Hub(b"x", cut_first=False)
    endpoint = await _serve(hub, aiohttp_server)
    config = tmp_path / "config.toml"
    config.write_text(render_example())
    env_file = "nope.gguf"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "npuserve.daemon.cli", "models", "pull", REPO, env_file,
        "--task", "rerank", "--config", str(config), "--state-dir", str(tmp_path / "s"),
        env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 1 and "nope.gguf" in out and "Traceback" not in out, out


def test_set_config_key_edits_only_its_section(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text(render_example())
    set_config_key(config, "models.expand.path", "/m/x.gguf")
    set_config_key(config, "server.port", 9000)
    set_config_key(config, "models.expand.path", "/m/y.gguf")  # again: replaced, not added
    cfg = load_config(config, env={})
    assert cfg.get("models.expand.path") == "/m/y.gguf" and cfg.get("server.port") == 9000
    assert cfg.get("models.embed.path") == "" and config.read_text().count("/m/") == 1
    fresh = tmp_path / "new.toml"  # no file yet: created with the section
    set_config_key(fresh, "models.rerank.path", "/m/r.gguf")
    assert load_config(fresh, env={}).get("models.rerank.path") == "/m/r.gguf"


class PresetHub(Hub):
    """Every file of the QMD preset, at its own repository path."""

    def __init__(self, blob: bytes) -> None:
        super().__init__(blob, cut_first=False)
        self.paths = {f"{repo}/resolve/main/{name}" for _, repo, name, _ in PRESETS["qmd"]}
        self.served: list[str] = []

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path not in self.paths:
            return await super().resolve(request)  # its 404
        if request.method == "GET":
            self.served.append(path)
        return await self.send(request)  # the same bytes under each name


async def test_pull_preset_qmd_fetches_and_registers_qmds_three_defaults(
        tmp_path: Path, blob: bytes, aiohttp_server):
    hub = PresetHub(blob)
    endpoint = await _serve(hub, aiohttp_server)
    config = tmp_path / "config.toml"
    config.write_text(render_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUSERVE_", "HF_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "npuserve.daemon.cli", "models", "pull", "--preset", "qmd",
        "--config", str(config), "--state-dir", str(tmp_path / "state"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 300))[0].decode()
    assert proc.returncode == 0, out
    assert sorted(hub.served) == sorted(hub.paths)
    cfg = load_config(config, env={})
    for task, repo, name, aliases in PRESETS["qmd"]:
        path = tmp_path / "state" / "models" / repo.replace("/", "--") / name
        assert cfg.get(f"models.{task}.path") == str(path) and path.is_file()
        assert cfg.get(f"models.{task}.aliases") == aliases
    assert "embeddinggemma-300M-Q8_0.gguf" in cfg.get("models.embed.path")
