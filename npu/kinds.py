"""Descriptors of the NPU backend kinds (see daemon/models/backend_kind.py). Light on
purpose: the daemon imports this, only the worker imports the runtimes."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.models.backend_kind import BackendKind
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.npu.model_dir import (
    COPIES_PER_CONTEXT,
    CROSS_ENCODER,
    ManifestError,
    contexts_for,
    is_model_dir,
    load_manifest,
    rerank_kind,
)
from npuserve.npu.rkllm_dir import RkllmDirError, is_rkllm_dir, load_rkllm_manifest

MB = 1024 * 1024


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
    """Each graph x its contexts (one per core, or one above SINGLE_CONTEXT_BYTES) x the two
    copies an RKNNLite context holds (its own and librknnrt's; an ONNX twin's session on the
    reference runtime holds one); the token table is mapped once."""
    cores = int(spec.option("npu_cores", 3))  # type: ignore[call-overload]
    total = 0
    for f in (Path(f) for f in graph_files(spec)):
        if not f.is_file():
            continue
        size = f.stat().st_size
        copies = COPIES_PER_CONTEXT if f.suffix == ".rknn" else 1
        total += size if f.suffix == ".npy" else size * contexts_for(f, cores) * copies
    return total


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


def rkllm_files(spec: ModelSpec) -> list[str]:
    """The .rkllm on a board; the GGUF twin on the reference runtime."""
    try:
        model = load_rkllm_manifest(Path(spec.path))
    except RkllmDirError:
        return []
    name = model.gguf if spec.option("npu_runtime") == "reference" else model.rkllm
    return [str(model.path(name))] if name and model.path(name).is_file() else []


def rkllm_memory(spec: ModelSpec) -> int:
    """RKLLM loads the whole model (w8a8 weights) and reserves the KV cache at the context
    it is given: the file, the cache at this context, and the runtime's buffers (Qwen3-0.6B
    w8a8: 791 MB in rknn-llm's benchmark)."""
    try:
        model = load_rkllm_manifest(Path(spec.path))
    except RkllmDirError:
        return 0
    files = sum(Path(f).stat().st_size for f in rkllm_files(spec))
    n_ctx = min(spec.n_ctx or model.max_context_len, model.max_context_len)
    kv = model.kv_bytes * n_ctx // max(1, model.max_context_len)
    return files + kv + 64 * MB


RKLLM = BackendKind(
    name="rkllm", device="npu", tasks=frozenset({"embed", "rerank", "expand", "generate"}),
    target="npuserve.npu.rkllm_backend:RkllmBackend",
    recognises=is_rkllm_dir, weight_files=rkllm_files, memory_estimate=rkllm_memory,
)
