"""What keeps web pages out of a daemon that has no API key (the default, on loopback).

A page in a browser can send requests to any address, the daemon's included. Three doors,
all shut by default:
- **Origin**: a browser names the page's origin on every cross-origin request (and on
  preflights); any Origin that is not in `server.cors_origins` gets 403, before any work.
  No CORS headers are sent unless an origin was allowed, so browsers also refuse to let a
  page read an answer.
- **Host**: DNS rebinding points an attacker's name at 127.0.0.1, so the page's requests
  become same-origin; they still carry the attacker's name in Host. Only the daemon's own
  names, IP addresses and `server.allowed_hosts` are answered (421 otherwise).
- **Content-Type**: JSON endpoints take only application/json bodies (validation.py: 415),
  which no "simple" cross-origin request can send without a preflight.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from npuserve.daemon.http.services import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type"


def own_names(bind_host: str, extra: Iterable[str]) -> frozenset[str]:
    """The names this daemon answers to (IP addresses are always answered)."""
    host = socket.gethostname().lower()
    # Not getfqdn(): a DNS lookup at start-up stalls an offline board; other names go in
    # server.allowed_hosts.
    names = {"localhost", "localhost.localdomain", host, host.split(".")[0],
             f"{host.split('.')[0]}.local", bind_host.lower()}
    return frozenset(n.rstrip(".") for n in names | {e.lower() for e in extra} if n)


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:7832" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


class BrowserGuard:
    def __init__(self, bind_host: str, cors_origins: Iterable[str],
                 allowed_hosts: Iterable[str]) -> None:
        self.origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.hosts = own_names(bind_host, allowed_hosts)

    def host_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Host")
        if header is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(header)
        return is_ip(name) or name in self.hosts

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_ok(request):
            return json_error(421, f"this server does not answer to the name in Host"
                              f" ({host_name(request.headers['Host'])!r}); add it to"
                              " server.allowed_hosts if it is yours")
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self.origins:
            return json_error(403, f"requests from web origin {origin!r} are refused;"
                              " allow it in server.cors_origins")
        if request.method == "OPTIONS" and origin is not None:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if origin is not None:  # an allowed origin
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Vary"] = "Origin"
        return response
