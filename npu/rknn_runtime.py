"""RKNNLite contexts, one per NPU core, used round-robin.

The RK3588 has three NPU cores. One context per core (masks 1, 2, 4), each
used by one thread at a time, gave ~2.5x a single context in published
measurements, while the 0_1_2 mask does not speed up transformer graphs;
sharing one context across threads has hung the driver. RKNNLite reports
failure by returning -1 (load_rknn, init_runtime) or None (inference) and
rarely raises: every return value is checked here and turned into NpuError.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .model_dir import contexts_for

log = logging.getLogger("npuserve.npu")
CORE_MASKS = (1, 2, 4)  # NPU_CORE_0, NPU_CORE_1, NPU_CORE_2


class NpuError(RuntimeError):
    """The NPU runtime refused or failed (the RKNNLite call returned -1 or None)."""


def runtime_class(name: str) -> Callable[..., Any]:
    """The RKNNLite class: the vendor's, or the onnxruntime reference on x86."""
    if name == "reference":
        from .reference_runtime import ReferenceRKNNLite

        return ReferenceRKNNLite
    try:
        from rknnlite.api import RKNNLite
    except ImportError as exc:
        raise NpuError(f"rknn-toolkit-lite2 is not installed ({exc})") from None
    return RKNNLite


class Context:
    """One RKNNLite context bound to one core, guarded so one thread uses it at a time."""

    def __init__(self, cls: Callable[..., Any], path: Path, core_mask: int) -> None:
        self.lock = threading.Lock()
        self.rknn = cls(verbose=False)
        self.core_mask = core_mask
        if self.rknn.load_rknn(str(path)) != 0:
            raise NpuError(f"load_rknn({path.name}) failed (missing file or wrong format)")
        if self.rknn.init_runtime(core_mask=core_mask) != 0:
            self.rknn.release()
            raise NpuError(f"init_runtime(core_mask={core_mask}) failed: see the RKNN log"
                           " (driver/runtime version mismatch, or no NPU)")

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            outputs = self.rknn.inference(inputs=inputs)
        if outputs is None:
            raise NpuError(f"inference returned None on core mask {self.core_mask}")
        return outputs

    def release(self) -> None:
        with self.lock:
            self.rknn.release()


class ContextPool:
    """Contexts for one graph across the cores; requests spread round-robin."""

    def __init__(self, path: Path, cores: int, runtime: str) -> None:
        cls = runtime_class(runtime)
        self.contexts: list[Context] = []
        # A large graph gets one context: its copies per context would not fit.
        cores = contexts_for(path, cores)
        try:
            for mask in CORE_MASKS[:max(1, min(cores, len(CORE_MASKS)))]:
                self.contexts.append(Context(cls, path, mask))
        except NpuError:
            self.release()
            raise
        self._next = itertools.cycle(range(len(self.contexts)))
        self._pick = threading.Lock()
        self.executor = ThreadPoolExecutor(len(self.contexts), thread_name_prefix="npu")

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._pick:
            ctx = self.contexts[next(self._next)]
        return ctx.run(inputs)

    def run_many(self, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Several inferences at once, one per core (inference() releases the GIL)."""
        return list(self.executor.map(self.run, batches))

    def release(self) -> None:
        for ctx in self.contexts:
            ctx.release()
        self.contexts = []
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False)
