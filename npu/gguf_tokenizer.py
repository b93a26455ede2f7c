"""A Hugging Face `tokenizer.json` rebuilt from a GGUF file's own vocabulary.

An NPU model directory tokenises with the `tokenizers` library; a model that comes as a
GGUF (the CPU twin the daemon already has) carries its vocabulary, merges and token
types in its metadata. Byte-level BPE ("gpt2" in GGUF terms) is rebuilt here, with the
pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`; the result must give the ids
llama.cpp gives (tests/test_npu_rerank.py compares them text by text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# llama.cpp's token types (llama_token_type): control and user-defined tokens are
# matched whole, before BPE, when a prompt's special tokens are parsed.
CONTROL, USER_DEFINED = 3, 4
# GGUF `tokenizer.ggml.pre` values whose splitting is rebuilt here, and how.
SUPPORTED_PRE = ("smollm",)


class TokenizerExportError(ValueError):
    pass


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    if pre == "smollm":  # llama.cpp: "\p{N}" then GPT-2's split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    raise TokenizerExportError(
        f"tokenizer.ggml.pre = {pre!r}: only {', '.join(SUPPORTED_PRE)} is rebuilt so far;"
        " convert from a model directory that has its own tokenizer.json")


def tokenizer_from_gguf(gguf_path: Path, out_path: Path) -> None:
    """Write `out_path` (tokenizer.json) equivalent to the GGUF's llama.cpp tokenizer."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models

    reader = gguf.GGUFReader(str(gguf_path))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerExportError(f"{gguf_path.name}: tokenizer.ggml.model = {kind!r};"
                                   " only byte-level BPE ('gpt2') is rebuilt")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre") or "default"))
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their GGUF ids (they are in the BPE vocabulary already).
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    tok.save(str(out_path))
