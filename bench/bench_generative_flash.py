"""Flash attention on and off for the generative backend: speed and rerank exactness.

In-process, two backends on the same model (flash attention on / off for both tasks),
interleaved, best of N: a rerank of 10 documents of ~100 tokens (prefix KV reused) and 8
greedy expansions of 48 tokens side by side. Also printed per setting: the largest
difference between a document's score with the prefix reused and its whole prompt
evaluated alone (0 means the score does not depend on how the prompt was decoded).

Usage: python bench/bench_generative_flash.py [--rounds 3] [--model FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import generative_model, passage  # noqa: E402

QUERY = "how does apt verify package signatures before installing"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    from npuserve.daemon.backend_api import ExpandRequest
    from npuserve.daemon.config import DEFAULT_INSTRUCTION
    from npuserve.daemon.model_store import SMOLLM2_RERANK_TEMPLATE
    from npuserve.daemon.qmd_conventions import split_rerank_template
    from npuserve.daemon.worker_protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    model = generative_model(args.model)
    docs = [passage(i, 80) for i in range(10)]
    requests = [ExpandRequest(f"topic {i}: kernel modules", None, True) for i in range(8)]
    backends = {}
    for flash in (True, False):
        b = LlamaGenerativeBackend(ModelSpec(
            "bench", "llama_cpp_generative", str(model), 2048, 0,
            (("template", SMOLLM2_RERANK_TEMPLATE), ("rerank_flash_attn", flash),
             ("expand_flash_attn", flash), ("temperature", 0.0), ("max_tokens", 48))))
        b.load()
        backends[flash] = b
    best = {(f, k): float("inf") for f in backends for k in ("rerank", "expand")}
    for _ in range(args.rounds):
        for flash, b in backends.items():
            start = time.perf_counter()
            b.rerank(QUERY, docs, DEFAULT_INSTRUCTION)
            best[flash, "rerank"] = min(best[flash, "rerank"], time.perf_counter() - start)
            start = time.perf_counter()
            b.expand_many(requests)
            best[flash, "expand"] = min(best[flash, "expand"], time.perf_counter() - start)
    prefix, suffix = split_rerank_template(SMOLLM2_RERANK_TEMPLATE, DEFAULT_INSTRUCTION, QUERY)
    print(f"{model.name}, best of {args.rounds}")
    for flash, b in backends.items():
        reused = b.rerank(QUERY, docs, DEFAULT_INSTRUCTION).scores
        alone = [b.p_yes_of(b._tokenize(prefix, special=True) + b._tokenize(d)
                            + b._tokenize(suffix, special=True)) for d in docs]
        diff = max(abs(x - y) for x, y in zip(reused, alone, strict=True))
        print(f"  flash {'on ' if flash else 'off'}: rerank 10 docs {best[flash, 'rerank']:.2f}s,"
              f" 8 expansions {best[flash, 'expand']:.2f}s, rerank |reused - alone| <= {diff:.4f}")
        b.unload()
    print(f"  off / on: rerank {best[False, 'rerank'] / best[True, 'rerank']:.2f}x the time,"
          f" expansion {best[False, 'expand'] / best[True, 'expand']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
