"""Measured costs per model, persisted in the state directory.

Loads and calls are timed as they happen; the figures survive restarts so a daemon on a
slow board knows, from its first request, how long a cold load and a call take there.
Admission (503 + Retry-After), deadlines, running-call allowances and the recommended
client timeout are all computed from these figures.

A call's cost is counted in tokens (prompt, documents and generated tokens, as the backend
reports them), not per text or document: one 1,000-word document costs what its tokens
cost, and no longer moves the figure for every short one. The figure is the median of the
last WINDOW calls' seconds per token, so one outlier - a slow call on a busy machine, a
fast refusal - cannot poison it; and only calls that ran are measured.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("npuserve.calibration")
# Weight of the newest load in the load-time average (loads are few and alike).
ALPHA = 0.3
SAVE_EVERY = 100
WINDOW = 15  # calls whose per-token rate the median is taken over
FORMAT = 2  # 1: per-item call figures (discarded on load, with a log line)
DEFAULT_TOKENS_PER_CHAR = 0.3  # until measured: ~3.3 characters a token


@dataclass
class ModelCosts:
    load_seconds: float | None = None  # moving average
    load_seconds_max: float = 0.0
    rates: list[float] = field(default_factory=list)  # seconds per token, newest last
    tokens_per_char: float | None = None  # what this model's tokenizer makes of text
    request_tokens: float | None = None  # tokens of one request (expansion: mostly generated)
    samples: int = 0
    footprint_bytes: int = 0  # most memory the model was seen to hold (load + use)

    def observe_load(self, seconds: float) -> None:
        self.load_seconds = _ewma(self.load_seconds, seconds)
        self.load_seconds_max = max(self.load_seconds_max, seconds)

    def observe_footprint(self, nbytes: int) -> None:
        self.footprint_bytes = max(self.footprint_bytes, nbytes)

    def observe_call(self, tokens: int, seconds: float, chars: int = 0,
                     requests: int = 1) -> None:
        """A call that ran: `tokens` evaluated and generated in `seconds` for `requests`
        requests; `chars` of input text (0: unknown) calibrate the estimate of tokens before
        a call."""
        self.rates = (self.rates + [seconds / max(1, tokens)])[-WINDOW:]
        self.request_tokens = _ewma(self.request_tokens, tokens / max(1, requests))
        if chars > 0 and tokens > 0:
            self.tokens_per_char = _ewma(self.tokens_per_char, tokens / chars)
        self.samples += 1

    @property
    def sec_per_token(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def service_seconds(self, tokens: float) -> float | None:
        rate = self.sec_per_token
        return None if rate is None else rate * tokens

    def tokens_for(self, chars: int) -> float:
        """The tokens `chars` characters of text are expected to make."""
        return chars * (self.tokens_per_char or DEFAULT_TOKENS_PER_CHAR)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


class CalibrationStore:
    """`<state>/calibration.json`, keyed by model id (file + load settings)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.models: dict[str, ModelCosts] = {}
        self._calls = 0
        if path is not None and path.is_file():
            try:
                self.models = _read(json.loads(path.read_text(encoding="utf-8")), path)
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable calibration %s: %s", path, exc)

    def note_call(self) -> None:
        """A call was measured: saved every SAVE_EVERY calls (and at each load and stop)."""
        self._calls += 1
        if self._calls >= SAVE_EVERY:
            self.save()

    def costs(self, model_id: str) -> ModelCosts:
        return self.models.setdefault(model_id, ModelCosts())

    def save(self) -> None:
        """Write-then-rename; a failure (read-only disk) only costs the persistence."""
        self._calls = 0
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"version": FORMAT,
                       "models": {k: asdict(v) for k, v in self.models.items()}}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calibration.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save calibration to %s: %s", self.path, exc)


def _read(data: dict[str, object], path: Path) -> dict[str, ModelCosts]:
    models = data.get("models", {})
    assert isinstance(models, dict)
    if data.get("version") == FORMAT:
        return {k: ModelCosts(**v) for k, v in models.items()}
    # Format 1 measured calls per text or document: those figures cannot become per-token
    # ones, and one long document could have poisoned them. Loads and footprints stay.
    log.warning("calibration %s is of an older format: keeping load times and memory"
                " footprints, measuring call costs afresh (per token)", path)
    return {k: ModelCosts(load_seconds=v.get("load_seconds"),
                          load_seconds_max=v.get("load_seconds_max", 0.0),
                          footprint_bytes=v.get("footprint_bytes", 0))
            for k, v in models.items()}
