"""The embedding backend's two speed choices, measured in one run against its old path.

    python bench/bench_embed_options.py [--rounds 3]

Baseline: one text per llama_decode, flash attention off (the backend before session 2).
Variants: flash attention on (`models.embed.flash_attn`, the default) and short texts
packed several sequences per decode (the backend's default grouping). Same model
(all-MiniLM-L6-v2 f16 GGUF), same threads, same texts; prints texts/s, the ratio to the
baseline, and the smallest cosine between the variant's vectors and the baseline's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import passage  # noqa: E402

from npuserve.daemon.worker_protocol import ModelSpec  # noqa: E402
from npuserve.fallback.llama_embed import LlamaEmbedBackend  # noqa: E402

SETS = {
    "short (~16 tokens) x128": [f"how do I mount a usb drive on debian {i}" for i in range(128)],
    "passage (~100 tokens) x48": [passage(i) for i in range(48)],
    "long (~440 tokens) x12": [passage(i, n_words=340) for i in range(12)],
}


def model_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    models = os.environ.get("NPUSERVE_TEST_MODELS") or str(Path(base) / "npuserve" / "models")
    return Path(models) / "all-minilm-l6-v2-f16.gguf"


def backend(flash: bool, packed: bool) -> LlamaEmbedBackend:
    b = LlamaEmbedBackend(ModelSpec("bench", "llama_cpp_embed", str(model_path()), 512, 0,
                                    (("flash_attn", flash),)))
    if not packed:  # the old path: every text in a decode of its own
        b._groups = lambda token_lists: [[i] for i in range(len(token_lists))]  # type: ignore[method-assign]
    b.load()
    return b


def measure(b: LlamaEmbedBackend, texts: list[str], rounds: int) -> tuple[float, np.ndarray]:
    vectors = b.embed(texts[:2]).vectors  # warm up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        vectors = b.embed(texts).vectors
        best = max(best, len(texts) / (time.perf_counter() - start))
    return best, vectors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = {"baseline (loop, no flash)": (False, False), "flash attention": (True, False),
                "packing asked, no flash (falls back to the loop)": (False, True),
                "flash + packed (default)": (True, True)}
    results: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    for name, (flash, packed) in variants.items():
        b = backend(flash, packed)
        try:
            results[name] = {k: measure(b, t, args.rounds) for k, t in SETS.items()}
        finally:
            b.unload()
    base = results["baseline (loop, no flash)"]
    print("| variant | workload | texts/s | ratio to baseline | min cosine to baseline |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        for k, (tps, vecs) in rows.items():
            cos = float(np.min(np.sum(vecs * base[k][1], axis=1)))
            print(f"| {name} | {k} | {tps:.1f} | {tps / base[k][0]:.2f} | {cos:.7f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
