"""A tiny ONNX graph builder: named initializers, nodes with generated output names, and
the checked save. The exporters (BERT embedding, causal-LM rerank) write their graphs
node by node from the weights with it, so neither needs torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17  # LayerNormalization is a single op from 17 on


class GraphBuilder:
    """A tiny builder: named initializers and nodes with generated output names."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self.n += 1
        out = f"{op_type.lower()}_{self.n}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out


def save_model(g: GraphBuilder, result: str, output_name: str, graph_name: str,
               inputs: list[Any], output: Any, path: Path) -> None:
    """Name the result, check the model and write it (weights inline: under 2 GB)."""
    import onnx
    from onnx import helper

    g.nodes.append(helper.make_node("Identity", [result], [output_name]))
    graph = helper.make_graph(g.nodes, graph_name, inputs, [output], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
