"""GGUF files the tests build with gguf-py, for architectures no PyPI package ships.

A cross-encoder reranker is a BERT encoder with a classification head, pooled by llama.cpp
as "rank": built here from the real all-MiniLM-L6-v2 GGUF (its tokenizer, its 6 layers) with
a head of seeded random weights under llama.cpp's tensor names (`cls`, `cls.output`) and
`bert.pooling_type = 4`. The scores mean nothing; the graph, the tokenizer and the pooling
are what a real bge-reranker or ms-marco cross-encoder GGUF has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Dims:
    """A decoder stack's shape, small."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def hd(self) -> int:
        return self.n_embd // self.n_head


def _add_shape(writer: GGUFWriter, d: Dims, rope_base: float) -> None:
    """The hyperparameters llama.cpp reads for a Qwen3- or Gemma-3-style stack."""
    writer.add_block_count(d.n_layer)
    writer.add_context_length(2048)
    writer.add_embedding_length(d.n_embd)
    writer.add_feed_forward_length(d.n_ff)
    writer.add_head_count(d.n_head)
    writer.add_head_count_kv(d.n_head_kv)
    writer.add_key_length(d.hd)
    writer.add_value_length(d.hd)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-6)


def _random(seed: int) -> Callable[..., np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return w


def _add_blocks(writer: GGUFWriter, d: Dims, w: Callable[..., np.ndarray],
                post_norms: bool) -> None:
    """Every layer's tensors under llama.cpp's names (q/k norms per head; with `post_norms`,
    Gemma 3's norms after attention and FFN), then the output norm. Norms are stored as
    ones (Gemma's GGUFs store 1 + w, the converter adds the one)."""
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    hd = d.hd
    for i in range(d.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones(d.n_embd))
        writer.add_tensor(p + "attn_q.weight", w(d.n_head * hd, d.n_embd))
        writer.add_tensor(p + "attn_k.weight", w(d.n_head_kv * hd, d.n_embd))
        writer.add_tensor(p + "attn_v.weight", w(d.n_head_kv * hd, d.n_embd))
        writer.add_tensor(p + "attn_q_norm.weight", ones(hd))
        writer.add_tensor(p + "attn_k_norm.weight", ones(hd))
        writer.add_tensor(p + "attn_output.weight", w(d.n_embd, d.n_head * hd))
        if post_norms:
            writer.add_tensor(p + "post_attention_norm.weight", ones(d.n_embd))
        writer.add_tensor(p + "ffn_norm.weight", ones(d.n_embd))
        writer.add_tensor(p + "ffn_gate.weight", w(d.n_ff, d.n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(d.n_ff, d.n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(d.n_embd, d.n_ff))
        if post_norms:
            writer.add_tensor(p + "post_ffw_norm.weight", ones(d.n_embd))
    writer.add_tensor("output_norm.weight", ones(d.n_embd))


def _write(writer: GGUFWriter, out: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


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
    return _write(writer, out)


# Qwen3's chat template as the Qwen3 GGUFs carry it, thinking switch included (llama.cpp's
# built-in renderer recognises it as ChatML).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking"
    " is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
LAST_POOLING = 3


def tiny_qwen3(tokenizer_from: Path, out: Path, *, pooling: int | None = None, seed: int = 3,
               n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
               n_ff: int = 128) -> Path:
    """A `qwen3` GGUF with Qwen3's tensor names, norms (q/k RMSNorm per head), grouped-query
    attention and template, random weights of small dimensions, and the BPE tokenizer of
    `tokenizer_from` (SmolLM2's: ChatML special tokens, "yes"/"no" single tokens). With
    `pooling` (LAST_POOLING: Qwen3-Embedding's last-token pooling) it is an embedding
    model and appends EOS as Qwen3-Embedding does."""
    src = GGUFReader(tokenizer_from)
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    d = Dims(n_embd, n_layer, n_head, n_head_kv, n_ff)
    writer = GGUFWriter(out, "qwen3")
    writer.add_name("tiny-qwen3")
    _add_shape(writer, d, 1_000_000.0)
    if pooling is not None:
        writer.add_uint32("qwen3.pooling_type", pooling)
    for name, field in src.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        if name == "tokenizer.ggml.add_eos_token":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_chat_template(QWEN3_TEMPLATE)
    writer.add_add_eos_token(pooling is not None)
    w = _random(seed)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd, scale=0.5))
    _add_blocks(writer, d, w, post_norms=False)
    writer.add_tensor("output.weight", w(n_vocab, n_embd, scale=0.5))
    return _write(writer, out)


MEAN_POOLING = 1
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE = 1, 2, 3, 6
WORDS = ("cats sleep hours day dogs play fetch park stock market fell search result query"
         " text title task kernel module load").split()


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece vocabulary as Gemma's GGUFs carry it: control tokens, byte
    fallback for every byte, and whole words with the "▁" space marker."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [SPM_CONTROL, SPM_CONTROL, SPM_CONTROL, SPM_UNKNOWN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [SPM_BYTE] * 256
    pieces = ["▁"] + [f"▁{w}" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz|:")
    tokens += pieces
    types += [SPM_NORMAL] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_gemma_embedding(out: Path, *, seed: int = 11, n_embd: int = 64, n_layer: int = 6,
                         n_head: int = 4, n_head_kv: int = 1, n_ff: int = 128,
                         n_dense: int = 96) -> Path:
    """A `gemma-embedding` GGUF (embeddinggemma's architecture: Gemma 3 blocks with pre- and
    post-norms, q/k norms, bidirectional attention, mean pooling) with random weights of
    small dimensions and a small SentencePiece vocabulary of Gemma's kind. Six layers, as
    Gemma 3's pattern has five sliding-window layers to one global: with no global layer
    llama.cpp leaves the global mask unallocated and aborts on the first input."""
    arch = "gemma-embedding"
    d = Dims(n_embd, n_layer, n_head, n_head_kv, n_ff)
    writer = GGUFWriter(out, arch)
    writer.add_name("tiny-embeddinggemma")
    _add_shape(writer, d, 10_000.0)
    writer.add_uint32(f"{arch}.attention.sliding_window", 512)
    writer.add_uint32(f"{arch}.pooling_type", MEAN_POOLING)
    tokens, scores, types = _spm_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    w = _random(seed)
    writer.add_tensor("token_embd.weight", w(len(tokens), n_embd, scale=0.5))
    _add_blocks(writer, d, w, post_norms=True)
    # sentence-transformers' two dense projections after pooling (768 -> 3072 -> 768 in
    # embeddinggemma), here n_embd -> n_dense -> n_embd.
    writer.add_tensor("dense_2.weight", w(n_dense, n_embd))
    writer.add_tensor("dense_3.weight", w(n_embd, n_dense))
    writer.add_uint32(f"{arch}.dense_2_feat_in", n_embd)
    writer.add_uint32(f"{arch}.dense_2_feat_out", n_dense)
    writer.add_uint32(f"{arch}.dense_3_feat_in", n_dense)
    writer.add_uint32(f"{arch}.dense_3_feat_out", n_embd)
    return _write(writer, out)
