"""Embedding on the CPU with llama-cpp-python (any GGUF encoder or embedding model)."""

from __future__ import annotations

from typing import Any

import numpy as np

from npuserve.daemon.backend_api import Backend, BackendError, EmbedOutput, LoadInfo
from npuserve.daemon.worker_protocol import ModelSpec

from .llama_common import close_llama, file_memory_estimate, open_llama, open_vocab, thread_count


class LlamaEmbedBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.llm: Any = None
        self.vocab: Any = None
        self._tail: list[int] = []

    def load(self) -> LoadInfo:
        n_ctx = self.spec.n_ctx
        # n_ubatch must equal n_batch for encoder models: a smaller ubatch makes
        # llama.cpp abort the whole process on the first long input.
        self.llm = open_llama(
            self.spec,
            embedding=True,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=thread_count(self.spec.threads),
            n_threads_batch=thread_count(self.spec.threads),
        )
        self.vocab = self.llm
        self._tail = self._trailing_specials()
        n_ctx = min(n_ctx, self.llm.n_ctx())
        return LoadInfo(
            name=self.spec.model_id,
            tasks=["embed"],
            dim=int(self.llm.n_embd()),
            n_ctx=n_ctx,
            details={"pooling": int(self.llm.pooling_type())},
        )

    def unload(self) -> None:
        close_llama(self.llm)
        self.llm = None
        self.vocab = None

    def _tokenizer(self) -> Any:
        if self.vocab is None:
            self.vocab = open_vocab(self.spec)
        return self.vocab

    def _trailing_specials(self) -> list[int]:
        # Tokens the model appends after the text (BERT's [SEP], an EOS for
        # last-token pooling): truncation must keep them.
        empty = self._tokenizer().tokenize(b"", add_bos=True, special=False)
        return empty[-1:] if len(empty) >= 2 else []

    def tokens(self, text: str) -> tuple[list[int], bool]:
        toks = self._tokenizer().tokenize(text.encode("utf-8"), add_bos=True, special=False)
        limit = self.spec.n_ctx
        if len(toks) <= limit:
            return toks, False
        return toks[: limit - len(self._tail)] + self._tail, True

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer().tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed(self, texts: list[str]) -> EmbedOutput:
        if self.llm is None:
            raise BackendError("embedding model is not loaded")
        import llama_cpp

        llm = self.llm
        dim = int(llm.n_embd())
        pooled = llm.pooling_type() != llama_cpp.LLAMA_POOLING_TYPE_NONE
        out = np.empty((len(texts), dim), dtype=np.float32)
        tokenized = [self.tokens(text) for text in texts]
        truncated = [cut for _, cut in tokenized]
        total = sum(len(toks) for toks, _ in tokenized)
        # Short texts are packed, several sequences per decode (up to n_batch tokens):
        # with flash attention 1.4-1.6x faster for 16-token queries, same vectors; long
        # ones go one per decode, as they fill a batch alone (bench_embed_options.py).
        for group in self._groups([toks for toks, _ in tokenized], llm):
            llm._ctx.kv_cache_clear()
            llm._batch.reset()
            for seq, i in enumerate(group):
                llm._batch.add_sequence(tokenized[i][0], seq, True)
            llm._ctx.decode(llm._batch)
            for seq, i in enumerate(group):
                if pooled:
                    ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq)
                    out[i] = np.ctypeslib.as_array(ptr, shape=(dim,))
                else:  # one sequence per group then (see _groups): mean of its tokens
                    n = len(tokenized[i][0])
                    ptr = llama_cpp.llama_get_embeddings(llm._ctx.ctx)
                    out[i] = np.ctypeslib.as_array(ptr, shape=(n, dim)).mean(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms == 0, 1.0, norms)
        return EmbedOutput(vectors=out, truncated=truncated, tokens=total)

    def _groups(self, token_lists: list[list[int]], llm: Any) -> list[list[int]]:
        """Indices of texts to decode together: consecutive, at most n_batch tokens and
        n_seq_max sequences; one text per decode for unpooled models and without flash
        attention (bench/bench_embed_options.py)."""
        import llama_cpp

        budget = llm.n_batch
        max_seqs = int(getattr(llm.context_params, "n_seq_max", 1) or 1)
        # Without flash attention a packed batch attends over all its tokens (masked):
        # measured 0.45x for short texts, so packing only pays with it on.
        if (llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE
                or not self.spec.option("flash_attn", True)):
            max_seqs = 1
        groups: list[list[int]] = []
        used = 0
        for i, toks in enumerate(token_lists):
            if groups and used + len(toks) <= budget and len(groups[-1]) < max_seqs:
                groups[-1].append(i)
                used += len(toks)
            else:
                groups.append([i])
                used = len(toks)
        return groups

    def memory_estimate(self) -> int:
        return file_memory_estimate(self.spec, per_ctx_token=16 * 1024)
