"""Every error path answers JSON {"error": ...} with the right status (never HTML)."""

from __future__ import annotations

import pytest

from npuserve.daemon.http.services import SERVICES

JSON = {"Content-Type": "application/json"}


async def _error(resp, status: int) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


async def test_unknown_route_is_json_404(client):
    msg = await _error(await client.get("/no/such/thing"), 404)
    assert "/no/such/thing" in msg


async def test_wrong_method_is_json_405(client):
    resp = await client.get("/embed")
    msg = await _error(resp, 405)
    assert "POST" in msg and resp.headers["Allow"] == "POST"
    await _error(await client.delete("/health"), 405)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"   ", b'{"text": NaN}',
                                 b'{"text": Infinity}', b"[" * 100000 + b"]" * 100000])
async def test_malformed_json_is_400(client, raw):
    resp = await client.post("/embed", data=raw, headers={"Content-Type": "application/json"})
    message = await _error(resp, 400)  # asserts status 400 and a JSON {"error": ...}
    assert "JSON" in message or "UTF-8" in message


async def test_invalid_utf8_is_400(client):
    resp = await client.post("/embed", data=b'{"text": "\xff\xfe"}', headers=JSON)
    assert "UTF-8" in await _error(resp, 400)


async def test_body_over_limit_is_json_413(make_client):
    client = await make_client(server__max_body_mb="0.01")
    resp = await client.post("/embed", data=b'{"text": "' + b"a" * 20000 + b'"}', headers=JSON)
    assert "too large" in await _error(resp, 413)


@pytest.mark.parametrize("path,body,expected", [
    ("/embed", {"text": ""}, "text must be a non-empty string"),
    ("/embed", {"text": 5}, "text must be a non-empty string"),
    ("/embed", {}, "text must be a non-empty string"),
    ("/embed", ["text"], "JSON object"),
    ("/embed", {"text": "x", "options": "nope"}, "options must be an object"),
    ("/embed", {"text": "x", "options": {"isQuery": "yes"}}, "options.isQuery"),
    ("/embed", {"text": "x", "options": {"model": 1}}, "options.model must be a string"),
    ("/embed-batch", {"texts": ["x"], "options": {"title": []}}, "options.title"),
    ("/embed-batch", {"texts": []}, "texts must be a non-empty array of strings"),
    ("/embed-batch", {"texts": "abc"}, "texts must be a non-empty array of strings"),
    ("/embed-batch", {"texts": ["a", 3]}, "texts must be a non-empty array of strings"),
    ("/rerank", {"query": "", "documents": [{"file": "a", "text": "b"}]},
     "query must be a non-empty string and documents must be a non-empty array"),
    ("/rerank", {"query": "q", "documents": []},
     "query must be a non-empty string and documents must be a non-empty array"),
    ("/rerank", {"query": "q", "documents": [{"file": "a", "text": 1}]}, "documents[0].text"),
    ("/rerank", {"query": "q", "documents": [{"file": 2, "text": "x"}]}, "documents[0].file"),
    ("/expand", {"query": ""}, "query must be a non-empty string"),
    ("/expand", {"query": "q", "options": {"includeLexical": "yes"}}, "includeLexical"),
    ("/expand", {"query": "q", "options": {"intent": 4}}, "options.intent must be a string"),
    ("/tokenize", {"text": None}, "text must be a non-empty string"),
    ("/v1/embeddings", {"input": []}, "input must be"),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, "token arrays are not supported"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/rerank", {"query": "q", "documents": [1]}, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 10**12}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "y"},
     "return_documents"),
    ("/api/embed", {"input": None}, "input must be"),
    ("/api/embed", {"input": "x", "truncate": "no"}, "truncate"),
])
async def test_field_checks_name_the_field(client, path, body, expected):
    msg = await _error(await client.post(path, json=body), 400)
    assert expected in msg


async def test_batch_limit_names_the_limit(make_client):
    client = await make_client(server__max_batch="4")
    msg = await _error(await client.post("/embed-batch", json={"texts": ["a"] * 5}), 400)
    assert "limit is 4" in msg and "server.max_batch" in msg
    msg = await _error(await client.post("/rerank", json={
        "query": "q", "documents": [{"file": str(i), "text": "t"} for i in range(5)]}), 400)
    assert "limit is 4" in msg


async def test_text_length_limit_names_the_limit(make_client):
    client = await make_client(server__max_text_chars="100")
    msg = await _error(await client.post("/embed", json={"text": "a" * 101}), 400)
    assert "limit is 100" in msg and "server.max_text_chars" in msg


async def test_truncate_false_refuses_long_input_on_ollama_api(client):
    msg = await _error(await client.post("/api/embed", json={
        "model": "x", "input": "word " * 2000, "truncate": False}), 400)
    assert "truncate is false" in msg


async def test_api_key_required_except_health(make_client):
    client = await make_client(server__api_key="s3cret")
    assert (await client.get("/health")).status == 200
    resp = await client.post("/embed", json={"text": "x"})
    assert "API key" in await _error(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    await _error(await client.post("/embed", json={"text": "x"},
                                   headers={"Authorization": "Bearer wrong"}), 401)
    await _error(await client.get("/metrics", headers={"Authorization": "Basic s3cret"}), 401)
    ok = await client.post("/embed", json={"text": "x"},
                           headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200


async def test_no_cors_headers_by_default(client):
    """No web page may read a keyless daemon's answers (test_hostile_lan.py has the rest)."""
    resp = await client.options("/embed")  # no Origin: not a preflight, a wrong method
    msg = await _error(resp, 405)
    assert "OPTIONS" in msg and "Access-Control-Allow-Origin" not in resp.headers
    err = await client.get("/missing")
    assert "Access-Control-Allow-Origin" not in err.headers


async def test_rerank_query_too_long_for_context_is_400(make_client):
    client = await make_client(models__rerank__n_ctx="128", models__expand__n_ctx="128")
    resp = await client.post("/rerank", json={"query": "word " * 200,
                                              "documents": [{"file": "a", "text": "b"}]})
    assert "too long" in await _error(resp, 400)


async def test_corrupt_model_file_makes_health_503_with_reason(make_client, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    client = await make_client(models__embed__path=str(bad))
    resp = await client.post("/embed", json={"text": "x"})
    msg = await _error(resp, 503)
    assert "cannot load" in msg and "broken" in msg
    assert int(resp.headers["Retry-After"]) >= 1
    # Within the back-off the load is not retried on every request.
    sched = client.app[SERVICES].scheduler
    failures = sched.snapshot().events.get("load_failures", 0)
    again = await client.post("/embed", json={"text": "y"})
    assert again.status == 503 and sched.snapshot().events.get("load_failures", 0) == failures
    health = await client.get("/health")
    body = await health.json()
    assert health.status == 503 and body["ok"] is False and "load failed" in body["error"]
    # Counting tokens needs the broken file's tokenizer: unavailable, said clearly.
    tok = await client.post("/tokenize", json={"text": "x"})
    assert "cannot load" in await _error(tok, 503)
    # Other tasks still work.
    rr = await client.post("/rerank", json={"query": "q", "documents": [{"file": "a",
                                                                         "text": "b"}]})
    assert rr.status == 200
