"""What the scheduler shows the rest of the daemon: named results of its calls and a
read-only snapshot of its state. The HTTP layer, the index and mDNS read these, never the
scheduler's lanes or model records, so the scheduler can change inside without them."""

from __future__ import annotations

from dataclasses import dataclass, field

from npuserve.daemon.models.vector_rows import VectorRows
from npuserve.daemon.sched.jobs import Timing


@dataclass(frozen=True)
class EmbedResult:
    vectors: VectorRows
    truncated: list[bool]
    tokens: int
    timing: Timing
    model: str
    fingerprint: str = ""  # of the embedding model's files (models/fingerprint.py)


@dataclass(frozen=True)
class RerankResult:
    scores: list[float]
    truncated: list[bool]
    tokens: int
    timing: Timing
    model: str


@dataclass(frozen=True)
class ExpandResult:
    lines: list[tuple[str, str]]
    timing: Timing
    model: str


@dataclass(frozen=True)
class GenerateRequest:
    """A chat or completion request, whatever API shape it came in."""

    messages: tuple[tuple[str, str], ...] = ()  # (role, content); empty: `prompt` as is
    prompt: str = ""
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = -1
    stop: tuple[str, ...] = ()
    grammar: str = ""  # GBNF
    json_schema: str = ""  # a JSON schema the output must follow ("{}": any JSON object)

    @property
    def chars(self) -> int:
        return len(self.prompt) + sum(len(c) for _, c in self.messages)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    timing: Timing
    model: str


@dataclass(frozen=True)
class ModelView:
    name: str
    id: str
    kind: str
    path: str
    n_ctx: int
    tasks: tuple[str, ...]
    device: str
    device_reason: str
    state: str  # unloaded | loading | ready | failed
    resident: bool
    queue_depth: int
    oldest_wait_seconds: float
    loads: int
    unloads: int
    load_seconds_total: float
    error: str | None
    load_retry_in: float  # seconds until a failed load is tried again (0: not waiting)
    load_seconds: float | None
    load_seconds_max: float
    load_allowance: float
    footprint_bytes: int
    seconds_per_token: dict[str, float | None] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    has_twin: bool = False  # an NPU model with a CPU twin
    fallback: bool = False  # its work runs on the twin now
    fallback_reason: str | None = None


@dataclass(frozen=True)
class DeviceView:
    device: str
    worker_pid: int | None
    resident: tuple[str, ...]
    swaps: int
    worker_restarts: int
    worker_recycles: int
    prefetched_bytes: int


@dataclass(frozen=True)
class TaskView:
    task: str
    primary: ModelView  # the model configured for the task
    serving: ModelView  # the model serving it now (the CPU twin while the NPU is tripped)


@dataclass(frozen=True)
class SchedulerSnapshot:
    residency: str
    switching: str
    keep_alive: float
    recommended_timeout: float
    models: tuple[ModelView, ...]
    devices: tuple[DeviceView, ...]
    tasks: dict[str, TaskView]
    events: dict[str, int]

    def find(self, name: str) -> ModelView | None:
        """By task (embed/rerank/expand), model name or model id."""
        if name in self.tasks:
            return self.tasks[name].serving
        return next((m for m in self.models if name in (m.name, m.id)), None)
