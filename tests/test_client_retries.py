"""The agent client's retries, Retry-After, idempotency and failover (loopback servers)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from npuserve.daemon.client import Client, Daemon, NpuserveError, Unreachable
from tests.conftest import free_port


@pytest.fixture
async def flaky():
    """/health answers 503 (Retry-After: 1) twice, then 200; /embed is always 400."""
    state = {"health": 0, "times": []}

    async def health(request):
        state["health"] += 1
        state["times"].append(time.monotonic())
        if state["health"] <= 2:
            return web.json_response({"error": "busy"}, status=503,
                                     headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    async def embed(request):
        return web.json_response({"error": "text must be a non-empty string"}, status=400)

    app = web.Application()
    app.add_routes([web.get("/health", health), web.post("/embed", embed)])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", state
    await server.close()


async def test_503_is_retried_honouring_retry_after(flaky):
    url, state = flaky
    client = Client(url, retries=3, backoff=0.01)
    assert await asyncio.to_thread(client.health) == {"ok": True}
    assert state["health"] == 3
    gaps = [b - a for a, b in zip(state["times"], state["times"][1:], strict=False)]
    assert all(g >= 0.9 for g in gaps), gaps  # Retry-After: 1 was waited for


async def test_client_errors_are_not_retried(flaky):
    url, _ = flaky
    client = Client(url, retries=3, backoff=0.01)
    with pytest.raises(NpuserveError) as err:
        await asyncio.to_thread(client.embed, "")
    assert err.value.status == 400 and "non-empty" in err.value.message


async def test_failover_to_the_next_discovered_daemon(flaky):
    url, _ = flaky
    port = int(url.rsplit(":", 1)[1])
    dead = Daemon("dead", "127.0.0.1", free_port(), ["127.0.0.1"], {"timeout": "5"})
    live = Daemon("live", "127.0.0.1", port, ["127.0.0.1"], {"timeout": "5"})
    client = Client(daemons=[dead, live], retries=3, backoff=0.01)
    assert client.timeout == 5.0  # from the advertised TXT record
    assert await asyncio.to_thread(client.health) == {"ok": True}
    assert client.url == live.url


def test_unreachable_when_every_daemon_is_down():
    a = Daemon("a", "127.0.0.1", free_port(), ["127.0.0.1"])
    b = Daemon("b", "127.0.0.1", free_port(), ["127.0.0.1"])
    with pytest.raises(Unreachable):
        Client(daemons=[a, b], retries=1, backoff=0.01).health()
    with pytest.raises(Unreachable):
        Client()  # nothing given, nothing discovered
