"""Expansions side by side (one llama_decode a step for all) against one at a time.

In-process, one backend: 8 greedy expansions of 48 tokens generated together, then the
same 8 one after another. Printed: best-of-N seconds for each, the ratio, and how many
of the 8 texts are the same both ways (they must all be: each sequence has a KV stream
of its own).

Usage: python bench/bench_expansion_side_by_side.py [--rounds 3] [--model FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import generative_model  # noqa: E402

QUERIES = ["debian kernel modules", "sqlite full text search", "mdns service discovery",
           "cpu thread pinning", "apt package signatures", "systemd unit hardening",
           "python virtual environments", "reciprocal rank fusion"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    from npuserve.daemon.backend_api import ExpandRequest
    from npuserve.daemon.worker_protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    model = generative_model(args.model)
    backend = LlamaGenerativeBackend(ModelSpec(
        "bench", "llama_cpp_generative", str(model), 2048, 0,
        (("temperature", 0.0), ("max_tokens", 48))))
    backend.load()
    requests = [ExpandRequest(q, None, True) for q in QUERIES]
    together_t = alone_t = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        together = backend.expand_many(requests)
        together_t = min(together_t, time.perf_counter() - start)
        start = time.perf_counter()
        alone = [backend.expand_many([r])[0] for r in requests]
        alone_t = min(alone_t, time.perf_counter() - start)
    backend.unload()
    same = sum(a.raw == b.raw for a, b in zip(together, alone, strict=True))
    print(f"{model.name}: 8 expansions x 48 tokens, best of {args.rounds}: side by side "
          f"{together_t:.2f}s, one at a time {alone_t:.2f}s, speed-up {alone_t / together_t:.2f}x,"
          f" same text {same}/{len(requests)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
