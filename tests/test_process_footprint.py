"""What the daemon leaves running and resident: one worker per device, nothing more, and
nothing left behind when the daemon is killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .conftest import http_json, start_daemon, wait_http


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_worker_dies_with_a_killed_daemon_and_the_daemon_holds_no_numpy(state_dir: Path):
    proc, port = start_daemon(state_dir, "--set", "scheduler.keep_alive=-1")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health")
        status, body = http_json(base + "/v1/embeddings", {"input": ["a", "b"]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384
        status, _ = http_json(base + "/collections", {"name": "notes"})
        assert status == 201
        status, _ = http_json(base + "/collections/notes/documents/a.md", method="PUT",
                              body={"body": "apt verifies package signatures"})
        assert status in (200, 201)
        status, _ = http_json(base + "/vsearch", {"query": "signatures"})
        assert status in (200, 409)  # 409 while the vectors are still being made
        # One child: the model worker (no multiprocessing resource tracker beside it).
        children = _children(proc.pid)
        assert len(children) == 1, children
        cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes()
        assert b"npuserve.daemon.worker" in cmdline
        # numpy costs 11 MB of RSS; the daemon process serves vectors without it.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "numpy" not in maps
        # SIGKILL gives the daemon no chance to stop its worker: the worker must go anyway
        # rather than keep a model's memory on a small board.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(children[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
