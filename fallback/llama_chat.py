"""Free generation for the chat and completion endpoints (OpenAI, Ollama), on the
expansion model: the model's own chat template, the client's sampling, an optional grammar
(GBNF, or one made from a JSON schema), stop strings, streaming and cancellation between
tokens. A request that carries QMD's expansion prompt gets the expansion grammar, so a
QMD client expanding through chat completions receives the same well-formed lines as
/expand.
"""

from __future__ import annotations

import ctypes
import importlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from npuserve.daemon.models.backend_api import BackendError, ExpandRequest, GenerateOutput
from npuserve.daemon.models.qmd_conventions import (
    expansion_prompt,
    is_expansion_request,
    parse_expansion_request,
)
from npuserve.daemon.worker import cancel
from npuserve.daemon.worker import protocol as wp

from .llama_bindings import high_level
from .llama_common import set_threads


class ChatGeneration:
    """Mixed into the generative backend, which provides the model, context and decoding."""

    model: Any
    ctx: Any
    n_ctx: int
    n_batch: int
    spec: Any

    if TYPE_CHECKING:  # provided by the backend; never defined here (the MRO would pick these)
        def expand_many(self, requests: list[ExpandRequest]) -> list[Any]: ...
        def _chat_prompt(self, user: str) -> list[int]: ...
        def _open_context(self, n_seq: int, flash: bool) -> None: ...
        def _flash(self, task: str) -> bool: ...
        def _clear(self) -> None: ...
        def _eval(self, tokens: list[int], start: int, seq: int = 0) -> None: ...
        def _decode(self, items: list[tuple[int, int, int, bool]]) -> None: ...
        def _piece(self, tok: int) -> bytes: ...
        def _tokenizer(self) -> Any: ...
        def _sample(self, smp: Any, idx: int) -> int: ...
        def _grammar_sampler(self, grammar_text: str, free: Any, pick: Any) -> Any: ...
        @staticmethod
        def _free_sampler(lib: Any, smp: Any) -> None: ...

    def generate(self, req: wp.Generate, emit: Callable[[str], None]) -> GenerateOutput:
        if self.model is None:
            raise BackendError("generation model is not loaded")
        user = next((c for r, c in reversed(req.messages) if r == "user"), req.prompt)
        if not (req.grammar or req.json_schema) and is_expansion_request(user):
            return self._as_expansion(user, req, emit)
        prompt = self._prompt_tokens(req)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + req.max_tokens > self.n_ctx:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens and max_tokens {req.max_tokens}: together"
                f" over the model's context of {self.n_ctx} tokens")
        self._open_context(1, self._flash("expand"))
        llama = self.model.lib
        set_threads(llama, self.ctx, self.spec.threads)
        grammar = self._grammar_for(req)
        free, pick = self._client_chain(req), self._client_chain(req)
        smp = self._grammar_sampler(grammar, free, pick) if grammar else None
        stream = TextStream(req.stop, emit if req.stream else None)
        generated, finish = 0, "length"
        try:
            self._clear()
            self._eval(prompt, 0)
            while generated < req.max_tokens:
                cancel.check()  # between tokens: a client that left stops the generation
                tok = (self._sample(smp, -1) if smp is not None
                       else llama.llama_sampler_sample(free, self.ctx, -1))
                if llama.llama_vocab_is_eog(self.model.vocab, tok):
                    finish = "stop"
                    break
                generated += 1
                if stream.add(self._piece(tok)):
                    finish = "stop"
                    break
                self._decode([(tok, len(prompt) + generated - 1, 0, True)])
        finally:
            if smp is not None:
                self._free_sampler(llama, smp)
            else:
                llama.llama_sampler_free(free)
                llama.llama_sampler_free(pick)
        return GenerateOutput(stream.finish(), len(prompt), generated, finish)

    def _as_expansion(self, user: str, req: wp.Generate, emit: Callable[[str], None]
                      ) -> GenerateOutput:
        return as_expansion(self.expand_many, lambda text: len(self._chat_prompt(text)),
                            user, req, emit)

    # --- prompt -----------------------------------------------------------------------

    def _prompt_tokens(self, req: wp.Generate) -> list[int]:
        """The tokens to evaluate: special tokens in the text are parsed (as llama-server
        does), and BOS is added where the model asks for one."""
        text = self._render_chat(req.messages) if req.messages else req.prompt
        return self._tokenizer().tokenize(text, add_special=True, parse_special=True)

    def _render_chat(self, messages: tuple[tuple[str, str], ...]) -> str:
        return render_chat(self.model, messages)

    # --- sampling ---------------------------------------------------------------------

    def _grammar_for(self, req: wp.Generate) -> str:
        return grammar_for(req)

    def _client_chain(self, req: wp.Generate) -> Any:
        return client_chain(self.model, req)


def as_expansion(expand_many: Callable[[list[ExpandRequest]], list[Any]],
                 prompt_len: Callable[[str], int], user: str, req: wp.Generate,
                 emit: Callable[[str], None]) -> GenerateOutput:
    """QMD's expansion asked through a chat or completion endpoint: run exactly what
    /expand runs (QMD's prompt, sampling, grammar and line filter), and answer its lines
    as `type: text` lines - what these clients parse."""
    query, intent = parse_expansion_request(user)
    out = expand_many([ExpandRequest(query, intent, True)])[0]
    text = "".join(f"{kind}: {line}\n" for kind, line in out.lines)
    if req.stream:
        emit(text)
    prompt = prompt_len(expansion_prompt(query, intent))
    return GenerateOutput(text, prompt, max(0, out.tokens - prompt), "stop")


def render_chat(model: Any, messages: tuple[tuple[str, str], ...]) -> str:
    """The conversation in the model's own chat template (llama.cpp's renderer of the
    GGUF's tokenizer.chat_template), ChatML if it has none or llama.cpp cannot render it.
    `model`: a fallback.llama_session.LlamaModel (weights or vocabulary only)."""
    llama = model.lib
    template = llama.llama_model_chat_template(model.ptr, None)
    if template:
        keep = [(role.encode(), content.encode()) for role, content in messages]
        chat = (llama.llama_chat_message * len(keep))(
            *(llama.llama_chat_message(role=r, content=c) for r, c in keep))
        size = sum(len(c) for _, c in keep) * 2 + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(template, chat, len(keep), True, buf, size)
            if 0 < n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            if n <= 0:
                break
            size = n  # it returned the length it needs
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n"
                    for role, content in messages)
    return turns + "<|im_start|>assistant\n"


def grammar_for(req: wp.Generate) -> str:
    """The request's grammar: its own GBNF, one made from its JSON schema, or none."""
    if req.grammar:
        return req.grammar
    if req.json_schema:
        high_level()  # the package, beside the bindings the worker already uses
        grammars = importlib.import_module("llama_cpp.llama_grammar")
        if req.json_schema.strip() in ("", "{}"):
            return str(grammars.JSON_GBNF)
        try:
            json.loads(req.json_schema)
            return str(grammars.json_schema_to_gbnf(req.json_schema))
        except Exception as exc:  # its converter asserts on schemas it does not know
            raise ValueError(f"the JSON schema cannot be turned into a grammar:"
                             f" {str(exc)[:200]}") from exc
    return ""


def client_chain(model: Any, req: wp.Generate) -> Any:
    """The client's sampling (greedy at temperature 0) as a llama.cpp sampler chain."""
    llama = model.lib
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if req.temperature <= 0:
        parts = [llama.llama_sampler_init_greedy()]
    else:
        seed = req.seed & 0xFFFFFFFF if req.seed >= 0 else 0xFFFFFFFF
        parts = [llama.llama_sampler_init_top_k(max(0, req.top_k)),
                 llama.llama_sampler_init_top_p(req.top_p, 1),
                 llama.llama_sampler_init_temp(req.temperature),
                 llama.llama_sampler_init_dist(seed)]
    for part in parts:
        llama.llama_sampler_chain_add(chain, part)
    return chain


class TextStream:
    """Generated bytes -> text: whole UTF-8 characters only, cut at the first stop string,
    and (streaming) sent on as soon as no stop string can still begin in them."""

    def __init__(self, stops: tuple[str, ...], emit: Callable[[str], None] | None) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emit = emit
        self.raw = bytearray()
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, piece: bytes) -> bool:
        """Add a token's bytes; True when a stop string has been reached."""
        self.raw += piece
        text = self.raw.decode("utf-8", "ignore")
        if len(text.encode()) < len(self.raw):  # an unfinished character: wait for more
            return False
        self.text = text
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        self._flush(final=self.stopped)
        return self.stopped

    def _flush(self, final: bool) -> None:
        if self.emit is None:
            return
        hold = 0 if final else max((len(s) - 1 for s in self.stops), default=0)
        upto = max(self.sent, len(self.text) - hold)
        if upto > self.sent:
            self.emit(self.text[self.sent:upto])
            self.sent = upto

    def finish(self) -> str:
        if not self.stopped:
            self.text = self.raw.decode("utf-8", "ignore")
        self._flush(final=True)
        return self.text
