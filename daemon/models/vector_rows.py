"""Embedding vectors in the daemon process: float32 rows over one bytes buffer.

The daemon never imports numpy (11 MB of RSS measured, for slicing and serialising):
the worker packs a batch as float32 bytes and everything here reads it through
memoryviews. Every supported board and this host are little-endian, which is what
sqlite-vec blobs and OpenAI's base64 encoding expect; `le_bytes` swaps if not.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterable, Iterator


class VectorRows:
    """n rows of dim float32 values. rows[i] is a memoryview: .tolist(), bytes()."""

    def __init__(self, data: bytes, dim: int) -> None:
        if dim <= 0 or len(data) % (4 * dim):
            raise ValueError(f"{len(data)} bytes are not rows of {dim} float32 values")
        self.data, self.dim = data, dim
        self._flat = memoryview(data).cast("f")

    def __len__(self) -> int:
        return len(self._flat) // self.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def __getitem__(self, i: int) -> memoryview:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._flat[i * self.dim:(i + 1) * self.dim]

    def __iter__(self) -> Iterator[memoryview]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_rows(cls, rows: Iterable[Iterable[float]], dim: int) -> VectorRows:
        data = array("f")
        for row in rows:
            data.extend(row)
        return cls(data.tobytes(), dim)

    def __array__(self, dtype: object = None, copy: object = None) -> object:
        """numpy's view of the rows (for backends and tests that have numpy anyway)."""
        import numpy as np

        arr = np.frombuffer(self.data, dtype=np.float32).reshape(len(self), self.dim)
        return arr if dtype is None else arr.astype(dtype)

    def slice(self, start: int, stop: int) -> VectorRows:
        return VectorRows(self.data[start * self.dim * 4:stop * self.dim * 4], self.dim)

    def tolist(self) -> list[list[float]]:
        # float32 -> Python float is exact, as numpy's tolist() is.
        return [row.tolist() for row in self]


def l2_normalized(vec: list[float]) -> list[float]:
    """vec / |vec| (a zero vector stays zero); exact float math, no numpy."""
    norm = math.hypot(*vec)  # one C call; vectors are a few hundred to a few thousand values
    return vec if norm == 0 else [x / norm for x in vec]


def le_bytes(vector: memoryview | Iterable[float]) -> bytes:
    """Little-endian float32 bytes of one vector (a row, a list, any float sequence)."""
    if isinstance(vector, memoryview) and vector.format == "f" and sys.byteorder == "little":
        return vector.tobytes()
    values = array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()
