"""The daemon's side of one worker process: start, call with a deadline, notice death, restart."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait

from . import worker_protocol as wp
from .worker import worker_main

log = logging.getLogger("npuserve.worker_handle")


class WorkerDied(RuntimeError):
    """The worker process ended (abort, segfault, kill) during a call."""


WORKER_PYTHON_ENV = "NPUSERVE_WORKER_PYTHON"


class WorkerTimeout(RuntimeError):
    """A call did not return within its deadline; the worker was killed."""


class WorkerHandle:
    """One worker process. Calls are serialised: a worker runs one request at a time."""

    def __init__(self, device: str, log_level: int = logging.INFO) -> None:
        self.device = device
        self.log_level = log_level
        self._ctx = mp.get_context("spawn")
        # An interpreter or wrapper for the workers: e.g. a script that runs
        # `taskset -c 4-7 python3` to keep models on the RK3588's A76 cores, or one that
        # runs python3 under qemu-aarch64 for the arm64 smoke test.
        if os.environ.get(WORKER_PYTHON_ENV):
            self._ctx.set_executable(os.environ[WORKER_PYTHON_ENV])
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self.restarts = 0
        self.last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self.log_level),
            name=f"npuserve-worker-{self.device}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        log.info("worker for %s started (pid %s)", self.device, proc.pid)

    async def call(self, req: wp.Request, timeout: float | None = None) -> wp.Reply:
        """Send one request and wait for its reply off the event loop.

        Raises WorkerDied if the process ends and WorkerTimeout (after killing
        the process) if the deadline passes: a hung native call cannot be
        interrupted any other way.
        """
        async with self._lock:
            if not self.alive():
                self._reap()
                self.start()
            assert self._conn is not None and self._proc is not None
            conn, proc = self._conn, self._proc
            try:
                conn.send(req)
            except (BrokenPipeError, OSError) as exc:
                self._reap()
                raise WorkerDied(f"{self.device} worker pipe closed: {exc}") from exc
            return await asyncio.to_thread(self._receive, conn, proc, timeout)

    def _receive(
        self, conn: Connection, proc: mp.process.BaseProcess, timeout: float | None
    ) -> wp.Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([conn, proc.sentinel], remaining)
            if conn in ready:
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    pass  # the process died mid-reply; fall through to the death path
            if ready:
                proc.join(1)
                code = proc.exitcode
                self._reap()
                raise WorkerDied(f"{self.device} worker exited with code {code}")
            if deadline is not None and time.monotonic() >= deadline:
                self._kill()
                raise WorkerTimeout(f"{self.device} worker call exceeded {timeout:.1f}s")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            if not self._proc.is_alive():
                self.last_exit = f"exit code {self._proc.exitcode}"
                self.restarts += 1
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def stop(self) -> None:
        """Close the pipe (the worker exits its loop), then make sure it is gone."""
        async with self._lock:
            proc, conn = self._proc, self._conn
            self._proc, self._conn = None, None
            if conn is not None:
                conn.close()
            if proc is not None:
                await asyncio.to_thread(proc.join, 5)
                if proc.is_alive():
                    proc.kill()
                    await asyncio.to_thread(proc.join, 5)

    def kill_now(self) -> None:
        """SIGKILL the worker (tests and fault injection)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
