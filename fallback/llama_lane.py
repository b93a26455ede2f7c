"""Rerank lanes: llama.cpp contexts over one loaded model, each scoring documents on its
own share of the threads, side by side.

Why: a llama_decode on two threads meets at a barrier after every operation; with a
model as small as a reranker's, those waits cost more than the second thread gains. Two
contexts on one thread each, taking documents in turn, scored 1.09x the documents per
second of one context on two threads here (2 cores, SmolLM2-135M, 118-token paragraphs:
2.78 vs 2.56, median of 12 queries; the two-thread context swung from 2.34 to 2.83, the
lanes stayed within 2.74-2.85). Scores are bit for bit the same: llama.cpp computes each
output of an operation on one thread, whatever the thread count
(tests/test_rerank_scores.py). The weights are shared; each lane costs its own KV cache
and compute buffer, which the scheduler sees in the model's measured footprint.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from npuserve.daemon.models.backend_api import BackendError
from npuserve.daemon.models.qmd_conventions import p_yes
from npuserve.daemon.worker import cancel


class Lane:
    """One context and its batch. For rerank it remembers which prompt prefix its KV
    cells hold at positions 0..len-1, so a document evaluates only its own tokens."""

    def __init__(self, lib: Any, ctx: Any, batch: Any, n_batch: int, owned: bool) -> None:
        self.lib, self.ctx, self.batch, self.n_batch = lib, ctx, batch, n_batch
        self.owned = owned  # the backend's own context is freed by the backend
        # Asked before each decode of a rerank: threads a lane that ran out of documents
        # gave up go to the lanes still working (a long document decodes in several
        # micro-batches, so the last document of a call does not run on one thread).
        self.share: Callable[[], int] | None = None
        # None: the cache holds something else (or a decode failed part-way).
        self.kv_prefix: list[int] | None = None

    def close(self) -> None:
        if self.owned and self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
        self.ctx = self.batch = None

    def set_threads(self, n: int) -> None:
        # Set before every decode, not cached: the backend's own context is also set by
        # expansion and chat (two ints in the context, no cost).
        self.lib.llama_set_n_threads(self.ctx, n, n)

    def clear(self) -> None:
        self.kv_prefix = None
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        for j, (tok, pos, seq, logits) in enumerate(items):
            batch.token[j], batch.pos[j] = tok, pos
            batch.seq_id[j][0], batch.n_seq_id[j], batch.logits[j] = seq, 1, logits
        batch.n_tokens = len(items)
        if self.share is not None:
            self.set_threads(self.share())
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise BackendError(f"llama_decode failed with code {code}")

    def eval(self, tokens: list[int], start: int, seq: int = 0) -> None:
        """Tokens of one sequence from position `start`, logits for the last one."""
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            last = i + len(chunk) == len(tokens)
            self.decode([(t, start + i + k, seq, last and k == len(chunk) - 1)
                         for k, t in enumerate(chunk)])

    def logit_pair(self, a: int, b: int) -> tuple[float, float]:
        logits = ctypes.cast(self.lib.llama_get_logits_ith(self.ctx, -1),
                             ctypes.POINTER(ctypes.c_float))
        return float(logits[a]), float(logits[b])

    def hold_prefix(self, prefix: list[int]) -> int:
        """Make the KV cells hold `prefix`; the tokens that took evaluating.

        Each position's K and V depend only on the tokens up to it, so the cells of the
        part shared with the previous prefix are kept (scores bit for bit the same as from
        an empty cache: tests/test_rerank_scores.py)."""
        if self.kv_prefix == prefix:
            return 0
        keep = shared_length(self.kv_prefix or [], prefix)
        self.kv_prefix = None  # until the new prefix is whole (a decode may fail)
        if keep:
            self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, keep, -1)
        else:
            self.clear()
        self.eval(prefix[keep:], keep)
        self.kv_prefix = prefix
        return len(prefix) - keep

    def p_yes_after(self, prefix_len: int, tokens: list[int], yes: int, no: int) -> float:
        """P(yes) of `tokens` evaluated on top of the held prefix (whose cells stay)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, prefix_len, -1)
        self.eval(tokens, prefix_len)
        return p_yes(*self.logit_pair(yes, no))


def score_in_lanes(lanes: list[Lane], threads: int, prefix: list[int],
                   docs: list[list[int]], yes: int, no: int) -> tuple[list[float], int]:
    """Each document's P(yes) after `prefix`, the documents taken in turn by the lanes
    side by side (the first on this thread: the cancel signal's handler runs here), the
    `threads` shared out among the lanes still working; and the tokens evaluated. A lane
    that fails or sees the call cancelled stops the others after their current document."""
    scores = [0.0] * len(docs)
    turns = itertools.count()  # next() is atomic under the GIL: each document once
    evaluated = [0] * len(lanes)
    errors: list[BaseException] = []
    stop = threading.Event()
    working = list(range(len(lanes)))  # lanes not yet out of documents, in order

    def share(k: int) -> int:
        rank = working.index(k) if k in working else 0
        return max(1, threads // len(working) + (rank < threads % len(working)))

    def work(k: int) -> None:
        lane = lanes[k]
        lane.share = lambda: share(k)
        try:
            evaluated[k] += lane.hold_prefix(prefix)
            while not stop.is_set():
                cancel.check()  # between documents: a client that left stops the rest
                i = next(turns)
                if i >= len(docs):
                    return
                scores[i] = lane.p_yes_after(len(prefix), docs[i], yes, no)
                evaluated[k] += len(docs[i])
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)
            stop.set()
        finally:
            working.remove(k)  # its threads go to the others' next micro-batches
            lane.share = None

    helpers = [threading.Thread(target=work, args=(k,), name=f"rerank-lane-{k}")
               for k in range(1, len(lanes))]
    for t in helpers:
        t.start()
    work(0)
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    return scores, sum(evaluated)


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
