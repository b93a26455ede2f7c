"""The token-embedding lookup, done on the host.

RKNNLite takes int8, uint8, int16, float16 and float32 inputs only. Token ids do not fit
int16 for vocabularies over 32,767 (SmolLM2: 49,152; Qwen3: 151,669): cast, they turn
negative and ONNX's Gather reads wrong rows without an error. So the graphs take the
embedded tokens as float16 `inputs_embeds` [1, seq_len, dim] and the lookup is a numpy
row gather over the model's table, stored fp16 beside the graphs and memory-mapped (one
copy in the page cache, however many contexts and workers read it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TABLE_FILE = "token_embeddings.f16.npy"
# What the graphs take; the reference runtime refuses anything RKNNLite would.
EMBEDS_DTYPE = np.float16


def write_table(out_dir: Path, weights: np.ndarray) -> str:
    """The [vocab, dim] token-embedding matrix as fp16; returns its file name."""
    if weights.ndim != 2:
        raise ValueError(f"a token-embedding table is [vocab, dim], not {weights.shape}")
    np.save(out_dir / TABLE_FILE, np.ascontiguousarray(weights, dtype=EMBEDS_DTYPE))
    return TABLE_FILE


class TokenTable:
    """Rows of the memory-mapped table for a right-padded static input."""

    def __init__(self, path: Path) -> None:
        self.table = np.load(path, mmap_mode="r")
        if self.table.ndim != 2 or self.table.dtype != EMBEDS_DTYPE:
            raise ValueError(f"{path.name}: not an fp16 [vocab, dim] table")
        self.vocab, self.dim = (int(n) for n in self.table.shape)

    def embeds(self, ids: list[int], seq_len: int) -> np.ndarray:
        """[1, seq_len, dim] float16: the ids' rows, then zeros (padding is masked, or
        after the causal prompt's last token)."""
        if len(ids) > seq_len:
            raise ValueError(f"{len(ids)} tokens do not fit a {seq_len}-token input")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab):
            raise ValueError(f"token id outside the vocabulary of {self.vocab}")
        out = np.zeros((1, seq_len, self.dim), dtype=EMBEDS_DTYPE)
        out[0, :len(ids)] = self.table[np.asarray(ids, dtype=np.int64)]
        return out


def float_mask(n: int, seq_len: int) -> np.ndarray:
    """[1, seq_len] float16 attention mask: 1 over the n tokens, 0 on padding."""
    mask = np.zeros((1, seq_len), dtype=EMBEDS_DTYPE)
    mask[0, :n] = 1
    return mask
