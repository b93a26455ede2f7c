"""Export a BERT sentence-embedding model (safetensors) to ONNX with static shapes.

The graph is written node by node from the weights (no torch): token, position
and type embeddings, the encoder layers, masked mean pooling and L2
normalisation, so the whole embedding runs in one graph. One file per
sequence-length bucket; these are the "ONNX twins" the reference runtime runs
on x86 and the input that rknn-toolkit2 converts for the RK3588.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import GraphBuilder, save_model


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _linear(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
    wt = g.const(f"{name}.wT", np.ascontiguousarray(w.T.astype(np.float32)))
    bb = g.const(f"{name}.b", b.astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, wt]), bb])


def _gelu_tanh(g: GraphBuilder, h: str, name: str) -> str:
    """GELU as 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))): the form llama.cpp computes
    (the CPU twin), within ~1e-3 of BERT's exact erf form. rknn-toolkit2 2.5.0 puts Erf on
    the CPU (six NPU-CPU round trips per MiniLM inference); Tanh runs on the NPU."""
    cube = g.op("Mul", [g.op("Mul", [h, h]), h])
    inner = g.op("Add", [h, g.op("Mul", [cube, g.const(f"{name}.c", np.array(0.044715,
                                                                            np.float32))])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(f"{name}.k", np.array(np.sqrt(2 / np.pi),
                                                                       np.float32))])])
    return g.op("Mul", [g.op("Mul", [h, g.op("Add", [t, "one"])]),
                        g.const(f"{name}.half", np.array(0.5, np.float32))])


def _layer_norm(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, eps: float,
                name: str) -> str:
    return g.op("LayerNormalization", [x, g.const(f"{name}.g", w.astype(np.float32)),
                                       g.const(f"{name}.beta", b.astype(np.float32))],
                axis=-1, epsilon=eps)


def bert_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.removeprefix("bert."): v
            for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def is_cross_encoder(model_dir: Path) -> bool:
    """A BERT sequence classifier (ms-marco / bge-reranker style): one output label."""
    hp = _read_json(model_dir / "config.json")
    return any(a.endswith("ForSequenceClassification") for a in hp.get("architectures", []))


def build_bert_onnx(model_dir: Path, seq_len: int, out_path: Path,
                    head: str = "embedding") -> None:
    """Write an ONNX graph from inputs_embeds float16 [1, seq_len, dim] (the token
    embeddings, looked up on the host: npu/token_table.py) and attention_mask float16
    [1, seq_len]: with head "embedding", the masked mean, L2-normalised -> embedding
    [1, dim]; with head "rank" (a cross-encoder), the [CLS] position through the pooler
    (dense, tanh) and the classifier -> logit [1, 1], as llama.cpp's rank pooling does."""
    from onnx import TensorProto, helper

    hp = _read_json(model_dir / "config.json")
    w = bert_weights(model_dir)
    dim, heads = int(hp["hidden_size"]), int(hp["num_attention_heads"])
    head_dim, eps = dim // heads, float(hp["layer_norm_eps"])
    g = GraphBuilder()

    embeds, mask = "inputs_embeds", "attention_mask"
    emb = g.op("Cast", [embeds], to=TensorProto.FLOAT)
    pos = w["embeddings.position_embeddings.weight"][:seq_len] + \
        w["embeddings.token_type_embeddings.weight"][0]
    x = g.op("Add", [emb, g.const("pos_type", pos[None].astype(np.float32))])
    x = _layer_norm(g, x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps,
                    "emb_ln")
    # Additive attention mask: 0 where attended, -1e4 on padding.
    maskf = g.op("Cast", [mask], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("one", np.array(1.0, np.float32)), maskf]),
                        g.const("neg", np.array(-1e4, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], np.int64))])
    split_shape = g.const("split_shape", np.array([1, seq_len, heads, head_dim], np.int64))
    merge_shape = g.const("merge_shape", np.array([1, seq_len, dim], np.int64))
    scale = g.const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    for i in range(int(hp["num_hidden_layers"])):
        p = f"encoder.layer.{i}."

        def heads_of(name: str, p: str = p, x: str = x, i: int = i) -> str:
            t = _linear(g, x, w[p + f"attention.self.{name}.weight"],
                        w[p + f"attention.self.{name}.bias"], f"l{i}.{name}")
            return g.op("Transpose", [g.op("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

        q, k, v = heads_of("query"), heads_of("key"), heads_of("value")
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, kt]), scale]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        attn = _linear(g, ctx, w[p + "attention.output.dense.weight"],
                       w[p + "attention.output.dense.bias"], f"l{i}.ao")
        x = _layer_norm(g, g.op("Add", [x, attn]), w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"], eps, f"l{i}.ln1")
        h = _linear(g, x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"],
                    f"l{i}.up")
        h = _gelu_tanh(g, h, f"l{i}")
        down = _linear(g, h, w[p + "output.dense.weight"], w[p + "output.dense.bias"],
                       f"l{i}.down")
        x = _layer_norm(g, g.op("Add", [x, down]), w[p + "output.LayerNorm.weight"],
                        w[p + "output.LayerNorm.bias"], eps, f"l{i}.ln2")
    if head == "rank":
        out = _rank_head(g, x, w)
        name, labels = "logit", int(w["classifier.weight"].shape[0])
    else:
        out = _mean_normalised(g, x, maskf)
        name, labels = "embedding", dim
    save_model(g, out, name, f"bert_{head}",
               [helper.make_tensor_value_info(embeds, TensorProto.FLOAT16, [1, seq_len, dim]),
                helper.make_tensor_value_info(mask, TensorProto.FLOAT16, [1, seq_len])],
               helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, labels]),
               out_path)


def _mean_normalised(g: GraphBuilder, x: str, maskf: str) -> str:
    """Masked mean pooling, then L2 normalisation."""
    m3 = g.op("Unsqueeze", [maskf, g.const("axis2", np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, m3]), g.const("axis1", np.array([1], np.int64))],
                  keepdims=0)
    count = g.op("ReduceSum", [maskf, "axis1"], keepdims=1)
    pooled = g.op("Div", [summed, count])
    norm = g.op("ReduceL2", [pooled], axes=[1], keepdims=1)  # axes is an attribute before 18
    # norm + tiny, not max(norm, tiny): the same for any real vector, and rknn-toolkit2
    # puts Max on the CPU.
    return g.op("Div", [pooled, g.op("Add", [norm, g.const("tiny", np.array(1e-12,
                                                                             np.float32))])])


def _rank_head(g: GraphBuilder, x: str, w: dict[str, np.ndarray]) -> str:
    """The [CLS] position through the pooler (dense, tanh) and the classifier."""
    cls = g.op("Gather", [x, g.const("cls_index", np.array(0, np.int64))], axis=1)  # [1, dim]
    pooled = g.op("Tanh", [_linear(g, cls, w["pooler.dense.weight"], w["pooler.dense.bias"],
                                   "pooler")])
    return _linear(g, pooled, w["classifier.weight"], w["classifier.bias"], "classifier")
