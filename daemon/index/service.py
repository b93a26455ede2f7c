"""The document index as the HTTP layer sees it: open, ingest (validate, chunk,
store, wake the embedder), and the model facts searches need."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any

from npuserve.daemon.config import IndexSettings
from npuserve.daemon.errors import IndexError_, SchedulerError, StorageError
from npuserve.daemon.index.chunking import chunk_text
from npuserve.daemon.index.embedder import Embedder
from npuserve.daemon.index.storage import IndexStorage, SqliteStorage
from npuserve.daemon.index.store import (
    StoredDoc,
    check_collection_name,
    check_document_path,
    content_hash,
)
from npuserve.daemon.sched.scheduler import Scheduler

log = logging.getLogger("npuserve.index")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MAX_METADATA_CHARS = 16_384


def title_for(path: str, body: str) -> str:
    match = _HEADING.search(body)
    return match.group(1).strip() if match else PurePosixPath(path).stem


class IndexService:
    def __init__(self, store: IndexStorage, scheduler: Scheduler, settings: IndexSettings
                 ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.settings = settings
        self.embedder = Embedder(store, scheduler, settings.embed_batch)
        # One ingest at a time: chunking needs the tokenizer, and serial writes
        # keep SQLite's single writer uncontended.
        self.ingest_lock = asyncio.Lock()
        self.write_error: str | None = None
        self.write_failures = 0

    @classmethod
    def open(cls, path: Path, scheduler: Scheduler, settings: IndexSettings) -> IndexService:
        """The index in `path` (SQLite), or on the PostgreSQL server at settings.dsn."""
        if settings.backend == "postgres":
            from npuserve.daemon.index.pg_storage import PostgresStorage

            if not settings.dsn:
                raise ValueError("index.backend = postgres needs index.dsn")
            store: IndexStorage = PostgresStorage(settings.dsn, settings.claim_seconds)
        else:
            store = SqliteStorage(path)
        service = cls(store, scheduler, settings)
        if service.store.readonly:
            service.write_error = "the index is read-only now; nothing can be stored"
        return service

    def start(self) -> None:
        self.embedder.start()

    async def close(self) -> None:
        await self.embedder.stop()
        await self.store.close()

    def chunk_limit(self) -> int:
        if self.settings.chunk_tokens:
            return self.settings.chunk_tokens
        # QMD uses 900 tokens; never more than the embedding model's context.
        n_ctx = self.scheduler.snapshot().tasks["embed"].serving.n_ctx
        return max(32, min(900, n_ctx - 16))

    def validate(self, raw: Any, path: str | None = None) -> dict[str, Any]:
        """One document from a request body, checked; raises IndexError_ naming the field."""
        if not isinstance(raw, dict):
            raise IndexError_("each document must be an object with body (and path in batches)")
        path = path if path is not None else raw.get("path")
        if not isinstance(path, str):
            raise IndexError_("document path must be a string")
        path = check_document_path(path)
        body = raw.get("body")
        if not isinstance(body, str) or not body.strip():
            raise IndexError_(f"{path}: body must be a non-empty string")
        title = raw.get("title")
        if title is not None and not isinstance(title, str):
            raise IndexError_(f"{path}: title must be a string")
        metadata = raw.get("metadata")
        metadata = {} if metadata is None else metadata  # null: none, as when left out
        if not isinstance(metadata, dict):
            raise IndexError_(f"{path}: metadata must be an object")
        if len(repr(metadata)) > MAX_METADATA_CHARS:
            raise IndexError_(f"{path}: metadata is larger than {MAX_METADATA_CHARS} characters")
        title = title or title_for(path, body)
        return {"path": path, "title": title, "body": body, "metadata": metadata,
                "hash": content_hash(title, body)}

    async def ingest(self, collection: str, docs: list[dict[str, Any]]) -> list[StoredDoc]:
        """Store validated documents atomically; unchanged ones are not re-chunked."""
        check_collection_name(collection)
        async with self.ingest_lock:
            chunked: list[list[tuple[str, int]]] = []
            for doc in docs:
                same = await self.store.unchanged(collection, doc["path"], doc["hash"])
                if same:
                    chunked.append([])
                    continue
                chunks = await chunk_text(doc["body"], self.chunk_limit(),
                                          self.settings.chunk_overlap, self._count)
                chunked.append([(c.text, c.tokens) for c in chunks])
            try:
                stored = await self.store.put_documents(collection, docs, chunked)
            except StorageError as exc:
                self.write_error = str(exc)  # /health and /metrics report it until a write works
                self.write_failures += 1
                raise
            self.write_error = None
        self.embedder.poke()
        return stored

    async def _count(self, texts: list[str]) -> list[int]:
        try:
            return await self.scheduler.count_tokens("embed", texts)
        except SchedulerError as exc:
            # Storing must not depend on the embedding model: without its
            # tokenizer, estimate generously (about 3 characters a token) so
            # chunks stay within the context once the model is back.
            log.warning("tokenizer unavailable (%s); estimating chunk sizes", exc)
            return [len(t) // 3 + 2 for t in texts]
