"""What the chat and completion endpoints share, whatever their API shape (OpenAI in
routes_openai.py, Ollama in routes_ollama.py): reading messages and sampling fields, and
running one generation through the scheduler - whole, or streamed piece by piece to a
client whose leaving stops it.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from npuserve.daemon.errors import InvalidRequest
from npuserve.daemon.http.validation import Limits, check_count, check_length
from npuserve.daemon.sched.scheduler import Scheduler
from npuserve.daemon.sched.views import GenerateRequest, GenerateResult

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 4


def messages_of(value: Any, limits: Limits) -> tuple[tuple[str, str], ...]:
    """Chat messages as (role, text): content a string or a list of text parts."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages must be a non-empty array of {role, content}")
    check_count("messages", len(value), limits)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        content = _content_text(msg.get("content"), f"messages[{i}].content")
        check_length(f"messages[{i}].content", content, limits)
        out.append(("system" if role == "developer" else role, content))
    return tuple(out)


def _content_text(content: Any, name: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"{name}[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"{name} must be a string or an array of text parts")


def check_n(body: dict[str, Any]) -> None:
    """One choice per request: `n`, when given, must be the integer 1."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise InvalidRequest("n must be 1 (one choice per request)")


def number(body: dict[str, Any], name: str, default: float, lo: float, hi: float,
           label: str | None = None) -> float:
    value = body.get(name)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{label or name} must be a number")
    if not lo <= value <= hi:
        raise InvalidRequest(f"{label or name} must be between {lo:g} and {hi:g}")
    return float(value)


def integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int,
            label: str | None = None) -> int:
    value = number(body, name, default, lo, hi, label)
    if not value.is_integer():
        raise InvalidRequest(f"{label or name} must be an integer")
    return int(value)


def max_tokens(body: dict[str, Any], names: tuple[str, ...], limits: Limits,
               label_prefix: str = "") -> int:
    """The first of `names` present (each present one checked), lowered to
    server.max_tokens; that cap if none."""
    asked = [integer(body, name, limits.max_tokens, 1, 1 << 31, label_prefix + name)
             for name in names if body.get(name) is not None]
    return min(asked[0], limits.max_tokens) if asked else limits.max_tokens


def stops(value: Any, limits: Limits, name: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in items)):
        raise InvalidRequest(f"{name} must be a string or up to {MAX_STOPS} non-empty strings")
    for s in items:
        check_length(name, s, limits)
    return tuple(items)


def schema_text(value: Any, name: str) -> str:
    """A JSON schema (object) as text for the backend; "{}" for "any JSON object"."""
    if value == "json" or value == {}:
        return "{}"
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be \"json\" or a JSON schema object")
    return json.dumps(value)


# --- running ---------------------------------------------------------------------------


@dataclass
class Streamed:
    """A generation in flight: its pieces as they come (None: no more), then its result."""

    pieces: asyncio.Queue[str | None]
    task: asyncio.Task[GenerateResult]
    held: list[str | None] = field(default_factory=list)  # taken early, given out first

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            piece = self.held.pop(0) if self.held else await self.pieces.get()
            if piece is None:
                return
            yield piece


def start_stream(scheduler: Scheduler, request: GenerateRequest) -> Streamed:
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(scheduler.generate(request, pieces.put_nowait))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    return Streamed(pieces, task)


async def stream_body(request: web.Request, content_type: str, streamed: Streamed,
                      frames: Any) -> web.StreamResponse:
    """Write `frames` (an async iterator of bytes built over `streamed`) as the body.

    A failure before the first piece (overload, a prompt too long) is an ordinary JSON
    error with its status; once the stream has begun, it ends with the frame the caller
    makes of the error. A client that leaves cancels the generation (the scheduler stops
    the running call between tokens)."""
    first = asyncio.ensure_future(streamed.pieces.get())
    try:
        await asyncio.wait({first, streamed.task}, return_when=asyncio.FIRST_COMPLETED)
        nothing_sent = not first.done() or first.result() is None
        if streamed.task.done() and nothing_sent:
            error = streamed.task.exception()
            if error is not None:
                raise error
        streamed.held.append(await first)
        response = web.StreamResponse(headers={"Content-Type": content_type,
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response
    finally:
        first.cancel()
        if not streamed.task.done():
            streamed.task.cancel()  # the client left: stop the generation
