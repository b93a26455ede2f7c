"""`npuserve index add DIR`: send a directory's files to a running daemon's index."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

BATCH_DOCS = 16
BATCH_BYTES = 8 * 1024 * 1024


class IndexClientError(RuntimeError):
    pass


def _request(url: str, method: str, body: Any, api_key: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:
        try:
            message = json.load(err).get("error", err.reason)
        except ValueError:
            message = err.reason
        raise IndexClientError(f"{method} {url}: {err.code} {message}") from None
    except OSError as err:
        raise IndexClientError(f"cannot reach {url}: {err}") from None


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def batches(root: Path, paths: list[Path]) -> Iterator[tuple[list[dict[str, str]], int]]:
    """Documents in batches bounded by count and bytes; undecodable files are skipped."""
    batch: list[dict[str, str]] = []
    size = skipped = 0
    for path in paths:
        try:
            body = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if not body.strip():
            skipped += 1
            continue
        batch.append({"path": path.relative_to(root).as_posix(), "body": body})
        size += len(body)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch, skipped
            batch, size, skipped = [], 0, 0
    if batch or skipped:
        yield batch, skipped


def progress(out: TextIO, done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(1, total)
    out.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {done}/{total} {label}")
    out.flush()


def index_add(root: Path, collection: str, pattern: str, url: str, api_key: str | None,
              out: TextIO = sys.stderr) -> dict[str, int]:
    root = root.resolve()
    if not root.is_dir():
        raise IndexClientError(f"{root} is not a directory")
    base = url.rstrip("/")
    _request(f"{base}/collections", "POST",
             {"name": collection, "path": str(root), "pattern": pattern}, api_key)
    paths = files(root, pattern)
    counts = {"created": 0, "replaced": 0, "unchanged": 0, "skipped": 0}
    done = 0
    for docs, skipped in batches(root, paths):
        counts["skipped"] += skipped
        done += skipped
        if docs:
            reply = _request(f"{base}/collections/{collection}/documents", "POST",
                             {"documents": docs}, api_key)
            for item in reply["documents"]:
                counts[item["status"]] += 1
            done += len(docs)
        progress(out, done, len(paths), collection)
    out.write("\n")
    return counts
