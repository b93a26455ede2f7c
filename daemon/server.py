"""Run the daemon: plan models, start the scheduler and the HTTP server, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import VERSION, build_app
from .config import Config
from .mdns import Advertiser
from .model_registry import plan_models
from .scheduler import Scheduler

log = logging.getLogger("npuserve")


def create_scheduler(cfg: Config) -> Scheduler:
    plans, task_model = plan_models(cfg)
    return Scheduler(cfg, plans, task_model, log_level=logging.getLogger().level)


def _is_loopback(host: str) -> bool:
    from .cli import is_loopback

    return is_loopback(host)


def txt_properties(cfg: Config, scheduler: Scheduler) -> dict[str, str]:
    """What a client learns from the TXT record (keys of at most 9 characters)."""
    names = {t: scheduler.model_name(t) for t in ("embed", "rerank", "expand")}
    devices = ",".join(f"{t}:{scheduler.model_state(t).plan.device}" for t in names)
    return {
        "version": VERSION,
        "api": "qmd,openai,rerank,ollama",
        "embed": names["embed"],
        "rerank": names["rerank"],
        "gen": names["expand"],
        "dev": devices,
        "auth": "1" if cfg.get("server.api_key") else "0",
        "timeout": str(int(scheduler.recommended_timeout() + 0.999)),
        "index": "1" if cfg.get("index.enabled") else "0",
    }


async def _advertise(cfg: Config, scheduler: Scheduler, host: str, port: int) -> Advertiser | None:
    if not cfg.get("server.mdns"):
        log.info("mDNS advertisement off (server.mdns = false)")
        return None
    if _is_loopback(host):
        log.info("mDNS: not advertising, %s is loopback-only (set server.host to listen"
                 " on the LAN)", host)
        return None
    advertiser = Advertiser(cfg.get("server.name"), host, port,
                            lambda: txt_properties(cfg, scheduler))
    try:
        await advertiser.start()
    except Exception:  # no multicast route, etc.: serve anyway
        log.exception("mDNS advertisement failed; serving without it")
        return None
    return advertiser


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
    advertiser = await _advertise(cfg, scheduler, host, actual_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    if advertiser is not None:
        await advertiser.stop()
    await runner.cleanup()
    log.info("stopped")
    return 0
