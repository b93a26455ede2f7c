"""Logit rerank and query expansion on the CPU with one causal GGUF model.

Both tasks share the loaded weights, so a model configured for rerank and expansion is
loaded once. Written on llama.cpp's C API (`llama_bindings.lib()`): expansion decodes
several requests' sequences per step (one llama_decode for all of them), which the
high-level `Llama` cannot, and the worker needs neither numpy nor jinja2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npuserve.daemon.config import DEFAULT_RERANK_TEMPLATE
from npuserve.daemon.models.backend_api import (
    Backend,
    BackendError,
    ExpandOutput,
    ExpandRequest,
    LoadInfo,
    ModelLoadError,
    RerankOutput,
)
from npuserve.daemon.models.qmd_conventions import (
    MIN_DOC_TOKENS,
    expansion_prompt,
    p_yes,
    parse_expansion,
    split_rerank_template,
)
from npuserve.daemon.worker import cancel
from npuserve.daemon.worker.protocol import ModelSpec

from .llama_chat import ChatGeneration
from .llama_common import set_threads, thread_count, threads_for_call
from .llama_lane import Lane, score_in_lanes
from .llama_sampling import (
    Sampler,
    allows,
    chat_tokens,
    constrained_pick,
    expansion_budget,
    expansion_sampler,
    free_sampler,
    grammar_sampler,
    keep,
    next_seed,
    piece,
)
from .llama_session import LlamaModel, LlamaSession

# Expansions generated together, one token each per decode: a step of a small model is
# memory-bound, so eight sequences cost little more than one (bench/bench_scheduler.py).
MAX_PARALLEL_EXPANSIONS = 8
DEFAULT_UBATCH = 128
# Rerank contexts side by side, one thread each on two cores (fallback/llama_lane.py).
DEFAULT_LANES = 2

@dataclass
class _Sequence:
    """One expansion in flight: its sampler, output bytes, where it stands."""

    index: int
    prompt: list[int]
    sampler: Sampler
    out: bytearray
    generated: int = 0
    logits_at: int = -1  # batch position of its last token's logits
    done: bool = False


class LlamaGenerativeBackend(ChatGeneration, LlamaSession, Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: LlamaModel | None = None
        self.ctx: Any = None
        self.batch: Any = None
        self.vocab: LlamaModel | None = None
        self.n_ctx = 0
        self.n_batch = 0
        self._yes = self._no = -1
        self._seed = 0
        self._ctx_kind: tuple[int, bool] = (0, False)
        # The backend's own context as a lane (remade with the context). A long rerank
        # arrives in slices, each a call with the same query: each lane keeps the query's
        # prefix in its KV cells, so it is evaluated once per lane, not once per slice.
        self._main: Lane | None = None
        self._extra_lanes: list[Lane] = []  # more rerank contexts over the same weights

    # --- lifecycle ------------------------------------------------------

    def load(self) -> LoadInfo:
        self.model = LlamaModel(self.spec.path)
        try:
            self._open_context(1, self._flash("rerank"))
        except BackendError as exc:
            self.unload()
            raise ModelLoadError(str(exc)) from exc
        self._seed = int(self.spec.option("seed", -1)) & 0xFFFFFFFF
        self._yes = self._single_token(str(self.spec.option("yes_token", "yes")))
        self._no = self._single_token(str(self.spec.option("no_token", "no")))
        return LoadInfo(name=self.spec.model_id, tasks=["rerank", "expand", "generate"],
                        n_ctx=self.n_ctx,
                        details={"yes_id": self._yes, "no_id": self._no})

    def unload(self) -> None:
        for lane in self._extra_lanes:
            lane.close()
        self._extra_lanes = []
        self._main = None
        super().unload()

    def _flash(self, task: str) -> bool:
        """Flash attention for a task: off for rerank by default (on the CPU it made P(yes)
        depend on how the prompt was split into decodes: up to 0.1), on for expansion."""
        return bool(self.spec.option(f"{task}_flash_attn",
                                     self.spec.option("flash_attn", task == "expand")))

    def _new_context(self, n_seq: int, flash: bool) -> Any:
        """A llama.cpp context over the loaded weights (NULL when llama.cpp cannot make it).

        One sequence (rerank, a lone expansion) gets all of n_ctx in one stream. Several
        (expansions side by side) get a stream each of n_ctx / n_seq cells, so no
        sequence's attention spans another's cells: with one unified stream and prompts
        decoded together, 3 of 8 greedy expansions differed from the same request alone
        (tests/test_expansion_sampling.py). A context costs ~30 ms to make, against
        seconds of generation.
        """
        assert self.model is not None
        llama = self.model.lib
        params = llama.llama_context_default_params()
        params.n_ctx = self.spec.n_ctx
        # llama.cpp reserves its compute buffer for logits over the whole vocabulary at
        # every position of a micro-batch: 515 MB for gemma-3-270m (262k tokens) at 512,
        # 129 MB at 128. Rerank and expansion need logits at one position per sequence,
        # and their documents and prompts are short, so small micro-batches cost little
        # speed (docs/benchmarks.md, design notes) and keep the memory.
        ubatch = int(self.spec.option("n_ubatch", DEFAULT_UBATCH))
        # A generation step decodes one token of every parallel sequence at once.
        params.n_batch = params.n_ubatch = max(MAX_PARALLEL_EXPANSIONS,
                                               min(ubatch, self.spec.n_ctx))
        params.n_seq_max = n_seq
        params.kv_unified = n_seq == 1
        params.n_threads = params.n_threads_batch = thread_count(self.spec.threads)
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        return llama.llama_init_from_model(self.model.ptr, params)

    def _open_context(self, n_seq: int, flash: bool) -> None:
        """The backend's own context for `n_seq` sequences (kept while the count and
        kernel stay the same)."""
        assert self.model is not None
        if self.ctx and self._ctx_kind == (n_seq, flash):
            return
        llama = self.model.lib
        self._main = None
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        self.ctx = self._new_context(n_seq, flash)
        if not self.ctx:
            raise BackendError(f"cannot create a context for {Path(self.spec.path).name}"
                               f" ({n_seq} sequences)")
        self._ctx_kind = (n_seq, flash)
        if self.batch is None:
            self.n_ctx = int(llama.llama_n_ctx(self.ctx))
            self.n_batch = int(llama.llama_n_batch(self.ctx))
            self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._main = Lane(llama, self.ctx, self.batch, self.n_batch, owned=False)

    def _lanes(self, wanted: int) -> list[Lane]:
        """The backend's context (opened for rerank) and up to `wanted` - 1 more, made on
        first use; fewer when llama.cpp cannot make another (memory): rerank then runs on
        the lanes it has."""
        assert self.model is not None
        self._open_context(1, self._flash("rerank"))
        llama = self.model.lib
        while len(self._extra_lanes) < wanted - 1:
            ctx = self._new_context(1, self._flash("rerank"))
            if not ctx:
                break
            batch = llama.llama_batch_init(self.n_batch, 0, 1)
            self._extra_lanes.append(Lane(llama, ctx, batch, self.n_batch, owned=True))
        assert self._main is not None
        return [self._main, *self._extra_lanes[:wanted - 1]]

    # --- tokens ---------------------------------------------------------

    def _tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._tokenizer().tokenize(text, add_special=False, parse_special=special)

    def _single_token(self, word: str) -> int:
        toks = self._tokenize(word)
        if not toks:
            raise BackendError(f"rerank token {word!r} is empty for this model")
        return toks[0]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    # --- decoding on the backend's own context -------------------------

    def _clear(self) -> None:
        assert self._main is not None
        self._main.clear()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        assert self._main is not None
        self._main.decode(items)

    def _eval(self, tokens: list[int], start: int, seq: int = 0) -> None:
        assert self._main is not None
        self._main.eval(tokens, start, seq)

    def p_yes_of(self, tokens: list[int]) -> float:
        """P(yes) after a whole prompt evaluated from scratch (the no-reuse baseline)."""
        self._open_context(1, self._flash("rerank"))
        self._clear()
        self._eval(tokens, 0)
        assert self._main is not None
        return p_yes(*self._main.logit_pair(self._yes, self._no))

    # --- rerank ---------------------------------------------------------

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        if self.model is None:
            raise BackendError("rerank model is not loaded")
        template = str(self.spec.option("template", DEFAULT_RERANK_TEMPLATE))
        prefix_text, suffix_text = split_rerank_template(template, instruction, query)
        prefix = self._tokenize(prefix_text, special=True)
        suffix = self._tokenize(suffix_text, special=True)
        budget = self.n_ctx - len(prefix) - len(suffix)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(
                f"query is too long for the rerank context ({len(prefix)} prompt tokens,"
                f" context {self.n_ctx})"
            )
        if max_doc_tokens:
            budget = max(MIN_DOC_TOKENS, min(budget, max_doc_tokens))
        tokenized = [self._tokenize(doc) for doc in documents]
        truncated = [len(toks) > budget for toks in tokenized]
        # The prefix (system, instruction, query) is evaluated once per lane; each
        # document then only evaluates its own tokens on top of that KV cache.
        threads = threads_for_call(self.spec.threads)
        wanted = min(int(self.spec.option("lanes", DEFAULT_LANES)), threads,
                     max(1, len(documents)))
        scores, total = score_in_lanes(self._lanes(wanted), threads, prefix,
                                       [toks[:budget] + suffix for toks in tokenized],
                                       self._yes, self._no)
        return RerankOutput(scores=scores, truncated=truncated, tokens=total)

    # --- expansion ------------------------------------------------------

    def expand(self, query: str, intent: str | None, include_lexical: bool) -> ExpandOutput:
        return self.expand_many([ExpandRequest(query, intent, include_lexical)])[0]

    def expand_many(self, requests: list[ExpandRequest]) -> list[ExpandOutput]:
        """Expansions generated side by side: as many sequences per step as the context
        holds at their worst-case length (prompt + max_tokens), at most
        MAX_PARALLEL_EXPANSIONS."""
        if self.model is None:
            raise BackendError("expansion model is not loaded")
        max_new = self._max_new_tokens()
        prompts = [self._chat_prompt(expansion_prompt(r.query, r.intent)) for r in requests]
        raws: list[tuple[str, int]] = [("", 0)] * len(requests)
        needs = [len(prompt) + max_new for prompt in prompts]
        for prompt, need in zip(prompts, needs, strict=True):
            if need > self.n_ctx:
                raise ValueError(f"the expansion prompt ({len(prompt)} tokens) and max_tokens"
                                 f" ({max_new}) exceed the model's context ({self.n_ctx})")
        start = 0
        while start < len(prompts):
            # k sequences side by side get n_ctx / k cells each: grow k while the longest
            # of them still fits its share.
            k = 1
            while (start + k < len(prompts) and k < MAX_PARALLEL_EXPANSIONS
                   and max(needs[start:start + k + 1]) * (k + 1) <= self.n_ctx):
                k += 1
            self._generate(list(range(start, start + k)), prompts, max_new, raws)
            start += k
        return [ExpandOutput(lines=parse_expansion(raw, r.query, r.include_lexical),
                             tokens=tokens, raw=raw)
                for r, (raw, tokens) in zip(requests, raws, strict=True)]

    def _max_new_tokens(self) -> int:
        return expansion_budget(self.spec.option)

    def _generate(self, group: list[int], prompts: list[list[int]], max_new: int,
                  raws: list[tuple[str, int]]) -> None:
        assert self.model is not None
        llama = self.model.lib
        self._open_context(len(group), self._flash("expand"))
        set_threads(llama, self.ctx, self.spec.threads)
        seqs = [_Sequence(i, prompts[i], self._sampler(), bytearray()) for i in group]
        try:
            self._clear()
            # Each sequence's prompt at its own seq id, n_batch tokens per decode, all but
            # the last tokens; then the last tokens together, whose logits the first
            # sampling step reads (an earlier decode's logits would be overwritten).
            body = [(t, p, s_id, False) for s_id, seq in enumerate(seqs)
                    for p, t in enumerate(seq.prompt[:-1])]
            for start in range(0, len(body), self.n_batch):
                self._decode(body[start:start + self.n_batch])
            self._decode([(seq.prompt[-1], len(seq.prompt) - 1, s_id, True)
                          for s_id, seq in enumerate(seqs)])
            for s_id, seq in enumerate(seqs):
                seq.logits_at = s_id
            vocab = self.model.vocab
            while True:
                cancel.check()  # between generated tokens
                step: list[tuple[int, int, int, bool]] = []
                for s_id, seq in enumerate(seqs):
                    if seq.done:
                        continue
                    tok = self._sample(seq.sampler, seq.logits_at)
                    if llama.llama_vocab_is_eog(vocab, tok):
                        seq.done = True
                        continue
                    seq.out += self._piece(tok)
                    seq.generated += 1
                    if seq.generated >= max_new:
                        seq.done = True
                        continue
                    step.append((tok, len(seq.prompt) + seq.generated - 1, s_id, True))
                if not step:
                    break
                self._decode(step)
                live = [seq for seq in seqs if not seq.done]
                for j, seq in enumerate(live):
                    seq.logits_at = j
        finally:
            for seq in seqs:
                self._free_sampler(llama, seq.sampler)
        for seq in seqs:
            raws[seq.index] = (seq.out.decode("utf-8", "ignore"),
                               len(seq.prompt) + seq.generated)

    def _sampler(self) -> Sampler:
        """QMD's sampling (temperature, top-k, top-p, presence penalty) under the bounded
        expansion grammar; greedy at temperature 0."""
        assert self.model is not None
        return expansion_sampler(self.model, self.spec.option, self._next_seed())

    def _grammar_sampler(self, grammar_text: str, free: Any, pick: Any) -> Sampler:
        assert self.model is not None
        return grammar_sampler(self.model, grammar_text, free, pick)

    @staticmethod
    def _free_sampler(lib: Any, smp: Sampler) -> None:
        free_sampler(lib, smp)

    def _sample(self, smp: Sampler, idx: int) -> int:
        """Drawn by `free`, checked by the grammar; drawn again among the tokens it allows
        only when it refuses."""
        assert self.model is not None
        llama = self.model.lib
        tok = llama.llama_sampler_sample(smp.free, self.ctx, idx)  # accepted by `free`
        if not allows(llama, smp, tok):
            import numpy as np  # only the worker of a generative model, only on this path

            n_vocab = int(llama.llama_vocab_n_tokens(self.model.vocab))
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, idx),
                                           shape=(n_vocab,))
            tok = constrained_pick(self.model, smp, logits)
            llama.llama_sampler_accept(smp.free, tok)
        keep(llama, smp, tok)
        return tok

    def _next_seed(self) -> int:
        self._seed = next_seed(self._seed)
        return self._seed

    def _piece(self, tok: int) -> bytes:
        assert self.model is not None
        return piece(self.model, tok)

    def _chat_prompt(self, user: str) -> list[int]:
        assert self.model is not None
        return chat_tokens(self.model, user)

