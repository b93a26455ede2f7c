"""The document index over HTTP: QMD's index endpoints plus REST-style ingestion.

  POST   /collections                          {name, path?, pattern?, includeByDefault?}
  GET    /collections                          QMD's listing
  DELETE /collections/{name}
  PUT    /collections/{name}/documents/{path}  {body, title?, metadata?}
  GET    /collections/{name}/documents/{path}
  DELETE /collections/{name}/documents/{path}
  POST   /collections/{name}/documents         {documents: [{path, body, title?, metadata?}]}
  GET    /search?q=&limit=&collection=         BM25
  POST   /vsearch                              {query, limit?, collection?}
  POST   /query                                {query, limit?, collection?, intent?}  hybrid
  GET    /browse?limit=&offset=&collection=
  GET    /status
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from npuserve.daemon.http.routes_admin import runtime_view
from npuserve.daemon.http.services import services
from npuserve.daemon.http.validation import (
    InvalidRequest,
    check_count,
    optional_bool,
    optional_int,
    optional_str,
    read_object,
    text_field,
)
from npuserve.daemon.index.embedder import query_text
from npuserve.daemon.index.hybrid import hybrid_query
from npuserve.daemon.index.service import IndexService
from npuserve.daemon.index.store import check_collection_name
from npuserve.daemon.sched.views import EmbedResult

routes = web.RouteTableDef()
MAX_LIMIT = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def index_of(request: web.Request) -> IndexService:
    index = services(request).index
    if index is None:
        raise web.HTTPServiceUnavailable(reason="No index database loaded")
    return index


def _body_chars(request: web.Request, full: bool) -> int:
    """How much of each body a result carries: a snippet unless the client asks for it
    whole, so one search cannot move the server by hundreds of MB."""
    return 0 if full else services(request).cfg.index.result_body_chars


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true, false, 1 or 0")
    return raw in ("true", "1")


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}")
    return value


def _query_collection(request: web.Request) -> str | None:
    name = request.query.get("collection") or None
    return check_collection_name(name) if name else None


@routes.post("/collections")
async def create_collection(request: web.Request) -> web.Response:
    index = index_of(request)
    body = await read_object(request)
    limits = services(request).limits
    name = text_field(body, "name", limits)
    path = optional_str(body, "path", limits) or ""
    pattern = optional_str(body, "pattern", limits) or "**/*.md"
    include = optional_bool(body, "includeByDefault", True)
    created = await index.store.create_collection(name, path, pattern, include)
    return web.json_response({"name": name, "created": created}, status=201 if created else 200)


@routes.get("/collections")
async def list_collections(request: web.Request) -> web.Response:
    index = index_of(request)
    rows = await index.store.collections()
    return web.json_response([
        {"name": r["name"], "pwd": r["path"], "glob_pattern": r["pattern"],
         "doc_count": r["documents"], "active_count": r["documents"],
         "last_modified": r["last_modified"], "includeByDefault": r["include_by_default"]}
        for r in rows])


@routes.delete("/collections/{name}")
async def delete_collection(request: web.Request) -> web.Response:
    index = index_of(request)
    name = check_collection_name(request.match_info["name"])
    removed = await index.store.delete_collection(name)
    return web.json_response({"name": name, "deleted": True, "documents": removed})


def _stored_view(path: str, stored: Any) -> dict[str, Any]:
    return {"path": path, "status": stored.status, "hash": stored.hash, "chunks": stored.chunks}


@routes.put("/collections/{name}/documents/{path:.+}")
async def put_document(request: web.Request) -> web.Response:
    index = index_of(request)
    name = check_collection_name(request.match_info["name"])
    doc = index.validate(await read_object(request), request.match_info["path"])
    [stored] = await index.ingest(name, [doc])
    return web.json_response(_stored_view(doc["path"], stored),
                             status=201 if stored.status == "created" else 200)


@routes.post("/collections/{name}/documents")
async def put_documents(request: web.Request) -> web.Response:
    index = index_of(request)
    name = check_collection_name(request.match_info["name"])
    body = await read_object(request)
    raw = body.get("documents")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("documents must be a non-empty array")
    check_count("documents", len(raw), services(request).limits)
    docs = [index.validate(d) for d in raw]
    paths = [d["path"] for d in docs]
    if len(set(paths)) != len(paths):
        raise InvalidRequest("documents contains the same path twice")
    stored = await index.ingest(name, docs)
    return web.json_response({"documents": [_stored_view(d["path"], s)
                                            for d, s in zip(docs, stored, strict=True)]})


@routes.get("/collections/{name}/documents/{path:.+}")
async def get_document(request: web.Request) -> web.Response:
    index = index_of(request)
    name = check_collection_name(request.match_info["name"])
    doc = await index.store.get_document(name, request.match_info["path"])
    return web.json_response(doc)


@routes.delete("/collections/{name}/documents/{path:.+}")
async def delete_document(request: web.Request) -> web.Response:
    index = index_of(request)
    name = check_collection_name(request.match_info["name"])
    await index.store.delete_document(name, request.match_info["path"])
    return web.json_response({"deleted": True})


@routes.get("/search")
async def bm25_search(request: web.Request) -> web.Response:
    index = index_of(request)
    q = request.query.get("q") or request.query.get("query") or ""
    if not q.strip():
        raise InvalidRequest("q must be a non-empty query")
    limit = _query_int(request, "limit", 20, 1, MAX_LIMIT)
    collection = _query_collection(request)
    full = _query_bool(request, "full")
    hits = await index.store.bm25(q, limit, collection)
    out = await index.store.results(hits, "fts", _body_chars(request, full))
    return web.json_response({"results": out, "total": len(out)})


async def _search_body(request: web.Request, default_limit: int
                       ) -> tuple[dict[str, Any], str, int, str | None]:
    """(body, query, limit, collection) of a POSTed search, validated."""
    body = await read_object(request)
    limits = services(request).limits
    query = text_field(body, "query", limits)
    limit = optional_int(body, "limit", 1, MAX_LIMIT) or default_limit
    collection = optional_str(body, "collection", limits)
    if collection:
        check_collection_name(collection)
    return body, str(query), limit, collection


async def vectors_mismatch(index: IndexService, embedded: EmbedResult) -> web.Response | None:
    """409 when the index's vectors are another embedding model's than the query's: by
    name, dimension or fingerprint (a file swapped under the same name)."""
    stored_model, stored_dim, stored_fp = await index.store.vector_model()
    dim = int(embedded.vectors.shape[1])
    if stored_dim is None or (stored_dim == dim and stored_model == embedded.model
                              and stored_fp in (None, embedded.fingerprint)):
        return None
    return web.json_response({
        "error": "stored vectors were made by a different embedding model",
        "detail": f"index: {stored_model} ({stored_dim}-d, {stored_fp}); query:"
                  f" {embedded.model} ({dim}-d, {embedded.fingerprint})",
        "query_model": embedded.model, "query_dim": dim,
        "query_fingerprint": embedded.fingerprint, "index_fingerprint": stored_fp,
        "hint": "re-embed the index with the current model, or configure the old one",
    }, status=409)


@routes.post("/vsearch")
async def vector_search(request: web.Request) -> web.Response:
    index = index_of(request)
    svc = services(request)
    body, query, limit, collection = await _search_body(request, 20)
    embedded = await svc.scheduler.embed([query_text(query)])
    vectors = embedded.vectors
    mismatch = await vectors_mismatch(index, embedded)
    if mismatch is not None:
        return mismatch
    hits = await index.store.nearest(vectors[0], limit, collection)
    full = optional_bool(body, "full", False)
    out = await index.store.results(hits, "vec", _body_chars(request, full))
    return web.json_response({"results": out, "total": len(out)})


@routes.post("/query")
async def query(request: web.Request) -> web.Response:
    index = index_of(request)
    svc = services(request)
    body, text, limit, collection = await _search_body(request, 10)
    intent = optional_str(body, "intent", svc.limits)
    full = optional_bool(body, "full", False)
    result = await hybrid_query(index.store, svc.scheduler, text, limit, collection, intent,
                                _body_chars(request, full), index.settings.rerank_seconds)
    return web.json_response(result)


@routes.get("/browse")
async def browse(request: web.Request) -> web.Response:
    index = index_of(request)
    limit = _query_int(request, "limit", 20, 1, MAX_LIMIT)
    offset = _query_int(request, "offset", 0, 0, 1 << 40)
    chunks, total = await index.store.browse(limit, offset,
                                            _query_collection(request))
    return web.json_response({"chunks": chunks, "total": total, "limit": limit,
                              "offset": offset})


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    runtime = runtime_view(services(request).scheduler.snapshot())
    index = services(request).index
    if index is None:
        return web.json_response({"error": "No index database loaded", "runtime": runtime},
                                 status=503)
    total, pending = await index.store.counts()
    collections = await index.store.collections()
    return web.json_response({
        "totalDocuments": total,
        "needsEmbedding": pending,
        "hasVectorIndex": await index.store.has_vectors(),
        "collections": [{"name": c["name"], "path": c["path"], "pattern": c["pattern"],
                         "documents": c["documents"], "lastUpdated": c["last_modified"]}
                        for c in collections],
        "embedder": {"embedded": index.embedder.embedded,
                     "last_error": index.embedder.last_error},
        "storage": await index.store.report(),
        "runtime": runtime,
    })
