"""A GGUF file's header, read without llama.cpp or numpy: which backend a file needs is
decided in the daemon (models/registry.py), which loads neither (numpy alone is 11 MB of
RSS). Only the key-value pairs are read, and only until the keys asked for are found."""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any, BinaryIO

# llama.cpp's enum llama_pooling_type
POOLING_RANK = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise ValueError("implausible GGUF string")
    return f.read(n).decode("utf-8", "replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == STRING:
        return _string(f)
    if vtype == ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS and not keep:  # skip without reading item by item
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            return None
        values = [_value(f, item, keep) for _ in range(count)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


@functools.lru_cache(maxsize=32)
def _metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return {}
            _read(f, "<I")  # version
            _read(f, "<Q")  # tensor count
            for _ in range(_read(f, "<Q")):
                key = _string(f)
                vtype = _read(f, "<I")
                # Vocabularies are long arrays nobody here needs: skipped, not kept.
                value = _value(f, vtype, keep=vtype != ARRAY)
                if value is not None:
                    out[key] = value
    except (OSError, ValueError, struct.error):
        return out
    return out


def metadata(path: Path) -> dict[str, Any]:
    """The header's scalar and string key-value pairs; {} for anything not a GGUF."""
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
