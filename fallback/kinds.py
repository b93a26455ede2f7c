"""Descriptors of the CPU and remote backend kinds (see daemon/models/backend_kind.py).
Light on purpose: the daemon imports this, only the worker imports the backends."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.models.backend_kind import BackendKind, no_files
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.gguf_meta import is_rank_model

MB = 1024 * 1024


def gguf_estimate(spec: ModelSpec) -> int:
    """The file (mmapped weights) plus a margin for the context and compute buffers. Only
    until the first load: the scheduler then plans with the footprint it measured."""
    try:
        return Path(spec.path).stat().st_size + 64 * MB
    except OSError:
        return 0


LLAMA_EMBED = BackendKind(
    name="llama_cpp_embed", device="cpu", tasks=frozenset({"embed"}),
    target="npuserve.fallback.llama_embed:LlamaEmbedBackend",
    memory_estimate=gguf_estimate,
)
LLAMA_CROSS_ENCODER = BackendKind(
    name="llama_cpp_cross_encoder", device="cpu", tasks=frozenset({"rerank"}),
    target="npuserve.fallback.llama_cross:LlamaCrossEncoderBackend",
    recognises=is_rank_model,
    memory_estimate=gguf_estimate,
)
LLAMA_GENERATIVE = BackendKind(
    name="llama_cpp_generative", device="cpu",
    tasks=frozenset({"rerank", "expand", "generate"}),
    target="npuserve.fallback.llama_generative:LlamaGenerativeBackend",
    memory_estimate=gguf_estimate,
)
OLLAMA = BackendKind(
    name="ollama", device="remote", tasks=frozenset({"embed", "rerank", "expand"}),
    target="npuserve.fallback.ollama_backend:OllamaBackend",
    recognises=lambda path: False,  # chosen by config (backend = "ollama"), not by a path
    weight_files=no_files,
)
