"""Descriptors of the NPU backend kinds (see daemon/models/backend_kind.py). Light on
purpose: the daemon imports this, only the worker imports the runtimes."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.models.backend_kind import BackendKind
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.npu.model_dir import (
    CROSS_ENCODER,
    ManifestError,
    is_model_dir,
    load_manifest,
    rerank_kind,
)


def graph_files(spec: ModelSpec) -> list[str]:
    """The graphs the runtime runs: the .rknn files on a board, the ONNX twins on the
    reference runtime."""
    try:
        model = load_manifest(Path(spec.path))
    except ManifestError:
        return []  # the load will say what is wrong
    reference = spec.option("npu_runtime") == "reference"
    graphs = [str(model.root / (b.onnx if reference else b.rknn)) for b in model.buckets]
    return [*graphs, str(model.root / model.token_embeddings)]


def graph_memory(spec: ModelSpec) -> int:
    """Every RKNNLite context holds its own copy of each graph: graphs x cores; the token
    table is memory-mapped once."""
    cores = int(spec.option("npu_cores", 3))  # type: ignore[call-overload]
    files = [Path(f) for f in graph_files(spec) if Path(f).is_file()]
    graphs = sum(f.stat().st_size for f in files if not f.name.endswith(".npy"))
    table = sum(f.stat().st_size for f in files if f.name.endswith(".npy"))
    return graphs * cores + table


RKNN_EMBED = BackendKind(
    name="rknn_embed", device="npu", tasks=frozenset({"embed"}),
    target="npuserve.npu.embed_backend:NpuEmbedBackend",
    recognises=is_model_dir, weight_files=graph_files, memory_estimate=graph_memory,
)
RKNN_CROSS_ENCODER = BackendKind(
    name="rknn_cross_encoder", device="npu", tasks=frozenset({"rerank"}),
    target="npuserve.npu.cross_backend:NpuCrossEncoderBackend",
    recognises=lambda p: rerank_kind(p) == CROSS_ENCODER, weight_files=graph_files,
    memory_estimate=graph_memory,
)
RKNN_RERANK = BackendKind(
    name="rknn_rerank", device="npu", tasks=frozenset({"rerank"}),
    target="npuserve.npu.rerank_backend:NpuRerankBackend",
    recognises=is_model_dir, weight_files=graph_files, memory_estimate=graph_memory,
)
