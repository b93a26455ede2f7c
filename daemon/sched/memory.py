"""How much memory the `auto` residency policy may plan with.

The kernel's MemAvailable speaks for the whole machine. A daemon under a memory limit -
systemd's MemoryMax= on the unit, a container's limit - is killed at that limit however
much the machine has free, so the room left under every limiting cgroup caps the figure.
Like MemAvailable, that room counts the group's inactive file pages (page cache it can
drop) as free.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as a page-rounded 2**63 - 1.
_V1_UNLIMITED = 1 << 62


def mem_available(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Bytes that can be allocated before the machine or this process's cgroup runs out."""
    available = _meminfo_available(proc / "meminfo")
    room = cgroup_room(proc / "self" / "cgroup", cgroup_root)
    return available if room is None else min(available, room)


def _meminfo_available(path: Path) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def cgroup_room(self_cgroup: Path, root: Path) -> int | None:
    """Bytes left under the tightest memory limit on this process's cgroup path, or None
    when no cgroup limits it (or cgroups cannot be read)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    groups = dict(_parse_line(line) for line in lines if line.count(":") >= 2)
    try:
        if (root / "cgroup.controllers").exists() and "" in groups:
            return _room_v2(root, groups[""])
        if "memory" in groups:
            return _room_v1(root / "memory", groups["memory"])
    except (OSError, ValueError):
        return None
    return None


def _parse_line(line: str) -> tuple[str, str]:
    """("memory", "/path") for a v1 line, ("", "/path") for the v2 line."""
    _, controllers, path = line.split(":", 2)
    names = controllers.split(",")
    return ("memory" if "memory" in names else controllers), path


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _room_v2(root: Path, path: str) -> int | None:
    """v2: every ancestor's memory.max limits; the tightest room wins."""
    rooms: list[int] = []
    group = root / path.lstrip("/")
    while True:
        limit_file = group / "memory.max"
        if limit_file.exists():
            limit = limit_file.read_text().strip()
            if limit != "max":
                used = int((group / "memory.current").read_text())
                cache = _stat(group / "memory.stat").get("inactive_file", 0)
                rooms.append(max(0, int(limit) - used + cache))
        if group == root or root not in group.parents:
            break
        group = group.parent
    return min(rooms) if rooms else None


def _room_v1(mem_root: Path, path: str) -> int | None:
    """v1: memory.stat's hierarchical limit already folds in the ancestors'."""
    group = mem_root / path.lstrip("/")
    stat = _stat(group / "memory.stat")
    limit = stat.get("hierarchical_memory_limit")
    if limit is None:
        limit = int((group / "memory.limit_in_bytes").read_text())
    if limit >= _V1_UNLIMITED:
        return None
    used = int((group / "memory.usage_in_bytes").read_text())
    cache = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return max(0, limit - used + cache)
