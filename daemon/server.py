"""Run the daemon: plan models, start the scheduler and the HTTP server, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from npuserve.daemon.config import Config, ConfigError, is_loopback
from npuserve.daemon.http.app import build_app
from npuserve.daemon.http.connections import CappedSite
from npuserve.daemon.http.services import SERVICES
from npuserve.daemon.http.validation import Limits
from npuserve.daemon.mdns import Advertiser
from npuserve.daemon.models.registry import plan_models
from npuserve.daemon.sched.scheduler import Scheduler
from npuserve.daemon.sched.settings import SchedulerSettings
from npuserve.daemon.sd_notify import notify, watchdog_interval, watchdog_loop
from npuserve.daemon.version import VERSION

log = logging.getLogger("npuserve")


def create_scheduler(cfg: Config) -> Scheduler:
    plans, task_model = plan_models(cfg)
    return Scheduler.from_config(cfg, plans, task_model, log_level=logging.getLogger().level)


def txt_properties(cfg: Config, scheduler: Scheduler) -> dict[str, str]:
    """What a client learns from the TXT record (keys of at most 9 characters)."""
    snap = scheduler.snapshot()
    names = {t: snap.tasks[t].primary.name for t in ("embed", "rerank", "expand")}
    devices = ",".join(f"{t}:{snap.tasks[t].serving.device}" for t in names)
    return {
        "version": VERSION,
        "api": "qmd,openai,rerank,ollama",
        "embed": names["embed"],
        "rerank": names["rerank"],
        "gen": names["expand"],
        "dev": devices,
        "auth": "1" if cfg.server.api_key else "0",
        "timeout": str(int(snap.recommended_timeout + 0.999)),
        "index": "1" if cfg.index.enabled else "0",
        # Seconds of queued work, whole: coarse, so the record changes only when the load
        # does (clients read the exact figure from each answer's X-Npuserve-Wait).
        "wait": str(int(scheduler.load()[1])),
        **({"efp": scheduler.known_fingerprint} if scheduler.known_fingerprint else {}),
    }


async def _advertise(cfg: Config, scheduler: Scheduler, host: str, port: int) -> Advertiser | None:
    if not cfg.server.mdns:
        log.info("mDNS advertisement off (server.mdns = false)")
        return None
    if is_loopback(host):
        log.info("mDNS: not advertising, %s is loopback-only (set server.host to listen"
                 " on the LAN)", host)
        return None
    await scheduler.embedding_fingerprint()  # in the first record, not an update later
    advertiser = Advertiser(cfg.server.name, host, port,
                            lambda: txt_properties(cfg, scheduler))
    try:
        await advertiser.start()
    except Exception:  # no multicast route, etc.: serve anyway
        log.exception("mDNS advertisement failed; serving without it")
        return None
    return advertiser


RELOADABLE_PREFIXES = ("scheduler.", "server.api_key", "server.max_batch",
                       "server.max_text_chars", "log_level")


def reload_config(app: web.Application, scheduler: Scheduler, load: Callable[[], Config]) -> None:
    """SIGHUP: re-read the configuration and apply what is safe to change live."""
    services = app[SERVICES]
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload refused, configuration unchanged: %s", exc)
        return
    old = services.cfg
    changed = [k for k in new.values if new.values[k] != old.values.get(k)]
    live = [k for k in changed if k.startswith(RELOADABLE_PREFIXES)
            and k not in ("scheduler.policy", "scheduler.switching")]
    later = [k for k in changed if k not in live]
    merged = Config(values={**old.values, **{k: new.values[k] for k in live}}, source=new.source)
    services.cfg = merged
    services.limits = Limits(merged.server.max_batch, merged.server.max_text_chars,
                             merged.server.max_tokens)
    scheduler.apply_settings(SchedulerSettings.from_config(merged))
    logging.getLogger().setLevel(str(merged.get("log_level")).upper())
    log.info("configuration reloaded: applied %s", ", ".join(live) or "nothing")
    if later:
        log.warning("these changes need a restart: %s", ", ".join(later))


async def _preload(cfg: Config, scheduler: Scheduler) -> None:
    """Load the configured models before READY=1, asking systemd for each load's calibrated
    allowance (EXTEND_TIMEOUT_USEC) so a slow first load on a board is not killed by
    TimeoutStartSec. Requests that arrive meanwhile are queued as usual. A failed load is
    logged and reported by /health; the daemon serves anyway."""
    for task in cfg.server.preload:
        model = scheduler.snapshot().tasks[task].serving
        notify(f"EXTEND_TIMEOUT_USEC={int(model.load_allowance * 1e6)}",
               f"STATUS=loading {model.name} for {task} on {model.device}")
        try:
            state = await asyncio.wait_for(scheduler.control("load", task),
                                           model.load_allowance)
            log.info("preloaded %s (%s): %s", task, model.name, state)
        except Exception as exc:  # any failure: serve anyway, /health says why
            log.warning("preload of %s (%s) failed: %s", task, model.name, exc)


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it). True when it finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        return False
    return True


async def _drain(app: web.Application, timeout: float) -> None:
    """New requests are answered 503 from now on (they may go to another daemon at
    once); the ones in flight get up to `timeout` seconds to finish."""
    svc = app[SERVICES]
    svc.draining = True
    deadline = asyncio.get_running_loop().time() + timeout
    while svc.inflight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if svc.inflight:
        log.warning("%d requests still running after %.0fs; stopping anyway",
                    svc.inflight, timeout)


async def run_server(cfg: Config, load: Callable[[], Config] | None = None) -> int:
    scheduler = create_scheduler(cfg)
    app = build_app(cfg, scheduler)
    host, port = cfg.server.host, cfg.server.port
    if not is_loopback(host) and not cfg.server.api_key:
        log.warning(
            "!!! listening on %s WITHOUT an API key: anyone on the network can use this server."
            " Set server.api_key (or NPUSERVE_SERVER_API_KEY). !!!", host)
    # handler_cancellation: a client that disconnects cancels its handler, so
    # its queued work is dropped instead of computed for nobody.
    # keepalive_timeout: aiohttp's timer runs from the connection's start, so it also
    # closes a connection whose request headers never complete (connections.py).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=cfg.server.shutdown_timeout,
                           keepalive_timeout=cfg.server.idle_timeout)
    await runner.setup()
    site = CappedSite(runner, host, port, max_connections=cfg.server.max_connections)
    await site.start()
    actual_port = runner.addresses[0][1] if runner.addresses else port
    log.info("npuserve listening on http://%s:%d (state %s)", host, actual_port, cfg.state_dir)
    for task, route in scheduler.snapshot().tasks.items():
        m = route.serving
        log.info("  %-6s -> %s on %s (%s)", task, m.name, m.device, m.path)
    # Signals first: a SIGTERM during a long first load must stop cleanly, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_config, app, scheduler, load)
    interval = watchdog_interval()
    watchdog = asyncio.create_task(watchdog_loop(interval)) if interval else None
    advertiser = None
    if await _until_stopped(_preload(cfg, scheduler), stop):
        advertiser = await _advertise(cfg, scheduler, host, actual_port)
        notify("READY=1", f"STATUS=listening on {host}:{actual_port}")
        await stop.wait()
    log.info("stopping: finishing in-flight requests")
    # Ask systemd for the configured drain time (plus a margin to stop the workers)
    # so a long shutdown is not cut short by TimeoutStopSec.
    drain = cfg.server.shutdown_timeout
    notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int((drain + 10.0) * 1e6)}",
           "STATUS=finishing in-flight requests")
    if watchdog is not None:
        watchdog.cancel()
    if advertiser is not None:
        await advertiser.stop()  # no new clients find us while we drain
    await _drain(app, drain)
    await runner.cleanup()
    log.info("stopped")
    return 0
