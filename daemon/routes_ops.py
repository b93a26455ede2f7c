"""Operations: /health and /openapi.json (public), /metrics (Prometheus text)."""

from __future__ import annotations

import os
import time

from aiohttp import web

from .app import VERSION, services
from .metrics import Labels
from .openapi import openapi_document
from .scheduler import ModelState, Scheduler

routes = web.RouteTableDef()
# QMD's /health names the expansion model "generate".
HEALTH_TASK_NAMES = {"embed": "embed", "rerank": "rerank", "expand": "generate"}


def model_problem(sched: Scheduler, model: ModelState) -> str | None:
    """Why this model cannot serve now, or None."""
    if model.plan.spec.kind != "ollama" and not os.path.exists(model.plan.spec.path):
        return (f"{model.plan.name}: model file {model.plan.spec.path} not found;"
                " run `npuserve models prepare`")
    if model.state == "failed" and time.monotonic() < model.retry_at:
        return f"{model.plan.name}: load failed: {model.error}"
    return None


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(services(request).limits))


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    sched = services(request).scheduler
    problems: list[str] = []
    models: dict[str, str] = {}
    devices: dict[str, dict[str, object]] = {}
    for task, label in HEALTH_TASK_NAMES.items():
        primary, m = sched.primary_state(task), sched.model_state(task)
        models[label] = primary.plan.name
        devices[label] = {"device": m.plan.device, "state": m.state,
                          "reason": m.plan.device_reason}
        if m is not primary:
            devices[label].update(fallback_from=primary.plan.device, reason=primary.trip_reason)
        problem = model_problem(sched, m)
        if problem and problem not in problems:
            problems.append(problem)
    body: dict[str, object] = {
        "ok": not problems,
        "version": "2",
        "backend": "npuserve",
        "server_version": VERSION,
        "models": models,
        "devices": devices,
    }
    index = services(request).index
    if index is not None and index.write_error:
        # Models still serve and searches still answer: reported, but not "not ok".
        body["index"] = {"writable": False, "error": index.write_error}
    if services(request).draining:
        problems.insert(0, "shutting down")
        body["ok"] = False
    if problems:
        body["error"] = "; ".join(problems)
        return web.json_response(body, status=503)
    return web.json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    svc = services(request)
    sched = svc.scheduler
    now = time.monotonic()
    gauges: list[tuple[str, str, Labels, float]] = []
    per_model = [(m, (("model", m.plan.name), ("device", m.plan.device)))
                 for m in sched.all_models()]
    for m, lb in per_model:
        gauges.append(("npuserve_queue_depth", "queued requests per model", lb, len(m.queue)))
    for m, lb in per_model:
        gauges.append(("npuserve_queue_oldest_wait_seconds", "age of the oldest queued request",
                       lb, m.head_age(now)))
    for m, lb in per_model:
        resident = m.model_id in sched.lane_of(m).resident
        gauges.append(("npuserve_model_resident", "1 when loaded", lb, float(resident)))
    for m, lb in per_model:
        gauges.append(("npuserve_model_loads", "model loads since start", lb, m.loads))
    for m, lb in per_model:
        gauges.append(("npuserve_model_unloads", "model unloads since start", lb, m.unloads))
    for m, lb in per_model:
        gauges.append(("npuserve_model_load_seconds", "seconds spent loading", lb,
                       m.load_seconds_total))
    for m, lb in per_model:
        gauges.append(("npuserve_model_footprint_bytes", "memory the model needs, as the auto"
                       " policy plans it (the most seen, else file size + 64 MB)", lb,
                       sched.estimate_bytes(m)))
    for m, lb in per_model:
        for task, costs in m.task_costs.items():
            gauges.append(("npuserve_model_seconds_per_item", "calibrated cost per item",
                           lb + (("task", task),), costs.sec_per_item or 0.0))
    for m, lb in per_model:
        if m.plan.twin:
            gauges.append(("npuserve_npu_fallback", "1 while an NPU model's work runs on its"
                           " CPU twin", lb, float(m.tripped)))
    for lane in sched.lanes.values():
        gauges.append(("npuserve_worker_restarts", "worker processes lost and restarted",
                       (("device", lane.device),), lane.crashes))
        gauges.append(("npuserve_prefetch_bytes", "bytes of models read ahead while another"
                       " computed", (("device", lane.device),), lane.prefetcher.bytes_read))
    for name, value in sorted(sched.metrics.items()):
        gauges.append((f"npuserve_scheduler_{name}", f"scheduler events: {name}", (), value))
    if svc.index is not None:
        gauges.append(("npuserve_index_write_failures", "index writes refused by the disk"
                       " (full, read-only, I/O error)", (), svc.index.write_failures))
        gauges.append(("npuserve_index_writable", "0 while the last index write failed", (),
                       float(svc.index.write_error is None)))
    text = svc.metrics.render(gauges)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
