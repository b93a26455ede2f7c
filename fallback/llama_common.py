"""What both llama-cpp-python backends share: thread sizing, CPU features, memory estimates."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def thread_count(requested: int) -> int:
    """Threads for llama.cpp: never more than the cores this process may use.

    Oversubscription is catastrophic on small boards (4 threads on 2 cores made
    generation ~70x slower here), so an explicit request is capped too.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(requested, cores) if requested > 0 else cores)


def runnable_elsewhere(proc: Path = PROC, samples: int = 3) -> int:
    """Threads of other processes that are running or runnable now (state R in
    /proc/<pid>/task/<tid>/stat), the least of a few samples 2 ms apart: a busy process
    is runnable in all of them, a passing one is not. This process's own threads are not
    counted - llama.cpp's pool still spins for a moment after a call. 0 where /proc cannot
    be read."""
    me = os.getpid()
    seen = []
    for i in range(samples):
        if i:
            time.sleep(0.002)
        running = 0
        try:
            pids = [p for p in os.listdir(proc) if p.isdigit() and int(p) != me]
        except OSError:
            return 0
        for pid in pids:
            try:
                tasks = os.listdir(proc / pid / "task")
            except OSError:
                continue  # gone, or not ours to read
            for tid in tasks:
                try:
                    stat = (proc / pid / "task" / tid / "stat").read_bytes()
                except OSError:
                    continue
                # "pid (comm) S ...": comm may hold spaces and parentheses; the state
                # follows the last ")".
                if stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"R":
                    running += 1
        seen.append(running)
    return min(seen) if seen else 0


# The watch sleeps once no call has asked for this long: an idle worker scans nothing.
WATCH_IDLE_SECONDS = 10.0


class _BusyWatch:
    """Counts other processes' runnable threads once a second on a thread of its own, so a
    call reads the figure without waiting for a scan of /proc (~10 ms) - while calls come;
    the first call after a pause scans in line and wakes it."""

    def __init__(self, proc: Path) -> None:
        self.proc = proc
        self.wake = threading.Event()
        self.used = self.fresh_at = time.monotonic()
        self.busy = runnable_elsewhere(proc)
        threading.Thread(target=self._run, name="busy-watch", daemon=True).start()

    def read(self) -> int:
        now = time.monotonic()
        self.used = now
        if now - self.fresh_at > 2.0:  # the watch was asleep: its figure is old
            self.busy, self.fresh_at = runnable_elsewhere(self.proc), now
            self.wake.set()
        return self.busy

    def _run(self) -> None:
        while True:
            self.wake.clear()  # before the check: a read() after it sets it again
            if time.monotonic() - self.used > WATCH_IDLE_SECONDS:
                self.wake.wait()
            time.sleep(1.0)
            self.busy, self.fresh_at = runnable_elsewhere(self.proc), time.monotonic()


_watches: dict[Path, _BusyWatch] = {}
_watch_lock = threading.Lock()


def threads_now(limit: int, proc: Path | None = None) -> int:
    """Threads for the next call: `limit`, less the cores other processes are using
    (as seen within the last second).

    llama.cpp's threads meet at a barrier every layer; when another process holds a core,
    the thread that shares it arrives late to every one of them. Measured here with two
    busy processes on two cores: 40 generated tokens took 12.2 s on two threads and 1.9 s
    on one; a 500-token prompt 16.8 s and 8.9 s."""
    root = proc or PROC
    with _watch_lock:
        watch = _watches.get(root) or _watches.setdefault(root, _BusyWatch(root))
    cores = thread_count(0)
    return max(1, min(limit, cores - watch.read()))


def threads_for_call(requested: int) -> int:
    """Threads for the next call: `requested` (capped by the cores), or with 0 (the
    default) one per core that no other process is using right now."""
    return thread_count(requested) if requested > 0 else threads_now(thread_count(0))


def set_threads(lib: Any, ctx: Any, requested: int) -> int:
    """Before each call: the threads `threads_for_call` gives."""
    n = threads_for_call(requested)
    lib.llama_set_n_threads(ctx, n, n)
    return n


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo has none: ARM says
    "Features", other systems have no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def extra_buffers_safe(flags: set[str]) -> bool:
    """Whether llama.cpp may put weights in its extra buffer types (repacked layouts).

    On a CPU with AMX (Xeon Sapphire Rapids and later) a native build routes quantized
    weights to ggml's AMX buffer, and llama_decode then segfaults on SmolLM2's Q4_1
    (llama-cpp-python 0.3.36, seen in its own Llama API too). Elsewhere, ARM boards
    included, the repacked layouts are kept: they are what makes Q4_0 fast there.
    """
    return "amx_int8" not in flags
