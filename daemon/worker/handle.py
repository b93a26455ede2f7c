"""The daemon's side of one worker process: start, call with a deadline, notice death, restart."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from npuserve.daemon.worker import cancel
from npuserve.daemon.worker import protocol as wp

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
        # An interpreter or wrapper for the workers: e.g. a script that runs
        # `taskset -c 4-7 python3` to keep models on the RK3588's A76 cores, or one that
        # runs python3 under qemu-aarch64 for the arm64 smoke test.
        self.python = os.environ.get(WORKER_PYTHON_ENV) or sys.executable
        self._proc: WorkerProcess | None = None
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
        proc, conn = WorkerProcess.spawn(self.python, self.device, self.log_level)
        self._proc, self._conn = proc, conn
        log.info("worker for %s started (pid %s)", self.device, proc.pid)

    async def call(self, req: wp.Request, timeout: float | None = None,
                   on_partial: Callable[[wp.Partial], None] | None = None) -> wp.Reply:
        """Send one request and wait for its reply off the event loop; `on_partial` gets
        each piece of a streamed generation, on the event loop, as it arrives.

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
            loop = asyncio.get_running_loop()

            def partial(piece: wp.Partial) -> None:
                if on_partial is not None:
                    loop.call_soon_threadsafe(on_partial, piece)

            return await asyncio.to_thread(self._receive, conn, proc, timeout, partial)

    def _receive(
        self, conn: Connection, proc: WorkerProcess, timeout: float | None,
        partial: Callable[[wp.Partial], None]
    ) -> wp.Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if proc.sentinel is None:  # no pidfd: look at the process twice a second
                remaining = 0.5 if remaining is None else min(remaining, 0.5)
            ready = wait([conn] if proc.sentinel is None else [conn, proc.sentinel], remaining)
            if conn in ready:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    pass  # the process died mid-reply; fall through to the death path
                else:
                    if isinstance(reply, wp.Partial):
                        partial(reply)
                        continue
                    return reply
            if ready or not proc.is_alive():
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
        proc = self._proc
        if proc is not None:
            if proc.is_alive():  # its pipe is gone: a worker we give up on must not linger
                proc.kill()
            else:
                self.last_exit = f"exit code {proc.exitcode}"
                self.restarts += 1
            proc.join(5)
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

    def interrupt(self) -> None:
        """Ask the running call to stop where it can (worker/cancel.py); no-op when idle."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, cancel.SIGNAL)
            except ProcessLookupError:
                pass

    def kill_now(self) -> None:
        """SIGKILL the worker (tests and fault injection)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()


def worker_environment() -> dict[str, str]:
    """The daemon's environment, with glibc's mmap threshold pinned unless set already.

    By default glibc raises that threshold each time a large block is freed, so the
    multi-megabyte buffers llama.cpp allocates per sampled token (one entry per vocabulary
    token) move onto the heap and stay there: a worker that had generated with gemma-3
    kept 53 MB more after its expansions than with the threshold pinned (447 vs 394 MB,
    no slower). Pinned, such blocks are mapped and returned to the system when freed."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


class WorkerProcess:
    """A worker started with subprocess, talking over one end of a socket pair.

    Not multiprocessing: its spawn start method also runs a resource-tracker process
    (13 MB measured, for nothing here) and re-imports the daemon's main module in the
    child. A pidfd is the death sentinel `multiprocessing.connection.wait` watches.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.sentinel: int | None
        try:
            self.sentinel = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # kernel < 5.3: _receive polls instead
            self.sentinel = None

    @classmethod
    def spawn(cls, python: str, device: str, log_level: int) -> tuple[WorkerProcess, Connection]:
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(
                [python, "-m", "npuserve.daemon.worker", str(theirs.fileno()), str(log_level),
                 device],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=worker_environment(),
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(popen), Connection(ours.detach())

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.returncode is not None and self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()
