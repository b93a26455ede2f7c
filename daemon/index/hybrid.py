"""Hybrid search, as QMD runs it locally: expand -> BM25 + vector lists -> reciprocal-rank
fusion -> rerank the best chunk per document -> position-aware blend.

Constants are QMD's (see ../shared/spec/qmd-remote-protocol.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from npuserve.daemon.index import search
from npuserve.daemon.index.db import VectorsMismatch
from npuserve.daemon.index.embedder import query_text
from npuserve.daemon.index.storage import IndexStorage
from npuserve.daemon.sched.scheduler import Scheduler

RRF_K = 60
ORIGINAL_WEIGHT = 2.0
EXPANSION_WEIGHT = 1.0
RANK0_BONUS = 0.05
RANK12_BONUS = 0.02
RERANK_CANDIDATES = 40
STRONG_SCORE = 0.85
STRONG_GAP = 0.15
# Rerank within a time budget: each candidate is cut to its best-matching window; when even
# windows of MIN_WINDOW_CHARS do not fit, fewer candidates are reranked (never fewer than
# the results asked for).
MIN_WINDOW_CHARS = 400
CANDIDATE_STEPS = (40, 30, 20, 10)
_TERM = re.compile(r"\w{3,}")
T = TypeVar("T")


@dataclass
class Stage:
    name: str
    ran: bool
    ms: float = 0.0
    detail: str = ""


@dataclass
class Trace:
    stages: list[Stage] = field(default_factory=list)

    async def run(self, name: str, work: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        result = await work()
        self.stages.append(Stage(name, True, (time.perf_counter() - start) * 1000))
        return result

    def skip(self, name: str, why: str) -> None:
        self.stages.append(Stage(name, False, 0.0, why))


def rrf(lists: list[tuple[float, list[int]]]) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of (weight, ranked doc ids) lists, with QMD's top-rank bonus."""
    scores: dict[int, float] = {}
    for weight, ranked in lists:
        for rank, doc in enumerate(ranked):
            bonus = RANK0_BONUS if rank == 0 else RANK12_BONUS if rank <= 2 else 0.0
            scores[doc] = scores.get(doc, 0.0) + weight / (RRF_K + rank + 1) + bonus
    return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def blend_weight(rrf_rank: int) -> float:
    """How much the fusion rank counts (vs the reranker) at 1-based position rrf_rank."""
    return 0.75 if rrf_rank <= 3 else 0.60 if rrf_rank <= 10 else 0.40


def strong_signal(hits: list[search.Hit]) -> bool:
    if not hits or hits[0].score < STRONG_SCORE:
        return False
    second = hits[1].score if len(hits) > 1 else 0.0
    return hits[0].score - second >= STRONG_GAP


def best_window(text: str, terms: set[str], chars: int) -> str:
    """The `chars`-long stretch of `text` where the query's terms occur most (the earliest
    of equals); the whole text when it is short enough or `chars` is 0."""
    if not chars or len(text) <= chars:
        return text
    lower = text.lower()
    step = max(1, chars // 4)
    best, best_at = -1, 0
    for start in range(0, len(text) - chars + step, step):
        window = lower[start:start + chars]
        hits = sum(window.count(t) for t in terms)
        if hits > best:
            best, best_at = hits, start
    return text[best_at:best_at + chars]


def fit_candidates(sched: Scheduler, query: str, docs: list[str], limit: int,
                   seconds: float) -> tuple[int, int]:
    """How many of the fused candidates `docs` to rerank, and each one's window in
    characters (0: whole), so the rerank takes about `seconds` by the reranker's measured
    cost. Windows before fewer candidates: a candidate left out is never promoted."""
    if not seconds:
        return len(docs), 0
    counts = sorted({min(len(docs), max(n, limit)) for n in CANDIDATE_STEPS}, reverse=True)
    window = 0
    for n in counts:
        window = sched.rerank_window(query, docs[:n], seconds)
        if window == 0 or window >= MIN_WINDOW_CHARS:
            return n, window
    return counts[-1], window


async def hybrid_query(store: IndexStorage, sched: Scheduler, query: str, limit: int,
                       collection: str | None, intent: str | None, body_chars: int = 0,
                       rerank_seconds: float = 0.0) -> dict[str, Any]:
    trace = Trace()
    per_list = max(limit, RERANK_CANDIDATES)

    def bm25(text: str) -> Awaitable[list[search.Hit]]:
        return store.bm25(text, per_list, collection)

    probe = await trace.run("bm25", lambda: bm25(query))
    variants: list[tuple[str, str]] = []
    if intent is None and strong_signal(probe):
        trace.skip("expand", "strong BM25 signal")
    else:
        expanded = await trace.run("expand", lambda: sched.expand(query, intent, True))
        variants = expanded.lines

    lex = [text for kind, text in variants if kind == "lex" and text != query]
    vec = [text for kind, text in variants if kind in ("vec", "hyde")]
    to_embed = [query_text(query)] + [query_text(t) for t in vec]
    embedded = await trace.run("embed", lambda: sched.embed(to_embed))
    model, dim, fingerprint = await store.vector_model()
    if dim is not None and (dim != embedded.vectors.shape[1] or model != embedded.model
                            or fingerprint not in (None, embedded.fingerprint)):
        raise VectorsMismatch(f"stored vectors were made by a different embedding model"
                              f" ({model}, {fingerprint}); the query's: {embedded.model}"
                              f" ({embedded.fingerprint})")

    async def gather_lists() -> list[tuple[float, list[search.Hit]]]:
        lists: list[tuple[float, list[search.Hit]]] = [(ORIGINAL_WEIGHT, probe)]
        for text in lex:
            lists.append((EXPANSION_WEIGHT, await bm25(text)))
        for i, v in enumerate(embedded.vectors):
            hits = await store.nearest(v, per_list, collection)
            lists.append((ORIGINAL_WEIGHT if i == 0 else EXPANSION_WEIGHT, hits))
        return lists

    lists = await trace.run("search", gather_lists)
    fused = rrf([(w, [h.doc_id for h in hits]) for w, hits in lists])[:RERANK_CANDIDATES]
    if not fused:
        trace.skip("rerank", "no candidates")
        return {"results": [], "total": 0, "stages": _stages(trace)}

    texts = await _best_chunks(store, [d for d, _ in fused], lists)
    rerank_query = f"{intent}\n\n{query}" if intent else query
    count, window = fit_candidates(sched, rerank_query, [texts[d] for d, _ in fused], limit,
                                   rerank_seconds)
    terms = set(_TERM.findall(" ".join([query, *lex]).lower()))
    candidates = fused[:count]
    docs = [best_window(texts[d], terms, window) for d, _ in candidates]
    reranked = await trace.run("rerank", lambda: sched.rerank(rerank_query, docs))
    trace.stages[-1].detail = (f"{count} candidates, "
                               + (f"windows of {window} chars" if window else "whole chunks"))
    final = []
    for pos, ((doc, _), rr) in enumerate(zip(candidates, reranked.scores, strict=True),
                                         start=1):
        w = blend_weight(pos)
        final.append(search.Hit(doc, w * (1.0 / pos) + (1 - w) * rr))
    final.sort(key=lambda h: h.score, reverse=True)
    out = await store.results(final[:limit], "hybrid", body_chars)
    return {"results": out, "total": len(out), "stages": _stages(trace)}


async def _best_chunks(store: IndexStorage, docs: list[int],
                 lists: list[tuple[float, list[search.Hit]]]) -> dict[int, str]:
    """Per document, the chunk the vector lists found best; else its first chunk."""
    best: dict[int, tuple[float, int]] = {}
    for _, hits in lists:
        for h in hits:
            if h.chunk_id is not None and (h.doc_id not in best or h.score > best[h.doc_id][0]):
                best[h.doc_id] = (h.score, h.chunk_id)
    texts = await store.chunk_texts([cid for _, cid in best.values()])
    out = {doc: texts[cid] for doc, (_, cid) in best.items() if cid in texts}
    missing = [d for d in docs if d not in out]
    for doc, (_, text) in (await store.first_chunks(missing)).items():
        out[doc] = text
    for d in docs:
        out.setdefault(d, "")
    return out


def _stages(trace: Trace) -> list[dict[str, Any]]:
    return [{"name": s.name, "ran": s.ran, "ms": round(s.ms, 1), **({"detail": s.detail}
                                                                     if s.detail else {})}
            for s in trace.stages]
