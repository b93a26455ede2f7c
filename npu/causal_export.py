"""Export a causal language model (a llama-architecture GGUF) as an ONNX rerank graph.

The graph takes `inputs_embeds` float16 [1, seq_len, dim] (the token embeddings: RKNNLite
takes no int64, and int16 ids wrap above 32,767), right-padded, and returns the logits of
the "yes" and "no" tokens at every position, `yes_no_logits` float [1, seq_len, 2]:
causal attention means padding after the prompt changes nothing before it, so no
attention mask is needed and the caller reads the row of the prompt's last token. Of the
output projection only those two rows are kept (for SmolLM2, 2 of 49,152: the bulk of a
position's work otherwise). Static shapes and rank-4 tensors throughout, as rknn-toolkit2
wants; grouped-query attention is written with the key/value projections repeated per
query head, so no rank-5 broadcast is needed.

Weights are dequantised from the GGUF with gguf-py (no torch): the graph computes in
float32 what llama.cpp computes from the quantised blocks, so an NPU model and its CPU
twin are the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import GraphBuilder, save_model

OUTPUT = "yes_no_logits"
# Added to the attention scores above the diagonal; finite (fp16 on the NPU) and far
# below any real score.
MASKED = -1.0e4


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    dim: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_shape(reader: Any) -> LlamaShape:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ExportError(f"architecture {arch!r}: only 'llama' (SmolLM2, Llama) is exported"
                          " to a rerank graph so far")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", ""):
        raise ExportError("RoPE scaling is not exported")
    dim, n_head = int(_field(reader, "llama.embedding_length")), \
        int(_field(reader, "llama.attention.head_count"))
    return LlamaShape(
        n_layer=int(_field(reader, "llama.block_count")), dim=dim, n_head=n_head,
        n_head_kv=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=dim // n_head,
        eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)))


def read_weights(reader: Any) -> dict[str, np.ndarray]:
    """Every tensor as float32, shaped (out_features, in_features) like a torch weight."""
    from gguf.quants import dequantize

    return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def _rms_norm(g: GraphBuilder, x: str, w: np.ndarray, eps: float, name: str) -> str:
    """llama.cpp's RMS norm: x / sqrt(mean(x^2) + eps) * w (opset 17 has no RMSNorm op)."""
    mean_sq = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean_sq, "eps"])])
    return g.op("Mul", [g.op("Div", [x, root]), g.const(name, w.astype(np.float32))])


def _matmul(g: GraphBuilder, x: str, w: np.ndarray, name: str) -> str:
    return g.op("MatMul", [x, g.const(name, np.ascontiguousarray(w.T))])


def _rope_tables(shape: LlamaShape, seq_len: int) -> tuple[np.ndarray, ...]:
    """cos and sin per (position, dimension), and the pair-swap matrix P: llama.cpp's
    "normal" RoPE turns each adjacent pair (x[2j], x[2j+1]) by position * base^(-2j/d),
    i.e. rope(x) = x * cos + (x @ P) * sin. (GGUF stores llama's Q and K rows permuted
    for exactly this pairing.)"""
    hd = shape.head_dim
    theta = shape.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angle = np.arange(seq_len, dtype=np.float64)[:, None] * theta[None, :]
    cos = np.repeat(np.cos(angle), 2, axis=1).astype(np.float32)[None, None]
    sin = np.repeat(np.sin(angle), 2, axis=1).astype(np.float32)[None, None]
    swap = np.zeros((hd, hd), dtype=np.float32)
    for j in range(0, hd, 2):
        swap[j + 1, j], swap[j, j + 1] = -1.0, 1.0
    return cos, sin, swap


def _heads(g: GraphBuilder, x: str, w: np.ndarray, name: str, rope: bool) -> str:
    """[1, L, dim] -> projected and split into [1, heads, L, head_dim], RoPE applied."""
    t = g.op("Transpose", [g.op("Reshape", [_matmul(g, x, w, name), "split_shape"])],
             perm=[0, 2, 1, 3])
    if not rope:
        return t
    # (t * sin) @ P equals (t @ P) * sin (sin is the same for both halves of a pair); in
    # this order rknn-toolkit2 does not try to fold the position-wise sin into P.
    return g.op("Add", [g.op("Mul", [t, "rope_cos"]),
                        g.op("MatMul", [g.op("Mul", [t, "rope_sin"]), "rope_swap"])])


def _repeat_kv(w: np.ndarray, shape: LlamaShape) -> np.ndarray:
    """A key/value projection's rows, each KV head repeated for its group of query heads
    (llama.cpp's grouping: query head h reads KV head h // (n_head / n_head_kv))."""
    per_head = w.reshape(shape.n_head_kv, shape.head_dim, w.shape[-1])
    return np.repeat(per_head, shape.n_head // shape.n_head_kv, axis=0).reshape(-1, w.shape[-1])


def token_embeddings(gguf_path: Path) -> np.ndarray:
    """The GGUF's token-embedding matrix [vocab, dim], dequantised."""
    import gguf

    return read_weights(gguf.GGUFReader(str(gguf_path)))["token_embd.weight"]


def build_rerank_onnx(gguf_path: Path, seq_len: int, yes_id: int, no_id: int,
                      out_path: Path) -> None:
    """Write the rerank graph of a llama GGUF: inputs_embeds float16 [1, L, dim] (the token
    embeddings, looked up on the host: npu/token_table.py) -> yes_no_logits [1, L, 2]. No
    mask: the prompt is right-padded and causal attention keeps the padding out of every
    position up to its last token, the one the score reads."""
    import gguf
    from onnx import TensorProto, helper

    reader = gguf.GGUFReader(str(gguf_path))
    shape = read_shape(reader)
    w = read_weights(reader)
    del reader
    g = GraphBuilder()
    cos, sin, swap = _rope_tables(shape, seq_len)
    g.const("rope_cos", cos)
    g.const("rope_sin", sin)
    g.const("rope_swap", swap)
    g.const("eps", np.array(shape.eps, np.float32))
    g.const("split_shape", np.array([1, seq_len, shape.n_head, shape.head_dim], np.int64))
    g.const("merge_shape", np.array([1, seq_len, shape.dim], np.int64))
    g.const("scale", np.array(1.0 / np.sqrt(shape.head_dim), np.float32))
    causal = np.triu(np.full((seq_len, seq_len), MASKED, np.float32), k=1)[None, None]
    g.const("causal_mask", causal)

    x = g.op("Cast", ["inputs_embeds"], to=TensorProto.FLOAT)
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        h = _rms_norm(g, x, w[p + "attn_norm.weight"], shape.eps, f"l{i}.attn_norm")
        q = _heads(g, h, w[p + "attn_q.weight"], f"l{i}.q", rope=True)
        k = _heads(g, h, _repeat_kv(w[p + "attn_k.weight"], shape), f"l{i}.k", rope=True)
        v = _heads(g, h, _repeat_kv(w[p + "attn_v.weight"], shape), f"l{i}.v", rope=False)
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op(
            "Transpose", [k], perm=[0, 1, 3, 2])]), "scale"]), "causal_mask"])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), "merge_shape"])
        x = g.op("Add", [x, _matmul(g, ctx, w[p + "attn_output.weight"], f"l{i}.o")])
        h = _rms_norm(g, x, w[p + "ffn_norm.weight"], shape.eps, f"l{i}.ffn_norm")
        gate = _matmul(g, h, w[p + "ffn_gate.weight"], f"l{i}.gate")
        up = _matmul(g, h, w[p + "ffn_up.weight"], f"l{i}.up")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) up
        x = g.op("Add", [x, _matmul(g, act, w[p + "ffn_down.weight"], f"l{i}.down")])
    x = _rms_norm(g, x, w["output_norm.weight"], shape.eps, "output_norm")
    head = w.get("output.weight", w["token_embd.weight"])  # tied embeddings: no output.weight
    logits = _matmul(g, x, head[[yes_id, no_id]], "yes_no_head")
    save_model(g, logits, OUTPUT, "causal_lm_rerank",
               [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16,
                                              [1, seq_len, shape.dim])],
               helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, seq_len, 2]),
               out_path)
