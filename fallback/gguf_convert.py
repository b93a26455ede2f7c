"""Convert a Hugging Face BERT sentence-embedding model (safetensors) to GGUF.

Only what the default embedding model (all-MiniLM-L6-v2) needs: the BERT
architecture with WordPiece vocabulary and the sentence-transformers pooling
mode. It uses gguf-py's tensor-name map and safetensors' numpy loader, so the
daemon's install never pulls torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

ProgressFn = Callable[[int, int], None]

# Tensors llama.cpp's BERT graph does not use (HF pooler, MLM heads).
_SKIPPED = ("embeddings.position_ids", "pooler.", "cls.")
_F32_TABLES = ("token_types", "position_embd")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pooling_type(model_dir: Path) -> int | None:
    import gguf

    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return None
    for module in json.loads(modules_path.read_text(encoding="utf-8")):
        if module["type"].endswith("Pooling"):
            cfg = _read_json(model_dir / module["path"] / "config.json")
            if cfg.get("pooling_mode_mean_tokens"):
                return int(gguf.PoolingType.MEAN)
            if cfg.get("pooling_mode_cls_token"):
                return int(gguf.PoolingType.CLS)
            if cfg.get("pooling_mode_lasttoken"):
                return int(gguf.PoolingType.LAST)
    return None


def _wordpiece_vocab(model_dir: Path) -> tuple[list[str], list[int]]:
    """Tokens in llama.cpp's "phantom space" WPM form, with their types."""
    import gguf

    vocab = _read_json(model_dir / "tokenizer.json")["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    tokens: list[str] = []
    types: list[int] = []
    for tok, _ in by_id:
        if tok.startswith("[") and tok.endswith("]"):
            tokens.append(tok)
            types.append(int(gguf.TokenType.CONTROL))
        elif tok.startswith("##"):
            tokens.append(tok[2:])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append("\u2581" + tok)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _hf_name(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[:-6] + ".weight"
    if name.endswith(".beta"):
        name = name[:-5] + ".bias"
    return name


def convert_bert(model_dir: Path, out_path: Path, progress: ProgressFn | None = None) -> None:
    """Write `out_path` (f16 matrices, f32 vectors) from the model in `model_dir`."""
    import gguf
    from safetensors.numpy import load_file

    hp = _read_json(model_dir / "config.json")
    if hp.get("model_type") != "bert":
        raise ValueError(f"only BERT models convert without torch, got {hp.get('model_type')!r}")
    n_layers = int(hp["num_hidden_layers"])
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_block_count(n_layers)
    writer.add_context_length(int(hp["max_position_embeddings"]))
    writer.add_embedding_length(int(hp["hidden_size"]))
    writer.add_feed_forward_length(int(hp["intermediate_size"]))
    writer.add_head_count(int(hp["num_attention_heads"]))
    writer.add_layer_norm_eps(float(hp["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if (pooling := _pooling_type(model_dir)) is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))

    tokens, types = _wordpiece_vocab(model_dir)
    writer.add_token_type_count(int(hp.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    name_map = gguf.get_tensor_name_map(arch, n_layers)
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = [n for n in tensors if not n.startswith(_SKIPPED)]
    for i, name in enumerate(names):
        hf = _hf_name(name)
        new_name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"cannot map tensor {name!r}")
        data = tensors[name]
        # Norms, biases and the tables llama.cpp adds directly (token types,
        # positions) must stay f32; the ggml add op has no f32 + f16 form.
        keep_f32 = data.ndim <= 1 or new_name.startswith(_F32_TABLES)
        data = data.astype(np.float32 if keep_f32 else np.float16)
        writer.add_tensor(new_name, data)
        if progress:
            progress(i + 1, len(names))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
