"""Reading the next model's files into the page cache while the current model computes.

On a board that holds one model at a time, a swap reads the next model from flash (an
SD card ~90 MB/s, eMMC ~250 MB/s): seconds in which the device does nothing. The
scheduler knows which model it will load next, so a background thread reads that
model's files ahead, while the resident model is busy, and the load then finds them in
memory. Only as many bytes as the memory left beside the resident model allows are read:
the pages are clean cache the kernel can drop, but reading more would evict what the
resident model or the next load needs.

Reads are `posix_fadvise(WILLNEED)` per chunk (no copy into this process), each followed
by a one-byte read of the chunk's end, which waits for its I/O: the thread keeps pace
with the disk and stops between chunks when cancelled.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

log = logging.getLogger("npuserve.prefetch")

CHUNK_BYTES = 4 * 1024 * 1024


class Prefetcher:
    """One background read at a time; a new target replaces the old one."""

    def __init__(self) -> None:
        self.target: str | None = None  # the model whose files are being read
        self.bytes_read = 0  # over the daemon's life, for /metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, target: str, paths: Sequence[str], budget: int) -> None:
        """Read up to `budget` bytes of `paths` for `target`, unless already reading or
        read (until cancelled: a load cancels, so the next swap's model is read anew)."""
        if target == self.target:
            return
        self.cancel()
        if budget < CHUNK_BYTES or not paths:
            return
        self.target = target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(list(paths), budget,
                                                                 self._stop),
                                        name=f"prefetch-{target}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop reading (between chunks); pages already read stay cached."""
        self._stop.set()
        self.target = None

    def _read(self, paths: list[str], budget: int, stop: threading.Event) -> None:
        left = budget
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                log.debug("prefetch: cannot open %s: %s", path, exc)
                continue
            try:
                left = self._read_file(fd, left, stop)
            except OSError as exc:  # a file replaced or a disk error: the load will say
                log.debug("prefetch of %s stopped: %s", path, exc)
            finally:
                os.close(fd)
            if left <= 0 or stop.is_set():
                return

    def _read_file(self, fd: int, left: int, stop: threading.Event) -> int:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size and left > 0 and not stop.is_set():
            length = min(CHUNK_BYTES, size - offset, left)
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            os.pread(fd, 1, offset + length - 1)  # waits for the chunk's I/O
            offset += length
            left -= length
            self.bytes_read += length
        return left

