"""Scheduler benchmark: a mixed QMD-style workload under three policies, in one run.

8 concurrent clients each run 10 queries: POST /expand, then /embed-batch with 3
query variants, then /rerank of 10 documents — the order `qmd query` uses.

Policies, each on its own daemon started by this script with the same models:
  aging      sequential residency, npuserve's switching (default): the resident queue
             first, swaps to the queue with most work per second of loading, aging bound
  fifo       the naive baseline the issue names: sequential residency, requests in
             arrival order one backend call each, a swap whenever the next request
             needs another model (no coalescing, no read-ahead)
  fifo-coalesce  arrival order too, but requests next in line for the same model are
             merged into one call (embeddings batched, expansions side by side): the
             stronger baseline of sessions 1-10, so the switching alone is compared
  resident   every model resident (the memory-hungry baseline)
  aging-prefetch, aging-noprefetch, fifo-prefetch   with / without the read-ahead of the
             next model (scheduler.prefetch, off by default), to tell what it contributes

Printed: swaps per query, wall time, p50/p95 query latency, peak RSS of the
whole server (daemon + worker processes), and the ratios the issue targets.

With `--expand-model FILE` expansion runs on a third model of its own (as on a board:
embedding, reranker and expansion models are three files), instead of sharing the
default SmolLM2 with rerank. `--rerank-model FILE` does the same for rerank, e.g. with
SmolLM2 widened to F16 (bench/widen_gguf.py) to stand in for a board-sized reranker.

With `--board-memory-mb M --read-mbps R` each server runs under a board's constraints
(bench/board_limits.py): a memory limit of M MB, page cache included, so models that do
not fit are read again, from a disk throttled to R MB/s (SD card ~90, eMMC ~250), with
the model files evicted from the page cache before each run. `resident` is left out
there unless asked for: by design it does not fit such a board.

With `--stagger S` the clients start at random times within S seconds (seeded), as agents
that share a server do, instead of all at once. `--seeds 0,1,2` runs every policy once per
draw of start times and pauses and prints, per draw, aging's ratios to the naive FIFO and
how many draws meet both targets: whether the clients fall into step is a property of the
draw, so one draw shows little.

Usage: python bench/bench_scheduler.py [--state-dir DIR] [--clients 8] [--queries 10]
                                       [--think S] [--stagger S] [--expand-model FILE]
                                       [--repeat N] [--seeds 0,1,2]
                                       [--rerank-model FILE]
                                       [--board-memory-mb M --read-mbps R]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import passage, start_daemon, tree_rss  # noqa: E402
from board_limits import BoardCgroup, BoardLimits, evict_from_page_cache  # noqa: E402

TOPICS = ["debian kernel modules", "apt package signatures", "systemd unit hardening",
          "sqlite full text search", "mdns service discovery", "npu model conversion",
          "python virtual environments", "cpu thread pinning", "embedding model batching",
          "reciprocal rank fusion"]


class PeakSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.02)


async def one_query(session: aiohttp.ClientSession, base: str, q: str) -> float:
    start = time.perf_counter()
    async with session.post(base + "/expand", json={"query": q}) as r:
        assert r.status == 200, await r.text()
        lines = await r.json()
    variants = [f"task: search result | query: {line['text']}" for line in lines][:3]
    while len(variants) < 3:
        variants.append(f"task: search result | query: {q}")
    async with session.post(base + "/embed-batch", json={"texts": variants}) as r:
        assert r.status == 200, await r.text()
        await r.read()
    docs = [{"file": f"doc{i}.md", "text": passage(i, 45)} for i in range(10)]
    async with session.post(base + "/rerank", json={"query": q, "documents": docs}) as r:
        assert r.status == 200, await r.text()
        await r.read()
    return time.perf_counter() - start


async def workload(base: str, clients: int, queries: int, think: float, stagger: float,
                   seed: int = 0) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def client(c: int) -> None:
        # Seed 0 draws what every earlier session's runs drew; other seeds are other agents.
        rng = random.Random(c + 10_000 * seed)
        # Its own start time: drawn from a generator of its own, so the pauses that follow
        # are the same with and without a stagger.
        await asyncio.sleep(random.Random(1000 + c + 10_000 * seed).uniform(0.0, stagger))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
            for k in range(queries):
                if think:  # agents pause between queries: arrivals fall out of step
                    await asyncio.sleep(rng.expovariate(1.0 / think))
                latencies.append(await one_query(s, base, f"{TOPICS[(c + k) % 10]} {c}-{k}"))

    start = time.perf_counter()
    await asyncio.gather(*[client(c) for c in range(clients)])
    return time.perf_counter() - start, latencies


async def fetch_json(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


def run_policy(name: str, models_dir: Path, settings: list[str], clients: int,
               queries: int, think: float, stagger: float, board: BoardLimits | None,
               model_files: list[Path], seed: int = 0, log: Path | None = None
               ) -> dict[str, float]:
    cgroup = None
    if board is not None:
        cgroup = BoardCgroup(board, model_files, f"npuserve-bench-{os.getpid()}-{name}")
        evict_from_page_cache(model_files)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "models").symlink_to(models_dir)
        proc, base = start_daemon(state, settings, cgroup.enter if cgroup else None, log)
        try:
            sampler = PeakSampler(proc.pid)
            sampler.start()
            wall, lat = asyncio.run(workload(base, clients, queries, think, stagger, seed))
            sampler.running = False
            sampler.join()
            status = asyncio.run(fetch_json(base + "/admin/models"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    read_mb = 0.0
    if cgroup is not None:
        read_mb = cgroup.bytes_read() / 2**20
        cgroup.remove()
    loads = sum(m["loads"] for m in status["models"])
    load_s = sum(m.get("load_seconds_total", 0.0) for m in status["models"])
    n = clients * queries
    lat.sort()
    return {
        "swaps_per_query": loads / n,
        "wall": wall,
        "p50": statistics.median(lat),
        "p95": lat[math.ceil(0.95 * len(lat)) - 1],  # nearest rank
        "peak_rss_mb": sampler.peak / 2**20,
        "loads": loads,
        "load_s": load_s,
        "read_mb": read_mb,
    }


def print_run(name: str, r: dict[str, float], board: bool, seed: int | None) -> None:
    print((f"seed {seed}  " if seed is not None else "")
          + f"{name:9} swaps/query {r['swaps_per_query']:.3f} ({r['loads']} loads, "
          f"{r['load_s']:.1f}s loading)  "
          f"wall {r['wall']:.1f}s  p50 {r['p50']:.2f}s  p95 {r['p95']:.2f}s  "
          f"peak RSS {r['peak_rss_mb']:.0f} MB"
          + (f"  read {r['read_mb']:.0f} MB" if board else ""), flush=True)


def print_ratios(results: dict[str, dict[str, float]]) -> None:
    a, res = results.get("aging"), results.get("resident")
    for base in ("fifo", "fifo-coalesce"):
        f = results.get(base)
        for name in ("aging", "aging-prefetch", "aging-noprefetch", "fifo-prefetch"):
            if name in results and f:
                x = results[name]
                print(f"swaps per query, {name} / {base}  "
                      f"{x['swaps_per_query'] / f['swaps_per_query']:.2f}  (target <= 0.5)")
                print(f"wall time, {name} / {base}        "
                      f"{x['wall'] / f['wall']:.2f}  (target <= 0.8)")
    if a and res:
        print(f"p95 latency, sequential / resident {a['p95'] / res['p95']:.2f}  (target <= 1.5)")
        print(f"peak RSS, sequential / resident   {a['peak_rss_mb'] / res['peak_rss_mb']:.2f}"
              "  (target <= 0.6)")


def print_seed_summary(per_seed: dict[int, dict[str, dict[str, float]]]) -> None:
    """Aging against the naive FIFO draw by draw: how often both targets hold, not one draw."""
    rows = [(seed, r["aging"]["swaps_per_query"] / r["fifo"]["swaps_per_query"],
             r["aging"]["wall"] / r["fifo"]["wall"])
            for seed, r in per_seed.items() if "aging" in r and "fifo" in r]
    if not rows:
        return
    print("\nseed  swaps aging/fifo  wall aging/fifo  both targets")
    for seed, swaps, wall in rows:
        met = "met" if swaps <= 0.5 and wall <= 0.8 else "not met"
        print(f"{seed:4}  {swaps:16.2f}  {wall:15.2f}  {met}")
    met_n = sum(1 for _, swaps, wall in rows if swaps <= 0.5 and wall <= 0.8)
    print(f"median over {len(rows)} seeds: swaps {statistics.median(r[1] for r in rows):.2f}, "
          f"wall {statistics.median(r[2] for r in rows):.2f}; both targets met in "
          f"{met_n} of {len(rows)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--think", type=float, default=0.0,
                    help="mean seconds an agent pauses between queries (exponential)")
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="clients start at random times within this many seconds")
    ap.add_argument("--policies", default=None,
                    help="default aging,fifo,resident (aging,fifo with board limits)")
    ap.add_argument("--board-memory-mb", type=int, default=0,
                    help="run each server under this memory limit (page cache included)")
    ap.add_argument("--read-mbps", type=float, default=0.0,
                    help="with --board-memory-mb: reads from the models' disk at this rate")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the policies this many times, interleaved; ratios of medians")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated draws of start times and pauses, e.g. 0,1,2,3")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="keep each daemon's log here (the order of its loads)")
    ap.add_argument("--expand-model", type=Path, default=None,
                    help="a GGUF for expansion alone (a third model), e.g. gemma-3-270m")
    ap.add_argument("--rerank-model", type=Path, default=None,
                    help="a GGUF for rerank instead of the default SmolLM2")
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    board = None
    if args.board_memory_mb:
        if args.read_mbps <= 0:
            ap.error("--board-memory-mb needs --read-mbps")
        board = BoardLimits(args.board_memory_mb, args.read_mbps)
    if args.policies is None:
        args.policies = "aging,fifo" if board else "aging,fifo,resident"

    cfg = load_config(None, overrides={"state_dir": args.state_dir} if args.state_dir else {})
    # Greedy, short expansions so every policy does the same work.
    common = ["models.expand.temperature=0", "models.expand.max_tokens=48",
              "scheduler.keep_alive=-1"]
    extra = {"expand": args.expand_model, "rerank": args.rerank_model}
    for task, path in extra.items():
        if path:
            common.append(f"models.{task}.path={path.resolve()}")
    aging = common + ["scheduler.policy=sequential", "scheduler.switching=aging"]
    fifo = common + ["scheduler.policy=sequential", "scheduler.switching=fifo"]
    policies = {
        "aging": aging,
        "aging-prefetch": aging + ["scheduler.prefetch=true"],
        "aging-noprefetch": aging + ["scheduler.prefetch=false"],
        # The naive baseline swaps when the next request needs another model, nothing more:
        # one request per backend call, no read-ahead of the next model.
        "fifo": fifo + ["scheduler.prefetch=false", "scheduler.coalesce_texts=1",
                        "scheduler.coalesce_expansions=1"],
        # Arrival order, merging the requests next in line (sessions 1-10's "fifo").
        "fifo-coalesce": fifo + ["scheduler.prefetch=false"],
        "fifo-prefetch": fifo + ["scheduler.prefetch=true"],
        "resident": common + ["scheduler.policy=resident"],
    }
    model_files = sorted(p.resolve() for p in cfg.models_dir.glob("*.gguf"))
    model_files += [path.resolve() for path in extra.values() if path]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        runs: dict[str, list[dict[str, float]]] = {}
        for rep in range(args.repeat):  # interleaved, so a machine's drift hits every policy
            for name in args.policies.split(","):
                log = args.log_dir / f"{name}-seed{seed}-run{rep}.log" if args.log_dir else None
                r = run_policy(name, cfg.models_dir, policies[name], args.clients,
                               args.queries, args.think, args.stagger, board, model_files,
                               seed, log)
                runs.setdefault(name, []).append(r)
                print_run(name, r, board is not None, seed if len(seeds) > 1 else None)
        # Each figure's median over the repeats (one run: that run).
        per_seed[seed] = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                          for name, rs in runs.items()}
        if args.repeat > 1:
            print(f"\nmedians over {args.repeat} interleaved runs")
        print(f"\n{args.clients} clients x {args.queries} queries (expand -> embed-batch 3 -> "
              f"rerank 10), think time {args.think:g}s, start stagger {args.stagger:g}s, "
              f"seed {seed}, expansion on "
              f"{args.expand_model.name if args.expand_model else 'the rerank model'}"
              + (f", rerank on {args.rerank_model.name}" if args.rerank_model else "")
              + (f", board limits {board.memory_mb} MB RAM, {board.read_mb_per_s:g} MB/s "
                 "reads" if board else ""))
        print_ratios(per_seed[seed])
    if len(seeds) > 1:
        print_seed_summary(per_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
