"""The registry of backend kinds: one line per runtime (see models/backend_kind.py)."""

from __future__ import annotations

from pathlib import Path

from npuserve.daemon.models.backend_kind import BackendKind, is_file
from npuserve.daemon.worker import protocol as wp
from npuserve.fallback import kinds as cpu
from npuserve.npu import kinds as npu

KINDS: tuple[BackendKind, ...] = (
    cpu.LLAMA_EMBED,
    cpu.LLAMA_CROSS_ENCODER,  # before the generative kind: it claims rank-pooled GGUFs only
    cpu.LLAMA_GENERATIVE,
    npu.RKNN_EMBED,
    npu.RKNN_CROSS_ENCODER,  # before the logit kind: it claims cross-encoder directories only
    npu.RKNN_RERANK,
    npu.RKLLM,  # RKLLM directories (their manifest says "runtime": "rkllm")
    cpu.OLLAMA,
)
_BY_NAME = {k.name: k for k in KINDS}


def kind(name: str) -> BackendKind | None:
    return _BY_NAME.get(name)


def kind_for(task: str, device: str, path: Path) -> BackendKind | None:
    """The backend that runs `task` on `device` for the model at `path`: the first kind, in
    KINDS order, that recognises it; else the device's general kind for the task (a file
    that is missing then fails to load, with its reason, like any other). None when there
    is no backend for the task there yet."""
    able = [k for k in KINDS if k.device == device and task in k.tasks]
    return (next((k for k in able if device != "remote" and k.recognises(path)), None)
            or next((k for k in able if k.recognises is is_file or device == "remote"), None))


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
