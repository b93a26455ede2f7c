"""Measured costs per model, persisted in the state directory.

Loads and calls are timed as they happen; the figures survive restarts so a
daemon on a slow board knows, from its first request, how long a cold load
and a batch take there. Admission (503 + Retry-After), deadlines and the
recommended client timeout are all computed from these figures.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("npuserve.calibration")
# Weight of the newest measurement in the moving averages.
ALPHA = 0.3
SAVE_EVERY = 100


@dataclass
class ModelCosts:
    load_seconds: float | None = None  # moving average
    load_seconds_max: float = 0.0
    sec_per_item: float | None = None  # moving average of (call seconds / items)
    sec_per_call: float | None = None  # fixed overhead estimate (smallest call seen)
    samples: int = 0
    footprint_bytes: int = 0  # most memory the model was seen to hold (load + use)

    def observe_load(self, seconds: float) -> None:
        self.load_seconds = _ewma(self.load_seconds, seconds)
        self.load_seconds_max = max(self.load_seconds_max, seconds)

    def observe_footprint(self, nbytes: int) -> None:
        self.footprint_bytes = max(self.footprint_bytes, nbytes)

    def observe_call(self, items: int, seconds: float) -> None:
        self.sec_per_item = _ewma(self.sec_per_item, seconds / max(1, items))
        self.sec_per_call = seconds if self.sec_per_call is None else min(self.sec_per_call,
                                                                          seconds)
        self.samples += 1

    def service_seconds(self, items: int) -> float | None:
        if self.sec_per_item is None:
            return None
        return self.sec_per_item * items


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
                data = json.loads(path.read_text(encoding="utf-8"))
                self.models = {k: ModelCosts(**v) for k, v in data.get("models", {}).items()}
            except (ValueError, TypeError) as exc:
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
            payload = {"version": 1, "models": {k: asdict(v) for k, v in self.models.items()}}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calibration.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save calibration to %s: %s", self.path, exc)
