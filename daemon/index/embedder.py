"""Background embedding of stored chunks, through the scheduler, in batches.

Documents are searchable by BM25 the moment they are stored; this loop adds
their vectors afterwards. A failed batch leaves its chunks pending with a
back-off, so a broken embedding model never blocks ingestion or BM25.
"""

from __future__ import annotations

import asyncio
import logging

from npuserve.daemon.errors import SchedulerError, StorageError
from npuserve.daemon.index.db import VectorsMismatch
from npuserve.daemon.index.storage import IndexStorage
from npuserve.daemon.sched.scheduler import Scheduler

log = logging.getLogger("npuserve.embedder")

# One background call runs about this long at most (by the model's measured cost): a call
# already running is not interrupted, so this is what an interactive request may wait for.
BACKGROUND_CALL_SECONDS = 0.25


def document_text(title: str, chunk: str) -> str:
    """QMD's document format for embedding."""
    return f"title: {title} | text: {chunk}"


def query_text(query: str) -> str:
    """QMD's query format for embedding."""
    return f"task: search result | query: {query}"


class Embedder:
    def __init__(self, store: IndexStorage, scheduler: Scheduler, batch: int = 32) -> None:
        self.store = store
        self.scheduler = scheduler
        self.batch = batch
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.failures = 0
        self.embedded = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="embedder")
        # On a database other daemons share, their ingests wake this embedder too.
        self.watcher = asyncio.create_task(self.store.watch_backlog(self.poke),
                                           name="embedder-backlog")

    async def stop(self) -> None:
        for task in (self.task, self.watcher):
            if task:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    async def _other_model(self) -> str | None:
        """Why this daemon must not embed into the index: its vectors are another
        model's (on a database several boards share, theirs)."""
        model, dim, stored = await self.store.vector_model()
        mine = await self.scheduler.embedding_fingerprint()
        if stored is None or stored == mine:
            return None
        return (f"the index holds vectors of {model} ({stored}, {dim}-d); this daemon embeds"
                f" with another model ({mine}) and does not embed into it: re-embed the index,"
                " or configure that model (on every board that shares the index)")

    def poke(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                done_any = await self.step()
            except StorageError as exc:
                # Disk full or read-only: nothing can be recorded, not even the failure.
                # Pause; the chunks stay pending and are embedded once writes work again.
                self.last_error = str(exc)
                log.warning("index not writable, embedding paused: %s", exc)
                done_any = False
            if not done_any:
                try:
                    # Chunks in back-off become due on their own: look again later.
                    await asyncio.wait_for(self.wake.wait(), timeout=30)
                except TimeoutError:
                    pass

    async def step(self) -> bool:
        """Embed one batch of pending chunks; False when nothing was due."""
        refusal = await self._other_model()
        if refusal:  # claim nothing: the chunks stay for a daemon of the index's model
            self.last_error = refusal
            return False
        pending = await self.store.pending_chunks(self.batch)
        if not pending:
            return False
        texts = [document_text(p[2], p[3]) for p in pending]
        keep = self.scheduler.texts_within("embed", texts, BACKGROUND_CALL_SECONDS)
        if keep < len(pending):
            await self.store.release_chunks([p[0] for p in pending[keep:]])
        pending, texts = pending[:keep], texts[:keep]
        ids = [p[0] for p in pending]
        try:
            result = await self.scheduler.embed(texts, background=True)
        except SchedulerError as exc:
            self.failures += 1
            self.last_error = str(exc)
            backoff = min(600.0, 5.0 * 2 ** min(self.failures, 7))
            log.warning("embedding %d chunks failed (retry in %.0fs): %s", len(ids), backoff, exc)
            await self.store.embedding_failed(ids, str(exc), backoff)
            return False
        self.failures = 0
        self.last_error = None
        try:
            written = await self.store.store_vectors(ids, [p[1] for p in pending],
                                                     result.vectors, result.model,
                                                     result.fingerprint)
        except StorageError:
            raise  # run() pauses; recording the failure would fail the same way
        except VectorsMismatch as exc:  # nothing to retry soon: wait for the operator
            self.last_error = str(exc)
            log.warning("embedding paused: %s", exc)
            # Given back, not failed: on a shared database another daemon embeds them.
            await self.store.release_chunks(ids)
            return False
        except Exception as exc:  # anything else: the chunks stay pending
            log.exception("storing vectors failed")
            self.last_error = f"storing vectors failed: {exc}"
            await self.store.embedding_failed(ids, self.last_error, 60.0)
            return False
        self.embedded += written
        return True
