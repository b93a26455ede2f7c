"""Hostile clients on raw sockets: huge whitespace bodies, header floods, slow bodies,
slowloris connections. The daemon answers each with a clear status and keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from .reliability_support import Daemon, record

pytestmark = pytest.mark.slow


async def _raw(port: int, data: bytes, read_timeout: float = 30) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), read_timeout)
    except ConnectionResetError:
        raw = b""
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


@pytest.fixture
def daemon(tmp_path: Path, models_dir: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "models").symlink_to(models_dir)
    d = Daemon(state, "--set", "server.body_timeout=2").start()
    yield d
    assert d.stop() == 0


async def _still_serves(port: int) -> bool:
    status, _, body = await _raw(port, _request("/embed", b'{"text": "still here"}'))
    return status == 200 and "embedding" in json.loads(body)


async def test_hostile_clients(daemon):
    port = daemon.port
    cases: list[tuple[str, int, bool]] = []

    # 50 MB of whitespace: over server.max_body_mb (50 MiB) by a byte -> 413 JSON.
    big = b" " * (50 * 1024 * 1024 + 1)
    status, headers, body = await _raw(port, _request("/embed", big), 120)
    cases.append(("50 MB whitespace body", status, "json" in headers.get("content-type", "")))
    assert status == 413 and "server.max_body_mb" in json.loads(body)["error"]

    # 10 MB of whitespace within the limit: a clear 400, not a parse crash.
    status, headers, body = await _raw(port, _request("/embed", b" " * (10 << 20)), 120)
    cases.append(("10 MB whitespace body", status, True))
    assert status == 400 and "JSON object" in json.loads(body)["error"]

    # A body that trickles in: answered 408 after server.body_timeout, not held forever.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    cases.append(("slow body (1 of 100 bytes)", int(answer.split()[1]), True))
    assert answer.startswith(b"HTTP/1.1 408") and b"server.body_timeout" in answer

    # Header flood: aiohttp's parser refuses it before any route runs (its own 400/431,
    # connection closed); the daemon keeps serving.
    flood = "".join(f"X-Flood-{i}: {'a' * 64}\r\n" for i in range(2000))
    status, _, _ = await _raw(port, _request("/embed", b'{"text": "x"}', flood))
    cases.append(("2000-header flood", status, False))
    assert status in (400, 431)
    huge_header = f"X-Huge: {'b' * 100_000}\r\n"
    status, _, _ = await _raw(port, _request("/embed", b'{"text": "x"}', huge_header))
    cases.append(("100 kB header", status, False))
    assert status in (400, 431)

    # Slowloris: 200 connections that never finish their headers do not starve others.
    idle = []
    for _ in range(200):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        idle.append(w)
    await asyncio.sleep(0.5)
    serves = await _still_serves(port)
    for w in idle:
        w.close()
    cases.append(("200 slowloris connections", 200 if serves else 0, True))
    assert serves

    # Wrong method, unknown path, invalid UTF-8, NaN, deep nesting: JSON errors.
    for name, data, want in [
        ("wrong method", b"DELETE /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close"
                         b"\r\n\r\n", 405),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close"
                         b"\r\n\r\n", 404),
        ("invalid UTF-8", _request("/embed", b'{"text": "\xff\xfe"}'), 400),
        ("NaN", _request("/v1/embeddings", b'{"input": "a", "dimensions": NaN}'), 400),
        ("nesting 100k deep", _request("/embed", b"[" * 100_000 + b"]" * 100_000), 400),
    ]:
        status, headers, body = await _raw(port, data)
        is_json = "json" in headers.get("content-type", "") and "error" in json.loads(body)
        cases.append((name, status, is_json))
        assert status == want and is_json, (name, status, body[:200])

    assert await _still_serves(port) and daemon.alive()
    record("hostile", {"cases": len(cases), "all_answered": True,
                       "detail": [f"{n}: {s}" for n, s, _ in cases]})
