"""An NPU model directory: static-shape graphs per sequence-length bucket, the
tokenizer, and a manifest that says how to feed and read them.

    manifest.json  {"format": 1, "task": "embed", "name": ..., "dim": 384,
                    "buckets": [{"seq_len": 128, "rknn": "model_128.rknn",
                                 "onnx": "model_128.onnx"}, ...],
                    "inputs": [{"name": "input_ids", "dtype": "int64"},
                               {"name": "attention_mask", "dtype": "int64"}],
                    "pooling": "in_graph" | "mean" | "cls",
                    "normalize": "in_graph" | "numpy" | "none",
                    "tokenizer": "tokenizer.json",
                    "rerank": {"yes_id": ..., "no_id": ..., "template": ...},
                    "toolkit_version": "2.5.0"}   # rknn-toolkit2 that built the .rknn files
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
POOLINGS = ("in_graph", "mean", "cls", "last")
NORMALIZE = ("in_graph", "numpy", "none")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Bucket:
    seq_len: int
    rknn: str
    onnx: str


@dataclass
class NpuModel:
    root: Path
    task: str
    name: str
    dim: int
    buckets: list[Bucket]
    inputs: list[dict[str, str]]
    pooling: str
    normalize: str
    tokenizer: str
    rerank: dict[str, Any] = field(default_factory=dict)
    # The rknn-toolkit2 that built the .rknn graphs (None: not built, or an older manifest);
    # a board's librknnrt older than it refuses them.
    toolkit_version: str | None = None

    def bucket_for(self, n_tokens: int) -> Bucket:
        """The smallest bucket that fits, else the largest (the caller truncates)."""
        for b in self.buckets:
            if n_tokens <= b.seq_len:
                return b
        return self.buckets[-1]


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def load_manifest(root: Path) -> NpuModel:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{root / MANIFEST}: {exc}") from None
    if data.get("format") != 1:
        raise ManifestError(f"{root}: unsupported manifest format {data.get('format')!r}")
    try:
        buckets = sorted((Bucket(int(b["seq_len"]), str(b["rknn"]), str(b["onnx"]))
                          for b in data["buckets"]), key=lambda b: b.seq_len)
        model = NpuModel(root=root, task=str(data["task"]), name=str(data["name"]),
                         dim=int(data["dim"]), buckets=buckets, inputs=list(data["inputs"]),
                         pooling=str(data["pooling"]), normalize=str(data["normalize"]),
                         tokenizer=str(data.get("tokenizer", "tokenizer.json")),
                         rerank=dict(data.get("rerank", {})),
                         toolkit_version=data.get("toolkit_version"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{root / MANIFEST}: missing or bad field: {exc}") from None
    if not buckets:
        raise ManifestError(f"{root}: no buckets")
    if model.pooling not in POOLINGS or model.normalize not in NORMALIZE:
        raise ManifestError(f"{root}: pooling must be one of {POOLINGS}, normalize one of"
                            f" {NORMALIZE}")
    return model


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(data, indent=2), encoding="utf-8")
