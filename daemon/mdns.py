"""DNS-SD advertisement over mDNS (python-zeroconf's asyncio API).

The daemon registers `_npuserve._tcp` and `_http._tcp` with an `_npuserve`
subtype, but only when it listens on a non-loopback address: a loopback-only
daemon is unreachable from the LAN, so advertising it would only mislead.
The TXT record carries what a client needs to choose and configure itself
(kept under 400 bytes, `txtvers` first); it is refreshed when models,
devices or the calibrated timeout change, and the service re-announced when
the host's addresses change (after they are stable for two checks).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("npuserve.mdns")

SERVICE_TYPE = "_npuserve._tcp.local."
HTTP_TYPE = "_http._tcp.local."
HTTP_SUBTYPE = "_npuserve._sub._http._tcp.local."
TXT_LIMIT = 400
CHECK_SECONDS = 5.0


def instance_name(configured: str) -> str:
    """One DNS label of at most 63 bytes (UTF-8), never cut inside a character."""
    name = (configured or f"npuserve on {socket.gethostname()}").replace(".", "-")
    raw = name.encode("utf-8")[:63]
    return raw.decode("utf-8", "ignore")


def txt_record(props: dict[str, str]) -> dict[str, str]:
    """Ordered TXT properties, `txtvers` first, shortened to fit TXT_LIMIT bytes."""
    out = {"txtvers": "1", **{k: v for k, v in props.items() if k != "txtvers"}}

    def size(d: dict[str, str]) -> int:
        return sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in d.items())

    # Model names are the only long values: trim them first.
    for key in ("gen", "rerank", "embed"):
        while size(out) > TXT_LIMIT and len(out.get(key, "")) > 8:
            out[key] = out[key][:-4]
    return out


def advertised_addresses(host: str) -> list[str]:
    """The addresses to publish: the bound one, or every non-loopback one for 0.0.0.0/::."""
    import ifaddr

    if host not in ("0.0.0.0", "::", ""):
        return [host]
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = ipaddress.ip_address(addr.split("%")[0])
            except ValueError:
                continue
            if parsed.is_loopback or parsed.is_link_local:
                continue
            if parsed.version == 4 or host == "::":
                found.append(str(parsed))
    return sorted(set(found))


class Advertiser:
    """Registers the daemon's services and keeps them current until stop()."""

    def __init__(self, name: str, host: str, port: int,
                 props: Callable[[], dict[str, str]]) -> None:
        self.name = instance_name(name)
        self.host = host
        self.port = port
        self.props = props
        self.zc: Any = None
        self.infos: list[Any] = []
        self.task: asyncio.Task[None] | None = None
        self.addresses: list[str] = []
        self.registered_name: str | None = None
        self.txt: dict[str, str] = {}

    def _infos(self, addresses: list[str], txt: dict[str, str]) -> list[Any]:
        from zeroconf.asyncio import AsyncServiceInfo

        server = f"{socket.gethostname().split('.')[0]}.local."
        common = {"port": self.port, "properties": txt, "server": server,
                  "parsed_addresses": addresses}
        name = self.registered_name or self.name
        return [
            AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", **common),
            AsyncServiceInfo(HTTP_SUBTYPE, f"{name}.{HTTP_TYPE}", **common),
        ]

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        self.addresses = advertised_addresses(self.host)
        if not self.addresses:
            log.warning("mDNS: no non-loopback address to advertise")
            return
        self.zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self.txt = txt_record(self.props())
        infos = self._infos(self.addresses, self.txt)
        # A name taken by another host gets "-2" etc. appended (RFC 6762 probing).
        await self.zc.async_register_service(infos[0], allow_name_change=True)
        self.registered_name = infos[0].name[: -len(SERVICE_TYPE) - 1]
        infos = self._infos(self.addresses, self.txt)
        await self.zc.async_register_service(infos[1], allow_name_change=True)
        self.infos = infos
        log.info("mDNS: advertising %r on %s port %d", self.registered_name,
                 ", ".join(self.addresses), self.port)
        self.task = asyncio.create_task(self._watch(), name="mdns-watch")

    async def _watch(self) -> None:
        """Refresh TXT on change; re-announce after addresses change and settle."""
        pending: list[str] | None = None
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                now = advertised_addresses(self.host)
                if now != self.addresses:
                    if pending != now:  # first sighting: wait one more check (damping)
                        pending = now
                        continue
                    log.info("mDNS: addresses changed to %s", ", ".join(now) or "none")
                    self.addresses, pending = now, None
                    await self._update()
                    continue
                pending = None
                if txt_record(self.props()) != self.txt:
                    await self._update()
            except Exception:  # the watcher must outlive a passing interface error
                log.exception("mDNS: update failed")

    async def _update(self) -> None:
        if not self.addresses:
            return
        self.txt = txt_record(self.props())
        infos = self._infos(self.addresses, self.txt)
        for info in infos:
            await self.zc.async_update_service(info)
        self.infos = infos

    async def stop(self) -> None:
        """Unregister (goodbye packets, so browsers drop us at once) and close."""
        if self.task:
            self.task.cancel()
        if self.zc is not None:
            try:
                await self.zc.async_unregister_all_services()
            finally:
                await self.zc.async_close()
            self.zc = None
