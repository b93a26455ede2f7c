"""Embedding, logit rerank and grammar-constrained expansion on Rockchip's RKLLM runtime
(npu/rkllm_api.py), for Qwen3-family `.rkllm` models. Untested on hardware: on x86 it runs
against the reference librkllmrt (npu/reference_rkllm) over the model's GGUF twin.

- Tokens are made on the host with the GGUF twin's vocabulary (llama.cpp, vocabulary
  only), so the NPU sees the CPU backend's token ids, and fed as RKLLM_INPUT_TOKEN.
- embed: the last hidden layer (RKLLM_INFER_GET_LAST_HIDDEN_LAYER, Rockchip's advice for
  embedders), last-token (Qwen3-Embedding) or mean pooling, L2-normalised here.
- rerank: the last position's hidden state times the "yes" and "no" rows of the LM head,
  kept beside the model (2 x dim floats), never the vocabulary's logits; P(yes) from the
  two, as the CPU backend computes it.
- expand: RKLLM has no logits processor, so the grammar runs on the host, step by step.
  The runtime generates with QMD's sampling; the callback checks each token against the
  grammar and lets the run continue while it is allowed. A token the grammar refuses
  pauses the run (the callback returns 1); the host then takes the logits at that point
  (RKLLM_INFER_GET_LOGITS, one row), draws a token the grammar allows, and the run goes on
  from that token with keep_history. Whether a paused run already holds its own token in
  the KV cache is undocumented: the backend asks the runtime (rkllm_get_kv_cache_size)
  and removes whatever it holds beyond the accepted text, so either reading works.
- The KV cache is cleared before every request (stale history slowed rkllama's embed and
  rerank from 0.3 s to 26 s).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from npuserve.daemon.config import DEFAULT_RERANK_TEMPLATE
from npuserve.daemon.models.backend_api import (
    Backend,
    BackendError,
    EmbedOutput,
    ExpandOutput,
    GenerateOutput,
    LoadInfo,
    ModelLoadError,
    RerankOutput,
)
from npuserve.daemon.models.qmd_conventions import (
    MIN_DOC_TOKENS,
    expansion_prompt,
    is_expansion_request,
    p_yes,
    parse_expansion,
    split_rerank_template,
)
from npuserve.daemon.models.vector_rows import VectorRows
from npuserve.daemon.worker import cancel
from npuserve.daemon.worker.protocol import Generate, ModelSpec
from npuserve.fallback import llama_sampling as sampling
from npuserve.fallback.llama_chat import (
    TextStream,
    as_expansion,
    client_chain,
    grammar_for,
    render_chat,
)
from npuserve.fallback.llama_common import thread_count
from npuserve.fallback.llama_session import LlamaModel

from . import rkllm_api as api
from .detect import RKLLM_LIBS
from .rkllm_dir import RkllmDirError, RkllmModel, load_rkllm_manifest


class RkllmBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: RkllmModel | None = None
        self.rt: api.Rkllm | None = None
        self.vocab: LlamaModel | None = None
        self.head: np.ndarray | None = None  # [yes row, no row] of the LM head
        self.n_ctx = 0
        self._seed = int(spec.option("seed", -1)) & 0xFFFFFFFF

    # --- lifecycle ------------------------------------------------------

    def _manifest(self) -> RkllmModel:
        if self.model is None:
            try:
                self.model = load_rkllm_manifest(Path(self.spec.path))
            except RkllmDirError as exc:
                raise ModelLoadError(str(exc)) from None
        return self.model

    def _library(self) -> Path:
        chosen = str(self.spec.option("rkllm_library", ""))
        if chosen:
            return Path(chosen)
        if self.spec.option("npu_runtime") == "reference":
            from .reference_rkllm import ReferenceBuildError, reference_library

            try:
                return reference_library()
            except ReferenceBuildError as exc:
                raise ModelLoadError(str(exc)) from None
        found = next((Path(p) for p in RKLLM_LIBS if Path(p).exists()), None)
        if found is None:
            raise ModelLoadError("librkllmrt.so not found in /usr/lib (rknn-llm's"
                                 " rkllm-runtime)")
        return found

    def _model_file(self, model: RkllmModel) -> Path:
        if self.spec.option("npu_runtime") == "reference":
            return model.path(model.gguf)  # what the reference runtime runs
        if not model.rkllm:
            raise ModelLoadError(f"{model.root}: no .rkllm model in this directory (convert"
                                 " one with Rockchip's rkllm-toolkit, then npuserve convert"
                                 " --runtime rkllm --rkllm FILE)")
        return model.path(model.rkllm)

    def _tokens(self) -> LlamaModel:
        if self.vocab is None:  # a few MB: the twin's vocabulary, no weights
            self.vocab = LlamaModel(str(self._manifest().path(self._manifest().gguf)),
                                    vocab_only=True)
        return self.vocab

    def load(self) -> LoadInfo:
        model = self._manifest()
        vocab = self._tokens()
        try:
            lib = api.open_library(self._library())
            self.n_ctx = min(self.spec.n_ctx or model.max_context_len, model.max_context_len)
            self.rt = api.Rkllm(lib, self._model_file(model), self.n_ctx,
                                thread_count(self.spec.threads))
        except api.RkllmError as exc:
            raise ModelLoadError(f"NPU: {exc}") from None
        if model.task == "rerank":
            try:
                self.head = np.load(model.path(model.rerank["head"])).astype(np.float32)
            except (OSError, ValueError) as exc:
                self.unload()
                raise ModelLoadError(f"{model.root}: LM-head rows: {exc}") from None
        tasks = (["rerank", "expand", "generate"] if model.task == "rerank"
                 else ["expand", "generate"] if model.task == "expand" else ["embed"])
        n_vocab = int(vocab.lib.llama_vocab_n_tokens(vocab.vocab))
        return LoadInfo(name=model.name, tasks=tasks, dim=model.dim, n_ctx=self.n_ctx,
                        details={"runtime": "rkllm", "n_vocab": n_vocab})

    def unload(self) -> None:
        if self.rt is not None:
            self.rt.destroy()
            self.rt = None
        self.head = None

    def _runtime(self) -> api.Rkllm:
        if self.rt is None:
            raise BackendError("RKLLM model is not loaded")
        return self.rt

    def _rows(self, tokens: list[int], mode: int) -> np.ndarray:
        rt = self._runtime()
        try:
            rt.clear()
            return rt.rows(tokens, mode)
        except api.RkllmError as exc:
            raise BackendError(f"NPU: {exc}") from None

    # --- tokens ---------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        # As the CPU backends count: an embedder's specials (Qwen3-Embedding's EOS) included.
        embed = self._manifest().task == "embed"
        return len(self._tokens().tokenize(text, add_special=embed))

    def token_ids(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._tokens().tokenize(text, add_special=add_special, parse_special=True))

    # --- embed ----------------------------------------------------------

    def embed(self, texts: list[str]) -> EmbedOutput:
        model = self._manifest()
        if model.task != "embed":
            raise BackendError(f"{model.name} is an RKLLM {model.task} model, not embed")
        tail = self._tokens().tokenize("")[-1:]  # EOS that last-token pooling reads
        data = np.empty((len(texts), model.dim), np.float32)
        truncated, total = [], 0
        for i, text in enumerate(texts):
            cancel.check()
            toks = self._tokens().tokenize(text)
            truncated.append(len(toks) > self.n_ctx)
            if truncated[-1]:
                toks = toks[:self.n_ctx - len(tail)] + tail
            rows = self._rows(toks, api.INFER_GET_LAST_HIDDEN_LAYER)
            vec = rows[-1] if model.pooling == "last" else rows.mean(axis=0)
            data[i] = vec / max(float(np.linalg.norm(vec)), 1e-12)
            total += len(toks)
        return EmbedOutput(vectors=VectorRows(data.tobytes(), model.dim), truncated=truncated,
                           tokens=total)

    # --- rerank ---------------------------------------------------------

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        if self.head is None:
            raise BackendError("RKLLM rerank model is not loaded (or is not a rerank model)")
        vocab = self._tokens()
        template = str(self.spec.option("template", DEFAULT_RERANK_TEMPLATE))
        prefix_text, suffix_text = split_rerank_template(template, instruction, query)
        prefix = vocab.tokenize(prefix_text, add_special=False, parse_special=True)
        suffix = vocab.tokenize(suffix_text, add_special=False, parse_special=True)
        budget = self.n_ctx - len(prefix) - len(suffix)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(f"query is too long for the rerank context ({len(prefix)} prompt"
                             f" tokens, context {self.n_ctx})")
        if max_doc_tokens:
            budget = max(MIN_DOC_TOKENS, min(budget, max_doc_tokens))
        scores, truncated, total = [], [], 0
        for doc in documents:
            cancel.check()  # between documents
            toks = vocab.tokenize(doc, add_special=False)
            truncated.append(len(toks) > budget)
            ids = prefix + toks[:budget] + suffix
            hidden = self._rows(ids, api.INFER_GET_LAST_HIDDEN_LAYER)[-1]
            yes, no = self.head @ hidden
            scores.append(p_yes(float(yes), float(no)))
            total += len(ids)
        return RerankOutput(scores=scores, truncated=truncated, tokens=total)

    # --- expansion ------------------------------------------------------

    def expand(self, query: str, intent: str | None, include_lexical: bool) -> ExpandOutput:
        if self._manifest().task not in ("rerank", "expand"):
            raise BackendError(f"{self._manifest().name} is an RKLLM embedding model")
        vocab = self._tokens()
        prompt = sampling.chat_tokens(vocab, expansion_prompt(query, intent))
        max_new = sampling.expansion_budget(self.spec.option)
        if len(prompt) + max_new > self.n_ctx:
            raise ValueError(f"the expansion prompt ({len(prompt)} tokens) and max_tokens"
                             f" ({max_new}) exceed the model's context ({self.n_ctx})")
        self._seed = sampling.next_seed(self._seed)
        smp = sampling.expansion_sampler(vocab, self.spec.option, self._seed)
        try:
            text = _Generation(self._runtime(), vocab, smp, prompt, max_new,
                               self._sampling()).run()
        except api.RkllmError as exc:
            raise BackendError(f"NPU: {exc}") from None
        finally:
            sampling.free_sampler(vocab.lib, smp)
        raw = text.out.decode("utf-8", "ignore")
        return ExpandOutput(lines=parse_expansion(raw, query, include_lexical),
                            tokens=len(prompt) + len(text.accepted), raw=raw)

    def generate(self, req: Generate, emit: Callable[[str], None]) -> GenerateOutput:
        """Chat and completions: the client's sampling on the runtime, its grammar (GBNF or
        JSON schema) step-wise on the host, stop strings and streaming as on the CPU; a
        request carrying QMD's expansion prompt is answered as /expand answers it."""
        vocab = self._tokens()
        user = next((c for r, c in reversed(req.messages) if r == "user"), req.prompt)
        if not (req.grammar or req.json_schema) and is_expansion_request(user):
            return as_expansion(self.expand_many,
                                lambda text: len(sampling.chat_tokens(vocab, text)),
                                user, req, emit)
        text = render_chat(vocab, req.messages) if req.messages else req.prompt
        prompt = vocab.tokenize(text, add_special=True, parse_special=True)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + req.max_tokens > self.n_ctx:
            raise ValueError(f"the prompt is {len(prompt)} tokens and max_tokens"
                             f" {req.max_tokens}: together over the model's context of"
                             f" {self.n_ctx} tokens")
        grammar = grammar_for(req)
        smp = (sampling.grammar_sampler(vocab, grammar, client_chain(vocab, req),
                                        client_chain(vocab, req)) if grammar else None)
        stream = TextStream(req.stop, emit if req.stream else None)
        greedy = req.temperature <= 0
        params = api.SamplingParam(top_k=1 if greedy else max(0, req.top_k), top_p=req.top_p,
                                   temperature=max(req.temperature, 1e-3), repeat_penalty=1.0)
        try:
            gen = _Generation(self._runtime(), vocab, smp, prompt, req.max_tokens, params,
                              stream.add).run()
        except api.RkllmError as exc:
            raise BackendError(f"NPU: {exc}") from None
        finally:
            if smp is not None:
                sampling.free_sampler(vocab.lib, smp)
        return GenerateOutput(stream.finish(), len(prompt), len(gen.accepted), gen.finish)

    def _sampling(self) -> api.SamplingParam:
        """QMD's sampling for the runtime's own draws; greedy (top-k 1) at temperature 0."""
        opt = self.spec.option
        temperature = float(opt("temperature", 0.7))
        return api.SamplingParam(
            top_k=1 if temperature <= 0 else int(opt("top_k", 20)),
            top_p=float(opt("top_p", 0.8)), temperature=max(temperature, 1e-3),
            repeat_penalty=1.0, frequency_penalty=0.0,
            presence_penalty=float(opt("presence_penalty", 0.5)))


class _Generation:
    """One generation, step-wise under a grammar when there is one (see the module's
    docstring). `on_piece` gets each kept token's bytes and answers True to stop (a stop
    string reached)."""

    def __init__(self, rt: api.Rkllm, vocab: LlamaModel, smp: sampling.Sampler | None,
                 prompt: list[int], max_new: int, params: api.SamplingParam,
                 on_piece: Callable[[bytes], bool] | None = None) -> None:
        self.rt, self.vocab, self.smp = rt, vocab, smp
        self.prompt, self.max_new, self.params = prompt, max_new, params
        self.on_piece = on_piece
        self.accepted: list[int] = []
        self.out = bytearray()
        self.refused: int | None = None  # the token that paused the run
        self.stop = False
        self.finish = "length"
        self.full_rewinds = 0  # rewinds that had to evaluate the text again

    def _eog(self, tok: int) -> bool:
        return bool(self.vocab.lib.llama_vocab_is_eog(self.vocab.vocab, tok))

    def _take(self, tok: int) -> None:
        if self.smp is not None:
            sampling.keep(self.vocab.lib, self.smp, tok)
        self.accepted.append(tok)
        piece = sampling.piece(self.vocab, tok)
        self.out += piece
        if self.on_piece is not None and self.on_piece(piece):
            self.stop, self.finish = True, "stop"

    def _on_token(self, state: int, result: Any) -> int:
        if state != api.RUN_NORMAL:
            return api.CONTINUE
        if cancel.requested() or len(self.accepted) >= self.max_new:
            self.stop = True
            return api.PAUSE
        tok = int(result.token_id)
        if self.smp is not None and not sampling.allows(self.vocab.lib, self.smp, tok):
            self.refused = tok
            return api.PAUSE
        if self._eog(tok):
            # The end of text (where a grammar allows it: the text is complete).
            self.stop, self.finish = True, "stop"
            return api.PAUSE
        self._take(tok)
        return api.PAUSE if self.stop else api.CONTINUE

    def run(self) -> _Generation:
        self.rt.clear()
        feed = self.prompt
        while True:
            self.refused = None
            self.rt.run(feed, api.INFER_GENERATE, self._on_token, self.params,
                        max_new_tokens=self.max_new - len(self.accepted))
            cancel.check()
            if self.refused is None or self.stop or len(self.accepted) >= self.max_new:
                return self
            tok = self._redraw()
            if self._eog(tok):
                self.finish = "stop"
                return self
            self._take(tok)
            if self.stop or len(self.accepted) >= self.max_new:
                return self
            feed = [tok]

    def _redraw(self) -> int:
        """After a refused token: the logits where the accepted text ends, and a token the
        grammar allows drawn from them on the host."""
        assert self.smp is not None
        held = len(self.prompt) + len(self.accepted)
        kv = self.rt.kv_size()
        if kv not in (held, held + 1):  # the paused token is, or is not, in the cache
            raise api.RkllmError(f"the KV cache holds {kv} positions after a pause, the"
                                 f" text {held}")
        # The last accepted token is evaluated again, alone, for its logits row.
        text = self.prompt + self.accepted
        self._rewind(len(text) - 1, kv)
        logits = self.rt.rows(text[-1:], api.INFER_GET_LOGITS)[-1]
        return sampling.constrained_pick(self.vocab, self.smp, logits)

    def _rewind(self, keep: int, kv: int) -> None:
        """Cut the KV cache back to its first `keep` positions. rkllm.h allows clearing a
        range only "when keep_history == 0 and the generation has been paused"; where the
        runtime refuses the range, the whole cache is cleared and the text evaluated again
        (every reading of that sentence then works, at the cost of a prefill)."""
        try:
            self.rt.clear(keep, kv)
        except api.RkllmError:
            self.rt.clear()
            self.rt.rows((self.prompt + self.accepted)[:keep], api.INFER_GET_LAST_HIDDEN_LAYER)
            self.full_rewinds += 1
