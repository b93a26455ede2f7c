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
from npuserve.daemon.models.qmd_conventions import p_yes, split_rerank_template

from .model_backend import NpuModelBackend
from .model_dir import NpuModel


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
        template = str(self.spec.option("template", DEFAULT_RERANK_TEMPLATE))
        prefix_text, suffix_text = split_rerank_template(template, instruction, query)
        jobs, truncated = self._pair_jobs(self._encode(prefix_text, special=True),
                                          self._encode(suffix_text, special=True),
                                          documents, max_doc_tokens)
        scores = []
        for (ids, _), out in zip(jobs, self._run(jobs), strict=True):
            yes, no = out.reshape(-1, 2)[len(ids) - 1]
            scores.append(p_yes(float(yes), float(no)))
        return RerankOutput(scores=scores, truncated=truncated,
                            tokens=sum(len(ids) for ids, _ in jobs))
