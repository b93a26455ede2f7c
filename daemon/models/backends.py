"""The registry of backend kinds: one line per runtime (see models/backend_kind.py)."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.models.backend_kind import BackendKind
from npuserve.daemon.worker import protocol as wp
from npuserve.fallback import kinds as cpu
from npuserve.npu import kinds as npu

KINDS: tuple[BackendKind, ...] = (
    cpu.LLAMA_EMBED,
    cpu.LLAMA_GENERATIVE,
    npu.RKNN_EMBED,
    npu.RKNN_RERANK,
    cpu.OLLAMA,
)
_BY_NAME = {k.name: k for k in KINDS}


def kind(name: str) -> BackendKind | None:
    return _BY_NAME.get(name)


def kind_for(task: str, device: str) -> BackendKind | None:
    """The backend that runs `task` on `device`, or None when there is none yet."""
    return next((k for k in KINDS if k.device == device and task in k.tasks), None)


def is_npu_model(path: Path) -> bool:
    """A path that an NPU backend kind recognises (an NPU model directory)."""
    return any(k.device == "npu" and k.recognises(path) for k in KINDS)


def weight_files(spec: wp.ModelSpec) -> list[str]:
    k = kind(spec.kind)
    return k.weight_files(spec) if k else []


def memory_estimate(spec: wp.ModelSpec) -> int:
    k = kind(spec.kind)
    return k.memory_estimate(spec) if k else 0


def probe_request(spec: wp.ModelSpec, task: str) -> wp.Request:
    k = kind(spec.kind)
    if k is None:
        raise ValueError(f"unknown backend kind {spec.kind!r}")
    return k.probe(spec, task)


def worker_target(name: str) -> str | None:
    """"module:Class" of the backend, for the worker to import."""
    k = kind(name)
    return k.target if k else None
