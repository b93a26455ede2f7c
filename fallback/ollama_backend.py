"""A task served by an Ollama-compatible server, e.g. rkllama running RKLLM models
on the RK3588's NPU: POST /api/embed, /api/rerank (rkllama's logit rerank) and
/api/generate. The remote server does the work; this backend adds npuserve's
prompt, grammar-free parsing, timeouts and retries."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from typing import Any

from npuserve.daemon.models.backend_api import (
    Backend,
    BackendError,
    EmbedOutput,
    ExpandOutput,
    LoadInfo,
    ModelLoadError,
    RerankOutput,
)
from npuserve.daemon.models.qmd_conventions import expansion_prompt, parse_expansion
from npuserve.daemon.models.vector_rows import VectorRows, l2_normalized
from npuserve.daemon.worker.protocol import ModelSpec

RETRY_STATUSES = (429, 500, 502, 503, 504)


class OllamaBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.url = str(spec.option("ollama_url", "")).rstrip("/")
        self.model = str(spec.option("ollama_model", "")) or spec.path
        self.timeout = float(spec.option("ollama_timeout", 120.0))
        self.retries = int(spec.option("ollama_retries", 2))

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST with retries on connection errors and 429/5xx, exponential back-off."""
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUSES or attempt == self.retries:
                    raise BackendError(f"{self.url}{path}: HTTP {err.code}") from None
            except (urllib.error.URLError, OSError) as err:
                if attempt == self.retries:
                    raise BackendError(f"{self.url}{path}: {err}") from None
            time.sleep(min(10.0, 0.25 * 2 ** attempt * (0.5 + random.random())))
        raise BackendError("unreachable")  # the loop always returns or raises

    def load(self) -> LoadInfo:
        if not self.url:
            raise ModelLoadError("ollama_url is not set")
        try:
            with urllib.request.urlopen(self.url + "/api/tags", timeout=self.timeout) as resp:
                tags = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ModelLoadError(f"Ollama-compatible server {self.url}: {err}") from None
        names = {m.get("name") for m in tags.get("models", [])}
        if names and self.model not in names:
            raise ModelLoadError(f"{self.url} does not serve {self.model!r} ({sorted(names)})")
        return LoadInfo(name=self.model, tasks=["embed", "rerank", "expand"],
                        details={"url": self.url})

    def unload(self) -> None:
        pass  # the remote server manages its own memory

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # the Ollama API has no tokenizer endpoint


    def embed(self, texts: list[str]) -> EmbedOutput:
        out = self._post("/api/embed", {"model": self.model, "input": texts})
        rows = [l2_normalized([float(x) for x in row]) for row in out["embeddings"]]
        if len(rows) != len(texts) or any(len(row) != len(rows[0]) for row in rows):
            raise BackendError("the NPU server returned a malformed embedding list")
        return EmbedOutput(VectorRows.from_rows(rows, len(rows[0]) if rows else 1),
                           [False] * len(texts), int(out.get("prompt_eval_count", 0)))

    def rerank(self, query: str, documents: list[str], instruction: str,
               max_doc_tokens: int = 0) -> RerankOutput:
        # The remote server truncates by its own context; a cap is the scheduler's hint.
        out = self._post("/api/rerank", {"model": self.model, "query": query,
                                          "documents": documents})
        scores = [0.0] * len(documents)
        for item in out["results"]:
            scores[int(item["index"])] = float(item["relevance_score"])
        return RerankOutput(scores, [False] * len(documents), 0)

    def expand(self, query: str, intent: str | None, include_lexical: bool) -> ExpandOutput:
        opt = self.spec.option
        out = self._post("/api/generate", {
            "model": self.model, "prompt": expansion_prompt(query, intent), "stream": False,
            "options": {"temperature": float(opt("temperature", 0.7)),
                        "top_k": int(opt("top_k", 20)), "top_p": float(opt("top_p", 0.8)),
                        "num_predict": int(opt("max_tokens", 600))}})
        raw = str(out.get("response", ""))
        return ExpandOutput(parse_expansion(raw, query, include_lexical),
                            int(out.get("eval_count", 0)), raw)
