"""Which embedding model made a vector: a digest of the model's weight files.

Vectors of two models (or two quantisations of one) do not mix: a client whose index was
built with one must not be handed vectors of another (QMD PR #902 asks clients to fail
closed). A name says little - npuserve serves whatever file is configured under it - so
the identity is the SHA-256 of the files that define the model (weights, and for an NPU
directory its graphs, tokenizer and manifest), read once and remembered by path, size and
modification time in the state directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("npuserve.fingerprint")
CHUNK = 1 << 20
DIGEST_CHARS = 16


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """File digests, persisted in `<state>/fingerprints.json`; thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                self._known = dict(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)

    def digest(self, files: list[str]) -> str:
        """`sha256:<hex>` over the files' own digests, in name order (reads each file once
        per change)."""
        outer = hashlib.sha256()
        for name in sorted(files):
            path = Path(name)
            key = _key(path)
            with self._lock:
                known = self._known.get(key)
            if known is None:
                known = file_digest(path)
                with self._lock:
                    self._known[key] = known
                    self._save()
            outer.update(f"{path.name}\0{known}\n".encode())
        return "sha256:" + outer.hexdigest()[:DIGEST_CHARS]

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._known, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save %s: %s", self.path, exc)
