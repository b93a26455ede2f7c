"""Runtime control and state: preload/unload models, what is loaded where, /status."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from npuserve.daemon.http.services import services
from npuserve.daemon.sched.views import ModelView, SchedulerSnapshot

routes = web.RouteTableDef()


def model_view(m: ModelView) -> dict[str, Any]:
    return {
        "name": m.name,
        "id": m.id,
        "kind": m.kind,
        "tasks": list(m.tasks),
        "device": m.device,
        "device_reason": m.device_reason,
        "state": m.state,
        "resident": m.resident,
        "queue_depth": m.queue_depth,
        "oldest_wait_seconds": round(m.oldest_wait_seconds, 3),
        "loads": m.loads,
        "unloads": m.unloads,
        "load_seconds_total": round(m.load_seconds_total, 3),
        "error": m.error,
        "calibration": {
            "load_seconds": m.load_seconds,
            "load_seconds_max": m.load_seconds_max,
            "footprint_bytes": m.footprint_bytes,
            "seconds_per_token": dict(m.seconds_per_token),
            "samples": dict(m.samples),
        },
    }


def runtime_view(snap: SchedulerSnapshot) -> dict[str, Any]:
    return {
        "policy": snap.residency,
        "switching": snap.switching,
        "keep_alive": snap.keep_alive,
        "recommended_client_timeout": round(snap.recommended_timeout, 1),
        "models": [model_view(m) for m in snap.models],
        "devices": {
            d.device: {"worker_pid": d.worker_pid, "resident": list(d.resident),
                       "swaps": d.swaps, "worker_restarts": d.worker_restarts,
                       "worker_recycles": d.worker_recycles,
                       "prefetched_bytes": d.prefetched_bytes}
            for d in snap.devices
        },
        "events": dict(snap.events),
    }


@routes.get("/admin/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response(runtime_view(services(request).scheduler.snapshot()))


async def _control(request: web.Request, action: str) -> web.Response:
    sched = services(request).scheduler
    name = request.match_info["name"]
    model = sched.snapshot().find(name)
    if model is None:
        return web.json_response({"error": f"no model or task named {name!r}"}, status=404)
    state = await sched.control(action, name)
    return web.json_response({"model": model.name, "state": state, "device": model.device})


@routes.post("/admin/models/{name}/load")
async def load(request: web.Request) -> web.Response:
    return await _control(request, "load")


@routes.post("/admin/models/{name}/unload")
async def unload(request: web.Request) -> web.Response:
    return await _control(request, "unload")
