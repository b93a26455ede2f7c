"""A request that names a model (`model`, `options.model`): which model answers it.

The daemon serves one model per task, whatever a request names, and says which one
answered (name, and for embeddings the fingerprint). A name that is neither that model's
nor one of its configured `aliases` is counted in /metrics, and with
`server.strict_models = true` refused with 409 naming the served model. Not the default:
QMD's RemoteQMD client sends its own local default's name on `qmd embed` whatever server it
talks to, and would break.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from npuserve.daemon.errors import ApiError, InvalidRequest
from npuserve.daemon.http.services import services

# The task whose [models.<task>] section configures a task's aliases.
CONFIG_TASK = {"embed": "embed", "rerank": "rerank", "expand": "expand", "generate": "expand"}


class ModelMismatch(ApiError):
    status = 409


def check_model(request: web.Request, task: str, asked: Any, field: str = "model") -> None:
    if asked is None or asked == "":
        return
    if not isinstance(asked, str):
        raise InvalidRequest(f"{field} must be a string")
    svc = services(request)
    served = svc.scheduler.model_name(task)
    aliases = svc.cfg.get(f"models.{CONFIG_TASK[task]}.aliases")
    if asked == served or asked in aliases:
        return
    # The name is the client's: not a label (a hostile client could grow /metrics).
    svc.metrics.inc("npuserve_model_mismatch_total", (("task", task),),
                    help="requests that named a model other than the one serving their task")
    if svc.cfg.server.strict_models:
        raise ModelMismatch(
            f"this server's {task} model is {served}, not {asked} (server.strict_models;"
            f" add {asked!r} to models.{CONFIG_TASK[task]}.aliases if it is the same model)")
