"""Ollama-compatible API (embed, generate, chat, model lists), so Ollama-speaking tools
can use npuserve."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from npuserve.daemon.errors import ApiError
from npuserve.daemon.http import generation as gen
from npuserve.daemon.http.model_names import check_model
from npuserve.daemon.http.routes_openai import embedding_inputs
from npuserve.daemon.http.services import embedding_headers, services, timing_headers
from npuserve.daemon.http.validation import (
    InvalidRequest,
    Limits,
    optional_bool,
    optional_object,
    optional_str,
    read_object,
    text_field,
)
from npuserve.daemon.sched.views import GenerateRequest, GenerateResult
from npuserve.daemon.version import VERSION

routes = web.RouteTableDef()


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    texts = embedding_inputs(body.get("input"), svc.limits)
    check_model(request, "embed", body.get("model"))
    allow_truncate = optional_bool(body, "truncate", True)
    start = time.perf_counter_ns()
    result = await svc.scheduler.embed(texts)
    if not allow_truncate and any(result.truncated):
        first = result.truncated.index(True)
        raise InvalidRequest(f"input[{first}] exceeds the model's context and truncate is false")
    return web.json_response(
        {
            "model": result.model,
            "fingerprint": result.fingerprint,
            "embeddings": result.vectors.tolist(),
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": int(result.timing.load * 1e9),
            "prompt_eval_count": result.tokens,
        },
        headers=embedding_headers(result.timing, result.fingerprint),
    )


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    """Ollama's older single-prompt form."""
    svc = services(request)
    body = await read_object(request)
    prompt = text_field(body, "prompt", svc.limits)
    check_model(request, "embed", body.get("model"))
    result = await svc.scheduler.embed([prompt])
    return web.json_response({"embedding": result.vectors[0].tolist()},
                             headers=embedding_headers(result.timing, result.fingerprint))


def _model_entries(request: web.Request, loaded_only: bool) -> list[dict[str, Any]]:
    svc = services(request)
    out: dict[str, dict[str, Any]] = {}
    for m in svc.scheduler.snapshot().models:
        if loaded_only and not m.resident:
            continue
        try:
            size = os.path.getsize(m.path)
        except OSError:
            size = 0
        out[m.name] = {
            "name": m.name,
            "model": m.name,
            "size": size,
            "digest": m.id.rsplit("-", 1)[-1],
            "details": {"format": "gguf", "family": m.kind, "device": m.device,
                        "tasks": list(m.tasks)},
        }
        if loaded_only:
            out[m.name]["size_vram"] = 0
            out[m.name]["expires_at"] = None
    return list(out.values())


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    entries = _model_entries(request, loaded_only=False)
    svc = services(request)
    embed = svc.scheduler.model_name("embed")
    for entry in entries:
        if entry["name"] == embed:
            entry["details"]["fingerprint"] = await svc.scheduler.embedding_fingerprint()
    return web.json_response({"models": entries})


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    return web.json_response({"models": _model_entries(request, loaded_only=True)})


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


# --- generate and chat (generation on the expansion model) ------------------------------


def _ollama_request(body: dict[str, Any], limits: Limits, messages: tuple[tuple[str, str], ...],
                    prompt: str) -> GenerateRequest:
    opts = optional_object(body, "options")
    fmt = body.get("format")
    return GenerateRequest(
        messages=messages, prompt=prompt,
        max_tokens=gen.max_tokens(opts, ("num_predict",), limits, "options."),
        temperature=gen.number(opts, "temperature", 0.8, 0.0, 2.0, "options.temperature"),
        top_p=gen.number(opts, "top_p", 0.9, 0.0, 1.0, "options.top_p"),
        top_k=gen.integer(opts, "top_k", 40, 0, 1000, "options.top_k"),
        seed=gen.integer(opts, "seed", -1, -(1 << 63), (1 << 63) - 1, "options.seed"),
        stop=gen.stops(opts.get("stop"), limits, "options.stop"),
        json_schema="" if fmt in (None, "") else gen.schema_text(fmt, "format"))


def _counts(result: GenerateResult, started: int) -> dict[str, Any]:
    total = time.perf_counter_ns() - started
    return {"done": True, "done_reason": result.finish_reason, "total_duration": total,
            "load_duration": int(result.timing.load * 1e9),
            "prompt_eval_count": result.prompt_tokens,
            "eval_count": result.completion_tokens,
            "eval_duration": int(result.timing.inference * 1e9)}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def _ollama_generate(request: web.Request, body: dict[str, Any], req: GenerateRequest,
                           chat: bool) -> web.StreamResponse:
    """Ollama streams by default (NDJSON, one object per piece, then a final one with the
    counts); `"stream": false` answers one object."""
    svc = services(request)
    stream = optional_bool(body, "stream", True)
    model = svc.scheduler.model_name("expand")
    started = time.perf_counter_ns()

    def piece(text: str) -> dict[str, Any]:
        key: dict[str, Any] = ({"message": {"role": "assistant", "content": text}} if chat
                               else {"response": text})
        return {"model": model, "created_at": _now(), **key, "done": False}

    if not stream:
        result = await svc.scheduler.generate(req)
        return web.json_response({**piece(result.text), **_counts(result, started)},
                                 headers=timing_headers(result.timing))
    streamed = gen.start_stream(svc.scheduler, req)

    async def frames() -> AsyncIterator[bytes]:
        async for text in streamed:
            yield json.dumps(piece(text)).encode() + b"\n"
        try:
            result = await streamed.task
        except ApiError as exc:
            yield json.dumps({"error": str(exc)}).encode() + b"\n"
            return
        yield json.dumps({**piece(""), **_counts(result, started)}).encode() + b"\n"

    return await gen.stream_body(request, "application/x-ndjson", streamed, frames())


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "generate", body.get("model"))
    prompt = text_field(body, "prompt", svc.limits)
    assert prompt is not None
    system = optional_str(body, "system", svc.limits)
    if optional_bool(body, "raw", False):
        req = _ollama_request(body, svc.limits, (), prompt)
    else:  # Ollama renders the prompt with the model's template, as a user turn
        turns = ((("system", system),) if system else ()) + (("user", prompt),)
        req = _ollama_request(body, svc.limits, turns, "")
    return await _ollama_generate(request, body, req, chat=False)


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "generate", body.get("model"))
    messages = gen.messages_of(body.get("messages"), svc.limits)
    return await _ollama_generate(request, body, _ollama_request(body, svc.limits, messages, ""),
                                  chat=True)
