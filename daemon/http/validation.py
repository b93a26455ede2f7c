"""Request body parsing and field checks. Every failure is a 400 that names the field
(408 for a body that does not arrive in time)."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from npuserve.daemon.errors import InvalidRequest


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_text_chars: int
    max_tokens: int = 1024  # generated per chat or completion request


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"invalid JSON: {name} is not a number JSON allows")


class BodyTimeout(InvalidRequest):
    status = 408


class NotJson(InvalidRequest):
    status = 415


def check_json_type(request: web.Request) -> None:
    """Only application/json (or a +json type) bodies: a web page can send text/plain or
    a form cross-origin without asking first, but not JSON (browsers.py)."""
    ctype = request.content_type  # aiohttp: application/octet-stream when absent
    if ctype == "application/json" or (ctype.startswith("application/") and
                                       ctype.endswith("+json")):
        return
    raise NotJson(f"send the body as JSON with Content-Type: application/json (got {ctype})")


BODY_TIMEOUT = web.AppKey("body_timeout", float)


async def read_json(request: web.Request) -> Any:
    """The body as JSON. Malformed JSON, bad UTF-8, NaN/Infinity and absurd
    nesting are 400s; an oversize body is aiohttp's 413, turned into JSON by
    the error middleware."""
    check_json_type(request)
    timeout = request.app[BODY_TIMEOUT] if BODY_TIMEOUT in request.app else None
    try:
        # A client that trickles its body (slowloris) must not hold a handler forever.
        raw = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {timeout:g}s"
                          " (server.body_timeout)") from None
    except (HttpProcessingError, RequestPayloadError) as exc:
        # e.g. Content-Encoding: gzip on a body that is not gzip
        detail = getattr(exc, "message", "") or str(exc)
        raise InvalidRequest(f"request body could not be decoded: {detail.strip()}") from None
    if not raw.strip():
        raise InvalidRequest("request body must be a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidRequest(f"invalid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise InvalidRequest("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits (int_max_str_digits)
        raise InvalidRequest(f"invalid JSON: {exc}") from None
    check_unicode(body)
    return body


def check_unicode(body: Any) -> None:
    """Refuse lone surrogates (JSON's "\\ud800" escapes decode to them): no UTF-8 has
    them, so tokenizers and the index could not take the text. The error names the field.
    A loop, not recursion: the body may nest as deep as the JSON parser allowed."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{path}.{key!r} (a key)" if path else f"{key!r} (a key)")
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _check_text(value: str, path: str) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{path or 'the request body'} contains a lone surrogate"
            f" (U+{ord(value[exc.start]):04X}) at character {exc.start}: send valid Unicode"
        ) from None


async def read_object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def text_field(body: dict[str, Any], name: str, limits: Limits, message: str | None = None,
               required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(message or f"{name} must be a non-empty string")
    check_length(name, value, limits)
    return value


def check_length(name: str, value: str, limits: Limits) -> None:
    if len(value) > limits.max_text_chars:
        raise InvalidRequest(
            f"{name} is {len(value)} characters; the limit is {limits.max_text_chars}"
            " (server.max_text_chars)")


def check_count(name: str, n: int, limits: Limits) -> None:
    if n > limits.max_batch:
        raise InvalidRequest(
            f"{name} has {n} items; the limit is {limits.max_batch} (server.max_batch)")


def string_list(body: dict[str, Any], name: str, limits: Limits, message: str | None = None,
                allow_empty_items: bool = False) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise InvalidRequest(message or f"{name} must be a non-empty array of strings")
    check_count(name, len(value), limits)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(message or f"{name}[{i}] must be a string")
        if not item and not allow_empty_items:
            raise InvalidRequest(f"{name}[{i}] must be a non-empty string")
        check_length(f"{name}[{i}]", item, limits)
    return value


def optional_object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object")
    return value


def optional_bool(body: dict[str, Any], name: str, default: bool,
                  label: str | None = None) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{label or name} must be true or false")
    return value


def optional_str(body: dict[str, Any], name: str, limits: Limits,
                 label: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{label or name} must be a string")
    check_length(label or name, value, limits)
    return value


def optional_int(body: dict[str, Any], name: str, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be an integer")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise InvalidRequest(f"{name} must be an integer")
    value = int(value)
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{name} must be between {minimum} and {maximum}")
    return value
