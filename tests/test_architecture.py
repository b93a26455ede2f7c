"""The house rules a newcomer relies on, checked on the source: no import cycle inside
daemon/ (lazy imports included), the HTTP layer sees the scheduler only through its public
face, and only the worker imports model libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon"
# What routes may import of the scheduler's room: the Scheduler, its results and views,
# the job timing their headers report, and the settings object.
SCHED_PUBLIC = {"npuserve.daemon.sched.scheduler", "npuserve.daemon.sched.views",
                "npuserve.daemon.sched.jobs", "npuserve.daemon.sched.settings"}
MODEL_LIBRARIES = {"llama_cpp", "rknnlite", "onnxruntime", "tokenizers", "gguf"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "npuserve." + ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import of {node.module}")
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def daemon_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in DAEMON.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_daemon():
    assert find_cycle(daemon_graph()) is None, " -> ".join(find_cycle(daemon_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted((DAEMON / "http").glob("*.py")), ids=lambda p: p.name)
def test_routes_see_only_the_schedulers_public_face(path):
    sched = {m for m in imports_of(path) if m.startswith("npuserve.daemon.sched.")}
    internal = {m for m in sched if not any(m == p or m.startswith(p + ".")
                                            for p in SCHED_PUBLIC)}
    assert not internal, f"{path.name} imports scheduler internals: {sorted(internal)}"


def test_only_worker_side_modules_import_model_libraries():
    """The daemon process stays small: llama.cpp, RKNN and friends load in workers only."""
    for path in DAEMON.rglob("*.py"):
        libs = {m.split(".")[0] for m in imports_of(path)} & MODEL_LIBRARIES
        assert not libs, f"{path.relative_to(ROOT)} imports {sorted(libs)}"
