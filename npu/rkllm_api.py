"""librkllmrt through ctypes, pinned to rkllm.h 1.3.0.

rkllm.h changed its structs and rkllm_init's signature in 1.3.0 (a callback struct,
per-run sampling parameters); an older or newer library read through these structs would
corrupt memory rather than fail, so the library's version is read from its own banner
before anything is called, and any version but RKLLM_VERSION is refused by name.

RKLLM answers through a callback that runs inside rkllm_run, on the calling thread, with
pointers valid only during the call: `Rkllm.run` copies what it needs there and lets a
Python function decide to continue (0) or pause (1). It reports failure by return codes
(non-zero) and by RKLLM_RUN_ERROR in the callback; both become RkllmError.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .detect import RKLLM_VERSION

_BANNER = re.compile(rb"rkllm-runtime version:? v?(\d+\.\d+\.\d+)")

RUN_NORMAL, RUN_WAITING, RUN_FINISH, RUN_ERROR = 0, 1, 2, 3
INPUT_PROMPT, INPUT_TOKEN = 0, 1
INFER_GENERATE, INFER_GET_LAST_HIDDEN_LAYER, INFER_GET_LOGITS = 0, 1, 2
CONTINUE, PAUSE = 0, 1  # what a result callback answers


class RkllmError(RuntimeError):
    """librkllmrt refused or failed (a non-zero return, or RKLLM_RUN_ERROR)."""


class ExtendParam(ctypes.Structure):
    _fields_ = [("base_domain_id", ctypes.c_int32), ("embed_flash", ctypes.c_int8),
                ("enabled_cpus_num", ctypes.c_int8), ("enabled_cpus_mask", ctypes.c_uint32),
                ("n_batch", ctypes.c_uint8), ("use_cross_attn", ctypes.c_int8),
                ("reserved", ctypes.c_uint8 * 104)]


class Param(ctypes.Structure):
    _fields_ = [("model_path", ctypes.c_char_p), ("max_context_len", ctypes.c_int32),
                ("max_new_tokens", ctypes.c_int32), ("top_k", ctypes.c_int32),
                ("n_keep", ctypes.c_int32), ("top_p", ctypes.c_float),
                ("temperature", ctypes.c_float), ("repeat_penalty", ctypes.c_float),
                ("frequency_penalty", ctypes.c_float), ("presence_penalty", ctypes.c_float),
                ("mirostat", ctypes.c_int32), ("mirostat_tau", ctypes.c_float),
                ("mirostat_eta", ctypes.c_float), ("skip_special_token", ctypes.c_bool),
                ("ignore_eos_token", ctypes.c_bool), ("is_async", ctypes.c_bool),
                ("extend_param", ExtendParam)]


class EmbedInput(ctypes.Structure):
    _fields_ = [("embed", ctypes.POINTER(ctypes.c_float)), ("n_tokens", ctypes.c_size_t)]


class TokenInput(ctypes.Structure):
    _fields_ = [("input_ids", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_size_t)]


class _Image(ctypes.Structure):
    _fields_ = [("image_embed", ctypes.POINTER(ctypes.c_float)),
                ("n_image_tokens", ctypes.c_size_t), ("n_image", ctypes.c_size_t),
                ("image_start", ctypes.c_char_p), ("image_end", ctypes.c_char_p),
                ("image_content", ctypes.c_char_p), ("image_width", ctypes.c_size_t),
                ("image_height", ctypes.c_size_t)]


class _Video(ctypes.Structure):
    _fields_ = [("video_embed", ctypes.POINTER(ctypes.c_float)),
                ("n_frame_tokens", ctypes.c_size_t), ("n_frame_per_video", ctypes.c_size_t),
                ("n_video", ctypes.c_size_t), ("video_start", ctypes.c_char_p),
                ("video_end", ctypes.c_char_p), ("video_content", ctypes.c_char_p),
                ("frame_width", ctypes.c_size_t), ("frame_height", ctypes.c_size_t)]


class MultiModalInput(ctypes.Structure):
    _fields_ = [("prompt", ctypes.c_char_p), ("image", _Image), ("video", _Video)]


class _InputUnion(ctypes.Union):
    _fields_ = [("prompt_input", ctypes.c_char_p), ("embed_input", EmbedInput),
                ("token_input", TokenInput), ("multimodal_input", MultiModalInput)]


class Input(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("role", ctypes.c_char_p), ("enable_thinking", ctypes.c_bool),
                ("input_type", ctypes.c_int), ("u", _InputUnion)]


class SamplingParam(ctypes.Structure):
    _fields_ = [("top_k", ctypes.c_int32), ("top_p", ctypes.c_float),
                ("temperature", ctypes.c_float), ("repeat_penalty", ctypes.c_float),
                ("frequency_penalty", ctypes.c_float), ("presence_penalty", ctypes.c_float),
                ("mirostat", ctypes.c_int32), ("mirostat_tau", ctypes.c_float),
                ("mirostat_eta", ctypes.c_float)]


class InferParam(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("lora_params", ctypes.c_void_p),
                ("prompt_cache_params", ctypes.c_void_p),
                ("sampling_params", ctypes.POINTER(SamplingParam)),
                ("keep_history", ctypes.c_int), ("max_new_tokens", ctypes.c_int32)]


class LastHidden(ctypes.Structure):
    _fields_ = [("hidden_states", ctypes.POINTER(ctypes.c_float)),
                ("embd_size", ctypes.c_int), ("num_tokens", ctypes.c_int)]


class Logits(ctypes.Structure):
    _fields_ = [("logits", ctypes.POINTER(ctypes.c_float)), ("vocab_size", ctypes.c_int),
                ("num_tokens", ctypes.c_int)]


class PerfStat(ctypes.Structure):
    _fields_ = [("prefill_time_ms", ctypes.c_float), ("prefill_tokens", ctypes.c_int),
                ("generate_time_ms", ctypes.c_float), ("generate_tokens", ctypes.c_int),
                ("memory_usage_mb", ctypes.c_float)]


class Result(ctypes.Structure):
    _fields_ = [("text", ctypes.c_char_p), ("token_id", ctypes.c_int32),
                ("last_hidden_layer", LastHidden), ("logits", Logits), ("perf", PerfStat)]


ResultCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Result), ctypes.c_void_p,
                                  ctypes.c_int)


class Callbacks(ctypes.Structure):
    _fields_ = [("result_callback", ResultCallback), ("result_userdata", ctypes.c_void_p),
                ("tokenizer_callback", ctypes.c_void_p), ("tokenizer_userdata", ctypes.c_void_p),
                ("embed_callback", ctypes.c_void_p), ("embed_userdata", ctypes.c_void_p)]


def layout() -> list[int]:
    """Sizes and offsets in the order the reference library's rkllm_reference_layout
    reports them (tests compare the two)."""
    return [ctypes.sizeof(Param), Param.extend_param.offset, ctypes.sizeof(ExtendParam),
            ctypes.sizeof(Input), Input.input_type.offset, Input.u.offset,
            ctypes.sizeof(InferParam), InferParam.keep_history.offset, ctypes.sizeof(Result),
            Result.perf.offset, ctypes.sizeof(Callbacks), ctypes.sizeof(SamplingParam)]


def library_version(path: Path) -> str | None:
    """The version librkllmrt prints at start-up, read from the library file itself."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    match = _BANNER.search(data)
    return match.group(1).decode() if match else None


def open_library(path: Path) -> ctypes.CDLL:
    """librkllmrt at `path`, if it is the version these structs describe."""
    version = library_version(path)
    if version is None:
        raise RkllmError(f"{path}: not a librkllmrt (no 'rkllm-runtime version' in it)")
    if version != RKLLM_VERSION:
        raise RkllmError(f"{path} is librkllmrt {version}; npuserve speaks rkllm.h"
                         f" {RKLLM_VERSION} only (their structs differ): install librkllmrt"
                         f" {RKLLM_VERSION} from rknn-llm's release-v{RKLLM_VERSION}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise RkllmError(f"cannot load {path}: {exc}") from None
    handle_p = ctypes.POINTER(ctypes.c_void_p)
    lib.rkllm_createDefaultParam.restype = Param
    lib.rkllm_createDefaultParam.argtypes = []
    lib.rkllm_init.argtypes = [handle_p, ctypes.POINTER(Param), ctypes.POINTER(Callbacks)]
    lib.rkllm_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(Input),
                              ctypes.POINTER(InferParam), ctypes.c_void_p]
    for name in ("rkllm_abort", "rkllm_destroy", "rkllm_is_running"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    int_p = ctypes.POINTER(ctypes.c_int)
    lib.rkllm_clear_kv_cache.argtypes = [ctypes.c_void_p, ctypes.c_int, int_p, int_p]
    lib.rkllm_get_kv_cache_size.argtypes = [ctypes.c_void_p, int_p]
    for name in ("rkllm_init", "rkllm_run", "rkllm_abort", "rkllm_destroy",
                 "rkllm_is_running", "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


# What a run's Python handler sees: the state and the result (valid during the call only).
Handler = Callable[[int, Result], int]


class Rkllm:
    """One initialised RKLLM model (one handle). Not thread-safe: one run at a time."""

    def __init__(self, lib: ctypes.CDLL, model_path: Path, max_context_len: int,
                 threads: int) -> None:
        self.lib = lib
        self.handle = ctypes.c_void_p()
        self._handler: Handler | None = None
        self._error: str | None = None
        self._callback = ResultCallback(self._on_result)  # kept alive with the handle
        param = lib.rkllm_createDefaultParam()
        param.model_path = str(model_path).encode()
        param.max_context_len = max_context_len
        param.max_new_tokens = max_context_len
        # The host decides when a generation ends (the grammar allows end of text only
        # where the output is complete), so the runtime reports EOS like any token.
        param.ignore_eos_token = True
        param.skip_special_token = True
        param.is_async = False
        param.extend_param.enabled_cpus_num = max(1, min(threads, 8))
        # The big cores of an RK3588 (4-7) do the runtime's CPU-side work.
        param.extend_param.enabled_cpus_mask = sum(1 << c for c in range(8 - max(1, min(
            threads, 4)), 8))
        param.extend_param.n_batch = 1
        self.callbacks = Callbacks(result_callback=self._callback)
        code = lib.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param),
                              ctypes.byref(self.callbacks))
        if code != 0 or not self.handle:
            raise RkllmError(f"rkllm_init({model_path.name}) returned {code}: see the RKLLM"
                             " log (runtime/model version, driver, or memory)")

    def _on_result(self, result: ctypes._Pointer, userdata: int | None, state: int) -> int:
        # An exception must not cross into C: it is kept and raised after rkllm_run.
        if state == RUN_ERROR:
            self._error = "the run reported RKLLM_RUN_ERROR"
            return CONTINUE
        if self._handler is None or state == RUN_WAITING:
            return CONTINUE
        try:
            return self._handler(state, result.contents)
        except Exception as exc:  # noqa: BLE001 - re-raised by run()
            self._error = f"{type(exc).__name__}: {exc}"
            self._raised = exc
            self.lib.rkllm_abort(self.handle)
            return CONTINUE

    def run(self, tokens: list[int], mode: int, handler: Handler,
            sampling: SamplingParam | None = None, max_new_tokens: int = 0) -> None:
        """rkllm_run over `tokens` (appended to the KV cache: keep_history=1); `handler`
        gets each callback and answers CONTINUE or PAUSE."""
        ids = (ctypes.c_int32 * len(tokens))(*tokens)
        inp = Input(role=b"user", enable_thinking=False, input_type=INPUT_TOKEN)
        inp.token_input = TokenInput(ids, len(tokens))
        infer = InferParam(mode=mode, keep_history=1, max_new_tokens=max_new_tokens)
        if sampling is not None:
            infer.sampling_params = ctypes.pointer(sampling)
        self._handler, self._error, self._raised = handler, None, None
        try:
            code = self.lib.rkllm_run(self.handle, ctypes.byref(inp), ctypes.byref(infer),
                                      None)
        finally:
            self._handler = None
        if self._raised is not None:
            raise self._raised
        if code != 0 or self._error:
            raise RkllmError(f"rkllm_run returned {code}"
                             + (f" ({self._error})" if self._error else ""))

    def rows(self, tokens: list[int], mode: int) -> np.ndarray:
        """The last hidden layer (or the logits) of every token, copied out of the
        callback (its pointer is valid only there)."""
        out: list[np.ndarray] = []

        def keep(state: int, result: Result) -> int:
            if state != RUN_NORMAL:
                return CONTINUE
            part = result.last_hidden_layer if mode == INFER_GET_LAST_HIDDEN_LAYER \
                else result.logits
            width = part.embd_size if mode == INFER_GET_LAST_HIDDEN_LAYER else part.vocab_size
            data = part.hidden_states if mode == INFER_GET_LAST_HIDDEN_LAYER else part.logits
            if data and part.num_tokens > 0:
                out.append(np.ctypeslib.as_array(data, shape=(part.num_tokens * width,))
                           .reshape(part.num_tokens, width).copy())
            return CONTINUE

        self.run(tokens, mode, keep)
        if not out:
            raise RkllmError("rkllm_run finished without a result")
        return out[-1]

    def clear(self, start: int | None = None, end: int | None = None) -> None:
        """Clear the KV cache: all of it, or positions [start, end)."""
        if start is None or end is None:
            code = self.lib.rkllm_clear_kv_cache(self.handle, 0, None, None)
        else:
            s, e = ctypes.c_int(start), ctypes.c_int(end)
            code = self.lib.rkllm_clear_kv_cache(self.handle, 0, ctypes.byref(s),
                                                 ctypes.byref(e))
        if code != 0:
            raise RkllmError(f"rkllm_clear_kv_cache returned {code}")

    def kv_size(self) -> int:
        size = ctypes.c_int(-1)
        if self.lib.rkllm_get_kv_cache_size(self.handle, ctypes.byref(size)) != 0:
            raise RkllmError("rkllm_get_kv_cache_size failed")
        return int(size.value)

    def destroy(self) -> None:
        if self.handle:
            self.lib.rkllm_destroy(self.handle)
            self.handle = ctypes.c_void_p()
