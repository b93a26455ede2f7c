"""Which CPUs keep llama.cpp's repacked weight buffers (all but those with AMX, where a
native build's AMX buffer crashed every quantized rerank and expansion), and how many
threads a call gets on a machine other processes are busy on."""

from __future__ import annotations

import os
from pathlib import Path

from npuserve.fallback.llama_common import (
    cpu_flags,
    extra_buffers_safe,
    thread_count,
    threads_now,
)

XEON = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
        "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
EPYC = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma f16c\n"
RK3588 = "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"


def _flags(tmp_path: Path, text: str) -> set[str]:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return cpu_flags(path)


def test_amx_cpus_turn_extra_buffers_off(tmp_path):
    assert "amx_int8" in _flags(tmp_path, XEON)
    assert extra_buffers_safe(_flags(tmp_path, XEON)) is False


def test_other_cpus_keep_them(tmp_path):
    assert extra_buffers_safe(_flags(tmp_path, EPYC)) is True
    board = _flags(tmp_path, RK3588)
    assert "asimddp" in board and extra_buffers_safe(board) is True


def test_unreadable_cpuinfo_keeps_them(tmp_path):
    assert cpu_flags(tmp_path / "missing") == set()
    assert extra_buffers_safe(set()) is True


def test_this_machine_is_read():
    flags = cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags, "no flags or Features line read from /proc/cpuinfo"


def _proc(tmp_path, name: str, states: dict[int, str]):
    """A fake /proc: one process per entry, its one thread in the given state."""
    root = tmp_path / name
    for pid, state in states.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "stat").write_text(f"{pid} (busy (worker) x) {state} 1 1 1 0 -1\n")
    return root


def test_calls_leave_the_cores_other_processes_are_busy_on(tmp_path):
    """With every core held by another process, a call runs on one thread (two threads on
    two shared cores made generation ~6x slower); on an idle machine, on all of them; this
    process's own threads (llama.cpp's pool spinning after a call) do not count."""
    cores = thread_count(0)
    idle = _proc(tmp_path, "idle", {1: "S", 2: "S", os.getpid(): "R"})
    assert threads_now(cores, idle) == cores
    hogs = _proc(tmp_path, "hogs", {10 + i: "R" for i in range(cores)} | {1: "S"})
    assert threads_now(cores, hogs) == 1
    one = _proc(tmp_path, "one", {10: "R", 11: "S"})
    assert threads_now(cores, one) == max(1, cores - 1)
    assert threads_now(cores, tmp_path / "missing") == cores
