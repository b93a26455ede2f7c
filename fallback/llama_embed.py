"""Embedding on the CPU with llama.cpp (any GGUF encoder or embedding model).

Written against llama.cpp's C API through llama-cpp-python's ctypes bindings alone
(`llama_bindings.lib()`), not its high-level `Llama`: the worker then never imports
numpy, jinja2 or the chat formats (22 MB measured), and the decode loop is ours anyway —
short texts packed several sequences per decode, long ones alone.
"""

from __future__ import annotations

import ctypes
from array import array
from pathlib import Path
from typing import Any

from npuserve.daemon.models.backend_api import (
    Backend,
    BackendError,
    EmbedOutput,
    LoadInfo,
    ModelLoadError,
)
from npuserve.daemon.models.vector_rows import VectorRows, l2_normalized
from npuserve.daemon.worker.protocol import ModelSpec

from .llama_common import set_threads, thread_count
from .llama_session import LlamaModel, LlamaSession

# Sequences one decode may pack. llama.cpp keeps an output row of n_vocab + n_embd floats
# per sequence slot and clears it all at context creation: llama-cpp-python's 256 slots
# cost 30 MB of RSS for MiniLM before the first request; 32 slots cost 4 MB and fill a
# 512-token batch with 16-token queries, which is where packing pays
# (docs/benchmarks.md, design notes).
MAX_PACKED_SEQUENCES = 32
# Tokens one packed decode may hold. Every token of an embedding batch is an output row of
# n_vocab + n_embd floats (123 KB for MiniLM), allocated and cleared at the batch's size:
# packing up to 512 tokens held 63 MB more RSS than packing up to 128, and was no faster
# (measured: 64 queries, 16 passages). Longer texts still go alone, up to n_ctx.
PACK_TOKENS = 128


class LlamaEmbedBackend(LlamaSession, Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: LlamaModel | None = None
        self.ctx: Any = None
        self.batch: Any = None
        self.vocab: LlamaModel | None = None  # tokenizer-only, when not loaded
        self.dim = 0
        self.n_batch = 0
        self.max_seqs = 1
        self._tail: list[int] = []

    # --- lifecycle ---------------------------------------------------------------

    def load(self) -> LoadInfo:
        self.model = LlamaModel(self.spec.path)
        llama = self.model.lib
        try:
            self.ctx = self._context(llama, llama.LLAMA_POOLING_TYPE_UNSPECIFIED)
            if llama.llama_pooling_type(self.ctx) == llama.LLAMA_POOLING_TYPE_NONE:
                # A model without pooling metadata: mean-pool in the graph, as
                # sentence-transformers does for such models.
                llama.llama_free(self.ctx)
                self.ctx = self._context(llama, llama.LLAMA_POOLING_TYPE_MEAN)
        except BaseException:
            self.unload()
            raise
        self.n_batch = int(llama.llama_n_batch(self.ctx))
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self.dim = int(llama.llama_model_n_embd(self.model.ptr))
        # Without flash attention a packed batch attends over all its tokens (masked):
        # measured 0.45x for short texts, so packing only pays with it on.
        flash = bool(self.spec.option("flash_attn", True))
        self.max_seqs = int(llama.llama_n_seq_max(self.ctx)) if flash else 1
        self._tail = self._trailing_specials()
        return LoadInfo(name=self.spec.model_id, tasks=["embed"], dim=self.dim,
                        n_ctx=min(self.spec.n_ctx, int(llama.llama_n_ctx(self.ctx))),
                        details={"pooling": int(llama.llama_pooling_type(self.ctx))})

    def _context(self, llama: Any, pooling: int) -> Any:
        assert self.model is not None
        n_ctx = self.spec.n_ctx
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        # n_ubatch must equal n_batch for encoder models: a smaller ubatch makes
        # llama.cpp abort the whole process on the first long input.
        params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = max(1, min(MAX_PACKED_SEQUENCES, n_ctx,
                                      llama.llama_max_parallel_sequences()))
        params.kv_unified = True  # causal embedders: any sequence may use the whole context
        params.embeddings = True
        params.pooling_type = pooling
        params.n_threads = params.n_threads_batch = thread_count(self.spec.threads)
        # Flash attention: measured ~1.5x (100-token) to ~2x (440-token) faster embeddings
        # on this CPU with vectors unchanged (docs/benchmarks.md, design notes).
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
                                  if self.spec.option("flash_attn", True)
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = llama.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise ModelLoadError(f"cannot create a context for {Path(self.spec.path).name}")
        return ctx

    # --- tokens ------------------------------------------------------------------

    def _trailing_specials(self) -> list[int]:
        # Tokens the model appends after the text (BERT's [SEP], an EOS for
        # last-token pooling): truncation must keep them.
        # A model that adds only an EOS (Qwen3-Embedding) has one token here, which is
        # no BOS; one that adds only a BOS has nothing to keep.
        vocab = self._tokenizer()
        empty = vocab.tokenize("")
        bos = int(vocab.lib.llama_vocab_bos(vocab.vocab))
        return empty[-1:] if empty and empty[-1] != bos else []

    def tokens(self, text: str) -> tuple[list[int], bool]:
        toks = self._tokenizer().tokenize(text)
        limit = self.spec.n_ctx
        if len(toks) <= limit:
            return toks, False
        return toks[: limit - len(self._tail)] + self._tail, True

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer().tokenize(text))

    # --- embedding ---------------------------------------------------------------

    def embed(self, texts: list[str]) -> EmbedOutput:
        if self.model is None or not self.ctx:
            raise BackendError("embedding model is not loaded")
        tokenized = [self.tokens(text) for text in texts]
        set_threads(self.model.lib, self.ctx, self.spec.threads)
        rows: list[list[float]] = [[] for _ in texts]
        # Short texts are packed, several sequences per decode (up to PACK_TOKENS):
        # with flash attention 1.4-1.9x faster for 16-token queries, same vectors; long
        # ones go one per decode, as they fill a batch alone (docs/benchmarks.md, design notes).
        for group in self._groups([toks for toks, _ in tokenized]):
            for seq, vec in enumerate(self._decode([tokenized[i][0] for i in group])):
                rows[group[seq]] = vec
        data = array("f")
        for vec in rows:
            data.extend(l2_normalized(vec))
        return EmbedOutput(vectors=VectorRows(data.tobytes(), self.dim),
                           truncated=[cut for _, cut in tokenized],
                           tokens=sum(len(toks) for toks, _ in tokenized))

    def _decode(self, sequences: list[list[int]]) -> list[list[float]]:
        """One llama_decode of whole sequences; their pooled embeddings."""
        assert self.model is not None
        llama, batch = self.model.lib, self.batch
        memory = llama.llama_get_memory(self.ctx)
        if memory:  # causal embedders keep a KV cache; encoders have none
            llama.llama_memory_clear(memory, True)
        j = 0
        for seq, toks in enumerate(sequences):
            for pos, tok in enumerate(toks):
                batch.token[j], batch.pos[j] = tok, pos
                batch.seq_id[j][0], batch.n_seq_id[j], batch.logits[j] = seq, 1, True
                j += 1
        batch.n_tokens = j
        code = llama.llama_decode(self.ctx, batch)
        if code != 0:
            raise BackendError(f"llama_decode failed with code {code}")
        out = []
        for seq in range(len(sequences)):
            ptr = llama.llama_get_embeddings_seq(self.ctx, seq)
            if not ptr:
                raise BackendError("llama.cpp returned no embedding")
            out.append(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))[: self.dim])
        return out

    def _groups(self, token_lists: list[list[int]]) -> list[list[int]]:
        """Indices of texts to decode together: consecutive, at most PACK_TOKENS tokens
        and max_seqs sequences (1 without flash attention); a longer text alone."""
        groups: list[list[int]] = []
        used = 0
        budget = min(PACK_TOKENS, self.n_batch)
        for i, toks in enumerate(token_lists):
            if groups and used + len(toks) <= budget and len(groups[-1]) < self.max_seqs:
                groups[-1].append(i)
                used += len(toks)
            else:
                groups.append([i])
                used = len(toks)
        return groups


