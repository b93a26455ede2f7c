"""A GGUF file's header, read without llama.cpp: which backend a file needs is decided in
the daemon (models/registry.py), which never loads a model library. gguf-py reads the
metadata through a memory map; tensors are not touched."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# llama.cpp's enum llama_pooling_type
POOLING_RANK = 4


@functools.lru_cache(maxsize=32)
def _metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    try:
        from gguf import GGUFReader  # in the [cpu] extra with llama-cpp-python
    except ImportError:
        return {}
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.model":
            continue  # vocabularies: large and not needed here
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
    return out


def metadata(path: Path) -> dict[str, Any]:
    """The header's key-value pairs (vocabularies left out); {} for anything not a GGUF."""
    try:
        st = path.stat()
    except OSError:
        return {}
    if not path.is_file() or path.suffix != ".gguf":
        return {}
    return _metadata(str(path), st.st_size, st.st_mtime_ns)


def is_rank_model(path: Path) -> bool:
    """A sequence-classification encoder (a cross-encoder reranker): llama.cpp pools it
    with its classification head ("rank" pooling)."""
    meta = metadata(path)
    arch = meta.get("general.architecture")
    return bool(arch) and meta.get(f"{arch}.pooling_type") == POOLING_RANK
