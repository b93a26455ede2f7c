"""Connections as a resource: a cap below the descriptor limit, and idle ones closed.

One client holding 1,100 idle sockets used to exhaust the daemon's 1,024 descriptors:
accept() failed, /health timed out, the log filled with tracebacks. Now:
- idle keep-alive connections, and connections whose request headers never complete, are
  closed after `server.idle_timeout` (aiohttp's keep-alive timer runs from the connection's
  start, so it covers both);
- at most `server.max_connections` are open, and never more than the descriptor limit
  leaves room for (RESERVED_FDS for models, the index, worker pipes, mDNS). At the cap a
  new connection takes the place of the longest-idle one; only when every connection is
  busy with a request is it refused, at once, with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from aiohttp import web

from npuserve.daemon.http import quiet

log = logging.getLogger("npuserve.http")
RESERVED_FDS = 128
# asyncio accepts up to the listen backlog in one go before any protocol is made: that many
# descriptors can be open beyond the cap for a moment.
BACKLOG = 128
REFUSAL_BODY = json.dumps({"error": "too many connections; retry shortly"}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\n"
           + f"Content-Length: {len(REFUSAL_BODY)}\r\n\r\n".encode() + REFUSAL_BODY)


def connection_cap(configured: int) -> int:
    """The configured cap, lowered to what the descriptor limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - RESERVED_FDS - BACKLOG))


class Refusal(asyncio.Protocol):
    """Answers 503 and closes: the descriptor is given back at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


# aiohttp has no public view of a connection's state; these are its own fields (3.10+),
# read only here.
def is_open(handler: Any) -> bool:
    """Holds its socket: made (connected or about to be) and not yet lost."""
    return getattr(handler, "_manager", None) is not None


def is_idle(handler: Any) -> bool:
    """Open, not already being closed, and waiting for a request (keep-alive, or headers
    not complete yet) rather than serving one."""
    return (is_open(handler) and not getattr(handler, "_force_close", True)
            and not getattr(handler, "_request_in_progress", True))


class CappedSite(web.TCPSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.cap = connection_cap(max_connections)
        # Every connection this site made, oldest first: counted here, not in the server's
        # list, which learns of a connection only once asyncio has made it - in a burst of
        # accepts every new one would see the same count and evict the same idle one.
        self.handlers: list[Any] = []
        self.evicted = 0
        self.refused = 0
        self._log = quiet.Throttled(log)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would listen
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._admit(server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("connections: at most %d open, idle ones closed after the keep-alive"
                 " timeout", self.cap)

    def _admit(self, server: web.Server) -> asyncio.BaseProtocol:
        self.handlers = [h for h in self.handlers if is_open(h)]
        if len(self.handlers) >= self.cap:
            idle = next((h for h in self.handlers if is_idle(h)), None)
            if idle is None:
                self.refused += 1
                self._log.warn("refused", "connection refused: all %d connections are"
                               " serving requests", self.cap)
                return Refusal()
            idle.force_close()
            self.evicted += 1
            self._log.warn("evicted", "at the connection cap (%d): closed the longest-idle"
                           " connection for a new one", self.cap)
        handler = server()
        self.handlers.append(handler)
        return handler
