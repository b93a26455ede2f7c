"""The one small interface every model backend implements (CPU, NPU, remote).

A backend lives inside a worker process. The scheduler never sees a backend
object: it sends typed requests to the worker, which calls these methods.
Results are float32 rows over bytes and plain lists, cheap to send over the pipe.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from npuserve.daemon.models.vector_rows import VectorRows

if TYPE_CHECKING:
    from npuserve.daemon.worker.protocol import Generate

TASKS = ("embed", "rerank", "expand")


@dataclass
class EmbedOutput:
    vectors: VectorRows  # n rows of dim float32 values, L2-normalised
    truncated: list[bool]
    tokens: int  # tokens evaluated, for usage reporting and calibration


@dataclass
class RerankOutput:
    scores: list[float]  # P("yes") per document, input order
    truncated: list[bool]
    tokens: int


@dataclass
class ExpandOutput:
    lines: list[tuple[str, str]]  # (type, text) with type in lex/vec/hyde
    tokens: int
    raw: str = ""


@dataclass
class GenerateOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class ExpandRequest:
    query: str
    intent: str | None
    include_lexical: bool


@dataclass
class LoadInfo:
    """What a backend reports after loading: for health, metrics and calibration."""

    name: str
    tasks: list[str]
    dim: int | None = None
    n_ctx: int = 0
    details: dict[str, object] = field(default_factory=dict)


class BackendError(RuntimeError):
    """A failure inside a backend that the request may be told about."""


class ModelLoadError(BackendError):
    """The model file is missing or unreadable: the model is unavailable, not buggy."""


class Backend(abc.ABC):
    """Loads one model file and runs the tasks it supports."""

    @abc.abstractmethod
    def load(self) -> LoadInfo: ...

    @abc.abstractmethod
    def unload(self) -> None: ...

    def embed(self, texts: list[str]) -> EmbedOutput:
        raise BackendError(f"{type(self).__name__} cannot embed")

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        """P(yes) per document; a document keeps at most `max_doc_tokens` tokens (0: what
        the context takes) and says so in `truncated`."""
        raise BackendError(f"{type(self).__name__} cannot rerank")

    def expand(self, query: str, intent: str | None, include_lexical: bool) -> ExpandOutput:
        raise BackendError(f"{type(self).__name__} cannot expand")

    def expand_many(self, requests: list[ExpandRequest]) -> list[ExpandOutput]:
        """Several expansions in one call; backends that can generate side by side do."""
        return [self.expand(r.query, r.intent, r.include_lexical) for r in requests]

    def generate(self, req: Generate, emit: Callable[[str], None]) -> GenerateOutput:
        """Free generation with the request's sampling; `emit` gets each piece of text as
        it is generated when the request streams."""
        raise BackendError(f"{type(self).__name__} cannot generate")

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int: ...

    def token_ids(self, text: str, add_special: bool = True) -> list[int]:
        """The model's token ids of `text` (vLLM-shaped /tokenize)."""
        raise BackendError(f"{type(self).__name__} cannot list token ids")
