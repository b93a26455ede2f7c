"""Two comparisons for QMD's clients, each in one job on this machine:

1. Rerank of QMD-sized chunks (20 documents x ~900 tokens, 3 queries): the logit reranker
   (SmolLM2, the embedded default) against a cross-encoder of MiniLM's size (all-MiniLM-L6-v2
   with a classification head, built as tests/gguf_builders.py builds it: the graph and cost
   of an ms-marco MiniLM cross-encoder; its random head makes its scores meaningless, so only
   time is compared). Prints seconds per query and the ratio; and the logit reranker on
   one lane (one context on every thread) against its default two (fallback/llama_lane.py).
2. Expansion through /v1/chat/completions (QMD's OpenAI-style clients) against /expand, on
   two fresh daemons with the same seed: whether the lines are identical, and the time ratio.

Usage: python bench/bench_rerankers.py
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_core import post, start_daemon  # noqa: E402
from stdlib_corpus import MODULES, render  # noqa: E402

from tests.gguf_builders import cross_encoder_from  # noqa: E402

QUERIES = ["how do I compress a directory into an archive", "parse command line options",
           "send an email message"]
EXPAND_QUERIES = ["compress files with gzip", "thread locks", "parse toml configuration"]


def chunks() -> list[str]:
    """20 chunks of ~900 tokens (~3,600 characters) of the standard library's docs."""
    out = []
    for name in MODULES:
        text = render(name, 3600)
        if len(text) >= 3400:
            out.append(text)
        if len(out) == 20:
            return out
    return out


def time_reranks(state: Path, settings: list[str], docs: list[str]) -> float:
    proc, base = start_daemon(state, settings)
    try:
        post(base + "/rerank", {"query": "warm up", "documents": [{"file": "w", "text": "x"}]})
        secs = []
        for q in QUERIES:
            start = time.perf_counter()
            post(base + "/rerank", {"query": q, "documents": [
                {"file": f"{i}", "text": d} for i, d in enumerate(docs)]})
            secs.append(time.perf_counter() - start)
        return statistics.median(secs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def expansions(state: Path, chat: bool) -> tuple[list[list[str]], float]:
    proc, base = start_daemon(state, ["models.expand.seed=42"])
    try:
        post(base + "/expand", {"query": "warm up"} if not chat else {"query": "warm up"})
        out, spent = [], 0.0
        for q in EXPAND_QUERIES:
            start = time.perf_counter()
            if chat:
                body = post(base + "/v1/chat/completions", {"messages": [
                    {"role": "user", "content": f"Expand this search query: {q}"}],
                    "temperature": 0.7, "max_tokens": 200})
                assert isinstance(body, dict)
                lines = [x for x in body["choices"][0]["message"]["content"].splitlines() if x]
            else:
                items = post(base + "/expand", {"query": q})
                assert isinstance(items, list)
                lines = [f"{x['type']}: {x['text']}" for x in items]
            spent += time.perf_counter() - start
            out.append(lines)
        return out, spent
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    from npuserve.daemon.config import load_config

    models = load_config(None).models_dir
    docs = chunks()
    with tempfile.TemporaryDirectory() as tmp:
        cross = cross_encoder_from(models / "all-minilm-l6-v2-f16.gguf",
                                   Path(tmp) / "minilm-cross-encoder.gguf")
        states = []
        for name in ("logit", "cross", "expand", "chat", "one-lane"):
            state = Path(tmp) / name
            state.mkdir()
            (state / "models").symlink_to(models)
            states.append(state)
        logit = time_reranks(states[0], ["scheduler.keep_alive=-1"], docs)
        cross_s = time_reranks(states[1], ["scheduler.keep_alive=-1",
                                           f"models.rerank.path={cross}",
                                           "models.rerank.n_ctx=512"], docs)
        one_lane = time_reranks(states[4], ["scheduler.keep_alive=-1",
                                            "models.rerank.lanes=1"], docs)
        by_expand, t_expand = expansions(states[2], chat=False)
        by_chat, t_chat = expansions(states[3], chat=True)
    print(f"rerank, {len(docs)} documents x ~900 tokens, median of {len(QUERIES)} queries:"
          f" logit reranker {logit:.1f} s, cross-encoder {cross_s:.1f} s;"
          f" ratio {logit / cross_s:.1f}x faster with the cross-encoder"
          " (its 512-token context cuts each chunk)")
    print(f"logit reranker on one lane {one_lane:.1f} s against two lanes {logit:.1f} s:"
          f" {one_lane / logit:.2f}x faster with two")
    same = by_expand == by_chat
    print(f"expansion of {len(EXPAND_QUERIES)} queries, seed 42: /expand {t_expand:.1f} s,"
          f" /v1/chat/completions {t_chat:.1f} s (ratio {t_chat / t_expand:.2f});"
          f" lines identical: {same}")
    print(json.dumps({"expand": by_expand, "chat": by_chat}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
