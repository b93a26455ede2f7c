"""A stand-in for rknnlite.api.RKNNLite on machines without an NPU.

Same methods, same failure conventions (-1 from load_rknn/init_runtime, None
from inference, never an exception), but it runs the model's ONNX twin
(`model_128.rknn` -> `model_128.onnx` beside it) with onnxruntime. Every line
of the NPU backends therefore runs in CI; what it cannot show is the real
NPU's speed or its driver's failures, so those are injected:

    RKNN_REFERENCE_FAULT=init_fail          init_runtime returns -1
    RKNN_REFERENCE_FAULT=none_after:N       inference returns None from call N+1 on
    RKNN_REFERENCE_FAULT=hang_after:N       inference never returns from call N+1 on
                                            ("failed to submit" followed by a hang)
Counts are per process (the worker), across contexts. RKNN_REFERENCE_FAULT_FILE=PATH reads
the same spec from a file at every call instead (empty or missing: no fault), so a fault can
be injected and removed while the worker runs.

It is strict where RKNNLite is: a graph whose inputs are not of the dtypes RKNNLite
documents (int8, uint8, int16, float16, float32) does not initialise, and an inference
whose inputs are of another dtype, another shape, or another count than the graph's
returns None, so CI fails where the board would. Float inputs are converted to the
graph's float type, as the runtime converts them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("npuserve.npu.reference")

NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4
NPU_CORE_0_1, NPU_CORE_0_1_2, NPU_CORE_ALL = 3, 7, 0xFFFF
_VALID_MASKS = {NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1,
                NPU_CORE_0_1_2, NPU_CORE_ALL}
_calls = 0
_calls_lock = threading.Lock()
# The input dtypes RKNNLite documents, as numpy and as ONNX spells them.
RKNN_DTYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "float16", "float32")}
_ONNX_TYPES = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
               "tensor(float16)": np.float16, "tensor(float)": np.float32}


def _fault() -> tuple[str, int]:
    spec = os.environ.get("RKNN_REFERENCE_FAULT", "")
    path = os.environ.get("RKNN_REFERENCE_FAULT_FILE")
    if path:  # read at every call, so a test can make the fault go away again
        try:
            with open(path, encoding="utf-8") as f:
                spec = f.read().strip()
        except OSError:
            spec = ""
    kind, _, n = spec.partition(":")
    return kind, int(n) if n.isdigit() else 0


class ReferenceRKNNLite:
    """RKNNLite's interface over onnxruntime."""

    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4
    NPU_CORE_0_1, NPU_CORE_0_1_2, NPU_CORE_ALL = 3, 7, 0xFFFF

    def __init__(self, verbose: bool = False, verbose_file: str | None = None) -> None:
        self.path: Path | None = None
        self.session: Any = None
        self.core_mask: int | None = None

    def load_rknn(self, path: str) -> int:
        twin = Path(path).with_suffix(".onnx")
        if not twin.is_file():
            log.error("E load_rknn: %s (and its ONNX twin) not found", path)
            return -1
        self.path = twin
        return 0

    def init_runtime(self, target: str | None = None, device_id: str | None = None,
                     async_mode: bool = False, core_mask: int = NPU_CORE_AUTO) -> int:
        if self.path is None:
            log.error("E init_runtime: model is not loaded")
            return -1
        if core_mask not in _VALID_MASKS:
            log.error("E init_runtime: invalid core mask %s", core_mask)
            return -1
        if _fault()[0] == "init_fail":
            log.error("E init_runtime: injected failure")
            return -1
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1  # one "core" per context, like the NPU
            session = ort.InferenceSession(str(self.path), opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # RKNNLite logs and returns -1; so do we
            log.error("E init_runtime: %s", exc)
            return -1
        for inp in session.get_inputs():
            if inp.type not in _ONNX_TYPES:
                log.error("E RKNN: input %r is %s: the runtime supports int8, uint8, int16,"
                          " float16 and float32 inputs", inp.name, inp.type)
                return -1
        self.session = session
        self.core_mask = core_mask
        return 0

    def _checked(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray] | None:
        """The inputs as the graph takes them, or None (logged) where RKNNLite refuses."""
        graph = self.session.get_inputs()
        if len(inputs) != len(graph):
            log.error("E RKNN: %d inputs given, the model has %d", len(inputs), len(graph))
            return None
        feed = {}
        for arr, inp in zip(inputs, graph, strict=True):
            arr = np.asarray(arr)
            if arr.dtype not in RKNN_DTYPES:
                log.error("E RKNN: input %r has unsupported dtype %s", inp.name, arr.dtype)
                return None
            if list(arr.shape) != list(inp.shape):
                log.error("E RKNN: input %r has shape %s, the model's is %s", inp.name,
                          list(arr.shape), inp.shape)
                return None
            want = _ONNX_TYPES[inp.type]
            if arr.dtype != want and not (arr.dtype.kind == "f" and np.dtype(want).kind == "f"):
                log.error("E RKNN: input %r is %s, the model takes %s", inp.name, arr.dtype,
                          np.dtype(want))
                return None
            feed[inp.name] = arr.astype(want, copy=False)
        return feed

    def inference(self, inputs: list[np.ndarray] | None = None, data_type: Any = None,
                  data_format: Any = None, inputs_pass_through: Any = None,
                  reuse_outputs: bool = False) -> list[np.ndarray] | None:
        global _calls
        if self.session is None or inputs is None:
            log.error("E inference: runtime not initialised")
            return None
        with _calls_lock:
            _calls += 1
            call = _calls
        kind, n = _fault()
        if kind == "none_after" and call > n:
            log.error("E inference: injected failure (call %d)", call)
            return None
        if kind == "hang_after" and call > n:
            log.error("E failed to submit!")
            while True:
                time.sleep(3600)
        feed = self._checked(inputs)
        if feed is None:
            return None
        try:
            return self.session.run(None, feed)
        except Exception as exc:
            log.error("E inference: %s", exc)
            return None

    def get_sdk_version(self) -> str:
        return "reference runtime (onnxruntime), not librknnrt"

    def release(self) -> None:
        self.session = None
