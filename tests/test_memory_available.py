"""The auto policy's memory figure honours the cgroup limit the daemon runs under
(systemd's MemoryMax=, a container's limit), not only the machine's MemAvailable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from npuserve.daemon.sched.memory import cgroup_room, mem_available

MB = 1024 * 1024


def _write(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _proc(tmp_path: Path, cgroup_line: str, available_mb: int) -> Path:
    proc = tmp_path / "proc"
    _write(proc, {"meminfo": f"MemTotal: 99999999 kB\nMemAvailable: {available_mb * 1024} kB\n",
                  "self/cgroup": cgroup_line})
    return proc


def test_v2_limit_of_an_ancestor_caps_available_memory(tmp_path):
    root = tmp_path / "cg"
    _write(root, {
        "cgroup.controllers": "cpu memory io\n",
        "system.slice/memory.max": f"{1024 * MB}\n",  # MemoryMax=1G on the slice
        "system.slice/memory.current": f"{800 * MB}\n",
        "system.slice/memory.stat": f"anon 1\ninactive_file {100 * MB}\n",
        "system.slice/npuserve.service/memory.max": "max\n",
        "system.slice/npuserve.service/memory.current": f"{300 * MB}\n",
        "system.slice/npuserve.service/memory.stat": "inactive_file 0\n",
    })
    proc = _proc(tmp_path, "0::/system.slice/npuserve.service\n", available_mb=20000)
    # 1024 - 800 used + 100 droppable cache = 324 MB, far below the machine's 20 GB.
    assert mem_available(proc, root) == 324 * MB


def test_v1_hierarchical_limit_caps_available_memory(tmp_path):
    root = tmp_path / "cg"
    _write(root, {
        "memory/box/memory.limit_in_bytes": str(9223372036854771712),
        "memory/box/memory.usage_in_bytes": str(200 * MB),
        "memory/box/memory.stat": (f"cache 5\nhierarchical_memory_limit {512 * MB}\n"
                                   f"total_inactive_file {50 * MB}\n"),
    })
    proc = _proc(tmp_path, "4:memory:/box\n3:cpuset:/\n", available_mb=20000)
    assert mem_available(proc, root) == (512 - 200 + 50) * MB


def test_no_limit_leaves_the_machine_figure(tmp_path):
    root = tmp_path / "cg"
    _write(root, {
        "memory/memory.limit_in_bytes": str(9223372036854771712),
        "memory/memory.usage_in_bytes": str(200 * MB),
        "memory/memory.stat": f"hierarchical_memory_limit {9223372036854771712}\n",
    })
    proc = _proc(tmp_path, "4:memory:/\n", available_mb=3000)
    assert cgroup_room(proc / "self" / "cgroup", root) is None
    assert mem_available(proc, root) == 3000 * MB
    # Unreadable cgroup files do not break the figure either.
    assert mem_available(_proc(tmp_path / "x", "4:memory:/gone\n", 3000), root) == 3000 * MB


def _own_v1_memory_group() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


def test_a_real_memory_cgroup_limits_what_the_daemon_plans_with(tmp_path):
    """A process put in a 256 MB memory cgroup sees at most 256 MB (root and cgroup v1)."""
    parent = _own_v1_memory_group()
    if os.geteuid() != 0 or parent is None or not parent.is_dir():
        pytest.skip("needs root and a cgroup v1 memory hierarchy")
    group = parent / f"npuserve-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(256 * MB))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    def in_group(*args: str) -> str:
        return subprocess.run(
            [sys.executable, *args],
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            capture_output=True, text=True, timeout=120).stdout

    try:
        inside = int(in_group("-c", "from npuserve.daemon.sched.memory import"
                              " mem_available; print(mem_available())"))
        # (doctor's verdict here is "not ready": this state directory has no models)
        doctor = in_group("-m", "npuserve.daemon.cli", "doctor", "--state-dir", str(tmp_path))
    finally:
        group.rmdir()
    assert 0 < inside <= 256 * MB
    assert mem_available() > 256 * MB  # outside the group: the machine's figure
    assert "capped by this process's cgroup memory limit" in doctor
