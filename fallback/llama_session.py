"""What both llama.cpp backends hold: a model, a context and a batch on the bare ctypes
bindings, freed exactly once, and a tokenizer that works loaded or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npuserve.daemon.models.backend_api import BackendError, ModelLoadError
from npuserve.daemon.worker.protocol import ModelSpec

from .llama_bindings import lib
from .llama_common import cpu_flags, extra_buffers_safe


class LlamaModel:
    """One llama_model (weights or vocabulary only), freed exactly once."""

    def __init__(self, path: str, vocab_only: bool = False) -> None:
        self.lib = lib()
        if not Path(path).is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        params = self.lib.llama_model_default_params()
        params.vocab_only = vocab_only
        params.use_extra_bufts = extra_buffers_safe(cpu_flags())
        self.ptr = self.lib.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"cannot load {Path(path).name}: llama.cpp rejected the file")
        self.vocab = self.lib.llama_model_get_vocab(self.ptr)

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8  # a token is at least one byte, plus BOS/CLS and EOS/SEP
        buf = (self.lib.llama_token * room)()
        args = (add_special, parse_special)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, room, *args)
        if n < 0:  # cannot happen with that room; llama.cpp returns -needed
            buf = (self.lib.llama_token * -n)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, -n, *args)
        if n < 0:
            raise BackendError(f"cannot tokenize a text of {len(data)} bytes")
        return buf[:n]

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None


class LlamaSession:
    """Model, context and batch of one loaded backend (set by its load())."""

    spec: ModelSpec
    model: LlamaModel | None
    ctx: Any
    batch: Any
    vocab: LlamaModel | None  # tokenizer-only, when not loaded

    def unload(self) -> None:
        if self.model is None:
            return
        llama = self.model.lib
        if self.batch is not None:
            llama.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        self.model.close()
        self.model = None

    def token_ids(self, text: str, add_special: bool = True) -> list[int]:
        # Special tokens written in the text are parsed, as vLLM's tokenizer does.
        return list(self._tokenizer().tokenize(text, add_special=add_special,
                                               parse_special=True))

    def _tokenizer(self) -> LlamaModel:
        if self.model is not None:
            return self.model
        if self.vocab is None:  # a few MB, no weights, no context
            self.vocab = LlamaModel(self.spec.path, vocab_only=True)
        return self.vocab
