"""Helpers for the reliability suite: a daemon process with its own state directory, the
load generator, process sampling from /proc, and the suite's report file.

`bench/reliability.py` runs the suite with the full settings (60 s, 32 clients) and prints
the table; CI runs the same tests shorter. Settings come from the environment:
NPUSERVE_TEST_LOAD_SECONDS, NPUSERVE_TEST_LOAD_CLIENTS, NPUSERVE_TEST_FUZZ_EXAMPLES, and
NPUSERVE_TEST_RELIABILITY_REPORT (a JSON file each test adds its row to).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import start_daemon, wait_http

LOAD_SECONDS = float(os.environ.get("NPUSERVE_TEST_LOAD_SECONDS", "20"))
LOAD_CLIENTS = int(os.environ.get("NPUSERVE_TEST_LOAD_CLIENTS", "32"))
FUZZ_EXAMPLES = int(os.environ.get("NPUSERVE_TEST_FUZZ_EXAMPLES", "10"))
REPORT = os.environ.get("NPUSERVE_TEST_RELIABILITY_REPORT")


def record(section: str, row: dict[str, Any]) -> None:
    """Add one row to the suite's report (when bench/reliability.py asked for one)."""
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(section, []).append(row)
    path.write_text(json.dumps(data, indent=1))


class Daemon:
    """`npuserve serve` in a subprocess on a free port with its own state directory."""

    def __init__(self, state: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state, self.args, self.extra_env = state, args, env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log = state / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        self.proc, self.port = start_daemon(self.state, *self.args, env=self.extra_env,
                                            log=self.log)
        wait_http(self.url + "/health", timeout=60)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 90) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Sample:
    t: float
    main_rss_kb: int
    total_rss_kb: int
    fds: int


async def sample_process(pid: int, samples: list[Sample], stop: asyncio.Event,
                         every: float = 1.0) -> None:
    start = time.monotonic()
    while not stop.is_set():
        kids = children(pid)
        samples.append(Sample(time.monotonic() - start, rss_kb(pid),
                              rss_kb(pid) + sum(rss_kb(k) for k in kids), open_fds(pid)))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class LoadStats:
    requests: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    undesigned: list[str] = field(default_factory=list)
    acked_docs: dict[str, str] = field(default_factory=dict)  # path -> body acknowledged

    def add(self, op: str, status: int, seconds: float) -> None:
        self.requests += 1
        cls = "2xx" if 200 <= status < 300 else str(status)
        self.by_class[cls] = self.by_class.get(cls, 0) + 1
        self.latencies.setdefault(op, []).append(seconds)

    def percentile(self, q: float, op: str | None = None) -> float:
        values = self.latencies.get(op, []) if op else [
            v for vs in self.latencies.values() for v in vs]
        return float(np.percentile(values, q)) if values else 0.0


def pick(weights: dict[str, int], rng: random.Random) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]
