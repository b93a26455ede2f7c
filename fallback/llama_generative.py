"""Logit rerank and query expansion on the CPU with one causal GGUF model.

Both tasks share the loaded weights, so a model configured for rerank and
expansion is loaded once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from npuserve.daemon.backend_api import (
    Backend,
    BackendError,
    ExpandOutput,
    LoadInfo,
    RerankOutput,
)
from npuserve.daemon.config import DEFAULT_RERANK_TEMPLATE
from npuserve.daemon.qmd_conventions import (
    expansion_grammar,
    expansion_prompt,
    parse_expansion,
    split_rerank_template,
)
from npuserve.daemon.worker_protocol import ModelSpec

from .llama_common import close_llama, file_memory_estimate, open_llama, open_vocab, thread_count

# Tokens a document keeps at least; a query that leaves less room is refused.
MIN_DOC_TOKENS = 16


def p_yes(logit_yes: float, logit_no: float) -> float:
    """softmax([yes, no])[yes], computed stably."""
    return 1.0 / (1.0 + math.exp(logit_no - logit_yes))


class LlamaGenerativeBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.llm: Any = None
        self.vocab: Any = None
        self._yes = self._no = -1
        self._grammar: Any = None

    # --- lifecycle ------------------------------------------------------

    def load(self) -> LoadInfo:
        threads = thread_count(self.spec.threads)
        self.llm = open_llama(
            self.spec,
            n_ctx=self.spec.n_ctx,
            n_batch=min(512, self.spec.n_ctx),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            seed=int(self.spec.option("seed", -1)) & 0xFFFFFFFF,
        )
        self.vocab = self.llm
        self._yes = self._single_token(str(self.spec.option("yes_token", "yes")))
        self._no = self._single_token(str(self.spec.option("no_token", "no")))
        return LoadInfo(
            name=self.spec.model_id,
            tasks=["rerank", "expand"],
            n_ctx=int(self.llm.n_ctx()),
            details={"yes_id": self._yes, "no_id": self._no},
        )

    def unload(self) -> None:
        close_llama(self.llm)
        self.llm = None
        self.vocab = None
        self._grammar = None

    def memory_estimate(self) -> int:
        return file_memory_estimate(self.spec, per_ctx_token=64 * 1024)

    # --- tokens ---------------------------------------------------------

    def _tokenize(self, text: str, special: bool = False) -> list[int]:
        if self.vocab is None:
            self.vocab = open_vocab(self.spec)
        return self.vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _single_token(self, word: str) -> int:
        toks = self._tokenize(word)
        if not toks:
            raise BackendError(f"rerank token {word!r} is empty for this model")
        return toks[0]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    # --- rerank ---------------------------------------------------------

    def rerank(self, query: str, documents: list[str], instruction: str) -> RerankOutput:
        if self.llm is None:
            raise BackendError("rerank model is not loaded")
        llm = self.llm
        template = str(self.spec.option("template", DEFAULT_RERANK_TEMPLATE))
        prefix_text, suffix_text = split_rerank_template(template, instruction, query)
        prefix = self._tokenize(prefix_text, special=True)
        suffix = self._tokenize(suffix_text, special=True)
        budget = llm.n_ctx() - len(prefix) - len(suffix)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(
                f"query is too long for the rerank context ({len(prefix)} prompt tokens,"
                f" context {llm.n_ctx()})"
            )
        # The prefix (system, instruction, query) is evaluated once; each
        # document then only evaluates its own tokens on top of that KV cache.
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(prefix)
        scores: list[float] = []
        truncated: list[bool] = []
        total = len(prefix)
        for doc in documents:
            toks = self._tokenize(doc)
            truncated.append(len(toks) > budget)
            toks = toks[:budget] + suffix
            llm._ctx.kv_cache_seq_rm(0, len(prefix), -1)
            llm.n_tokens = len(prefix)
            llm.eval(toks)
            total += len(toks)
            scores.append(self._last_p_yes())
        return RerankOutput(scores=scores, truncated=truncated, tokens=total)

    def _last_p_yes(self) -> float:
        import llama_cpp

        # With logits_all=False, Llama.scores is not filled for us: read the
        # last position's logits straight from the context.
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))
        return p_yes(float(logits[self._yes]), float(logits[self._no]))

    # --- expansion ------------------------------------------------------

    def expand(self, query: str, intent: str | None, include_lexical: bool) -> ExpandOutput:
        if self.llm is None:
            raise BackendError("expansion model is not loaded")
        from llama_cpp import LlamaGrammar

        opt = self.spec.option
        if self._grammar is None:
            grammar = expansion_grammar(int(opt("max_lines", 6)), int(opt("max_line_chars", 160)))
            self._grammar = LlamaGrammar.from_string(grammar, verbose=False)
        self.llm.reset()
        result = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": expansion_prompt(query, intent)}],
            grammar=self._grammar,
            temperature=float(opt("temperature", 0.7)),
            top_k=int(opt("top_k", 20)),
            top_p=float(opt("top_p", 0.8)),
            presence_penalty=float(opt("presence_penalty", 0.5)),
            max_tokens=int(opt("max_tokens", 600)),
        )
        raw = result["choices"][0]["message"]["content"] or ""
        lines = parse_expansion(raw, query, include_lexical)
        return ExpandOutput(lines=lines, tokens=int(result["usage"]["total_tokens"]), raw=raw)
