"""Board conditions for a benchmarked server: short RAM and slow flash, through cgroups.

On the development VM every model file stays in the page cache of 24 GB, so a model
swap costs 0.1-0.8 s. On a board whose RAM cannot hold every model - the reason the
daemon runs models one at a time - an unloaded model's pages are reclaimed, and the next
load reads the file from flash again: an SD card reads ~90 MB/s, eMMC ~250 MB/s. This
module puts the server's process tree in a cgroup with a memory limit (page cache
included, so what does not fit is read again) and a read-rate limit on the block device
that holds the models, and evicts those files from the page cache before a run, so
every policy starts from cold flash. It emulates a board's storage and memory pressure;
the CPU is still this machine's.

Needs root and cgroup v1 (memory + blkio hierarchies) or v2 (memory + io controllers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class BoardLimitsUnavailable(RuntimeError):
    """This machine cannot apply the limits (no cgroup write access, no block device)."""


@dataclass(frozen=True)
class BoardLimits:
    memory_mb: int
    read_mb_per_s: float


def block_device(path: Path) -> str:
    """MAJ:MIN of the whole disk holding `path` (throttling applies to disks, not
    partitions)."""
    st = os.stat(path.resolve())
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if major == 0 or not sys_dev.exists():
        raise BoardLimitsUnavailable(
            f"{path} is not on a block device (st_dev {major}:{minor}); cannot throttle reads")
    if (sys_dev / "partition").exists():
        return (sys_dev.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}"


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop the clean cached pages of these files, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _own_cgroup_v1(controller: str) -> str:
    """This process's cgroup path in a v1 hierarchy ("/" when at its root)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise BoardLimitsUnavailable(f"no cgroup v1 {controller} hierarchy")


class BoardCgroup:
    """A cgroup per benchmark run; `enter()` runs in the server's child before exec."""

    def __init__(self, limits: BoardLimits, models: list[Path], name: str) -> None:
        self.limits = limits
        self.device = block_device(models[0])
        self.dirs: list[Path] = []
        memory = limits.memory_mb * 1024 * 1024
        rate = int(limits.read_mb_per_s * 1024 * 1024)
        try:
            if (CGROUP_ROOT / "cgroup.controllers").exists():
                self._make_v2(name, memory, rate)
            else:
                self._make_v1(name, memory, rate)
        except OSError as exc:
            self.remove()
            raise BoardLimitsUnavailable(f"cannot set up the cgroup: {exc}") from exc

    def _make_v2(self, name: str, memory: int, rate: int) -> None:
        have = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
        if not {"memory", "io"} <= set(have):
            raise BoardLimitsUnavailable(f"cgroup v2 without memory and io controllers: {have}")
        (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory +io")
        group = CGROUP_ROOT / name
        group.mkdir(exist_ok=True)
        self.dirs.append(group)
        (group / "memory.max").write_text(str(memory))
        (group / "memory.swap.max").write_text("0")
        (group / "io.max").write_text(f"{self.device} rbps={rate}")

    def _make_v1(self, name: str, memory: int, rate: int) -> None:
        mem_root = CGROUP_ROOT / "memory"
        blk_root = CGROUP_ROOT / "blkio"
        if not (mem_root.is_dir() and blk_root.is_dir()):
            raise BoardLimitsUnavailable("no cgroup v1 memory and blkio hierarchies")
        mem = mem_root / _own_cgroup_v1("memory").lstrip("/") / name
        blk = blk_root / _own_cgroup_v1("blkio").lstrip("/") / name
        for d in (mem, blk):
            d.mkdir(exist_ok=True)
            self.dirs.append(d)
        (mem / "memory.limit_in_bytes").write_text(str(memory))
        swap = mem / "memory.swappiness"
        if swap.exists():
            swap.write_text("0")
        (blk / "blkio.throttle.read_bps_device").write_text(f"{self.device} {rate}")

    def enter(self) -> None:
        """Move the calling process (the server, before exec) into the cgroup."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """The cgroup's own peak memory (page cache included), where the kernel keeps it."""
        for d in self.dirs:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                f = d / name
                if f.exists():
                    return int(f.read_text().split()[0])
        return None

    def bytes_read(self) -> int:
        """Bytes the cgroup has read from the throttled device."""
        total = 0
        for d in self.dirs:
            for name in ("blkio.throttle.io_service_bytes", "io.stat"):
                f = d / name
                if not f.exists():
                    continue
                text = f.read_text()
                for line in text.splitlines():
                    if line.startswith(self.device):
                        m = re.search(r"(?:Read (\d+))|(?:rbytes=(\d+))", line)
                        if m:
                            total += int(m.group(1) or m.group(2))
        return total

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone."""
        for d in reversed(self.dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        self.dirs.clear()
