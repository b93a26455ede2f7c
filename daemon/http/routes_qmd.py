"""QMD's remote-model protocol: /embed, /embed-batch, /rerank, /expand, /tokenize.

Shapes follow ../shared/spec/qmd-remote-protocol.md. Texts are embedded
exactly as received: QMD clients format them (`task: ... | query: ...`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from npuserve.daemon.http.model_names import check_model
from npuserve.daemon.http.rerank_shapes import cohere_or_tei_rerank, is_qmd_rerank
from npuserve.daemon.http.services import embedding_headers, services, timing_headers
from npuserve.daemon.http.validation import (
    InvalidRequest,
    Limits,
    check_count,
    check_length,
    optional_bool,
    optional_object,
    optional_str,
    read_object,
    string_list,
    text_field,
)

routes = web.RouteTableDef()

MSG_TEXT = "text must be a non-empty string"
MSG_TEXTS = "texts must be a non-empty array of strings"
MSG_RERANK = "query must be a non-empty string and documents must be a non-empty array"
MSG_QUERY = "query must be a non-empty string"


def _embed_options(request: web.Request, body: dict[str, Any], limits: Limits) -> None:
    """QMD sends options the server does not need (it embeds text as received);
    they are still type-checked so a malformed client hears about it."""
    options = optional_object(body, "options")
    model = optional_str(options, "model", limits, "options.model")
    check_model(request, "embed", model, "options.model")
    optional_str(options, "title", limits, "options.title")
    optional_bool(options, "isQuery", False, "options.isQuery")


def _vector(row: memoryview) -> list[float]:
    return row.tolist()  # exact float32 values


@routes.post("/embed")
async def embed(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    text = text_field(body, "text", svc.limits, MSG_TEXT)
    _embed_options(request, body, svc.limits)
    result = await svc.scheduler.embed([text])
    return web.json_response(
        {"embedding": _vector(result.vectors[0]), "model": result.model,
         "fingerprint": result.fingerprint, "truncated": result.truncated[0]},
        headers=embedding_headers(result.timing, result.fingerprint),
    )


@routes.post("/embed-batch")
async def embed_batch(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    texts = string_list(body, "texts", svc.limits, MSG_TEXTS, allow_empty_items=True)
    _embed_options(request, body, svc.limits)
    # Empty strings have nothing to embed: they answer null in their slot.
    wanted = [i for i, t in enumerate(texts) if t]
    out: list[dict[str, Any] | None] = [None] * len(texts)
    headers: dict[str, str] = {}
    if wanted:
        result = await svc.scheduler.embed([texts[i] for i in wanted])
        for row, i in enumerate(wanted):
            out[i] = {"embedding": _vector(result.vectors[row]), "model": result.model,
                      "fingerprint": result.fingerprint, "truncated": result.truncated[row]}
        headers = embedding_headers(result.timing, result.fingerprint)
    return web.json_response(out, headers=headers)


@routes.post("/rerank")
async def rerank(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    if not is_qmd_rerank(body):
        # Cohere/Jina or TEI shape sent to the QMD path, as llama-server accepts.
        return await cohere_or_tei_rerank(request, body)
    query = text_field(body, "query", svc.limits, MSG_RERANK)
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise InvalidRequest(MSG_RERANK)
    files, texts = _qmd_documents(docs, svc.limits)
    result = await svc.scheduler.rerank(query, texts)
    results = [
        {"file": files[i], "score": result.scores[i], "relevance_score": result.scores[i],
         "index": i, "truncated": result.truncated[i]}
        for i in range(len(texts))
    ]
    results.sort(key=lambda r: r["score"], reverse=True)
    return web.json_response(
        {"results": results, "model": result.model},
        headers=timing_headers(result.timing),
    )


def _qmd_documents(docs: list[Any], limits: Limits) -> tuple[list[str], list[str]]:
    check_count("documents", len(docs), limits)
    files: list[str] = []
    texts: list[str] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InvalidRequest(f"documents[{i}] must be an object with file and text")
        file, text = doc.get("file"), doc.get("text")
        if not isinstance(file, str):
            raise InvalidRequest(f"documents[{i}].file must be a string")
        if not isinstance(text, str):
            raise InvalidRequest(f"documents[{i}].text must be a string")
        title = doc.get("title")
        if title is not None and not isinstance(title, str):
            raise InvalidRequest(f"documents[{i}].title must be a string")
        check_length(f"documents[{i}].text", text, limits)
        files.append(file)
        texts.append(text)
    return files, texts


@routes.post("/expand")
async def expand(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    query = text_field(body, "query", svc.limits, MSG_QUERY)
    options = optional_object(body, "options")
    intent = optional_str(options, "intent", svc.limits, "options.intent")
    context = optional_str(options, "context", svc.limits, "options.context")
    include_lexical = optional_bool(options, "includeLexical", True, "options.includeLexical")
    if context:
        intent = f"{intent}\n{context}" if intent else context
    result = await svc.scheduler.expand(query, intent, include_lexical)
    return web.json_response(
        [{"type": kind, "text": text} for kind, text in result.lines],
        headers=timing_headers(result.timing)
    )


@routes.post("/tokenize")
@routes.post("/v1/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """QMD's {"text"} -> {"tokens": count}; vLLM's {"model", "prompt", "add_special_tokens"}
    -> {"tokens": [ids], "count", "max_model_len"}, by the named model's tokenizer (the
    embedding model's when the name is not one of ours)."""
    svc = services(request)
    body = await read_object(request)
    if "prompt" not in body:
        text = text_field(body, "text", svc.limits, MSG_TEXT)
        counts = await svc.scheduler.count_tokens("embed", [text])
        return web.json_response({"tokens": counts[0]})
    prompt = text_field(body, "prompt", svc.limits)
    assert prompt is not None
    add_special = optional_bool(body, "add_special_tokens", True)
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("model must be a string")
    task = next((t for t in ("embed", "rerank", "expand")
                 if isinstance(name, str) and name == svc.scheduler.model_name(t)), "embed")
    ids, n_ctx = await svc.scheduler.token_ids(task, prompt, add_special)
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": n_ctx})
