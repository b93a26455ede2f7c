"""The descriptor of a backend kind: everything the daemon needs to know about a runtime
without importing it. The registry (models/registry.py) plans models with it, the scheduler
plans memory and probes with it, and the worker imports `target` - only the worker ever
loads the library behind a kind.

Adding a runtime is one backend module (the class named by `target`, run in the worker), one
descriptor beside the others of its family (npu/kinds.py, fallback/kinds.py), and one line in
models/backends.py's KINDS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npuserve.daemon.worker import protocol as wp


def is_file(path: Path) -> bool:
    return path.is_file()


def no_files(spec: wp.ModelSpec) -> list[str]:
    return []


def the_file(spec: wp.ModelSpec) -> list[str]:
    return [spec.path] if Path(spec.path).is_file() else []


def default_probe(spec: wp.ModelSpec, task: str) -> wp.Request:
    """The smallest call of `task`: what a re-probe of a tripped NPU model sends."""
    if task == "embed":
        return wp.Embed(spec.model_id, ("probe",))
    if task == "rerank":
        return wp.Rerank(spec.model_id, "probe", ("probe",), "")
    return wp.Expand(spec.model_id, "probe", None, False)


@dataclass(frozen=True)
class BackendKind:
    name: str  # ModelSpec.kind
    device: str  # cpu | npu | remote: the lane (worker process) it runs in
    tasks: frozenset[str]
    target: str  # "module:Class" implementing models.backend_api.Backend, worker-side
    recognises: Callable[[Path], bool] = is_file  # is this path a model of this kind?
    weight_files: Callable[[wp.ModelSpec], list[str]] = the_file  # what a load reads
    # Bytes a loaded model holds, before it was ever measured (then the measurement wins).
    memory_estimate: Callable[[wp.ModelSpec], int] = lambda spec: 0
    probe: Callable[[wp.ModelSpec, str], wp.Request] = default_probe
