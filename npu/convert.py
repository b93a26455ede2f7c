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

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .model_dir import CROSS_ENCODER, FORMAT, write_manifest
from .onnx_export import bert_weights, build_bert_onnx
from .token_table import write_table

Say = Callable[[str], None]
DEFAULT_BUCKETS = (128, 512)
# A built graph whose simulated output drifts further than this from onnxruntime's is
# not written: fp16 on the NPU keeps sentence embeddings above 0.999 when all is well.
MIN_SIMULATOR_COSINE = 0.99
# rknn-toolkit2's target_platform: a graph built for one SoC is refused on another.
DEFAULT_TARGET = "rk3588"
SAMPLE_TEXTS = ("How do I verify the signature of a Debian package?",
                "The RK3588 has a three-core NPU of 6 TOPS.",
                "sqlite full text search ranks documents with bm25")


def toolkit_version() -> str | None:
    """The rknn-toolkit2 building the graphs: recorded in the manifest, because a board whose
    librknnrt is older refuses them (npu/detect.py: model_version_problem)."""
    try:
        return importlib.metadata.version("rknn-toolkit2")
    except importlib.metadata.PackageNotFoundError:
        return None


Samples = list[list[Any]]  # each: the graph's inputs for one sample, in order
Compare = Callable[[Any, Any, int], float]  # (simulated, reference, sample) -> agreement


@dataclass
class Built:
    """What building one .rknn found: the worst simulator agreement, and where each op
    type runs ({"NPU": {"Conv": 12, ...}, "CPU": {"Erf": 6, ...}})."""

    agreement: float
    placement: dict[str, dict[str, int]]


def build_rknn(onnx_path: Path, rknn_path: Path, samples: Samples, compare: Compare,
               minimum: float, platform: str = DEFAULT_TARGET) -> Built:
    """rknn-toolkit2: ONNX -> .rknn (fp16, no quantisation), checked on the toolkit's
    simulator first: the worst agreement between simulated and onnxruntime outputs over
    the samples (the graph is refused below `minimum`), and the op placement the toolkit
    logs while it builds. The NPU itself: untested on hardware."""
    from rknn.api import RKNN

    with tempfile.TemporaryFile(mode="w+b") as log:
        rknn = RKNN(verbose=True)
        try:
            with _output_to(log):  # the toolkit logs from native code too: capture the fds
                steps: list[tuple[str, Callable[[], int]]] = [
                    (f"rknn.config(target_platform={platform})",
                     lambda: rknn.config(target_platform=platform)),
                    (f"rknn.load_onnx({onnx_path.name})",
                     lambda: rknn.load_onnx(model=str(onnx_path))),
                    ("rknn.build", lambda: rknn.build(do_quantization=False))]
                failed = next((name for name, step in steps if step() != 0), "")
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
            if failed:  # the reason is in the captured log, not on the terminal
                raise RuntimeError(f"{failed} failed: {_errors(text)}")
            placement = op_placement(text)
            # The simulator runs the graph built from ONNX in this session (not a .rknn).
            worst = simulator_agreement(rknn, onnx_path, samples, compare)
            if worst < minimum:
                raise RuntimeError(f"{rknn_path.name}: the simulated graph disagrees with"
                                   f" onnxruntime ({worst:.4f} < {minimum})")
            if rknn.export_rknn(str(rknn_path)) != 0:
                raise RuntimeError("rknn.export_rknn failed")
            return Built(worst, placement)
        finally:
            rknn.release()


@contextlib.contextmanager
def _output_to(sink: IO[bytes]) -> Iterator[None]:
    """stdout and stderr, at the file-descriptor level, into `sink` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _errors(log: str, last: int = 5) -> str:
    """The toolkit's last error lines ("E ..."), or the log's tail when it has none."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"(\x1b\[[0-9;]*m)?E\b", ln)]
    return " | ".join((errors or lines)[-last:]) or "no output"


# A row of the op table rknn-toolkit2 logs in verbose mode while it builds:
#   D RKNN: [12:01:58.460] 4    Erf    FLOAT16  CPU    (1,8,1,4)  ...  Erf:z
_OP_ROW = re.compile(r"RKNN: \[[^\]]*\]\s+\d+\s+(\w+)\s+\w+\s+(NPU|CPU)\s")
_PSEUDO_OPS = {"InputOperator", "OutputOperator"}


def op_placement(log: str) -> dict[str, dict[str, int]]:
    """Counts of each op type per target in the op table of a build log."""
    rows = [m.groups() for m in _OP_ROW.finditer(log) if m.group(1) not in _PSEUDO_OPS]
    out: dict[str, dict[str, int]] = {"NPU": {}, "CPU": {}}
    for op, target in rows:
        out[target][op] = out[target].get(op, 0) + 1
    return {t: dict(sorted(ops.items())) for t, ops in out.items()}


def placement_line(placement: dict[str, dict[str, int]]) -> str:
    """"NPU: Conv 36, ...; CPU: Erf 6" for the convert log."""
    return "; ".join(f"{target}: " + (", ".join(f"{op} {n}" for op, n in ops.items()) or "none")
                     for target, ops in placement.items())


def sample_inputs(tokenizer: Path, table: Path, seq_len: int) -> Samples:
    """SAMPLE_TEXTS as the embedding graph's static inputs (embedded tokens, mask)."""
    from tokenizers import Tokenizer

    from .token_table import TokenTable, float_mask

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.enable_truncation(seq_len)
    rows = TokenTable(table)
    out = []
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text).ids
        out.append([rows.embeds(ids, seq_len), float_mask(len(ids), seq_len)])
    return out


def cosine_of(simulated: Any, reference: Any, sample: int) -> float:
    import numpy as np

    a = np.ravel(np.asarray(simulated, dtype=np.float64))
    b = np.ravel(np.asarray(reference, dtype=np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))


def simulator_agreement(rknn: Any, onnx_path: Path, samples: Samples, compare: Compare
                        ) -> float:
    import numpy as np
    import onnxruntime as ort

    if rknn.init_runtime() != 0:  # no target: the toolkit's simulator
        raise RuntimeError("the rknn-toolkit2 simulator did not start")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 1.0
    for k, inputs in enumerate(samples):
        simulated = rknn.inference(inputs=inputs)
        if simulated is None:  # RKNN's failure convention: None, not an exception
            raise RuntimeError("the rknn-toolkit2 simulator returned no output")
        reference = session.run(None, dict(zip(names, inputs, strict=True)))[0]
        worst = min(worst, compare(np.asarray(simulated[0]), reference, k))
    return worst


def convert_embedding(hf_dir: Path, out_dir: Path, name: str,
                      buckets: tuple[int, ...] = DEFAULT_BUCKETS, say: Say = print,
                      target: str = DEFAULT_TARGET) -> Path:
    """A Hugging Face BERT embedding model -> an NPU embedding directory."""
    import json

    dim = int(json.loads((hf_dir / "config.json").read_text())["hidden_size"])
    return _convert_bert(hf_dir, out_dir, buckets, say, target, "embedding", {
        "task": "embed", "name": name, "dim": dim, "pooling": "in_graph",
        "normalize": "in_graph"})


def convert_cross_encoder(hf_dir: Path, out_dir: Path, name: str,
                          buckets: tuple[int, ...] = DEFAULT_BUCKETS, say: Say = print,
                          target: str = DEFAULT_TARGET) -> Path:
    """A Hugging Face BERT sequence classifier (an ms-marco / bge-reranker cross-encoder)
    -> an NPU rerank directory: the same BERT graph, ending in its classifier's logit."""
    return _convert_bert(hf_dir, out_dir, buckets, say, target, "rank", {
        "task": "rerank", "name": name, "dim": 1, "pooling": "in_graph", "normalize": "none",
        "rerank": {"kind": CROSS_ENCODER, "columns": ["logit"]}})


def _convert_bert(hf_dir: Path, out_dir: Path, buckets: tuple[int, ...], say: Say,
                  target: str, head: str, fields: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    have_toolkit = importlib.util.find_spec("rknn") is not None
    entries = []
    table = write_table(out_dir, bert_weights(hf_dir)["embeddings.word_embeddings.weight"])
    shutil.copy(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    for seq_len in sorted(buckets):
        onnx_path = out_dir / f"model_{seq_len}.onnx"
        say(f"exporting ONNX, sequence length {seq_len}")
        build_bert_onnx(hf_dir, seq_len, onnx_path, head)
        rknn_path = out_dir / f"model_{seq_len}.rknn"
        entry: dict[str, Any] = {"seq_len": seq_len, "rknn": rknn_path.name,
                                 "onnx": onnx_path.name}
        if have_toolkit:
            say(f"building {rknn_path.name} for {target} with rknn-toolkit2")
            samples = sample_inputs(out_dir / "tokenizer.json", out_dir / table, seq_len)
            compare, minimum, what = ((cosine_of, MIN_SIMULATOR_COSINE, "smallest cosine")
                                      if head == "embedding" else
                                      (score_agreement, 1.0 - MAX_SIMULATOR_P_YES_DIFF,
                                       "largest score difference"))
            built = build_rknn(onnx_path, rknn_path, samples, compare, minimum, target)
            shown = built.agreement if head == "embedding" else 1.0 - built.agreement
            say(f"{rknn_path.name}: simulator vs onnxruntime, {what} {shown:.6f}"
                f" over {len(SAMPLE_TEXTS)} texts")
            say(f"{rknn_path.name}: ops {placement_line(built.placement)}")
            entry["op_placement"] = built.placement
        entries.append(entry)
    write_manifest(out_dir, {
        "format": FORMAT, **fields, "buckets": entries,
        "inputs": [{"name": "inputs_embeds", "dtype": "float16"},
                   {"name": "attention_mask", "dtype": "float16"}],
        "token_embeddings": table, "tokenizer": "tokenizer.json",
        "toolkit_version": toolkit_version() if have_toolkit else None,
        "target_platform": target,
    })
    if not have_toolkit:
        say("rknn-toolkit2 is not installed: no .rknn files were built. The ONNX twins run"
            " on the reference runtime; convert on an x86 host with rknn-toolkit2 for the"
            " board.")
    return out_dir


def score_agreement(simulated: Any, reference: Any, sample: int) -> float:
    """1 - |sigmoid(a) - sigmoid(b)| of a cross-encoder's logits."""
    import numpy as np

    from npuserve.daemon.models.qmd_conventions import p_yes

    a, b = (p_yes(float(np.ravel(x)[0]), 0.0) for x in (simulated, reference))
    return 1.0 - abs(a - b)


# Rerank graphs: P(yes) on the simulator may differ from onnxruntime's by this much.
MAX_SIMULATOR_P_YES_DIFF = 0.02
DEFAULT_RERANK_BUCKETS = (256, 512)
SAMPLE_PAIRS = (("how does apt verify package signatures",
                 "apt checks the Release file's GPG signature, then each package's hash."),
                ("how does apt verify package signatures",
                 "The RK3588 has a three-core NPU of 6 TOPS."))


def rerank_samples(tokenizer: Path, table: Path, seq_len: int) -> tuple[Samples, list[int]]:
    """SAMPLE_PAIRS as right-padded judgement prompts, and each prompt's length."""
    from tokenizers import Tokenizer

    from npuserve.daemon.config import DEFAULT_INSTRUCTION, DEFAULT_RERANK_TEMPLATE
    from npuserve.daemon.models.qmd_conventions import split_rerank_template

    from .token_table import TokenTable

    tok = Tokenizer.from_file(str(tokenizer))
    rows = TokenTable(table)
    samples, lengths = [], []
    for query, doc in SAMPLE_PAIRS:
        before, after = split_rerank_template(DEFAULT_RERANK_TEMPLATE, DEFAULT_INSTRUCTION,
                                              query)
        ids = tok.encode(before + doc + after, add_special_tokens=False).ids[:seq_len]
        samples.append([rows.embeds(ids, seq_len)])
        lengths.append(len(ids))
    return samples, lengths


def convert_rerank(gguf_path: Path, out_dir: Path, name: str,
                   buckets: tuple[int, ...] = DEFAULT_RERANK_BUCKETS, say: Say = print,
                   target: str = DEFAULT_TARGET) -> Path:
    """A causal-LM GGUF (the CPU twin) -> an NPU rerank directory: tokenizer.json rebuilt
    from the GGUF, one yes/no-logit graph per bucket, .rknn files where the toolkit is."""
    import gguf
    from tokenizers import Tokenizer

    from npuserve.daemon.models.qmd_conventions import p_yes

    from .causal_export import build_rerank_onnx, read_shape, token_embeddings
    from .gguf_tokenizer import tokenizer_from_gguf

    read_shape(gguf.GGUFReader(str(gguf_path)))  # refuses an architecture it cannot export
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = out_dir / "tokenizer.json"
    tokenizer_from_gguf(gguf_path, tokenizer)
    tok = Tokenizer.from_file(str(tokenizer))
    # The score's tokens, found as the CPU backend finds them: the first token of each word.
    yes_id, no_id = (tok.encode(w, add_special_tokens=False).ids[0] for w in ("yes", "no"))
    have_toolkit = importlib.util.find_spec("rknn") is not None
    table = write_table(out_dir, token_embeddings(gguf_path))
    entries = []
    for seq_len in sorted(buckets):
        onnx_path, rknn_path = out_dir / f"model_{seq_len}.onnx", out_dir / f"model_{seq_len}.rknn"
        say(f"exporting the rerank graph, sequence length {seq_len}")
        build_rerank_onnx(gguf_path, seq_len, yes_id, no_id, onnx_path)
        entry: dict[str, Any] = {"seq_len": seq_len, "rknn": rknn_path.name,
                                 "onnx": onnx_path.name}
        if have_toolkit:
            samples, lengths = rerank_samples(tokenizer, out_dir / table, seq_len)

            def agreement(sim: Any, ref: Any, k: int, lengths: list[int] = lengths) -> float:
                rows = [x.reshape(-1, 2)[lengths[k] - 1] for x in (sim, ref)]
                return 1.0 - abs(p_yes(*map(float, rows[0])) - p_yes(*map(float, rows[1])))

            say(f"building {rknn_path.name} for {target} with rknn-toolkit2")
            built = build_rknn(onnx_path, rknn_path, samples, agreement,
                               1.0 - MAX_SIMULATOR_P_YES_DIFF, target)
            say(f"{rknn_path.name}: simulator vs onnxruntime, largest P(yes) difference"
                f" {1.0 - built.agreement:.6f} over {len(samples)} prompts")
            say(f"{rknn_path.name}: ops {placement_line(built.placement)}")
            entry["op_placement"] = built.placement
        entries.append(entry)
    write_manifest(out_dir, {
        "format": FORMAT, "task": "rerank", "name": name, "dim": 2, "buckets": entries,
        "inputs": [{"name": "inputs_embeds", "dtype": "float16"}],
        "token_embeddings": table,
        "pooling": "last", "normalize": "none", "tokenizer": "tokenizer.json",
        "rerank": {"yes_id": yes_id, "no_id": no_id, "columns": ["yes", "no"],
                   "source": gguf_path.name},
        "toolkit_version": toolkit_version() if have_toolkit else None,
        "target_platform": target,
    })
    if not have_toolkit:
        say("rknn-toolkit2 is not installed: no .rknn files were built (the ONNX twins run"
            " on the reference runtime).")
    return out_dir
