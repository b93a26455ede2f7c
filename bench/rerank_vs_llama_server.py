"""npuserve's logit rerank against llama.cpp's own server doing the same work, in one run.

Same SmolLM2 GGUF, same prompts token for token, 3 queries x 20 paragraphs of the
standard library's documentation (~100 tokens each):

  npuserve      one POST /rerank of the 20 paragraphs per query (the embedded default,
                its defaults: two rerank lanes of one thread each)
  llama-server  what a client of llama.cpp would do: per paragraph, POST /completion with
                the whole prompt as token ids, `cache_prompt: true` (the query's prefix is
                kept in the slot's KV cache between paragraphs), `n_predict: 1`, `n_probs`
                to read P(yes); its defaults otherwise (batch 2048, micro-batch 512,
                flash attention auto), the same thread count, and no host-memory prompt
                cache (`--cache-ram 0`: it would answer the repeated rounds from RAM)
  llama-server -fa off   the same with flash attention off, the attention kernel npuserve's
                rerank uses (on the CPU, flash attention moves P(yes) by up to 0.1)

Prints documents per second for each, and for each arm its ratio to both llama-server
arms (higher is better for npuserve; target >= 1.0 without changing scores) with the
median and largest difference between their P(yes).

    python bench/bench_peers.py --setup   # once: builds llama-server (cached)
    python bench/rerank_vs_llama_server.py [--rounds 5] [--threads N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import free_port, post, start_daemon, wait_ready  # noqa: E402
from bench_peers import CACHE, build_llama_server  # noqa: E402
from stdlib_corpus import MODULES, render  # noqa: E402

QUERIES = ["how do I compress a directory into an archive", "parse command line options",
           "send an email message"]


def paragraphs(n: int = 20) -> list[str]:
    """n paragraphs of ~400 characters (~100 tokens), one per module, from past the
    boilerplate every pydoc page starts with."""
    return [render(name, 1400)[1000:] for name in MODULES[:n]]


def prompts(model: Path, query: str, docs: list[str]) -> tuple[list[list[int]], int, int]:
    """The token ids npuserve's reranker evaluates for each document, and yes/no ids."""
    from npuserve.daemon.config import DEFAULT_INSTRUCTION
    from npuserve.daemon.models.qmd_conventions import split_rerank_template
    from npuserve.daemon.models.store import SMOLLM2_RERANK_TEMPLATE
    from npuserve.fallback.llama_session import LlamaModel

    vocab = LlamaModel(str(model), vocab_only=True)
    try:
        prefix, suffix = split_rerank_template(SMOLLM2_RERANK_TEMPLATE, DEFAULT_INSTRUCTION,
                                               query)
        head = vocab.tokenize(prefix, add_special=False, parse_special=True)
        tail = vocab.tokenize(suffix, add_special=False, parse_special=True)
        out = [head + vocab.tokenize(d, add_special=False) + tail for d in docs]
        yes = vocab.tokenize("yes", add_special=False)[0]
        no = vocab.tokenize("no", add_special=False)[0]
        return out, yes, no
    finally:
        vocab.close()


Scores = list[list[float]]


def npuserve_round(base: str, docs: list[str]) -> Scores:
    scores = []
    for q in QUERIES:
        out = post(base + "/rerank", {"query": q, "documents": [
            {"file": str(i), "text": d} for i, d in enumerate(docs)]})
        assert isinstance(out, dict)
        by_file = {int(r["file"]): r["score"] for r in out["results"]}
        scores.append([by_file[i] for i in range(len(docs))])
    return scores


def start_npuserve(state: Path, threads: int, extra: list[str]
                   ) -> tuple[subprocess.Popen[bytes] | None, Callable[[list[str]], Scores]]:
    proc, base = start_daemon(state, ["scheduler.keep_alive=-1",
                                      f"models.rerank.threads={threads}", *extra])
    post(base + "/rerank", {"query": "warm up", "documents": [{"file": "w", "text": "x"}]})
    return proc, lambda docs: npuserve_round(base, docs)


def start_in_process(model: Path, threads: int
                     ) -> tuple[None, Callable[[list[str]], Scores]]:
    """npuserve's backend called directly, no daemon: the engine's own cost, to tell the
    daemon's overhead (HTTP, worker hop, slicing) from llama.cpp's work."""
    from npuserve.daemon.config import DEFAULT_INSTRUCTION
    from npuserve.daemon.models.store import SMOLLM2_RERANK_TEMPLATE
    from npuserve.daemon.worker.protocol import ModelSpec
    from npuserve.fallback.llama_generative import LlamaGenerativeBackend

    backend = LlamaGenerativeBackend(ModelSpec(
        "bench", "llama_cpp_generative", str(model), 2048, threads,
        (("template", SMOLLM2_RERANK_TEMPLATE),)))
    backend.load()
    return None, lambda docs: [backend.rerank(q, docs, DEFAULT_INSTRUCTION).scores
                               for q in QUERIES]


def start_llama_server(model: Path, threads: int, flash: str = "auto"
                       ) -> tuple[subprocess.Popen[bytes] | None, Callable[[list[str]], Scores]]:
    port = free_port()
    proc = subprocess.Popen([str(CACHE / "llama-server"), "-m", str(model), "-c", "2048",
                             "-t", str(threads), "-tb", str(threads), "--parallel", "1",
                             "--cache-ram", "0", "-fa", flash, "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health")
    by_query: list[tuple[list[list[int]], int, int]] = []

    def one_round(docs: list[str]) -> Scores:
        if not by_query:
            by_query.extend(prompts(model, q, docs) for q in QUERIES)
        return [[p_yes_of(post(base + "/completion", {
            "prompt": t, "n_predict": 1, "cache_prompt": True, "n_probs": 100,
            "temperature": 0, "post_sampling_probs": False}), yes, no) for t in toks]
            for toks, yes, no in by_query]

    post(base + "/completion", {"prompt": "warm up", "n_predict": 1})
    return proc, one_round


def p_yes_of(body: object, yes: int, no: int) -> float:
    """softmax([yes, no])[yes] from the top log-probabilities llama-server returns (NaN
    when either token is not among them)."""
    assert isinstance(body, dict)
    top = body["completion_probabilities"][0]["top_logprobs"]
    lp = {t["id"]: t["logprob"] for t in top}
    if yes not in lp or no not in lp:
        return math.nan
    return 1.0 / (1.0 + math.exp(lp[no] - lp[yes]))


def score_gap(ours: Scores, theirs: Scores) -> str:
    """Median and largest |difference| of two runs' P(yes) (NaN: not among the top 100)."""
    diffs = [abs(a - b) for qa, qb in zip(ours, theirs, strict=True)
             for a, b in zip(qa, qb, strict=True) if not math.isnan(b)]
    return f"median {statistics.median(diffs):.1e}, largest {max(diffs):.1e}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="also run an npuserve with these settings (an A/B of a change)")
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    build_llama_server()
    models = load_config(None).models_dir
    model = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    docs = paragraphs()
    rates: dict[str, list[float]] = {}
    scores: dict[str, Scores] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers: dict[str, tuple[subprocess.Popen[bytes] | None,
                                 Callable[[list[str]], Scores]]] = {}
        for name, extra in [("npuserve", []), ("npuserve " + " ".join(args.set), args.set)
                            ][:2 if args.set else 1]:
            state = Path(tmp) / str(len(servers))
            state.mkdir()
            (state / "models").symlink_to(models)
            servers[name] = start_npuserve(state, args.threads, extra)
        servers["npuserve backend in-process"] = start_in_process(model, args.threads)
        servers["llama-server"] = start_llama_server(model, args.threads)
        # The same attention kernel as npuserve's rerank (flash attention off): the engines
        # compared alone, apart from the kernel choice.
        servers["llama-server -fa off"] = start_llama_server(model, args.threads, "off")
        try:
            # Rounds alternate between the servers, all started and idle but the one
            # measured: drift of the machine falls on each alike.
            for r in range(args.rounds):
                for name, (_, one_round) in servers.items():
                    start = time.perf_counter()
                    scores[name] = one_round(docs)
                    rate = len(QUERIES) * len(docs) / (time.perf_counter() - start)
                    rates.setdefault(name, []).append(rate)
                    print(f"  round {r + 1} {name}: {rate:.2f} documents/s", flush=True)
        finally:
            for proc, _ in servers.values():
                if proc is None:
                    continue
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    theirs = statistics.median(rates["llama-server"])
    same_kernel = statistics.median(rates["llama-server -fa off"])
    print(f"rerank, {len(QUERIES)} queries x {len(docs)} paragraphs (~100 tokens),"
          f" {args.threads} threads, median of {args.rounds} interleaved rounds")
    for name, rs in rates.items():
        print(f"  {name:<30} {statistics.median(rs):5.2f} documents/s")
        for peer, rate in (("llama-server", theirs), ("llama-server -fa off", same_kernel)):
            if name == peer or (name == "llama-server" and peer.endswith("off")):
                continue
            print(f"      {statistics.median(rs) / rate:5.2f}x {peer}; P(yes) against its"
                  f" scores: {score_gap(scores[name], scores[peer])}")
    if args.set:
        a, b = list(scores)[:2]
        moved = max(abs(x - y) for qa, qb in zip(scores[a], scores[b], strict=True)
                    for x, y in zip(qa, qb, strict=True))
        print(f"  largest P(yes) change between the two npuserve runs: {moved:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
