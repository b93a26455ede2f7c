"""`npuserve convert`: a Hugging Face BERT embedding model -> an NPU model directory.

Steps: ONNX export with static shapes (one graph per sequence-length bucket,
pooling and normalisation inside the graph), the tokenizer, the manifest, and
- where rknn-toolkit2 is installed (an x86 host) - `model_<len>.rknn` for the
RK3588 from each graph. Without rknn-toolkit2 the directory still holds the
ONNX twins, which the reference runtime runs; copy a directory converted on a
host with rknn-toolkit2 to the board.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

from .model_dir import write_manifest
from .onnx_export import build_bert_onnx

Say = Callable[[str], None]
DEFAULT_BUCKETS = (128, 512)


def build_rknn(onnx_path: Path, rknn_path: Path, platform: str = "rk3588") -> None:
    """rknn-toolkit2: ONNX -> .rknn (fp16, no quantisation). Untested on hardware here."""
    from rknn.api import RKNN

    rknn = RKNN(verbose=False)
    try:
        if rknn.config(target_platform=platform) != 0:
            raise RuntimeError("rknn.config failed")
        if rknn.load_onnx(model=str(onnx_path)) != 0:
            raise RuntimeError(f"rknn.load_onnx({onnx_path.name}) failed")
        if rknn.build(do_quantization=False) != 0:
            raise RuntimeError("rknn.build failed")
        if rknn.export_rknn(str(rknn_path)) != 0:
            raise RuntimeError("rknn.export_rknn failed")
    finally:
        rknn.release()


def convert_embedding(hf_dir: Path, out_dir: Path, name: str,
                      buckets: tuple[int, ...] = DEFAULT_BUCKETS, say: Say = print) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    have_toolkit = importlib.util.find_spec("rknn") is not None
    entries = []
    dim = 0
    for seq_len in sorted(buckets):
        onnx_path = out_dir / f"model_{seq_len}.onnx"
        say(f"exporting ONNX, sequence length {seq_len}")
        build_bert_onnx(hf_dir, seq_len, onnx_path)
        rknn_path = out_dir / f"model_{seq_len}.rknn"
        if have_toolkit:
            say(f"building {rknn_path.name} for rk3588 with rknn-toolkit2")
            build_rknn(onnx_path, rknn_path)
        entries.append({"seq_len": seq_len, "rknn": rknn_path.name, "onnx": onnx_path.name})
    import json

    dim = int(json.loads((hf_dir / "config.json").read_text())["hidden_size"])
    shutil.copy(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    write_manifest(out_dir, {
        "format": 1, "task": "embed", "name": name, "dim": dim, "buckets": entries,
        "inputs": [{"name": "input_ids", "dtype": "int64"},
                   {"name": "attention_mask", "dtype": "int64"}],
        "pooling": "in_graph", "normalize": "in_graph", "tokenizer": "tokenizer.json",
    })
    if not have_toolkit:
        say("rknn-toolkit2 is not installed: no .rknn files were built. The ONNX twins run"
            " on the reference runtime; convert on an x86 host with rknn-toolkit2 for the"
            " board.")
    return out_dir
