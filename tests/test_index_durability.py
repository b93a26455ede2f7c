"""A real process kill in the middle of an ingest loses no acknowledged document."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .conftest import http_json, start_daemon, wait_http
from .pg_support import both_index_backends, pg_server  # noqa: F401 - both backends


def call(base: str, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
    return http_json(base + path, body, method=method, timeout=30)


def body_for(i: int) -> str:
    return f"# Note {i}\n\n" + f"Paragraph {i} about durable writes and WAL mode. " * 40


def test_sigkill_mid_ingest_loses_no_acknowledged_document(state_dir: Path,
                                                           index_overrides: dict[str, str]):
    backend = [a for k, v in index_overrides.items() for a in ("--set", f"{k}={v}")]
    proc, port = start_daemon(state_dir, *backend)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health")
    assert call(base, "POST", "/collections", {"name": "notes"})[0] == 201
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def writer() -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            path = f"n/{i}.md"
            try:
                status, reply = call(base, "PUT", f"/collections/notes/documents/{path}",
                                     {"body": body_for(i), "title": f"Note {i}"})
            except OSError:
                return  # the daemon is gone
            if status in (200, 201):
                acknowledged[path] = reply["hash"]

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown handlers, no flush: a crash
    proc.wait(10)
    stop.set()
    t.join(30)
    assert len(acknowledged) >= 25

    proc2, port2 = start_daemon(state_dir, *backend)
    base2 = f"http://127.0.0.1:{port2}"
    try:
        wait_http(base2 + "/health")
        for path, h in acknowledged.items():
            status, doc = call(base2, "GET", f"/collections/notes/documents/{path}")
            assert status == 200, path
            assert doc["hash"] == h
            i = int(path.split("/")[1].split(".")[0])
            assert hashlib.sha256(doc["body"].encode()).hexdigest() == \
                hashlib.sha256(body_for(i).encode()).hexdigest()
        # No half-written document: everything stored has its chunks and FTS row.
        status, browse = call(base2, "GET", "/browse?limit=1000")
        assert browse["total"] >= len(acknowledged)
        for chunk in browse["chunks"]:
            _, doc = call(base2, "GET", f"/collections/notes/documents/{chunk['path']}")
            assert doc["chunks"] >= 1
            _, found = call(base2, "GET", "/search?q=" + urllib.request.quote(doc["title"])
                            + "&limit=1000")
            assert chunk["path"] in [r["displayPath"].split("/", 1)[1] for r in found["results"]]
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.communicate(timeout=60)
