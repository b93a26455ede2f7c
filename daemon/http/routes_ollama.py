"""Ollama-compatible embedding API, so Ollama-speaking tools can use npuserve."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from npuserve.daemon.http.routes_openai import embedding_inputs
from npuserve.daemon.http.services import services, timing_headers
from npuserve.daemon.http.validation import InvalidRequest, optional_bool, read_object, text_field
from npuserve.daemon.version import VERSION

routes = web.RouteTableDef()


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    texts = embedding_inputs(body.get("input"), svc.limits)
    allow_truncate = optional_bool(body, "truncate", True)
    start = time.perf_counter_ns()
    result = await svc.scheduler.embed(texts)
    if not allow_truncate and any(result.truncated):
        first = result.truncated.index(True)
        raise InvalidRequest(f"input[{first}] exceeds the model's context and truncate is false")
    return web.json_response(
        {
            "model": result.model,
            "embeddings": result.vectors.tolist(),
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": int(result.timing.load * 1e9),
            "prompt_eval_count": result.tokens,
        },
        headers=timing_headers(result.timing),
    )


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    """Ollama's older single-prompt form."""
    svc = services(request)
    body = await read_object(request)
    prompt = text_field(body, "prompt", svc.limits)
    result = await svc.scheduler.embed([prompt])
    return web.json_response({"embedding": result.vectors[0].tolist()},
                             headers=timing_headers(result.timing))


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
    return web.json_response({"models": _model_entries(request, loaded_only=False)})


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    return web.json_response({"models": _model_entries(request, loaded_only=True)})


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})
