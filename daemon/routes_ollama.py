"""Ollama-compatible embedding API, so Ollama-speaking tools can use npuserve."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from .app import VERSION, services, timing_headers
from .routes_openai import embedding_inputs
from .validation import InvalidRequest, optional_bool, read_object, text_field

routes = web.RouteTableDef()


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    texts = embedding_inputs(body.get("input"), svc.limits)
    allow_truncate = optional_bool(body, "truncate", True)
    start = time.perf_counter_ns()
    vectors, truncated, tokens, timing = await svc.scheduler.embed(texts)
    if not allow_truncate and any(truncated):
        first = truncated.index(True)
        raise InvalidRequest(f"input[{first}] exceeds the model's context and truncate is false")
    return web.json_response(
        {
            "model": svc.scheduler.model_name("embed"),
            "embeddings": vectors.tolist(),
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": int(timing.load * 1e9),
            "prompt_eval_count": tokens,
        },
        headers=timing_headers(timing),
    )


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    """Ollama's older single-prompt form."""
    svc = services(request)
    body = await read_object(request)
    prompt = text_field(body, "prompt", svc.limits)
    vectors, _, _, timing = await svc.scheduler.embed([prompt])
    return web.json_response({"embedding": vectors[0].tolist()},
                             headers=timing_headers(timing))


def _model_entries(request: web.Request, loaded_only: bool) -> list[dict[str, Any]]:
    svc = services(request)
    out: dict[str, dict[str, Any]] = {}
    for m in svc.scheduler.all_models():
        lane = svc.scheduler.lane_of(m)
        if loaded_only and m.model_id not in lane.resident:
            continue
        path = m.plan.spec.path
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        out[m.plan.name] = {
            "name": m.plan.name,
            "model": m.plan.name,
            "size": size,
            "digest": m.model_id.rsplit("-", 1)[-1],
            "details": {"format": "gguf", "family": m.plan.spec.kind, "device": m.plan.device,
                        "tasks": list(m.plan.tasks)},
        }
        if loaded_only:
            out[m.plan.name]["size_vram"] = 0
            out[m.plan.name]["expires_at"] = None
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
