"""What the RKLLM backend's host-side control costs, apart from the NPU: the RKLLM backend on
the reference librkllmrt (llama.cpp under rkllm.h) against the CPU backend on the same
GGUF, same kernels (flash attention off on both), same threads, in one process, calls
interleaved. Real model: the embedded default's SmolLM2-135M-Instruct.

  expand   QMD's expansion, greedy: identical output counted; the step-wise grammar's
           pauses (a refused token: pause, one logits row, a host draw) per expansion
  rerank   20 paragraphs per query: RKLLM evaluates each whole prompt (the KV cache is
           cleared per request); the CPU backend keeps the query's prefix. Scores are
           compared on the Q4_1 file and on the same weights widened to F32 (llama.cpp's
           Q4_1 matmul quantises activations to 8 bits; the LM-head rows RKLLM's backend
           multiplies on the host are float32)

Prints time ratios RKLLM/CPU (what the host round trips and the lost prefix reuse cost on
this machine). It says nothing of NPU speed.

Usage: python bench/rkllm_stepwise.py [--queries 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_corpus import QUESTIONS  # noqa: E402

PARAGRAPHS = [
    "The socket module provides access to the BSD socket interface.",
    "sqlite3 is a DB-API 2.0 interface for SQLite databases.",
    "The threading module constructs higher-level threading interfaces.",
    "asyncio is a library to write concurrent code using async/await.",
    "The os module provides a portable way of using operating system functionality.",
    "json exposes an API familiar to users of the marshal and pickle modules.",
    "The re module provides regular expression matching operations.",
    "subprocess allows you to spawn new processes and connect to their pipes.",
    "The hashlib module implements a common interface to many secure hash algorithms.",
    "The zipfile module provides tools to create, read, write and list ZIP files.",
] * 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from npuserve.daemon.config import load_config
    from npuserve.daemon.worker.protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend
    from npuserve.npu import rkllm_backend
    from npuserve.npu.rkllm_convert import convert_rkllm

    gguf = next(load_config(None).models_dir.glob("SmolLM2*.gguf"))
    greedy = (("temperature", 0.0), ("presence_penalty", 0.0), ("expand_flash_attn", False),
              ("rerank_flash_attn", False))
    with tempfile.TemporaryDirectory() as tmp:
        rdir = convert_rkllm(gguf, Path(tmp) / "rkllm", "smollm2", "rerank",
                             max_context_len=2048)
        npu = rkllm_backend.RkllmBackend(ModelSpec(
            "n", "rkllm", str(rdir), 2048, args.threads, (("npu_runtime", "reference"),
                                                           *greedy)))
        cpu = LlamaGenerativeBackend(ModelSpec("c", "llama_cpp_generative", str(gguf), 2048,
                                               args.threads, greedy))
        npu.load()
        cpu.load()
        pauses = []
        original = rkllm_backend._Generation._redraw

        def counted(self: rkllm_backend._Generation) -> int:
            pauses[-1] += 1
            return original(self)

        rkllm_backend._Generation._redraw = counted  # type: ignore[method-assign]
        queries = [q for q, _ in QUESTIONS][:args.queries]
        times: dict[str, list[float]] = {"expand npu": [], "expand cpu": [],
                                         "rerank npu": [], "rerank cpu": []}
        same = 0
        for q in queries:
            pauses.append(0)
            t = time.perf_counter()
            a = npu.expand(q, None, True)
            times["expand npu"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = cpu.expand(q, None, True)
            times["expand cpu"].append(time.perf_counter() - t)
            same += a.raw == b.raw
            t = time.perf_counter()
            ra = npu.rerank(q, PARAGRAPHS, "Judge whether the document answers the query")
            times["rerank npu"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rb = cpu.rerank(q, PARAGRAPHS, "Judge whether the document answers the query")
            times["rerank cpu"].append(time.perf_counter() - t)
            worst = max(abs(x - y) for x, y in zip(ra.scores, rb.scores, strict=True))
            print(f"{q[:40]!r}: expand {times['expand npu'][-1]:.2f}s vs"
                  f" {times['expand cpu'][-1]:.2f}s, pauses {pauses[-1]}, same"
                  f" {a.raw == b.raw}; rerank {times['rerank npu'][-1]:.2f}s vs"
                  f" {times['rerank cpu'][-1]:.2f}s, max |dP| {worst:.4f}", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nexpand: RKLLM/CPU time {med['expand npu'] / med['expand cpu']:.2f}x"
              f" (median {med['expand npu']:.2f} s vs {med['expand cpu']:.2f} s);"
              f" identical {same}/{len(queries)}; pauses per expansion median"
              f" {statistics.median(pauses)}")
        print(f"rerank: RKLLM/CPU time {med['rerank npu'] / med['rerank cpu']:.2f}x"
              f" (median {med['rerank npu']:.2f} s vs {med['rerank cpu']:.2f} s for"
              f" {len(PARAGRAPHS)} paragraphs)")
        npu.unload()
        cpu.unload()
        print(f"rerank on the F32 twin: max |dP| {f32_delta(gguf, Path(tmp), queries[:2]):.5f}")
    return 0


def f32_delta(gguf: Path, tmp: Path, queries: list[str]) -> float:
    """Largest |P(yes) RKLLM - P(yes) CPU| over `queries` x PARAGRAPHS on `gguf` at F32."""
    import llama_cpp
    from widen_gguf import widen

    from npuserve.daemon.worker.protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend
    from npuserve.npu.rkllm_backend import RkllmBackend
    from npuserve.npu.rkllm_convert import convert_rkllm

    wide = tmp / "f32.gguf"
    widen(gguf, wide, llama_cpp.LLAMA_FTYPE_ALL_F32)
    rdir = convert_rkllm(wide, tmp / "rkllm-f32", "smollm2-f32", "rerank", max_context_len=2048)
    off = (("rerank_flash_attn", False),)
    npu = RkllmBackend(ModelSpec("n", "rkllm", str(rdir), 2048, 2,
                                 (("npu_runtime", "reference"), *off)))
    cpu = LlamaGenerativeBackend(ModelSpec("c", "llama_cpp_generative", str(wide), 2048, 2, off))
    npu.load()
    cpu.load()
    worst = 0.0
    for q in queries:
        a = npu.rerank(q, PARAGRAPHS, "Judge whether the document answers the query").scores
        b = cpu.rerank(q, PARAGRAPHS, "Judge whether the document answers the query").scores
        worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
    npu.unload()
    cpu.unload()
    return worst


if __name__ == "__main__":
    sys.exit(main())
