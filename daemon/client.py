"""A client for agents: find npuserve daemons on the LAN, call them, retry, fail over.

Light by design: it needs only the standard library and python-zeroconf (no
model runtime), so a laptop can `pip install npuserve` without compiling
llama.cpp. Retries use exponential back-off with jitter on connection errors,
503 (honouring Retry-After) and 504, and only for idempotent calls; a daemon
that stays unreachable is replaced by the next one discovered.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

SERVICE_TYPE = "_npuserve._tcp.local."
DEFAULT_TIMEOUT = 300.0


class NpuserveError(RuntimeError):
    """The daemon answered with an error (status and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Unreachable(RuntimeError):
    """No daemon could be reached within the retry budget."""


@dataclass
class Daemon:
    name: str
    host: str
    port: int
    addresses: list[str]
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        addr = self.addresses[0] if self.addresses else self.host
        if ":" in addr:
            addr = f"[{addr}]"
        return f"http://{addr}:{self.port}"

    @property
    def timeout(self) -> float | None:
        try:
            return float(self.txt["timeout"])
        except (KeyError, ValueError):
            return None


def discover(timeout: float = 3.0) -> list[Daemon]:
    """Daemons answering on the LAN within `timeout` seconds, by name."""
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    found: dict[str, Daemon] = {}
    lock = threading.Lock()

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=int(timeout * 1000))
            if info is None or not info.port:
                return
            txt = {k: v for k, v in info.decoded_properties.items() if v is not None}
            daemon = Daemon(name=name[: -len(type_) - 1], host=(info.server or "").rstrip("."),
                            port=info.port, addresses=info.parsed_scoped_addresses(), txt=txt)
            with lock:
                found[name] = daemon

        update_service = add_service

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            with lock:
                found.pop(name, None)

    zc = Zeroconf()
    try:
        ServiceBrowser(zc, SERVICE_TYPE, Listener())
        time.sleep(timeout)
    finally:
        zc.close()
    with lock:
        return sorted(found.values(), key=lambda d: d.name)


async def async_discover(timeout: float = 3.0) -> list[Daemon]:
    return await asyncio.to_thread(discover, timeout)


class Client:
    """Synchronous client. `Client("http://board:7832")` or `Client(discover=True)`."""

    def __init__(self, url: str | None = None, *, discover: bool = False,
                 discover_timeout: float = 3.0, api_key: str | None = None,
                 timeout: float | None = None, retries: int = 4, backoff: float = 0.5,
                 daemons: list[Daemon] | None = None) -> None:
        self.api_key = api_key
        self.retries = retries
        self.backoff = backoff
        self.daemons = list(daemons or [])
        if url is None and discover and not self.daemons:
            self.daemons = globals()["discover"](discover_timeout)
        self.urls = [url.rstrip("/")] if url else [d.url for d in self.daemons]
        if not self.urls:
            raise Unreachable("no npuserve daemon given or discovered")
        advertised = next((d.timeout for d in self.daemons if d.timeout), None)
        self.timeout = timeout or advertised or DEFAULT_TIMEOUT
        self.current = 0

    @property
    def url(self) -> str:
        return self.urls[self.current]

    # --- transport --------------------------------------------------------------

    def _once(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.load(resp)

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt * (0.5 + random.random())  # jitter
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, 60.0))

    def call(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Any:
        """One API call with retries (idempotent calls only) and failover."""
        tries = self.retries if idempotent else 0
        switched = 0
        attempt = 0
        while True:
            try:
                return self._once(method, path, body)
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code in (503, 504) and attempt < tries:
                    self._pause(attempt, err.headers.get("Retry-After"))
                    attempt += 1
                    continue
                raise NpuserveError(err.code, message) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if attempt < tries:
                    self._pause(attempt, None)
                    attempt += 1
                    continue
                if idempotent and switched + 1 < len(self.urls):
                    # This daemon stays down: fail over to the next one.
                    self.current = (self.current + 1) % len(self.urls)
                    switched += 1
                    attempt = 0
                    continue
                raise Unreachable(f"{self.url}: {err}") from None

    # --- endpoints ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/health")

    def embed(self, text: str) -> list[float]:
        return self.call("POST", "/embed", {"text": text})["embedding"]

    def embed_batch(self, texts: list[str]) -> list[list[float] | None]:
        out = self.call("POST", "/embed-batch", {"texts": texts})
        return [item["embedding"] if item else None for item in out]

    def rerank(self, query: str, documents: list[str]) -> list[dict[str, Any]]:
        docs = [{"file": str(i), "text": d} for i, d in enumerate(documents)]
        return self.call("POST", "/rerank", {"query": query, "documents": docs})["results"]

    def expand(self, query: str, intent: str | None = None) -> list[dict[str, str]]:
        options = {"intent": intent} if intent else {}
        return self.call("POST", "/expand", {"query": query, "options": options})

    def tokenize(self, text: str) -> int:
        return self.call("POST", "/tokenize", {"text": text})["tokens"]

    def search(self, q: str, limit: int = 20, collection: str | None = None) -> dict[str, Any]:
        params = {"q": q, "limit": str(limit), **({"collection": collection} if collection
                                                  else {})}
        return self.call("GET", "/search?" + urllib.parse.urlencode(params))

    def vsearch(self, query: str, limit: int = 20) -> dict[str, Any]:
        return self.call("POST", "/vsearch", {"query": query, "limit": limit})

    def query(self, query: str, limit: int = 10, intent: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "limit": limit}
        if intent:
            body["intent"] = intent
        return self.call("POST", "/query", body)

    def put_document(self, collection: str, path: str, body: str,
                     title: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"body": body}
        if title:
            doc["title"] = title
        quoted = urllib.parse.quote(path)
        return self.call("PUT", f"/collections/{collection}/documents/{quoted}", doc)


class AsyncClient:
    """The same calls for asyncio code; each runs the synchronous client in a thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync = Client(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._sync, name)
        if not callable(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    @classmethod
    async def discover(cls, timeout: float = 3.0, **kwargs: Any) -> AsyncClient:
        daemons = await async_discover(timeout)
        return cls(daemons=daemons, **kwargs)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.load(err).get("error", err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)
