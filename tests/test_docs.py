"""The README stays true: every config key documented, the two commands present."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.config import FLAT_SCHEMA

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_documents_every_config_key():
    missing = [p for p in FLAT_SCHEMA if f"#{p.rpartition('.')[2]} = " not in README]
    assert not missing, missing
    for section in ("[server]", "[scheduler]", "[models.embed]", "[models.rerank]",
                    "[models.expand]"):
        assert section in README


def test_readme_has_run_and_test_commands():
    assert "npuserve models prepare && .venv/bin/npuserve serve" in README
    assert ".venv/bin/pytest" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci/run").read_text()
    assert "## Run the tests" in ci
