"""The index's storage interface, and its SQLite implementation.

Everything above this line - the HTTP routes, ingest, the background embedder, hybrid
search - reaches the database through `IndexStorage`'s async methods only; an
implementation decides how it does so without blocking the event loop. `SqliteStorage`
runs every call on one thread of its own (the SQLite connection is one, and writes are
serial anyway). A PostgreSQL implementation would fill the same methods with an async
driver.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from npuserve.daemon.index import search
from npuserve.daemon.index.db import IndexDB
from npuserve.daemon.index.search import Hit
from npuserve.daemon.index.store import IndexStore, StoredDoc
from npuserve.daemon.models.vector_rows import VectorRows

T = TypeVar("T")
Vector = memoryview | Sequence[float]


class IndexStorage(abc.ABC):
    """Collections, documents, chunks and their vectors; BM25 and nearest-vector search."""

    @property
    @abc.abstractmethod
    def readonly(self) -> bool:
        """The database opened read-only (searches work, writes answer 503)."""

    # collections
    @abc.abstractmethod
    async def create_collection(self, name: str, path: str, pattern: str,
                                include: bool) -> bool: ...

    @abc.abstractmethod
    async def delete_collection(self, name: str) -> int: ...

    @abc.abstractmethod
    async def collections(self) -> list[dict[str, Any]]: ...

    # documents
    @abc.abstractmethod
    async def unchanged(self, collection: str, path: str, content_hash: str) -> bool: ...

    @abc.abstractmethod
    async def put_documents(self, collection: str, docs: list[dict[str, Any]],
                            chunks: list[list[tuple[str, int]]]) -> list[StoredDoc]:
        """All or nothing: a failure (StorageError) leaves the index as it was."""

    @abc.abstractmethod
    async def get_document(self, collection: str, path: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def delete_document(self, collection: str, path: str) -> None: ...

    @abc.abstractmethod
    async def counts(self) -> tuple[int, int]:
        """(documents, chunks still without a vector)."""

    @abc.abstractmethod
    async def report(self) -> dict[str, Any]:
        """The backend and what an operator should know of it (/status `storage`)."""

    # the embedding backlog
    @abc.abstractmethod
    async def pending_chunks(self, limit: int) -> list[tuple[int, int, str, str]]:
        """(chunk id, collection id, title, text) of chunks due for a vector."""

    @abc.abstractmethod
    async def store_vectors(self, ids: list[int], collection_ids: list[int],
                            vectors: VectorRows, model: str, fingerprint: str) -> int:
        """Vectors of `model` (`fingerprint`); VectorsMismatch when the index holds another
        model's."""

    @abc.abstractmethod
    async def embedding_failed(self, ids: list[int], error: str, backoff: float) -> None: ...

    async def watch_backlog(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever another daemon adds to a shared backlog; runs until
        cancelled. Only a shared database has other daemons: by default, nothing."""
        return None

    @abc.abstractmethod
    async def release_chunks(self, ids: list[int]) -> None:
        """Give back chunks `pending_chunks` handed out that this daemon will not embed now
        (a shared backlog lets another daemon take them at once)."""

    @abc.abstractmethod
    async def vector_model(self) -> tuple[str | None, int | None, str | None]:
        """(model, dimension, fingerprint) of the stored vectors; Nones before the first."""

    @abc.abstractmethod
    async def has_vectors(self) -> bool: ...

    # search
    @abc.abstractmethod
    async def bm25(self, text: str, limit: int, collection: str | None) -> list[Hit]: ...

    @abc.abstractmethod
    async def nearest(self, vector: Vector, limit: int, collection: str | None
                      ) -> list[Hit]: ...

    @abc.abstractmethod
    async def results(self, hits: list[Hit], source: str, body_chars: int = 0
                      ) -> list[dict[str, Any]]:
        """Hits as QMD SearchResults, in the hits' order, bodies cut to `body_chars`
        (0: whole)."""

    @abc.abstractmethod
    async def chunk_texts(self, chunk_ids: list[int]) -> dict[int, str]: ...

    @abc.abstractmethod
    async def first_chunks(self, doc_ids: list[int]) -> dict[int, tuple[int, str]]: ...

    @abc.abstractmethod
    async def browse(self, limit: int, offset: int, collection: str | None
                     ) -> tuple[list[dict[str, Any]], int]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteStorage(IndexStorage):
    """SQLite (FTS5 + sqlite-vec) in one file; every call on this storage's own thread."""

    def __init__(self, path: Path) -> None:
        self.db = IndexDB(path)
        self.store = IndexStore(self.db)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-sqlite")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(fn, *args))

    @property
    def readonly(self) -> bool:
        return self.db.readonly

    async def create_collection(self, name: str, path: str, pattern: str,
                                include: bool) -> bool:
        return await self._run(self.store.create_collection, name, path, pattern, include)

    async def delete_collection(self, name: str) -> int:
        return await self._run(self.store.delete_collection, name)

    async def collections(self) -> list[dict[str, Any]]:
        return await self._run(self.store.collections)

    async def unchanged(self, collection: str, path: str, content_hash: str) -> bool:
        return await self._run(self.store.unchanged, collection, path, content_hash)

    async def put_documents(self, collection: str, docs: list[dict[str, Any]],
                            chunks: list[list[tuple[str, int]]]) -> list[StoredDoc]:
        return await self._run(self.store.put_documents, collection, docs, chunks)

    async def get_document(self, collection: str, path: str) -> dict[str, Any]:
        return await self._run(self.store.get_document, collection, path)

    async def delete_document(self, collection: str, path: str) -> None:
        await self._run(self.store.delete_document, collection, path)

    async def counts(self) -> tuple[int, int]:
        return await self._run(self.store.counts)

    async def report(self) -> dict[str, Any]:
        return {"backend": "sqlite", "warning": None}

    async def pending_chunks(self, limit: int) -> list[tuple[int, int, str, str]]:
        return await self._run(self.store.pending_chunks, limit)

    async def store_vectors(self, ids: list[int], collection_ids: list[int],
                            vectors: VectorRows, model: str, fingerprint: str) -> int:
        return await self._run(self.store.store_vectors, ids, collection_ids, vectors, model,
                               fingerprint)

    async def embedding_failed(self, ids: list[int], error: str, backoff: float) -> None:
        await self._run(self.store.embedding_failed, ids, error, backoff)

    async def release_chunks(self, ids: list[int]) -> None:
        return None  # one daemon per SQLite file: nothing is claimed

    async def vector_model(self) -> tuple[str | None, int | None, str | None]:
        return await self._run(self.store.vector_model)

    async def has_vectors(self) -> bool:
        return await self._run(self.db.has_vector_table)

    async def bm25(self, text: str, limit: int, collection: str | None) -> list[Hit]:
        return await self._run(search.bm25, self.store, text, limit, collection)

    async def nearest(self, vector: Vector, limit: int, collection: str | None) -> list[Hit]:
        return await self._run(search.nearest, self.store, vector, limit, collection)

    async def results(self, hits: list[Hit], source: str, body_chars: int = 0
                      ) -> list[dict[str, Any]]:
        return await self._run(search.results, self.store, hits, source, body_chars)

    async def chunk_texts(self, chunk_ids: list[int]) -> dict[int, str]:
        return await self._run(search.chunk_texts, self.store, chunk_ids)

    async def first_chunks(self, doc_ids: list[int]) -> dict[int, tuple[int, str]]:
        return await self._run(search.first_chunks, self.store, doc_ids)

    async def browse(self, limit: int, offset: int, collection: str | None
                     ) -> tuple[list[dict[str, Any]], int]:
        return await self._run(search.browse, self.store, limit, offset, collection)

    async def close(self) -> None:
        await self._run(self.db.close)
        self._thread.shutdown(wait=True)
