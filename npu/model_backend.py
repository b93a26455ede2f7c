"""What every NPU backend shares: the model directory's manifest and tokenizer, one
context pool per sequence-length bucket, and the static, right-padded inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from npuserve.daemon.models.backend_api import Backend, BackendError, LoadInfo, ModelLoadError
from npuserve.daemon.models.qmd_conventions import MIN_DOC_TOKENS
from npuserve.daemon.worker.protocol import ModelSpec

from .detect import installed_runtime_version, model_version_problem
from .model_dir import Bucket, ManifestError, NpuModel, load_manifest
from .rknn_runtime import ContextPool, NpuError
from .token_table import TokenTable, float_mask


class NpuModelBackend(Backend):
    task = ""  # the manifest's task this backend serves

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: NpuModel | None = None
        self.tokenizer: Any = None
        self.pools: dict[int, ContextPool] = {}
        self.table: TokenTable | None = None

    def _manifest(self) -> NpuModel:
        if self.model is None:
            try:
                model = load_manifest(Path(self.spec.path))
            except ManifestError as exc:
                raise ModelLoadError(str(exc)) from None
            if model.task != self.task:
                raise ModelLoadError(f"{self.spec.path}: a {model.task} model, not {self.task}")
            self.model = model
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

    def _encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids without the post-processor's additions; special tokens in the text are
        matched only when `special` (a prompt template's, never a document's)."""
        tok = self._tokenizer()
        tok.encode_special_tokens = not special
        return list(tok.encode(text, add_special_tokens=False).ids)

    def load(self) -> LoadInfo:
        model = self._manifest()
        self._tokenizer()
        try:
            self.table = TokenTable(model.root / model.token_embeddings)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{model.root}: token embeddings: {exc}") from None
        cores = int(self.spec.option("npu_cores", 3))
        runtime = str(self.spec.option("npu_runtime", "rknnlite"))
        try:
            for bucket in model.buckets:
                self.pools[bucket.seq_len] = ContextPool(model.root / bucket.rknn, cores, runtime)
        except NpuError as exc:
            self.unload()
            raise ModelLoadError(f"NPU: {exc}{self._version_hint(model)}") from None
        return LoadInfo(name=model.name, tasks=[self.task], dim=model.dim,
                        n_ctx=model.buckets[-1].seq_len,
                        details={"buckets": [b.seq_len for b in model.buckets],
                                 "cores": cores, "runtime": runtime})

    @staticmethod
    def _version_hint(model: NpuModel) -> str:
        """The likeliest cause of a refused graph, when the versions show it: RKNNLite
        only logs the reason, and the error is what /health shows the operator."""
        problem = model_version_problem(model.name, model.toolkit_version,
                                        installed_runtime_version())
        return f"; {problem[0]} (fix: {problem[1]})" if problem else ""

    def unload(self) -> None:
        for pool in self.pools.values():
            pool.release()
        self.pools = {}
        self.table = None


    def _inputs(self, ids: list[int], bucket: Bucket) -> list[np.ndarray]:
        """The graph's static inputs: the tokens' embedding rows (looked up here, not in the
        graph: RKNNLite takes no int64 ids) and, where the graph has one, a float mask."""
        model = self._manifest()
        if self.table is None:
            raise BackendError(f"NPU {self.task} model is not loaded")
        arrays = []
        for spec in model.inputs:
            if spec["name"] == "inputs_embeds":
                arrays.append(self.table.embeds(ids, bucket.seq_len))
            elif spec["name"] == "attention_mask":
                arrays.append(float_mask(len(ids), bucket.seq_len))
            else:
                raise BackendError(f"NPU model input {spec['name']!r} is not one npuserve"
                                   " feeds")
        return arrays

    def _pair_jobs(self, head: list[int], tail: list[int], documents: list[str],
                   max_doc_tokens: int) -> tuple[list[tuple[list[int], Bucket]], list[bool]]:
        """Each document between a rerank prompt's `head` and `tail` tokens, cut to what
        the largest bucket leaves (and `max_doc_tokens`), in the smallest bucket that
        holds it; and which documents were cut."""
        model = self._manifest()
        budget = model.buckets[-1].seq_len - len(head) - len(tail)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(f"query is too long for the rerank model's largest bucket"
                             f" ({len(head)} prompt tokens, {model.buckets[-1].seq_len})")
        if max_doc_tokens:
            budget = max(MIN_DOC_TOKENS, min(budget, max_doc_tokens))
        jobs: list[tuple[list[int], Bucket]] = []
        truncated: list[bool] = []
        for doc in documents:
            ids = self._encode(doc)
            truncated.append(len(ids) > budget)
            ids = head + ids[:budget] + tail
            jobs.append((ids, model.bucket_for(len(ids))))
        return jobs, truncated

    def _run(self, jobs: list[tuple[list[int], Bucket]]) -> list[np.ndarray]:
        """Each job's first output, bucket by bucket, spread over the core contexts."""
        if not self.pools:
            raise BackendError(f"NPU {self.task} model is not loaded")
        outputs: list[Any] = [None] * len(jobs)
        try:
            for bucket_len in sorted({b.seq_len for _, b in jobs}):
                idx = [i for i, (_, b) in enumerate(jobs) if b.seq_len == bucket_len]
                results = self.pools[bucket_len].run_many(
                    [self._inputs(*jobs[i]) for i in idx])
                for i, res in zip(idx, results, strict=True):
                    outputs[i] = res[0]
        except NpuError as exc:
            raise BackendError(f"NPU: {exc}") from None
        return outputs
