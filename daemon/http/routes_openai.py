"""OpenAI-compatible /v1/embeddings, /v1/models, /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from npuserve.daemon.errors import ApiError
from npuserve.daemon.http import generation as gen
from npuserve.daemon.http.model_names import check_model
from npuserve.daemon.http.services import embedding_headers, services, timing_headers
from npuserve.daemon.http.validation import (
    InvalidRequest,
    Limits,
    check_count,
    check_length,
    optional_bool,
    optional_object,
    read_object,
)
from npuserve.daemon.models.vector_rows import le_bytes
from npuserve.daemon.sched.views import GenerateRequest, GenerateResult

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
    check_model(request, "embed", body.get("model"))
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
         "fingerprint": result.fingerprint,
         "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}},
        headers=embedding_headers(result.timing, result.fingerprint),
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
        if task == "embed":
            entry["fingerprint"] = await svc.scheduler.embedding_fingerprint()
    return web.json_response({"object": "list", "data": list(seen.values())})


# --- chat and completions (generation on the expansion model) ---------------------------


def _openai_request(body: dict[str, Any], limits: Limits, messages: tuple[tuple[str, str], ...],
                    prompt: str) -> GenerateRequest:
    gen.check_n(body)
    fmt = body.get("response_format")
    schema = ""
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            schema = "{}"
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = gen.schema_text(spec.get("schema") if isinstance(spec, dict) else None,
                                     "response_format.json_schema.schema")
        elif kind != "text":
            raise InvalidRequest("response_format.type must be text, json_object or json_schema")
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise InvalidRequest("grammar must be a GBNF string")
    return GenerateRequest(
        messages=messages, prompt=prompt,
        max_tokens=gen.max_tokens(body, ("max_completion_tokens", "max_tokens"), limits),
        temperature=gen.number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=gen.number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=gen.integer(body, "top_k", 0, 0, 1000),
        seed=gen.integer(body, "seed", -1, -(1 << 63), (1 << 63) - 1),
        stop=gen.stops(body.get("stop"), limits),
        grammar=grammar or "", json_schema=schema)


def _usage(result: GenerateResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _generate(request: web.Request, body: dict[str, Any], req: GenerateRequest,
                    kind: str) -> web.StreamResponse:
    """One chat (`kind` "chat") or text completion, whole or as server-sent events."""
    svc = services(request)
    stream = optional_bool(body, "stream", False)
    include_usage = optional_bool(optional_object(body, "stream_options"), "include_usage",
                                  False, "stream_options.include_usage")
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    model = svc.scheduler.model_name("expand")
    obj = "chat.completion" if kind == "chat" else "text_completion"
    if not stream:
        result = await svc.scheduler.generate(req)
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason,
                                  "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return web.json_response({"id": ident, "object": obj, "created": created,
                                  "model": result.model, "choices": [choice],
                                  "usage": _usage(result)},
                                 headers=timing_headers(result.timing))

    def chunk(piece: str | None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "chat":
            choice["delta"] = ({} if piece is None else
                               {"role": "assistant", "content": piece})
        else:
            choice["text"] = piece or ""
        return {"id": ident, "object": obj + ("" if kind != "chat" else ".chunk"),
                "created": created, "model": model, "choices": [choice]}

    streamed = gen.start_stream(svc.scheduler, req)

    async def frames() -> AsyncIterator[bytes]:
        async for piece in streamed:
            yield _sse(chunk(piece))
        try:
            result = await streamed.task
        except ApiError as exc:
            yield _sse({"error": {"message": str(exc), "code": exc.status}})
        else:
            yield _sse(chunk(None, result.finish_reason))
            if include_usage:
                yield _sse({"id": ident, "object": obj + ".chunk" if kind == "chat" else obj,
                            "created": created, "model": model, "choices": [],
                            "usage": _usage(result)})
        yield b"data: [DONE]\n\n"

    return await gen.stream_body(request, "text/event-stream", streamed, frames())


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "generate", body.get("model"))
    messages = gen.messages_of(body.get("messages"), svc.limits)
    return await _generate(request, body, _openai_request(body, svc.limits, messages, ""),
                           "chat")


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "generate", body.get("model"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string (one prompt per request)")
    check_length("prompt", prompt, svc.limits)
    return await _generate(request, body, _openai_request(body, svc.limits, (), prompt),
                           "completion")
