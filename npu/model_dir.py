"""An NPU model directory: static-shape graphs per sequence-length bucket, the
tokenizer, and a manifest that says how to feed and read them.

    manifest.json  {"format": 2, "task": "embed", "name": ..., "dim": 384,
                    "buckets": [{"seq_len": 128, "rknn": "model_128.rknn",
                                 "onnx": "model_128.onnx"}, ...],
                    "inputs": [{"name": "inputs_embeds", "dtype": "float16"},
                               {"name": "attention_mask", "dtype": "float16"}],
                    "token_embeddings": "token_embeddings.f16.npy",
                    "pooling": "in_graph" | "mean" | "cls",
                    "normalize": "in_graph" | "numpy" | "none",
                    "tokenizer": "tokenizer.json",
                    "rerank": {"yes_id": ..., "no_id": ..., "template": ...},
                    "toolkit_version": "2.5.0",   # rknn-toolkit2 that built the .rknn files
                    "target_platform": "rk3588"}  # the SoC they were built for

Format 1 (before 2026-12) fed token ids as int64, which RKNNLite does not take: such a
directory is refused with the advice to convert it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 2
CROSS_ENCODER = "cross_encoder"  # manifest rerank.kind of a BERT sequence classifier
# The input dtypes RKNNLite documents; anything else is refused when the manifest is read.
RKNN_INPUT_DTYPES = ("int8", "uint8", "int16", "float16", "float32")
POOLINGS = ("in_graph", "mean", "cls", "last")
NORMALIZE = ("in_graph", "numpy", "none")
# A graph above this size gets one RKNNLite context, not one per core: each context holds
# the graph twice (the .rknn bytes RKNNLite keeps in Python, even after release(), and
# librknnrt's own copy), so SmolLM2's 252 MB rerank bucket would cost 1.5 GB on three
# cores; MiniLM's 23 MB buckets keep the three-core spread.
SINGLE_CONTEXT_BYTES = 128 * 1024 * 1024
COPIES_PER_CONTEXT = 2


def graph_file(path: Path) -> Path:
    """The file a context loads: the .rknn, else (reference runtime) its ONNX twin."""
    return path if path.is_file() else path.with_suffix(".onnx")


def contexts_for(path: Path, cores: int) -> int:
    """RKNNLite contexts for the graph at `path` on `cores` NPU cores."""
    try:
        size = graph_file(path).stat().st_size
    except OSError:
        return max(1, cores)  # the load will say what is missing
    return 1 if size > SINGLE_CONTEXT_BYTES else max(1, cores)


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
    token_embeddings: str = ""  # the host-side lookup table (npu/token_table.py)
    # The rknn-toolkit2 that built the .rknn graphs (None: not built, or an older manifest);
    # a board's librknnrt older than it refuses them.
    toolkit_version: str | None = None
    # The SoC the .rknn graphs were built for (rknn-toolkit2's target_platform; None: an
    # older manifest, built for the rk3588).
    target_platform: str | None = None

    def bucket_for(self, n_tokens: int) -> Bucket:
        """The smallest bucket that fits, else the largest (the caller truncates)."""
        for b in self.buckets:
            if n_tokens <= b.seq_len:
                return b
        return self.buckets[-1]


def is_model_dir(path: Path) -> bool:
    """An RKNN model directory (an RKLLM one has a manifest too: npu/rkllm_dir.py)."""
    from .rkllm_dir import is_rkllm_dir

    return path.is_dir() and (path / MANIFEST).is_file() and not is_rkllm_dir(path)


def rerank_kind(path: Path) -> str | None:
    """A model directory's rerank kind ("cross_encoder", or "logit" for the causal
    yes/no graph); None when it is not a readable rerank directory."""
    if not is_model_dir(path):
        return None
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("task") != "rerank":
        return None
    return str(data.get("rerank", {}).get("kind", "logit"))


def load_manifest(root: Path) -> NpuModel:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{root / MANIFEST}: {exc}") from None
    if data.get("format") == 1:
        raise ManifestError(f"{root}: made by an older npuserve convert, whose graphs take"
                            " int64 token ids (RKNNLite takes no int64): convert it again")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{root}: unsupported manifest format {data.get('format')!r}")
    try:
        buckets = sorted((Bucket(int(b["seq_len"]), str(b["rknn"]), str(b["onnx"]))
                          for b in data["buckets"]), key=lambda b: b.seq_len)
        model = NpuModel(root=root, task=str(data["task"]), name=str(data["name"]),
                         dim=int(data["dim"]), buckets=buckets, inputs=list(data["inputs"]),
                         pooling=str(data["pooling"]), normalize=str(data["normalize"]),
                         tokenizer=str(data.get("tokenizer", "tokenizer.json")),
                         rerank=dict(data.get("rerank", {})),
                         token_embeddings=str(data["token_embeddings"]),
                         toolkit_version=data.get("toolkit_version"),
                         target_platform=data.get("target_platform"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{root / MANIFEST}: missing or bad field: {exc}") from None
    if not buckets:
        raise ManifestError(f"{root}: no buckets")
    bad = [i for i in model.inputs if i.get("dtype") not in RKNN_INPUT_DTYPES]
    if bad:
        raise ManifestError(f"{root}: input {bad[0].get('name')!r} is"
                            f" {bad[0].get('dtype')!r}; RKNNLite takes"
                            f" {', '.join(RKNN_INPUT_DTYPES)}")
    if model.pooling not in POOLINGS or model.normalize not in NORMALIZE:
        raise ManifestError(f"{root}: pooling must be one of {POOLINGS}, normalize one of"
                            f" {NORMALIZE}")
    return model


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(data, indent=2), encoding="utf-8")
