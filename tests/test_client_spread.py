"""The client spreads calls over every daemon serving the same embedding model, weighted by
their load, and fails over without the caller noticing: two real daemons on loopback
ports, one throttled (its processes stopped 60% of the time, as a slower board), a 60 s
load from 8 clients, the other daemon stopped two thirds of the way."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from npuserve.daemon.client import Client, Daemon

from .conftest import http_json, start_daemon, wait_http

pytestmark = pytest.mark.slow

SECONDS, STOP_AT, CLIENTS = 60.0, 40.0, 8


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the daemon and its model workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class Throttle(threading.Thread):
    """Stops a process tree for `stopped` of every 100 ms: a board with less CPU."""

    def __init__(self, pid: int, stopped: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.stopped, self.halt = pid, stopped, threading.Event()

    def _signal(self, sig: int) -> None:
        for p in descendants(self.pid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        while not self.halt.is_set():
            self._signal(signal.SIGSTOP)
            time.sleep(0.1 * self.stopped)
            self._signal(signal.SIGCONT)
            time.sleep(0.1 * (1 - self.stopped))
        self._signal(signal.SIGCONT)


def daemon(tmp_path: Path, models_dir: Path, name: str) -> tuple[object, Daemon]:
    state = tmp_path / name
    state.mkdir()
    (state / "models").symlink_to(models_dir, target_is_directory=True)
    proc, port = start_daemon(state, "--set", "index.enabled=false", "--set",
                              "models.embed.threads=1", log=tmp_path / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", timeout=60)
    health = http_json(base + "/health", timeout=30)[1]
    return proc, Daemon(name, "127.0.0.1", port, ["127.0.0.1"],
                        {"efp": health["fingerprints"]["embed"], "timeout": "30"})


def test_load_lands_on_both_the_slower_gets_less_and_a_stop_fails_over(tmp_path, models_dir):
    fast_proc, fast = daemon(tmp_path, models_dir, "fast")
    slow_proc, slow = daemon(tmp_path, models_dir, "slow")
    throttle = Throttle(slow_proc.pid, 0.6)
    served: dict[str, list[int]] = {fast.url: [0, 0], slow.url: [0, 0]}  # before/after stop
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = time.monotonic()

    def agent(k: int) -> None:
        client = Client(daemons=[fast, slow], retries=4, backoff=0.05)
        n = 0
        while time.monotonic() - start < SECONDS:
            try:
                vec = client.embed(f"agent {k} asks about retrieval on small boards, call {n}")
                assert len(vec) == 384
            except BaseException as exc:  # noqa: BLE001 - every error is the test's failure
                with lock:
                    errors.append(exc)
                return
            phase = int(time.monotonic() - start >= STOP_AT)
            with lock:
                served[client.url][phase] += 1
            n += 1

    try:
        throttle.start()
        agents = [threading.Thread(target=agent, args=(k,)) for k in range(CLIENTS)]
        for t in agents:
            t.start()
        time.sleep(STOP_AT - (time.monotonic() - start))
        fast_proc.send_signal(signal.SIGTERM)  # the fast board goes away mid-load
        for t in agents:
            t.join(SECONDS + 60)
    finally:
        throttle.halt.set()
        throttle.join(5)
        for proc in (fast_proc, slow_proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print(f"\nbefore the stop: fast {served[fast.url][0]}, throttled {served[slow.url][0]};"
          f" after: fast {served[fast.url][1]}, throttled {served[slow.url][1]}")
    assert not errors, errors[:3]
    before_fast, before_slow = served[fast.url][0], served[slow.url][0]
    assert before_slow > 0 and before_fast > before_slow, served
    assert served[slow.url][1] > 0, "nothing was served after the fast daemon stopped"
