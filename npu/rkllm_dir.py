"""An RKLLM model directory: a `.rkllm` model for Rockchip's LLM runtime, the GGUF twin
of the same model (its vocabulary tokenises on the host; the reference runtime runs it),
and, for rerank, the two LM-head rows that turn the last hidden state into the "yes"/"no"
logits (never the whole vocabulary's logits: ~180 MB a prompt on Qwen3).

    manifest.json  {"runtime": "rkllm", "format": 1, "task": "embed" | "rerank" | "expand",
                    "name": ..., "dim": 1024, "max_context_len": 4096,
                    "rkllm": "model.rkllm" | null,   # null: reference runtime only
                    "gguf": "twin.gguf",
                    "pooling": "last" | "mean",      # embed
                    "rerank": {"yes_id": .., "no_id": .., "head": "yes_no_head.f32.npy"},
                    "kv_bytes": ..,                  # the KV cache at max_context_len
                    "rkllm_version": "1.3.0", "target_platform": "rk3588"}

`npuserve convert --runtime rkllm` writes it (npu/rkllm_convert.py); the .rkllm file
itself comes from Rockchip's rkllm-toolkit (not on PyPI) or ready-made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
RUNTIME = "rkllm"
FORMAT = 1
TASKS = ("embed", "rerank", "expand")
POOLINGS = ("last", "mean")


class RkllmDirError(ValueError):
    pass


@dataclass
class RkllmModel:
    root: Path
    task: str
    name: str
    dim: int
    max_context_len: int
    rkllm: str | None
    gguf: str
    pooling: str = "last"
    rerank: dict[str, Any] = field(default_factory=dict)
    kv_bytes: int = 0
    rkllm_version: str | None = None
    target_platform: str | None = None

    def path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.root / p


def _read(path: Path) -> dict[str, Any] | None:
    if not (path.is_dir() and (path / MANIFEST).is_file()):
        return None
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_rkllm_dir(path: Path) -> bool:
    data = _read(path)
    return data is not None and data.get("runtime") == RUNTIME


def rkllm_task(path: Path) -> str | None:
    data = _read(path)
    return str(data.get("task")) if data and data.get("runtime") == RUNTIME else None


def load_rkllm_manifest(root: Path) -> RkllmModel:
    data = _read(root)
    if data is None or data.get("runtime") != RUNTIME:
        raise RkllmDirError(f"{root}: not an RKLLM model directory (no manifest.json with"
                            ' "runtime": "rkllm")')
    if data.get("format") != FORMAT:
        raise RkllmDirError(f"{root}: unsupported RKLLM manifest format {data.get('format')!r}")
    try:
        model = RkllmModel(
            root=root, task=str(data["task"]), name=str(data["name"]), dim=int(data["dim"]),
            max_context_len=int(data["max_context_len"]), rkllm=data.get("rkllm"),
            gguf=str(data["gguf"]), pooling=str(data.get("pooling", "last")),
            rerank=dict(data.get("rerank", {})), kv_bytes=int(data.get("kv_bytes", 0)),
            rkllm_version=data.get("rkllm_version"),
            target_platform=data.get("target_platform"))
    except (KeyError, TypeError, ValueError) as exc:
        raise RkllmDirError(f"{root / MANIFEST}: missing or bad field: {exc}") from None
    if model.task not in TASKS or model.pooling not in POOLINGS:
        raise RkllmDirError(f"{root}: task must be one of {TASKS}, pooling one of {POOLINGS}")
    if model.task == "rerank" and not {"yes_id", "no_id", "head"} <= set(model.rerank):
        raise RkllmDirError(f"{root}: a rerank model needs rerank.yes_id, no_id and head")
    return model


def write_rkllm_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps({"runtime": RUNTIME, "format": FORMAT} | data,
                                            indent=2), encoding="utf-8")
