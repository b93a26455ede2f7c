"""The model worker process: owns backends, answers one request at a time.

A native abort or segfault here kills only this process; the daemon sees the
pipe close, fails or retries the request, and starts a new worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from npuserve.daemon.models.backend_api import Backend, BackendError, ExpandRequest, ModelLoadError
from npuserve.daemon.models.backends import worker_target
from npuserve.daemon.worker import cancel
from npuserve.daemon.worker import protocol as wp

log = logging.getLogger("npuserve.worker")



def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil needed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def build_backend(spec: wp.ModelSpec) -> Backend:
    target = worker_target(spec.kind)  # imported here, in the worker, on first use
    if target is None:
        raise BackendError(f"unknown backend kind {spec.kind!r}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec)


class Worker:
    def __init__(self, send: Callable[[wp.Reply | wp.Partial], None] | None = None) -> None:
        self.send = send
        self.loaded: dict[str, Backend] = {}
        # Tokenizer-only backends, so counting tokens never forces a model swap.
        self.tokenizers: dict[str, Backend] = {}

    def handle(self, req: wp.Request) -> wp.Reply:
        cancel.reset()
        try:
            return self._dispatch(req)
        except cancel.Cancelled as exc:
            return wp.Failure(str(exc), kind="cancelled")
        except ModelLoadError as exc:
            return wp.Failure(str(exc), kind="unavailable")
        except BackendError as exc:
            return wp.Failure(str(exc))
        except (ValueError, TypeError) as exc:
            return wp.Failure(f"{type(exc).__name__}: {exc}", kind="bad_request")
        except Exception as exc:  # a library error must not end the worker loop
            log.exception("request %s failed", type(req).__name__)
            return wp.Failure(f"{type(exc).__name__}: {exc}")

    def _dispatch(self, req: wp.Request) -> wp.Reply:
        if isinstance(req, wp.Load):
            return self._load(req.spec)
        if isinstance(req, wp.Unload):
            return self._unload(req.model_id)
        if isinstance(req, wp.Stats):
            return wp.WorkerStats(os.getpid(), rss_bytes(), tuple(self.loaded))
        if isinstance(req, wp.CountTokens):
            tok = self.loaded.get(req.spec.model_id) or self._tokenizer(req.spec)
            return wp.TokenCounts(tuple(tok.count_tokens(t) for t in req.texts))
        if isinstance(req, wp.TokenIdsOf):
            tok = self.loaded.get(req.spec.model_id) or self._tokenizer(req.spec)
            return wp.TokenIds(tuple(tok.token_ids(req.text, req.add_special)))
        backend = self.loaded.get(req.model_id)
        if backend is None:
            return wp.Failure(f"model {req.model_id} is not loaded", kind="not_loaded")
        start = time.perf_counter()
        if isinstance(req, wp.Embed):
            out = backend.embed(list(req.texts))
            return wp.Vectors.pack(out.vectors, out.truncated, out.tokens, _since(start))
        if isinstance(req, wp.Rerank):
            r = backend.rerank(req.query, list(req.documents), req.instruction,
                               req.max_doc_tokens)
            return wp.Scores(tuple(r.scores), tuple(r.truncated), r.tokens, _since(start))
        if isinstance(req, wp.Expand):
            e = backend.expand(req.query, req.intent, req.include_lexical)
            return wp.Lines(tuple(e.lines), e.tokens, _since(start))
        if isinstance(req, wp.Generate):
            g = backend.generate(req, self.emit)
            return wp.Generated(g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason,
                                _since(start))
        if isinstance(req, wp.ExpandMany):
            outs = backend.expand_many([ExpandRequest(r.query, r.intent, r.include_lexical)
                                        for r in req.requests])
            seconds = _since(start)
            return wp.LinesMany(tuple(wp.Lines(tuple(e.lines), e.tokens, seconds)
                                      for e in outs))
        return wp.Failure(f"unknown request {type(req).__name__}", kind="bad_request")

    def emit(self, text: str) -> None:
        """A piece of a streamed generation, sent ahead of the call's reply."""
        if self.send is not None and text:
            self.send(wp.Partial(text))

    def _load(self, spec: wp.ModelSpec) -> wp.Reply:
        before = rss_bytes()
        if spec.model_id in self.loaded:
            return wp.Loaded(spec.model_id, spec.model_id, None, spec.n_ctx, 0.0, before, before)
        start = time.perf_counter()
        backend = build_backend(spec)
        info = backend.load()
        self.loaded[spec.model_id] = backend
        return wp.Loaded(
            spec.model_id, info.name, info.dim, info.n_ctx, _since(start), before, rss_bytes()
        )

    def _unload(self, model_id: str) -> wp.Reply:
        before = rss_bytes()
        backend = self.loaded.pop(model_id, None)
        if backend is not None:
            backend.unload()
        return wp.Unloaded(model_id, before, rss_bytes())

    def _tokenizer(self, spec: wp.ModelSpec) -> Backend:
        tok = self.tokenizers.get(spec.model_id)
        if tok is None:
            tok = build_backend(spec)
            self.tokenizers[spec.model_id] = tok
        return tok


def _since(start: float) -> float:
    return time.perf_counter() - start


def worker_main(conn: Connection, log_level: int = logging.INFO) -> None:
    """The worker's loop: one request in, one reply out, until the daemon hangs up."""
    logging.basicConfig(level=log_level, format="%(asctime)s worker[%(process)d] %(message)s")
    # The daemon handles SIGINT/SIGTERM and tells us to stop by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cancel.install()
    worker = Worker(conn.send)
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            break
        conn.send(worker.handle(req))


def main(argv: list[str]) -> None:
    """`python -m npuserve.daemon.worker FD LEVEL DEVICE`, as worker_handle starts it."""
    fd, level = int(argv[0]), int(argv[1])
    _die_with_parent()
    worker_main(Connection(fd), level)


def _die_with_parent() -> None:
    """SIGKILL this worker when the daemon dies, even if a native call never returns
    (a closed pipe is noticed only between requests). A daemon that died before this
    ran has closed its end of the pipe: the first recv ends the loop."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

