"""Core daemon benchmarks, as ratios measured in one run on one machine.

1. Embedding throughput through the daemon's HTTP /embed-batch (64 texts of
   ~100 tokens) versus llama-cpp-python called directly in this process
   (both its list API and a per-text loop; the faster one is the baseline).
   Target: >= 0.90.
2. Rerank with the shared prefix's KV cache reused versus a full prompt per
   document, same model, same documents. Target: >= 1.25x.

Usage: python bench/bench_core.py [--state-dir DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

WORDS = ("apt resolves package dependencies downloads archives from mirrors verifies signatures "
         "unpacks files runs maintainer scripts and records state so upgrades and removals stay "
         "consistent across the whole system ").split()


def passage(i: int, n_words: int = 80) -> str:
    """About 100 MiniLM tokens, different per i so nothing is cached."""
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words)]
    return f"passage {i}: " + " ".join(words)


def generative_model(path: Path | None) -> Path:
    """`path`, else the prepared default rerank/expansion model (SmolLM2)."""
    if path is not None:
        return path
    from npuserve.daemon.config import load_config
    from npuserve.daemon.models.store import read_manifest

    cfg = load_config(None)
    return cfg.models_dir / read_manifest(cfg.models_dir)["smollm2-135m-instruct"].file


def status_mb(key: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def tree_rss(root_pid: int) -> int:
    """RSS of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: object) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)


def wait_ready(url: str) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def start_daemon(state_dir: Path, settings: list[str],
                 preexec: Callable[[], None] | None = None, log: Path | None = None
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """`npuserve serve` on a free loopback port; returns the process and its base URL.
    `preexec` runs in the child before exec (e.g. to enter a cgroup); `log` keeps the
    daemon's log (which model it loaded when), else it is discarded."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    sets = [a for s in settings for a in ("--set", s)]
    err = log.open("wb") if log else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "npuserve.daemon.cli", "serve", "--state-dir", str(state_dir),
         "--port", str(port), *sets],
        env=env, stdout=subprocess.DEVNULL, stderr=err or subprocess.DEVNULL,
        preexec_fn=preexec)
    if err:
        err.close()  # the child holds its own copy
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health")
    return proc, base


def bench_daemon_embed(state_dir: Path, texts: list[str], rounds: int) -> float:
    proc, base = start_daemon(state_dir, ["scheduler.keep_alive=-1"])
    try:
        post(base + "/embed-batch", {"texts": texts[:4]})  # load + warm up
        best = 0.0
        for r in range(rounds):
            batch = [f"{r} {t}" for t in texts]
            start = time.perf_counter()
            out = post(base + "/embed-batch", {"texts": batch})
            elapsed = time.perf_counter() - start
            assert isinstance(out, list) and len(out) == len(batch)
            best = max(best, len(batch) / elapsed)
        return best
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def bench_direct_embed(model: Path, texts: list[str], rounds: int) -> tuple[float, float]:
    from llama_cpp import Llama

    from npuserve.fallback.llama_common import thread_count

    n = thread_count(0)
    llm = Llama(str(model), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                n_threads=n, n_threads_batch=n, verbose=False)
    llm.embed(texts[:4], normalize=True)
    best_list = best_loop = 0.0
    for r in range(rounds):
        batch = [f"{r} {t}" for t in texts]
        start = time.perf_counter()
        llm.embed(batch, normalize=True)
        best_list = max(best_list, len(batch) / (time.perf_counter() - start))
        start = time.perf_counter()
        for t in batch:
            llm.embed(t, normalize=True)
        best_loop = max(best_loop, len(batch) / (time.perf_counter() - start))
    llm.close()
    return best_list, best_loop


def bench_rerank(model: Path, n_docs: int, rounds: int) -> tuple[float, float, float]:
    """Seconds per request with prefix reuse, without, and the largest score difference."""
    from npuserve.daemon.config import DEFAULT_INSTRUCTION
    from npuserve.daemon.models.qmd_conventions import split_rerank_template
    from npuserve.daemon.models.store import SMOLLM2_RERANK_TEMPLATE
    from npuserve.daemon.worker.protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    spec = ModelSpec("bench", "llama_cpp_generative", str(model), 2048, 0,
                     (("template", SMOLLM2_RERANK_TEMPLATE),))
    backend = LlamaGenerativeBackend(spec)
    backend.load()
    query = "how does apt verify package signatures before installing"
    docs = [passage(i) for i in range(n_docs)]

    def full_prompt() -> list[float]:
        prefix, suffix = split_rerank_template(SMOLLM2_RERANK_TEMPLATE, DEFAULT_INSTRUCTION, query)
        return [backend.p_yes_of(backend._tokenize(prefix, special=True) + backend._tokenize(d)
                                 + backend._tokenize(suffix, special=True)) for d in docs]

    reuse_t = full_t = float("inf")
    diff = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        reused = backend.rerank(query, docs, DEFAULT_INSTRUCTION).scores
        reuse_t = min(reuse_t, time.perf_counter() - start)
        start = time.perf_counter()
        full = full_prompt()
        full_t = min(full_t, time.perf_counter() - start)
        diff = max(diff, max(abs(a - b) for a, b in zip(reused, full, strict=True)))
    backend.unload()
    return reuse_t, full_t, diff


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", type=int, default=20)
    args = ap.parse_args()
    from npuserve.daemon.config import load_config
    from npuserve.daemon.models.store import read_manifest

    overrides = {"state_dir": args.state_dir} if args.state_dir else {}
    cfg = load_config(None, overrides=overrides)
    records = read_manifest(cfg.models_dir)
    embed_model = cfg.models_dir / records["all-minilm-l6-v2"].file
    gen_model = cfg.models_dir / records["smollm2-135m-instruct"].file
    texts = [passage(i) for i in range(64)]

    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    daemon = bench_daemon_embed(cfg.state_dir, texts, args.rounds)
    direct_list, direct_loop = bench_direct_embed(embed_model, texts, args.rounds)
    baseline = max(direct_list, direct_loop)
    print("embedding, 64 texts x ~100 tokens, best of", args.rounds)
    print(f"  daemon HTTP /embed-batch      {daemon:8.1f} texts/s")
    print(f"  llama-cpp-python embed(list)  {direct_list:8.1f} texts/s")
    print(f"  llama-cpp-python embed loop   {direct_loop:8.1f} texts/s")
    print(f"  ratio daemon / best direct    {daemon / baseline:8.2f}  (target >= 0.90)")

    reuse_t, full_t, diff = bench_rerank(gen_model, args.docs, args.rounds)
    print(f"rerank, {args.docs} documents x ~100 tokens, best of {args.rounds}")
    print(f"  prefix KV reused              {reuse_t * 1000:8.0f} ms")
    print(f"  full prompt per document      {full_t * 1000:8.0f} ms")
    print(f"  speed-up full / reused        {full_t / reuse_t:8.2f}x (target >= 1.25x)")
    print(f"  largest score difference      {diff:8.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
