"""Run the daemon: plan models, start the scheduler and the HTTP server, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import build_app
from .config import Config
from .model_registry import plan_models
from .scheduler import Scheduler

log = logging.getLogger("npuserve")


def create_scheduler(cfg: Config) -> Scheduler:
    plans, task_model = plan_models(cfg)
    return Scheduler(cfg, plans, task_model, log_level=logging.getLogger().level)


def _is_loopback(host: str) -> bool:
    from .cli import is_loopback

    return is_loopback(host)


async def run_server(cfg: Config) -> int:
    scheduler = create_scheduler(cfg)
    app = build_app(cfg, scheduler)
    host, port = cfg.get("server.host"), int(cfg.get("server.port"))
    if not _is_loopback(host) and not cfg.get("server.api_key"):
        log.warning(
            "!!! listening on %s WITHOUT an API key: anyone on the network can use this server."
            " Set server.api_key (or NPUSERVE_SERVER_API_KEY). !!!", host)
    # handler_cancellation: a client that disconnects cancels its handler, so
    # its queued work is dropped instead of computed for nobody.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=float(cfg.get("server.shutdown_timeout")))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual_port = runner.addresses[0][1] if runner.addresses else port
    log.info("npuserve listening on http://%s:%d (state %s)", host, actual_port, cfg.state_dir)
    for task in ("embed", "rerank", "expand"):
        m = scheduler.model_state(task)
        log.info("  %-6s -> %s on %s (%s)", task, m.plan.name, m.plan.device, m.plan.spec.path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await runner.cleanup()
    log.info("stopped")
    return 0
