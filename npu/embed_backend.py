"""Embedding on the NPU: tokenise, pick the smallest sequence bucket, pad to the
static shape, run on the core contexts, pool and normalise where the manifest says."""

from __future__ import annotations

import numpy as np

from npuserve.daemon.models.backend_api import EmbedOutput
from npuserve.daemon.models.vector_rows import VectorRows

from .model_backend import NpuModelBackend
from .model_dir import Bucket


class NpuEmbedBackend(NpuModelBackend):
    task = "embed"

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer().encode(text).ids)

    def token_ids(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._tokenizer().encode(text, add_special_tokens=add_special).ids)

    def _pool(self, out: np.ndarray, n: int) -> np.ndarray:
        model = self._manifest()
        if model.pooling == "in_graph":
            vec = out.reshape(-1)[: model.dim]
        elif model.pooling == "cls":
            vec = out[0, 0]
        elif model.pooling == "last":
            vec = out[0, n - 1]
        else:
            vec = out[0, :n].mean(axis=0)
        if model.normalize == "numpy":
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        return vec.astype(np.float32)

    def embed(self, texts: list[str]) -> EmbedOutput:
        model = self._manifest()
        tok = self._tokenizer()
        tok.encode_special_tokens = False
        longest = model.buckets[-1].seq_len
        jobs: list[tuple[list[int], Bucket]] = []
        truncated: list[bool] = []
        for text in texts:
            ids = tok.encode(text).ids
            cut = len(ids) > longest
            if cut:  # keep the final special token ([SEP]) as truncation would
                ids = ids[: longest - 1] + ids[-1:]
            truncated.append(cut)
            jobs.append((ids, model.bucket_for(len(ids))))
        out = np.empty((len(texts), model.dim), dtype=np.float32)
        for i, res in enumerate(self._run(jobs)):
            out[i] = self._pool(res, len(jobs[i][0]))
        return EmbedOutput(vectors=VectorRows(out.astype("<f4").tobytes(), model.dim),
                           truncated=truncated,
                           tokens=sum(len(ids) for ids, _ in jobs))
