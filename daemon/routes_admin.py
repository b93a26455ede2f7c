"""Runtime control and state: preload/unload models, what is loaded where, /status."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .app import services
from .scheduler import ModelState, Scheduler

routes = web.RouteTableDef()


def model_view(sched: Scheduler, m: ModelState, now: float) -> dict[str, Any]:
    lane = sched.lane_of(m)
    return {
        "name": m.plan.name,
        "id": m.model_id,
        "tasks": list(m.plan.tasks),
        "device": m.plan.device,
        "device_reason": m.plan.device_reason,
        "state": m.state,
        "resident": m.model_id in lane.resident,
        "queue_depth": len(m.queue),
        "oldest_wait_seconds": round(m.head_age(now), 3),
        "loads": m.loads,
        "unloads": m.unloads,
        "load_seconds_total": round(m.load_seconds_total, 3),
        "error": m.error,
        "calibration": {
            "load_seconds": m.costs.load_seconds,
            "load_seconds_max": m.costs.load_seconds_max,
            "footprint_bytes": sched.estimate_bytes(m),
            "seconds_per_item": {t: c.sec_per_item for t, c in m.task_costs.items()},
            "samples": {t: c.samples for t, c in m.task_costs.items()},
        },
    }


def runtime_view(sched: Scheduler) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "policy": sched.policy,
        "switching": sched.switching,
        "keep_alive": sched.keep_alive,
        "recommended_client_timeout": round(sched.recommended_timeout(), 1),
        "models": [model_view(sched, m, now) for m in sched.all_models()],
        "devices": {
            lane.device: {"worker_pid": lane.worker.pid, "resident": list(lane.resident),
                          "swaps": lane.swaps, "worker_restarts": lane.crashes,
                          "worker_recycles": lane.recycles,
                          "prefetched_bytes": lane.prefetcher.bytes_read}
            for lane in sched.lanes.values()
        },
        "events": dict(sched.metrics),
    }


@routes.get("/admin/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response(runtime_view(services(request).scheduler))


async def _control(request: web.Request, action: str) -> web.Response:
    sched = services(request).scheduler
    name = request.match_info["name"]
    model = sched.find_model(name)
    if model is None:
        return web.json_response({"error": f"no model or task named {name!r}"}, status=404)
    state = await sched.control(action, model)
    return web.json_response({"model": model.plan.name, "state": state,
                              "device": model.plan.device})


@routes.post("/admin/models/{name}/load")
async def load(request: web.Request) -> web.Response:
    return await _control(request, "load")


@routes.post("/admin/models/{name}/unload")
async def unload(request: web.Request) -> web.Response:
    return await _control(request, "unload")
