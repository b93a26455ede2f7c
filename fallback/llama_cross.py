"""Rerank with a cross-encoder on the CPU: a sequence-classification encoder (bge-reranker,
ms-marco MiniLM cross-encoders; BERT family) read by llama.cpp with its classification head
("rank" pooling). Each (query, document) pair is one sequence; the score is the sigmoid of
the head's output.

Beside the logit reranker: a 0.6B causal model reads QMD's 900-token chunks at minutes per
query on a 4-core ARM CPU; a 22M-parameter cross-encoder reads them in seconds, and its graph
is the BERT graph the NPU path already builds.
"""

from __future__ import annotations

import math
from typing import Any

from npuserve.daemon.models.backend_api import (
    BackendError,
    LoadInfo,
    RerankOutput,
)
from npuserve.daemon.models.qmd_conventions import MIN_DOC_TOKENS
from npuserve.daemon.worker import cancel

from .llama_common import set_threads
from .llama_embed import LlamaEmbedBackend
from .llama_session import LlamaModel


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class LlamaCrossEncoderBackend(LlamaEmbedBackend):
    def load(self) -> LoadInfo:
        self.model = LlamaModel(self.spec.path)
        llama = self.model.lib
        try:
            self.ctx = self._context(llama, llama.LLAMA_POOLING_TYPE_RANK)
        except BaseException:
            self.unload()
            raise
        self.n_batch = int(llama.llama_n_batch(self.ctx))
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        # What rank pooling leaves per sequence: the classification head's outputs.
        self.dim = max(1, int(llama.llama_model_n_cls_out(self.model.ptr)))
        flash = bool(self.spec.option("flash_attn", True))
        self.max_seqs = int(llama.llama_n_seq_max(self.ctx)) if flash else 1
        self._sep = self._separator(llama)
        return LoadInfo(name=self.spec.model_id, tasks=["rerank"], n_ctx=self.spec.n_ctx,
                        details={"pooling": "rank", "labels": self.dim})

    def _separator(self, llama: Any) -> list[int]:
        assert self.model is not None
        sep = int(llama.llama_vocab_sep(self.model.vocab))
        if sep < 0:
            sep = int(llama.llama_vocab_eos(self.model.vocab))
        return [sep] if sep >= 0 else []

    def pair(self, query: list[int], document: str, budget: int) -> tuple[list[int], bool]:
        """[CLS] query [SEP] document [SEP], the document cut to `budget` tokens."""
        doc = self._tokenizer().tokenize(document, add_special=False)
        return query + doc[:budget] + self._sep, len(doc) > budget

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        if self.model is None or not self.ctx:
            raise BackendError("rerank model is not loaded")
        set_threads(self.model.lib, self.ctx, self.spec.threads)
        q = self._tokenizer().tokenize(query)  # [CLS] query [SEP]
        budget = self.spec.n_ctx - len(q) - len(self._sep)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(f"query is too long for the rerank context ({len(q)} tokens,"
                             f" context {self.spec.n_ctx})")
        if max_doc_tokens:
            budget = max(MIN_DOC_TOKENS, min(budget, max_doc_tokens))
        pairs = [self.pair(q, d, budget) for d in documents]
        scores = [0.0] * len(pairs)
        for group in self._groups([toks for toks, _ in pairs]):
            cancel.check()  # between decodes: a client that left stops the rest
            for seq, logits in enumerate(self._decode([pairs[i][0] for i in group])):
                scores[group[seq]] = sigmoid(logits[0])
        return RerankOutput(scores=scores, truncated=[cut for _, cut in pairs],
                            tokens=sum(len(toks) for toks, _ in pairs))

    def embed(self, texts: list[str]) -> Any:
        raise BackendError("a cross-encoder scores pairs; it does not embed")
