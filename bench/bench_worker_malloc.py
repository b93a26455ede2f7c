"""glibc's mmap threshold in the model worker: pinned (npuserve's worker environment,
MALLOC_MMAP_THRESHOLD_=131072) against glibc's default (a threshold that rises each time
a large block is freed), the same work in two fresh interpreters of this job.

The work, in-process on the llama.cpp backends: 2 × 8 expansions side by side with the
expansion model (greedy, 48 tokens), 3 reranks of 10 passages and 2 × 8 expansions with
SmolLM2, 10 embedding batches of 24 queries with MiniLM. Printed per setting: seconds per
part, the RSS the process keeps after the expansion model's work, its peak; and ratios.

    python bench/bench_worker_malloc.py [--expand-model FILE] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import passage, status_mb  # noqa: E402

PINNED = str(128 * 1024)


def timed(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for r in range(rounds):
        fn(r)
    return time.perf_counter() - start


def run_once(expand_model: str, rounds: int) -> dict[str, float]:
    from npuserve.daemon.backend_api import ExpandRequest
    from npuserve.daemon.config import load_config
    from npuserve.daemon.model_store import default_for_task
    from npuserve.daemon.worker_protocol import ModelSpec
    from npuserve.fallback.llama_embed import LlamaEmbedBackend
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    models = load_config(None).models_dir
    greedy = (("temperature", 0.0), ("max_tokens", 48))

    def expansions(b: LlamaGenerativeBackend) -> None:
        b.expand_many([ExpandRequest(f"apt package signatures {i}", None, True)
                       for i in range(8)])

    out: dict[str, float] = {}
    g = LlamaGenerativeBackend(ModelSpec("g", "llama_cpp_generative", expand_model, 2048, 0,
                                         greedy))
    g.load()
    out["expand_model_s"] = timed(lambda r: expansions(g), rounds)
    out["kept_after_mb"], out["peak_mb"] = status_mb("VmRSS"), status_mb("VmHWM")
    g.unload()
    smol = str(models / default_for_task(models, "rerank").file)
    s = LlamaGenerativeBackend(ModelSpec("s", "llama_cpp_generative", smol, 2048, 0, greedy))
    s.load()
    docs = [passage(i, 45) for i in range(10)]
    out["rerank_s"] = timed(lambda r: s.rerank("how does apt verify package signatures",
                                               docs, "Judge relevance"), rounds + 1)
    out["smol_expand_s"] = timed(lambda r: expansions(s), rounds)
    s.unload()
    e = LlamaEmbedBackend(ModelSpec("e", "llama_cpp_embed",
                                    str(models / default_for_task(models, "embed").file),
                                    512, 0, ()))
    e.load()
    out["embed_s"] = timed(lambda r: e.embed([f"task: search result | query: {r} q {i}"
                                              for i in range(24)]), 10)
    e.unload()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expand-model", default=None,
                    help="GGUF for the expansion part (default: the prepared expand model)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.expand_model is None:
        from npuserve.daemon.config import load_config
        from npuserve.daemon.model_store import default_for_task

        models = load_config(None).models_dir
        args.expand_model = str(models / default_for_task(models, "expand").file)
    if args.one:
        print(json.dumps(run_once(args.expand_model, args.rounds)))
        return 0
    results = {}
    for label in ("glibc default", "pinned"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        if label == "pinned":
            env["MALLOC_MMAP_THRESHOLD_"] = PINNED
        proc = subprocess.run([sys.executable, __file__, "--one", "--expand-model",
                               args.expand_model, "--rounds", str(args.rounds)],
                              capture_output=True, text=True, check=True, env=env)
        results[label] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{label:13} expansion model {r['expand_model_s']:.2f}s (RSS kept"
              f" {r['kept_after_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB)  rerank"
              f" {r['rerank_s']:.2f}s  SmolLM2 expansion {r['smol_expand_s']:.2f}s  embed"
              f" {r['embed_s']:.2f}s", flush=True)
    base, new = results["glibc default"], results["pinned"]
    print("\npinned / default: " + ", ".join(
        f"{k} {new[k] / base[k]:.2f}" for k in base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
