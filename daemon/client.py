"""A client for agents: find npuserve daemons on the LAN, spread calls over them, retry,
fail over.

Light by design: it needs only the standard library and python-zeroconf (no
model runtime), so a laptop can `pip install npuserve` without compiling
llama.cpp. Retries use exponential back-off with jitter on connection errors,
503 (honouring Retry-After) and 504, and only for idempotent calls.

With several daemons serving the same embedding model (the fingerprint in their TXT
records: vectors from any of them mix), each call goes to one of them drawn at random,
weighted against its expected wait: what the daemon advertises (TXT `wait` at discovery,
then the `X-Npuserve-Wait` header of every answer, trusted less as it ages) plus this
client's own calls in flight there times their recent latency. A slower board gets less;
a random draw (not the least loaded) keeps many clients from herding onto the same board
between updates. A daemon that does not answer is set aside for DOWN_SECONDS and the call
goes on at once to another; one that answers 503 is left for its Retry-After.
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
WAIT_HEADER = "X-Npuserve-Wait"
DOWN_SECONDS = 15.0  # a daemon that did not answer is not tried again before this
WAIT_HALF_LIFE = 5.0  # seconds after which an advertised wait counts half


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


@dataclass
class Board:
    """One daemon as this client sees it: what it advertised, what the client measured."""

    url: str
    wait: float = 0.0  # seconds of queued work it advertised
    seen: float = 0.0  # when (monotonic)
    inflight: int = 0  # this client's calls there now
    latency: float = 0.0  # moving average of this client's calls there (s)
    away_until: float = 0.0  # down or busy (503) until then
    calls: int = 0

    def expected_wait(self, now: float) -> float:
        advertised = self.wait * 0.5 ** ((now - self.seen) / WAIT_HALF_LIFE)
        return advertised + (self.inflight + 1) * max(self.latency, 0.005)


def same_model(daemons: list[Daemon]) -> list[Daemon]:
    """The daemons calls may be spread over: those whose embedding fingerprint (TXT `efp`)
    is the most common one's (their vectors mix); all of them when none advertises one."""
    prints = [d.txt.get("efp") for d in daemons if d.txt.get("efp")]
    if not prints:
        return daemons
    common = max(set(prints), key=prints.count)
    return [d for d in daemons if d.txt.get("efp") in (common, None)]


class Client:
    """Synchronous client. `Client("http://board:7832")` or `Client(discover=True)`.
    Thread-safe: agents may share one client between threads (AsyncClient does)."""

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
        self.daemons = same_model(self.daemons)
        self.urls = [url.rstrip("/")] if url else [d.url for d in self.daemons]
        if not self.urls:
            raise Unreachable("no npuserve daemon given or discovered")
        now = time.monotonic()
        waits = {d.url: _float(d.txt.get("wait")) for d in self.daemons}
        self.boards = [Board(u, waits.get(u, 0.0), now) for u in self.urls]
        advertised = next((d.timeout for d in self.daemons if d.timeout), None)
        self.timeout = timeout or advertised or DEFAULT_TIMEOUT
        self.current = 0  # the board of the latest call
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.urls[self.current]

    # --- choosing a daemon ------------------------------------------------------------

    def _pick(self, tried: set[int]) -> int | None:
        """A board for the next attempt: among those not yet tried by this call and not
        set aside, drawn with weight 1 / expected wait; None when there is none."""
        now = time.monotonic()
        with self._lock:
            ready = [i for i, b in enumerate(self.boards)
                     if i not in tried and b.away_until <= now]
            if not ready:
                return None
            weights = [1.0 / (0.02 + self.boards[i].expected_wait(now)) for i in ready]
            choice = random.choices(ready, weights)[0]
            self.boards[choice].inflight += 1
            self.current = choice
            return choice

    def _done(self, i: int, seconds: float | None, wait: str | None) -> None:
        with self._lock:
            board = self.boards[i]
            board.inflight -= 1
            if seconds is not None:
                board.calls += 1
                board.latency = seconds if board.calls == 1 else (
                    0.7 * board.latency + 0.3 * seconds)
            if wait is not None:
                board.wait, board.seen = _float(wait), time.monotonic()

    def _set_aside(self, i: int, seconds: float) -> None:
        with self._lock:
            self.boards[i].away_until = time.monotonic() + seconds

    # --- transport --------------------------------------------------------------

    def _once(self, i: int, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.urls[i] + path, data=data, method=method,
                                     headers=headers)
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                out = json.load(resp)
                wait = resp.headers.get(WAIT_HEADER)
        except urllib.error.HTTPError as err:
            self._done(i, None, err.headers.get(WAIT_HEADER))
            raise
        except BaseException:
            self._done(i, None, None)
            raise
        self._done(i, time.monotonic() - start, wait)
        return out

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt * (0.5 + random.random())  # jitter
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, 60.0))

    def call(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Any:
        """One API call: to a daemon drawn by load; retried (idempotent calls only) on
        another daemon at once, or on the same after a back-off when it is the only one."""
        tries = self.retries if idempotent else 0
        tried: set[int] = set()
        attempt = 0
        busy: NpuserveError | None = None  # the last 503/504, if every daemon was busy
        while True:
            i = self._pick(tried if idempotent else set())
            if i is None:  # every daemon tried (or set aside): start over after a pause
                if attempt >= tries:
                    if busy is not None:
                        raise busy
                    raise Unreachable(f"{self.url}: no daemon answered")
                self._pause(attempt, None)
                attempt += 1
                tried.clear()
                with self._lock:
                    for board in self.boards:
                        board.away_until = 0.0
                continue
            try:
                return self._once(i, method, path, body)
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code in (503, 504) and attempt < tries:
                    retry_after = err.headers.get("Retry-After")
                    if len(self.boards) > 1:  # another daemon may be free now
                        self._set_aside(i, _float(retry_after) or 1.0)
                        tried.add(i)
                        busy = NpuserveError(err.code, message)
                        continue
                    self._pause(attempt, retry_after)
                    attempt += 1
                    continue
                raise NpuserveError(err.code, message) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if not idempotent:
                    raise Unreachable(f"{self.urls[i]}: {err}") from None
                if len(self.boards) > 1:
                    self._set_aside(i, DOWN_SECONDS)  # fail over at once
                    tried.add(i)
                    continue
                if attempt >= tries:
                    raise Unreachable(f"{self.urls[i]}: {err}") from None
                self._pause(attempt, None)
                attempt += 1

    def spread(self) -> dict[str, int]:
        """Calls answered by each daemon so far (URL -> count)."""
        with self._lock:
            return {b.url: b.calls for b in self.boards}

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


def _float(text: str | None) -> float:
    try:
        return max(0.0, float(text)) if text else 0.0
    except ValueError:
        return 0.0


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.load(err).get("error", err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)
