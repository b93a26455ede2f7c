"""/openapi.json describes the whole API, and a property-based fuzzer (schemathesis) run
against a real daemon finds no server error, no hang and no non-JSON error."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from npuserve.daemon.http.app import build_app
from npuserve.daemon.server import create_scheduler

from .conftest import start_daemon, wait_http
from .reliability_support import FUZZ_EXAMPLES, record

pytestmark = pytest.mark.slow  # fuzzing: minutes of generated requests

# Fuzzing limits: small bounds keep each generated request cheap on two cores while every
# limit still gets probed from both sides.
# Small limits keep every fuzzed call short: six rerank shapes and four generation
# endpoints are fuzzed, and a rerank of 8 texts of 2,000 characters took ~15 s here.
FUZZ_LIMITS = ["--set", "server.max_batch=8", "--set", "server.max_text_chars=400",
               "--set", "models.expand.max_tokens=32", "--set", "server.max_tokens=16"]


def _openapi_path(route_path: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", route_path)


def test_every_route_is_in_the_openapi_document(make_config):
    cfg = make_config()
    app = build_app(cfg, create_scheduler(cfg))
    from npuserve.daemon.http.openapi import openapi_document
    from npuserve.daemon.http.validation import Limits

    paths = openapi_document(Limits(8, 100))["paths"]
    registered = {(r.method.lower(), _openapi_path(r.resource.canonical))
                  for r in app.router.routes() if r.method != "HEAD" and r.resource}
    described = {(m, p) for p, ops in paths.items() for m in ops}
    assert registered == described, (registered - described, described - registered)


async def test_openapi_is_behind_the_key_and_uses_the_daemons_limits(make_client):
    client = await make_client(server__api_key="k", server__max_batch="7")
    assert (await client.get("/openapi.json")).status == 401  # as README says: all but /health
    resp = await client.get("/openapi.json", headers={"Authorization": "Bearer k"})
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.") and "/v1/embeddings" in doc["paths"]
    texts = doc["paths"]["/embed-batch"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["texts"]
    assert texts["maxItems"] == 7
    assert (await client.get("/status")).status == 401  # the rest still needs the key


def fuzz(base_url: str, max_examples: int, seed: int | None, headers: list[str],
         workers: int = 1) -> tuple[int, str, int]:
    """Run schemathesis against a daemon; returns (exit code, output, cases generated).

    Checks: all of schemathesis' checks (no 5xx, documented status codes and content types,
    response schemas, schema-violating requests rejected) except positive_data_acceptance:
    some valid-by-schema requests are rightly refused for reasons JSON Schema cannot say
    (a query too long in *tokens* for the reranker's context, `dimensions` other than the
    model's, the same path twice in one batch)."""
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run",
           f"{base_url}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", str(max_examples),
           "--workers", str(workers), "--request-timeout", "60", "--max-response-time", "60",
           "--suppress-health-check", "all", *headers]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = res.stdout + res.stderr
    match = re.search(r"(\d+) generated", out)
    return res.returncode, out, int(match.group(1)) if match else 0


@pytest.mark.slow
def test_fuzzing_finds_no_server_error_hang_or_non_json_error(state_dir: Path):
    if shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("schemathesis is not installed (it is in the test extra)")
    proc, port = start_daemon(state_dir, *FUZZ_LIMITS, "--set", "server.api_key=fuzz-key")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health")
        # A fixed seed in CI (reproducible); the reliability command varies it.
        seed = int(os.environ.get("NPUSERVE_TEST_FUZZ_SEED", "20261122"))
        code, out, cases = fuzz(base, FUZZ_EXAMPLES, seed=seed,
                                headers=["-H", "Authorization: Bearer fuzz-key"])
    finally:
        proc.send_signal(signal.SIGTERM)
        daemon_out, _ = proc.communicate(timeout=60)
    failures = re.search(r"(\d+) found (\d+) unique failure", out)
    record("fuzz", {"tool": "schemathesis", "cases": cases, "seed": seed,
                    "failures": int(failures.group(2)) if failures else 0,
                    "server_errors": out.count("Server error")})
    assert code == 0, out[-6000:]
    assert cases >= 500, out[-2000:]
    assert proc.returncode == 0, daemon_out[-3000:]
    # The error middleware logs every 500 it turns into JSON; there must be none. (aiohttp
    # itself logs malformed HTTP framing, e.g. a NUL in a header, before any route runs,
    # and answers it with its own 400: that is not an application error.)
    assert "unhandled error" not in daemon_out, daemon_out[-3000:]
