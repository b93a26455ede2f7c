"""Cross-encoder rerank on the NPU: each (query, document) pair as [CLS] query [SEP]
document [SEP] — the CPU cross-encoder's tokens (fallback/llama_cross.py) — right-padded
into the smallest bucket that holds it, through the BERT graph that ends in the
classifier's logit (`npuserve convert --task rerank --from A_CROSS_ENCODER_DIR`); the score
is its sigmoid. Every token type is 0, as llama.cpp's BERT graph has it."""

from __future__ import annotations

from npuserve.daemon.models.backend_api import ModelLoadError, RerankOutput
from npuserve.daemon.models.qmd_conventions import p_yes

from .model_backend import NpuModelBackend
from .model_dir import CROSS_ENCODER, NpuModel


class NpuCrossEncoderBackend(NpuModelBackend):
    task = "rerank"

    def _manifest(self) -> NpuModel:
        model = super()._manifest()
        if model.rerank.get("kind") != CROSS_ENCODER:
            raise ModelLoadError(f"{self.spec.path}: not a cross-encoder directory")
        return model

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _special(self, token: str) -> list[int]:
        found = self._tokenizer().token_to_id(token)
        return [] if found is None else [int(found)]

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        sep = self._special("[SEP]")
        jobs, truncated = self._pair_jobs(self._special("[CLS]") + self._encode(query) + sep,
                                          sep, documents, max_doc_tokens)
        # sigmoid(logit) = softmax([logit, 0])[0]
        scores = [p_yes(float(out.reshape(-1)[0]), 0.0) for out in self._run(jobs)]
        return RerankOutput(scores=scores, truncated=truncated,
                            tokens=sum(len(ids) for ids, _ in jobs))
