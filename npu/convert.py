"""`npuserve convert`: a Hugging Face BERT embedding model -> an NPU model directory.

Steps: ONNX export with static shapes (one graph per sequence-length bucket,
pooling and normalisation inside the graph), the tokenizer, the manifest, and
- where rknn-toolkit2 is installed (an x86 host) - `model_<len>.rknn` for the
RK3588 from each graph, each checked on the toolkit's simulator against onnxruntime
before it is written. Without rknn-toolkit2 the directory still holds the ONNX twins,
which the reference runtime runs; copy a directory converted on a host with
rknn-toolkit2 to the board.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_dir import write_manifest
from .onnx_export import build_bert_onnx

Say = Callable[[str], None]
DEFAULT_BUCKETS = (128, 512)
# A built graph whose simulated output drifts further than this from onnxruntime's is
# not written: fp16 on the NPU keeps sentence embeddings above 0.999 when all is well.
MIN_SIMULATOR_COSINE = 0.99
SAMPLE_TEXTS = ("How do I verify the signature of a Debian package?",
                "The RK3588 has a three-core NPU of 6 TOPS.",
                "sqlite full text search ranks documents with bm25")


def build_rknn(onnx_path: Path, rknn_path: Path, tokenizer: Path, seq_len: int,
               platform: str = "rk3588") -> float:
    """rknn-toolkit2: ONNX -> .rknn (fp16, no quantisation), checked on the toolkit's
    simulator first. Returns the smallest cosine between simulated and onnxruntime
    outputs over SAMPLE_TEXTS. The NPU itself: untested on hardware."""
    from rknn.api import RKNN

    rknn = RKNN(verbose=False)
    try:
        if rknn.config(target_platform=platform) != 0:
            raise RuntimeError("rknn.config failed")
        if rknn.load_onnx(model=str(onnx_path)) != 0:
            raise RuntimeError(f"rknn.load_onnx({onnx_path.name}) failed")
        if rknn.build(do_quantization=False) != 0:
            raise RuntimeError("rknn.build failed")
        # The simulator runs a graph built from ONNX in this session (not a loaded .rknn).
        cosine = simulator_agreement(rknn, onnx_path, tokenizer, seq_len)
        if cosine < MIN_SIMULATOR_COSINE:
            raise RuntimeError(f"{rknn_path.name}: the simulated graph disagrees with"
                               f" onnxruntime (cosine {cosine:.4f} < {MIN_SIMULATOR_COSINE})")
        if rknn.export_rknn(str(rknn_path)) != 0:
            raise RuntimeError("rknn.export_rknn failed")
        return cosine
    finally:
        rknn.release()


def sample_inputs(tokenizer: Path, seq_len: int) -> list[list[Any]]:
    """SAMPLE_TEXTS as the graph's static int64 inputs (ids, mask), padded to seq_len."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.enable_truncation(seq_len)
    out = []
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text).ids
        padded = np.zeros((1, seq_len), dtype=np.int64)
        mask = np.zeros((1, seq_len), dtype=np.int64)
        padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1
        out.append([padded, mask])
    return out


def simulator_agreement(rknn: Any, onnx_path: Path, tokenizer: Path, seq_len: int) -> float:
    import numpy as np
    import onnxruntime as ort

    if rknn.init_runtime() != 0:  # no target: the toolkit's simulator
        raise RuntimeError("the rknn-toolkit2 simulator did not start")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 1.0
    for inputs in sample_inputs(tokenizer, seq_len):
        simulated = rknn.inference(inputs=inputs)
        if simulated is None:  # RKNN's failure convention: None, not an exception
            raise RuntimeError("the rknn-toolkit2 simulator returned no output")
        reference = session.run(None, dict(zip(names, inputs, strict=True)))[0]
        a = np.ravel(np.asarray(simulated[0], dtype=np.float64))
        b = np.ravel(np.asarray(reference, dtype=np.float64))
        worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0)))
    return worst


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
            cosine = build_rknn(onnx_path, rknn_path, hf_dir / "tokenizer.json", seq_len)
            say(f"{rknn_path.name}: simulator vs onnxruntime, smallest cosine {cosine:.6f}"
                f" over {len(SAMPLE_TEXTS)} texts")
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
