"""What both llama-cpp-python backends share: thread sizing, CPU features, memory estimates."""

from __future__ import annotations

import os
from pathlib import Path


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
