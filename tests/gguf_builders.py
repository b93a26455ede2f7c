"""GGUF files the tests build with gguf-py, for architectures no PyPI package ships.

A cross-encoder reranker is a BERT encoder with a classification head, pooled by llama.cpp
as "rank": built here from the real all-MiniLM-L6-v2 GGUF (its tokenizer, its 6 layers) with
a head of seeded random weights under llama.cpp's tensor names (`cls`, `cls.output`) and
`bert.pooling_type = 4`. The scores mean nothing; the graph, the tokenizer and the pooling
are what a real bge-reranker or ms-marco cross-encoder GGUF has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

RANK_POOLING = 4


def _copy_fields(reader: GGUFReader, writer: GGUFWriter, override: dict[str, int]) -> None:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes the header and the architecture itself
        if name in override:
            writer.add_key_value(name, override[name], GGUFValueType.UINT32)
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def cross_encoder_from(encoder: Path, out: Path, seed: int = 7) -> Path:
    """A BERT cross-encoder GGUF: `encoder`'s weights and tokenizer plus a random head."""
    reader = GGUFReader(encoder)
    arch = reader.fields["general.architecture"].contents()
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    writer = GGUFWriter(out, arch)
    _copy_fields(reader, writer, {f"{arch}.pooling_type": RANK_POOLING})
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape)),
                          raw_dtype=t.tensor_type)
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(n_embd)
    writer.add_tensor("cls.weight", (rng.standard_normal((n_embd, n_embd)) * scale)
                      .astype(np.float32))
    writer.add_tensor("cls.bias", np.zeros(n_embd, dtype=np.float32))
    writer.add_tensor("cls.output.weight", (rng.standard_normal((1, n_embd)) * scale * 4)
                      .astype(np.float32))
    writer.add_tensor("cls.output.bias", np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
