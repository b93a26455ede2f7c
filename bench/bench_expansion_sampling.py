"""Expansion sampling: a grammar-rejected token redrawn from the most likely candidates
(npuserve's default, CONSTRAINED_CANDIDATES = 256) against a redraw over the whole
vocabulary (the grammar applied to every token, as before), on the same model.

Each setting runs in a fresh interpreter of this job (a heap's leftovers from one run
must not count for the other): 8 expansions side by side, greedy, 48 tokens, `--rounds`
times. Printed: seconds, the process's peak RSS over the loaded model (VmHWM after the
load reset through /proc/self/clear_refs), and the ratios.

    python bench/bench_expansion_sampling.py [--model FILE] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import status_mb  # noqa: E402


def run_one(model: str, candidates: int, rounds: int) -> dict[str, float]:
    import npuserve.fallback.llama_generative as generative
    from npuserve.daemon.backend_api import ExpandRequest
    from npuserve.daemon.worker_protocol import ModelSpec

    b = generative.LlamaGenerativeBackend(ModelSpec(
        "bench", "llama_cpp_generative", model, 2048, 0,
        (("temperature", 0.0), ("max_tokens", 48))))
    b.load()
    n_vocab = int(b.model.lib.llama_vocab_n_tokens(b.model.vocab))
    generative.CONSTRAINED_CANDIDATES = candidates or n_vocab
    import numpy  # noqa: F401  (both settings pay for numpy before the peak is reset)

    loaded = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    best = float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        b.expand_many([ExpandRequest(f"apt package signatures {r} {i}", None, True)
                       for i in range(8)])
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "peak_over_loaded_mb": status_mb("VmHWM") - loaded,
            "n_vocab": n_vocab}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF (default: the prepared expand model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from npuserve.daemon.config import load_config
        from npuserve.daemon.model_store import default_for_task

        cfg = load_config(None)
        args.model = str(cfg.models_dir / default_for_task(cfg.models_dir, "expand").file)
    if args.one is not None:
        print(json.dumps(run_one(args.model, args.one, args.rounds)))
        return 0
    results = {}
    for label, k in (("whole vocabulary", 0), ("top 256", 256)):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--rounds",
                              str(args.rounds), "--one", str(k)],
                             capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[label]
        print(f"{label:17} {r['seconds']:.2f} s for 8 expansions, peak RSS over the loaded"
              f" model {r['peak_over_loaded_mb']:.0f} MB", flush=True)
    base, new = results["whole vocabulary"], results["top 256"]
    print(f"\n{Path(args.model).name} ({base['n_vocab']} tokens): time top-256 / whole"
          f" {new['seconds'] / base['seconds']:.2f}, peak growth"
          f" {new['peak_over_loaded_mb']:.0f} vs {base['peak_over_loaded_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
