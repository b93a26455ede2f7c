"""Logit rerank on the NPU: the judgement prompt of each document, right-padded into the
smallest bucket that holds it, through the causal-LM graph `npuserve convert --task rerank`
writes; the score is P("yes") from the yes/no logits at the prompt's last token.

The prompt is the CPU backend's, token for token: the same template (prefix, document,
suffix), the same tokenizer (rebuilt from the GGUF twin), the document truncated to what
the largest bucket leaves. What the NPU cannot do is keep the prefix's KV cache between
documents (the graph is static), so every document pays for the whole prompt."""

from __future__ import annotations

from npuserve.daemon.config import DEFAULT_RERANK_TEMPLATE
from npuserve.daemon.models.backend_api import ModelLoadError, RerankOutput
from npuserve.daemon.models.qmd_conventions import MIN_DOC_TOKENS, p_yes, split_rerank_template

from .model_backend import NpuModelBackend
from .model_dir import Bucket, NpuModel


class NpuRerankBackend(NpuModelBackend):
    task = "rerank"

    def _manifest(self) -> NpuModel:
        model = super()._manifest()
        if model.rerank.get("columns") != ["yes", "no"]:
            raise ModelLoadError(f"{self.spec.path}: the manifest's rerank.columns must be"
                                 ' ["yes", "no"]')
        return model

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        model = self._manifest()
        template = str(self.spec.option("template", DEFAULT_RERANK_TEMPLATE))
        prefix_text, suffix_text = split_rerank_template(template, instruction, query)
        prefix = self._encode(prefix_text, special=True)
        suffix = self._encode(suffix_text, special=True)
        budget = model.buckets[-1].seq_len - len(prefix) - len(suffix)
        if budget < MIN_DOC_TOKENS:
            raise ValueError(f"query is too long for the rerank model's largest bucket"
                             f" ({len(prefix)} prompt tokens, {model.buckets[-1].seq_len})")
        if max_doc_tokens:
            budget = max(MIN_DOC_TOKENS, min(budget, max_doc_tokens))
        jobs: list[tuple[list[int], Bucket]] = []
        truncated: list[bool] = []
        for doc in documents:
            ids = self._encode(doc)
            truncated.append(len(ids) > budget)
            ids = prefix + ids[:budget] + suffix
            jobs.append((ids, model.bucket_for(len(ids))))
        scores = []
        for (ids, _), out in zip(jobs, self._run(jobs), strict=True):
            yes, no = out.reshape(-1, 2)[len(ids) - 1]
            scores.append(p_yes(float(yes), float(no)))
        return RerankOutput(scores=scores, truncated=truncated,
                            tokens=sum(len(ids) for ids, _ in jobs))
