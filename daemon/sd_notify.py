"""systemd's notify protocol: READY=1 once listening, WATCHDOG=1 from the event loop,
STATUS= for humans, STOPPING=1 on the way down. A datagram to $NOTIFY_SOCKET (a
leading '@' is the abstract namespace); a no-op when not run by systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("npuserve.sd_notify")


def notify(*lines: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
        return True
    except OSError as exc:  # unlike the sdnotify package, say so
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, when systemd asked for keep-alives from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog_loop(interval: float) -> None:
    """Runs on the event loop: if the loop is blocked, the keep-alives stop and
    systemd restarts the service - which is the point."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
