"""Operations: /health and /openapi.json (public), /metrics (Prometheus text)."""

from __future__ import annotations

import os

from aiohttp import web

from npuserve.daemon.http.metrics import Labels, Sample
from npuserve.daemon.http.openapi import openapi_document
from npuserve.daemon.http.services import Services, services
from npuserve.daemon.sched.views import ModelView, SchedulerSnapshot
from npuserve.daemon.version import VERSION

routes = web.RouteTableDef()
# QMD's /health names the expansion model "generate".
HEALTH_TASK_NAMES = {"embed": "embed", "rerank": "rerank", "expand": "generate"}


def model_problem(model: ModelView) -> str | None:
    """Why this model cannot serve now, or None."""
    if model.kind != "ollama" and not os.path.exists(model.path):
        return (f"{model.name}: model file {model.path} not found;"
                " run `npuserve models prepare`")
    if model.load_retry_in > 0:
        return f"{model.name}: load failed: {model.error}"
    return None


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(services(request).limits))


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    svc = services(request)
    snap = svc.scheduler.snapshot()
    problems: list[str] = []
    models: dict[str, str] = {}
    devices: dict[str, dict[str, object]] = {}
    for task, label in HEALTH_TASK_NAMES.items():
        route = snap.tasks[task]
        primary, m = route.primary, route.serving
        models[label] = primary.name
        devices[label] = {"device": m.device, "state": m.state, "reason": m.device_reason}
        if m.id != primary.id:
            devices[label].update(fallback_from=primary.device, reason=primary.fallback_reason)
        problem = model_problem(m)
        if problem and problem not in problems:
            problems.append(problem)
    body: dict[str, object] = {
        "ok": not problems,
        "version": "2",
        "backend": "npuserve",
        "server_version": VERSION,
        "models": models,
        "devices": devices,
        # What made /embed's vectors (models/fingerprint.py): a client that built an index
        # with other vectors must not mix these in.
        "fingerprints": {"embed": await svc.scheduler.embedding_fingerprint()},
        "load": dict(zip(("queued", "wait_seconds"), svc.scheduler.load(), strict=True)),
    }
    if svc.index is not None and svc.index.write_error:
        # Models still serve and searches still answer: reported, but not "not ok".
        body["index"] = {"writable": False, "error": svc.index.write_error}
    if svc.draining:
        problems.insert(0, "shutting down")
        body["ok"] = False
    if problems:
        body["error"] = "; ".join(problems)
        return web.json_response(body, status=503)
    return web.json_response(body)


def _gauges(snap: SchedulerSnapshot, svc: Services) -> list[Sample]:
    per_model = [(m, (("model", m.name), ("device", m.device))) for m in snap.models]
    out: list[Sample] = []
    for m, lb in per_model:
        out.append(("npuserve_queue_depth", "queued requests per model", lb, m.queue_depth))
    for m, lb in per_model:
        out.append(("npuserve_queue_oldest_wait_seconds", "age of the oldest queued request",
                    lb, m.oldest_wait_seconds))
    for m, lb in per_model:
        out.append(("npuserve_model_resident", "1 when loaded", lb, float(m.resident)))
    for m, lb in per_model:
        out.append(("npuserve_model_footprint_bytes", "memory the model needs, as the auto"
                    " policy plans it (the most seen, else its backend's estimate)", lb,
                    m.footprint_bytes))
    for m, lb in per_model:
        for task, cost in m.seconds_per_token.items():
            out.append(("npuserve_model_seconds_per_token", "calibrated cost per token",
                        lb + (("task", task),), cost or 0.0))
    for m, lb in per_model:
        if m.has_twin:
            out.append(("npuserve_npu_fallback", "1 while an NPU model's work runs on its"
                        " CPU twin", lb, float(m.fallback)))
    if svc.index is not None:
        out.append(("npuserve_index_writable", "0 while the last index write failed", (),
                    float(svc.index.write_error is None)))
    return out


def _totals(snap: SchedulerSnapshot, svc: Services) -> list[Sample]:
    per_model = [(m, (("model", m.name), ("device", m.device))) for m in snap.models]
    out: list[Sample] = []
    for m, lb in per_model:
        out.append(("npuserve_model_loads_total", "model loads since start", lb, m.loads))
    for m, lb in per_model:
        out.append(("npuserve_model_unloads_total", "model unloads since start", lb,
                    m.unloads))
    for m, lb in per_model:
        out.append(("npuserve_model_load_seconds_total", "seconds spent loading", lb,
                    m.load_seconds_total))
    for d in snap.devices:
        device: Labels = (("device", d.device),)
        out.append(("npuserve_worker_restarts_total", "worker processes lost and restarted",
                    device, d.worker_restarts))
        out.append(("npuserve_prefetch_bytes_total", "bytes of models read ahead while"
                    " another computed", device, d.prefetched_bytes))
    for name, value in sorted(snap.events.items()):
        out.append((f"npuserve_scheduler_{name}_total", f"scheduler events: {name}", (),
                    value))
    if svc.index is not None:
        out.append(("npuserve_index_write_failures_total", "index writes refused by the disk"
                    " (full, read-only, I/O error)", (), svc.index.write_failures))
    return out


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    svc = services(request)
    snap = svc.scheduler.snapshot()
    text = svc.metrics.render(_gauges(snap, svc), _totals(snap, svc))
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
