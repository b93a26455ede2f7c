"""Messages between the daemon and a model worker process.

Small frozen dataclasses pickled over a socket pair (multiprocessing.connection
framing). Vectors cross as packed float32 bytes (one buffer per batch), never as lists
of Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npuserve.daemon.models.vector_rows import VectorRows


@dataclass(frozen=True)
class ModelSpec:
    """How to build one backend: which implementation, which file, which options.

    `kind` names an entry of the worker's backend registry; the scheduler only
    knows kinds, never the libraries behind them.
    """

    model_id: str
    kind: str
    path: str
    n_ctx: int
    threads: int
    options: tuple[tuple[str, object], ...] = ()

    def option(self, name: str, default: object = None) -> object:
        return dict(self.options).get(name, default)


# --- requests -------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    spec: ModelSpec


@dataclass(frozen=True)
class Unload:
    model_id: str


@dataclass(frozen=True)
class Embed:
    model_id: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Rerank:
    model_id: str
    query: str
    documents: tuple[str, ...]
    instruction: str
    # Tokens a document may keep (0: what the context takes); the scheduler lowers it so
    # a request fits its deadline instead of being refused (the documents say truncated).
    max_doc_tokens: int = 0


@dataclass(frozen=True)
class Expand:
    model_id: str
    query: str
    intent: str | None
    include_lexical: bool


@dataclass(frozen=True)
class ExpandMany:
    """Expansions of several requests, generated side by side."""

    model_id: str
    requests: tuple[Expand, ...]


@dataclass(frozen=True)
class Generate:
    """Free generation (chat or completion endpoints) with the client's sampling.

    `messages` (role, content) are rendered with the model's own chat template; without
    them `prompt` is used as it is. `grammar` is GBNF, `json_schema` a JSON schema (the
    backend turns it into a grammar); with `stream`, pieces of text are sent as Partial
    replies before the Generated one."""

    model_id: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = -1
    stop: tuple[str, ...] = ()
    grammar: str = ""
    json_schema: str = ""  # "{}": any JSON object
    stream: bool = False


@dataclass(frozen=True)
class CountTokens:
    spec: ModelSpec  # the tokenizer alone is used; the model need not be loaded
    texts: tuple[str, ...]


@dataclass(frozen=True)
class TokenIdsOf:
    spec: ModelSpec  # the tokenizer alone is used, as for CountTokens
    text: str
    add_special: bool = True


@dataclass(frozen=True)
class Stats:
    pass


Request = (Load | Unload | Embed | Rerank | Expand | ExpandMany | Generate | CountTokens
           | TokenIdsOf | Stats)

# --- replies --------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    model_id: str
    name: str
    dim: int | None
    n_ctx: int
    seconds: float
    rss_before: int
    rss_after: int


@dataclass(frozen=True)
class Unloaded:
    model_id: str
    rss_before: int
    rss_after: int


@dataclass(frozen=True)
class Vectors:
    data: bytes  # float32, row-major (n, dim)
    dim: int
    truncated: tuple[bool, ...]
    tokens: int
    seconds: float

    @classmethod
    def pack(
        cls, vectors: VectorRows, truncated: list[bool], tokens: int, seconds: float
    ) -> Vectors:
        return cls(vectors.data, vectors.dim, tuple(truncated), tokens, seconds)

    def rows(self) -> VectorRows:
        return VectorRows(self.data, self.dim)


@dataclass(frozen=True)
class Scores:
    scores: tuple[float, ...]
    truncated: tuple[bool, ...]
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Lines:
    lines: tuple[tuple[str, str], ...]
    tokens: int
    seconds: float


@dataclass(frozen=True)
class LinesMany:
    items: tuple[Lines, ...]  # one per request of ExpandMany, in order


@dataclass(frozen=True)
class Partial:
    """A piece of a streamed generation; more replies follow on the same call."""

    text: str


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of generation or a stop string) | "length"
    seconds: float

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenCounts:
    counts: tuple[int, ...]


@dataclass(frozen=True)
class TokenIds:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    rss: int
    loaded: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Failure:
    """A request failed inside the worker; the worker itself is still healthy."""

    error: str
    kind: str = "backend"  # backend | bad_request | not_loaded | unavailable | cancelled


Reply = (Loaded | Unloaded | Vectors | Scores | Lines | LinesMany | Generated | TokenCounts
         | TokenIds | WorkerStats | Failure)
