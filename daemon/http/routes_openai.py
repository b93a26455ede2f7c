"""OpenAI-compatible /v1/embeddings and /v1/models."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from npuserve.daemon.http.services import services, timing_headers
from npuserve.daemon.http.validation import (
    InvalidRequest,
    Limits,
    check_count,
    check_length,
    read_object,
)
from npuserve.daemon.models.vector_rows import le_bytes

routes = web.RouteTableDef()
ENCODINGS = ("float", "base64")


def embedding_inputs(value: Any, limits: Limits, name: str = "input") -> list[str]:
    """`input` as a string or a list of strings (token-id arrays are refused)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"{name} must be a non-empty string or array of strings")
    check_count(name, len(value), limits)
    for i, item in enumerate(value):
        if isinstance(item, int | list):
            raise InvalidRequest(f"{name}[{i}]: token arrays are not supported; send text")
        if not isinstance(item, str) or not item:
            raise InvalidRequest(f"{name}[{i}] must be a non-empty string")
        check_length(f"{name}[{i}]", item, limits)
    return value


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    texts = embedding_inputs(body.get("input"), svc.limits)
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidRequest("encoding_format must be 'float' or 'base64'")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    result = await svc.scheduler.embed(texts)
    vectors = result.vectors
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int)
        or dimensions != vectors.shape[1]
    ):
        raise InvalidRequest(f"dimensions must be {vectors.shape[1]} for this model")
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vectors[i], encoding),
         "truncated": result.truncated[i]}
        for i in range(len(texts))
    ]
    return web.json_response(
        {"object": "list", "data": data, "model": result.model,
         "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}},
        headers=timing_headers(result.timing),
    )


def _encode(row: memoryview, encoding: str) -> list[float] | str:
    if encoding == "base64":
        # The official client decodes little-endian float32.
        return base64.b64encode(le_bytes(row)).decode("ascii")
    return row.tolist()  # exact float32 values


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    svc = services(request)
    created = int(svc.started)  # wall-clock start time
    seen: dict[str, dict[str, Any]] = {}
    for task in ("embed", "rerank", "expand"):
        name = svc.scheduler.model_name(task)
        entry = seen.setdefault(name, {"id": name, "object": "model", "created": created,
                                       "owned_by": "npuserve", "tasks": []})
        entry["tasks"].append(task)
    return web.json_response({"object": "list", "data": list(seen.values())})
