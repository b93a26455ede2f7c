"""The aiohttp application: middlewares (errors, CORS, auth, metrics) and route tables.

Layering: routes parse and validate, then call the scheduler; the scheduler
talks to worker processes; only workers import model libraries.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion11

from npuserve.daemon.config import Config
from npuserve.daemon.errors import ApiError
from npuserve.daemon.http import quiet
from npuserve.daemon.http.browsers import BrowserGuard
from npuserve.daemon.http.metrics import Registry
from npuserve.daemon.http.services import SERVICES, Services, json_error, services
from npuserve.daemon.http.validation import BODY_TIMEOUT, Limits
from npuserve.daemon.sched.scheduler import Scheduler

log = logging.getLogger("npuserve.http")
# Only /health answers without the key (load balancers, QMD's probe); the API description
# is part of the API.
PUBLIC_PATHS = frozenset({"/health"})
DRAIN_ALLOWED = frozenset({"/health", "/metrics"})  # health says "shutting down" itself
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_GONE = 499  # nginx's "client closed request"; never sent, only counted
gone = quiet.Throttled(log)


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (asyncio.CancelledError, ConnectionError):
        status = CLIENT_GONE  # the client left: not a server error
        raise
    finally:
        route = _route_label(request)
        reg = services(request).metrics
        labels = (("endpoint", route), ("status", str(status)))
        reg.inc("npuserve_http_requests_total", labels, help="HTTP requests by endpoint and status")
        reg.observe("npuserve_http_request_duration_seconds", (("endpoint", route),),
                    time.perf_counter() - start, help="HTTP request latency")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as {"error": ...} JSON: never aiohttp's HTML or text pages."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, str(exc), exc.headers() or None)
    except web.HTTPRequestEntityTooLarge:
        limit = services(request).max_body
        return json_error(413, f"request body too large (limit {limit} bytes,"
                          " server.max_body_mb)")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return json_error(405, f"method {request.method} not allowed on {request.path};"
                          f" use {allowed}", {"Allow": allowed})
    except web.HTTPNotFound:
        return json_error(404, f"not found: {request.path}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason or "error")
    except ConnectionError as exc:  # the client went away mid-body: nothing to answer
        gone.warn(type(exc).__name__, "client left during %s %s: %s", request.method,
                  request.path, exc)
        return json_error(CLIENT_GONE, "client closed the request")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal server error")


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While shutting down: in-flight requests finish, new ones are told to go elsewhere
    at once (503 + Retry-After, connection closed) instead of finding a closed socket."""
    svc = services(request)
    if svc.draining and request.path not in DRAIN_ALLOWED:
        return json_error(503, "server is shutting down; retry on another server or later",
                          {"Retry-After": "5", "Connection": "close"})
    svc.inflight += 1
    try:
        return await handler(request)
    finally:
        svc.inflight -= 1


def key_refusal(request: web.Request) -> web.Response | None:
    """401 when the daemon has a key and the request does not carry it."""
    key = services(request).cfg.server.api_key
    if not key or request.path in PUBLIC_PATHS:
        return None
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched.
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compared as the
    # bytes they were, they simply do not match (401), instead of failing to encode.
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), key.encode())
    if ok:
        return None
    return json_error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                      {"WWW-Authenticate": 'Bearer realm="npuserve"'})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return key_refusal(request) or await handler(request)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: a body over the limit (by its Content-Length) or without the
    key is refused before the client sends it - aiohttp would otherwise ask for 60 MB only
    to refuse it. Runs before the middlewares, so it answers in their JSON form itself."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no 100 Continue: the body simply follows
    if request.headers.get("Expect", "").lower() != "100-continue":
        return json_error(417, f"unsupported Expect: {request.headers.get('Expect')}")
    limit = services(request).max_body
    length = request.content_length
    refusal = key_refusal(request)
    if length is not None and length > limit:
        refusal = json_error(413, f"request body too large ({length} > {limit} bytes,"
                             " server.max_body_mb)")
    if refusal is not None:
        refusal.force_close()  # the body it announced is never read
        return refusal
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the real response's size is counted from here
    return None


def _open_index(app: web.Application, cfg: Config, scheduler: Scheduler) -> None:
    """Open the index; on failure the model endpoints still serve and the index
    endpoints answer 503 "No index database loaded"."""
    from npuserve.daemon.index.service import IndexService

    try:
        index = IndexService.open(cfg.state_dir / "index.sqlite", scheduler, cfg.index)
    except Exception:
        log.exception("cannot open the index in %s", cfg.state_dir)
        return
    index.start()
    app[SERVICES].index = index


def build_app(cfg: Config, scheduler: Scheduler) -> web.Application:
    from npuserve.daemon.client import WAIT_HEADER
    from npuserve.daemon.http import (
        embed_shapes,
        rerank_shapes,
        routes_admin,
        routes_index,
        routes_ollama,
        routes_openai,
        routes_ops,
        routes_qmd,
    )

    server = cfg.server
    max_body = server.max_body_bytes
    guard = BrowserGuard(server.host, server.cors_origins, server.allowed_hosts)
    quiet.install()
    app = web.Application(
        client_max_size=max_body,
        middlewares=[metrics_middleware, guard.middleware, error_middleware, drain_middleware,
                     auth_middleware],
    )
    app[BODY_TIMEOUT] = server.body_timeout
    app[SERVICES] = Services(
        cfg=cfg,
        scheduler=scheduler,
        metrics=Registry(),
        limits=Limits(server.max_batch, server.max_text_chars, server.max_tokens),
        max_body=max_body,
    )
    for module in (routes_qmd, rerank_shapes, embed_shapes, routes_openai, routes_ollama,
                   routes_ops, routes_admin, routes_index):
        for route in module.routes:
            assert isinstance(route, web.RouteDef)
            app.router.add_route(route.method, route.path, route.handler,
                                 expect_handler=expect_handler, **route.kwargs)

    async def on_startup(app: web.Application) -> None:
        scheduler.start()
        if cfg.index.enabled:
            _open_index(app, cfg, scheduler)

    async def on_cleanup(app: web.Application) -> None:
        index = app[SERVICES].index
        if index is not None:
            await index.close()
        await scheduler.stop(server.shutdown_timeout)

    async def advertise_wait(request: web.Request, response: web.StreamResponse) -> None:
        # Every answer says how much work waits here: a client spreading calls over
        # several daemons (daemon/client.py) weighs them by it.
        response.headers[WAIT_HEADER] = f"{scheduler.load()[1]:.2f}"

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.on_response_prepare.append(advertise_wait)
    return app
