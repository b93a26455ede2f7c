"""`npuserve convert --runtime rkllm`: an RKLLM model directory (npu/rkllm_dir.py) from a
`.rkllm` file and the GGUF twin of the same model.

Nothing is converted for the NPU here: the `.rkllm` comes from Rockchip's rkllm-toolkit
(x86, not on PyPI) or ready-made. What npuserve adds is read from the twin: its
dimensions (for the memory plan), its pooling (embedding models), and for rerank the
"yes"/"no" rows of its LM head, dequantised to float32 (2 x dim floats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from npuserve.npu.rkllm_api import RKLLM_VERSION
from npuserve.npu.rkllm_dir import write_rkllm_manifest

HEAD_FILE = "yes_no_head.f32.npy"
LAST_POOLING, MEAN_POOLING = 3, 1  # llama.cpp's pooling types


class RkllmConvertError(ValueError):
    pass


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _dims(reader: Any) -> dict[str, int]:
    arch = _field(reader, "general.architecture")
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or n_embd // n_head)
    n_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    return {"n_embd": n_embd, "n_layer": int(_field(reader, f"{arch}.block_count")),
            "n_kv": int(n_kv), "head_dim": head_dim,
            "pooling": int(_field(reader, f"{arch}.pooling_type") or 0)}


def head_rows(reader: Any, ids: list[int]) -> np.ndarray:
    """Rows `ids` of the LM head (output.weight, or the tied token embeddings), float32."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        raise RkllmConvertError("the GGUF has neither output.weight nor token_embd.weight")
    rows = np.asarray(tensor.data)[ids]
    return np.asarray(dequantize(rows, tensor.tensor_type), dtype=np.float32).reshape(
        len(ids), -1)


def _yes_no(gguf_path: Path, yes: str, no: str) -> list[int]:
    from npuserve.fallback.llama_session import LlamaModel

    vocab = LlamaModel(str(gguf_path), vocab_only=True)
    try:
        ids = [vocab.tokenize(word, add_special=False) for word in (yes, no)]
    finally:
        vocab.close()
    if not all(ids):
        raise RkllmConvertError(f"{yes!r} or {no!r} is no token of this model")
    return [ids[0][0], ids[1][0]]


def convert_rkllm(gguf_path: Path, out_dir: Path, name: str, task: str,
                  rkllm: Path | None = None, max_context_len: int = 4096,
                  target: str = "rk3588", yes: str = "yes", no: str = "no") -> Path:
    """Write the directory; `rkllm` None makes one the reference runtime alone can run."""
    import gguf

    if rkllm is not None and not rkllm.is_file():
        raise RkllmConvertError(f"{rkllm}: no such .rkllm file")
    reader = gguf.GGUFReader(str(gguf_path))
    d = _dims(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "task": task, "name": name, "dim": d["n_embd"], "max_context_len": max_context_len,
        "rkllm": str(rkllm.resolve()) if rkllm else None, "gguf": str(gguf_path.resolve()),
        # K and V, fp16, every layer, at the full context: what the runtime reserves.
        "kv_bytes": d["n_layer"] * max_context_len * d["n_kv"] * d["head_dim"] * 2 * 2,
        "rkllm_version": RKLLM_VERSION, "target_platform": target,
    }
    if task == "embed":
        if d["pooling"] not in (LAST_POOLING, MEAN_POOLING):
            raise RkllmConvertError(f"{gguf_path.name}: pooling type {d['pooling']} (an"
                                    " RKLLM embedder pools the last hidden layer: last or"
                                    " mean)")
        data["pooling"] = "last" if d["pooling"] == LAST_POOLING else "mean"
    elif task == "rerank":
        ids = _yes_no(gguf_path, yes, no)
        np.save(out_dir / HEAD_FILE, head_rows(reader, ids))
        data["rerank"] = {"yes_id": ids[0], "no_id": ids[1], "head": HEAD_FILE}
    elif task != "expand":
        raise RkllmConvertError(f"task {task!r}: embed, rerank or expand")
    write_rkllm_manifest(out_dir, data)
    return out_dir
