"""Micro-batch size of the generative backend (rerank + expansion): speed and memory.

In-process, one backend per setting, the same work: a rerank of 10 passages (shared
prefix reused) and 8 expansions generated side by side (greedy, 48 tokens). Prints
seconds, the process's RSS growth over the load, and ratios against n_ubatch = 512.

    python bench/bench_generative_ubatch.py [--model FILE] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import passage  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(model: Path, ubatch: int, rounds: int) -> dict[str, float]:
    from npuserve.daemon.backend_api import ExpandRequest
    from npuserve.daemon.worker_protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    before = rss_mb()
    b = LlamaGenerativeBackend(ModelSpec("bench", "llama_cpp_generative", str(model), 2048, 0,
                                         (("n_ubatch", ubatch), ("temperature", 0.0),
                                          ("max_tokens", 48))))
    b.load()
    docs = [passage(i) for i in range(10)]
    queries = [ExpandRequest(f"apt package signatures {i}", None, True) for i in range(8)]
    rerank = expand = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        b.rerank("how does apt verify package signatures", docs, "Judge relevance")
        rerank = min(rerank, time.perf_counter() - t)
        t = time.perf_counter()
        b.expand_many(queries)
        expand = min(expand, time.perf_counter() - t)
    grown = rss_mb() - before
    b.unload()
    gc.collect()
    return {"rerank_s": rerank, "expand_s": expand, "rss_mb": grown}


def main() -> int:
    from npuserve.daemon.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ubatch", default="512,128,64")
    args = ap.parse_args()
    model = args.model or next(load_config(None).models_dir.glob("SmolLM2*.gguf"))
    results = {u: measure(model, u, args.rounds) for u in map(int, args.ubatch.split(","))}
    base = results[max(results)]
    print(f"model {model.name}; ratios against n_ubatch={max(results)}")
    print("| n_ubatch | rerank 10 docs (s) | ratio | 8 expansions (s) | ratio | RSS growth (MB)"
          " | ratio |\n|---|---|---|---|---|---|---|")
    for u, r in results.items():
        print(f"| {u} | {r['rerank_s']:.2f} | {r['rerank_s'] / base['rerank_s']:.2f} | "
              f"{r['expand_s']:.2f} | {r['expand_s'] / base['expand_s']:.2f} | "
              f"{r['rss_mb']:.0f} | {r['rss_mb'] / base['rss_mb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
