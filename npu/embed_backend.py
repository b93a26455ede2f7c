"""Embedding on the NPU: tokenise, pick the smallest sequence bucket, pad to the
static shape, run on the core contexts, pool and normalise where the manifest says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from npuserve.daemon.backend_api import Backend, BackendError, EmbedOutput, LoadInfo, ModelLoadError
from npuserve.daemon.vector_rows import VectorRows
from npuserve.daemon.worker_protocol import ModelSpec

from .model_dir import Bucket, ManifestError, NpuModel, load_manifest
from .rknn_runtime import ContextPool, NpuError

DTYPES = {"int64": np.int64, "int32": np.int32, "int16": np.int16, "float32": np.float32}


class NpuEmbedBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: NpuModel | None = None
        self.tokenizer: Any = None
        self.pools: dict[int, ContextPool] = {}

    def _manifest(self) -> NpuModel:
        if self.model is None:
            try:
                self.model = load_manifest(Path(self.spec.path))
            except ManifestError as exc:
                raise ModelLoadError(str(exc)) from None
        return self.model

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            from tokenizers import Tokenizer

            model = self._manifest()
            tok = Tokenizer.from_file(str(model.root / model.tokenizer))
            # tokenizer.json may pad/truncate to a fixed length: we pad per bucket ourselves.
            tok.no_padding()
            tok.no_truncation()
            self.tokenizer = tok
        return self.tokenizer

    def load(self) -> LoadInfo:
        model = self._manifest()
        self._tokenizer()
        cores = int(self.spec.option("npu_cores", 3))
        runtime = str(self.spec.option("npu_runtime", "rknnlite"))
        try:
            for bucket in model.buckets:
                self.pools[bucket.seq_len] = ContextPool(model.root / bucket.rknn, cores, runtime)
        except NpuError as exc:
            self.unload()
            raise ModelLoadError(f"NPU: {exc}") from None
        return LoadInfo(name=model.name, tasks=["embed"], dim=model.dim,
                        n_ctx=model.buckets[-1].seq_len,
                        details={"buckets": [b.seq_len for b in model.buckets],
                                 "cores": cores, "runtime": runtime})

    def unload(self) -> None:
        for pool in self.pools.values():
            pool.release()
        self.pools = {}

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer().encode(text).ids)

    def memory_estimate(self) -> int:
        model = self._manifest()
        cores = int(self.spec.option("npu_cores", 3))
        total = sum((model.root / b.rknn).stat().st_size for b in model.buckets
                    if (model.root / b.rknn).exists())
        return total * cores

    def _inputs(self, ids: list[int], bucket: Bucket) -> list[np.ndarray]:
        model = self._manifest()
        n = len(ids)
        arrays = []
        for spec in model.inputs:
            arr = np.zeros((1, bucket.seq_len), dtype=DTYPES[spec.get("dtype", "int64")])
            if spec["name"] == "input_ids":
                arr[0, :n] = ids
            elif spec["name"] == "attention_mask":
                arr[0, :n] = 1
            # token_type_ids stay zero
            arrays.append(arr)
        return arrays

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
        if not self.pools:
            raise BackendError("NPU embedding model is not loaded")
        model = self._manifest()
        tok = self._tokenizer()
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
        try:
            for bucket_len in sorted({b.seq_len for _, b in jobs}):
                idx = [i for i, (_, b) in enumerate(jobs) if b.seq_len == bucket_len]
                batches = [self._inputs(jobs[i][0], jobs[i][1]) for i in idx]
                results = self.pools[bucket_len].run_many(batches)
                for i, res in zip(idx, results, strict=True):
                    out[i] = self._pool(res[0], len(jobs[i][0]))
        except NpuError as exc:
            raise BackendError(f"NPU: {exc}") from None
        return EmbedOutput(vectors=VectorRows(out.astype("<f4").tobytes(), model.dim),
                           truncated=truncated,
                           tokens=sum(len(ids) for ids, _ in jobs))
