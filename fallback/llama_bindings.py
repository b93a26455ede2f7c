"""llama.cpp's ctypes bindings without the rest of llama-cpp-python.

`import llama_cpp` runs the package's __init__, which imports the high-level `Llama` and
with it numpy, jinja2 and the chat formats: 22 MB of a worker's RSS (measured) that an
embedding worker never uses. `lib()` imports only the bindings module
(`llama_cpp.llama_cpp`) under a package object whose __init__ has not run; `high_level()`
runs that __init__ later, in place, when a generative backend needs `Llama`.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Any

from npuserve.daemon.models.backend_api import ModelLoadError

log = logging.getLogger("npuserve.llama")

_DEFERRED = "_npuserve_init_deferred"
_state: dict[str, Any] = {}


def lib() -> ModuleType:
    """The ctypes bindings, with the backend initialised and llama.cpp's log quiet."""
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is None:
        if "llama_cpp" not in sys.modules:
            spec = importlib.util.find_spec("llama_cpp")
            if spec is None or spec.loader is None:
                raise ModelLoadError("llama-cpp-python is not installed"
                                     " (pip install 'npuserve[cpu]')")
            pkg = importlib.util.module_from_spec(spec)
            setattr(pkg, _DEFERRED, True)
            # Anyone else in this process asking the package for a high-level name
            # (`from llama_cpp import Llama`) finishes its import first (PEP 562).
            pkg.__getattr__ = _finish_then_get  # type: ignore[attr-defined]
            sys.modules["llama_cpp"] = pkg
        mod = importlib.import_module("llama_cpp.llama_cpp")
    if "backend" not in _state:
        mod.llama_backend_init()
        _quiet(mod)
        _state["backend"] = True
    return mod


def high_level() -> ModuleType:
    """The whole llama_cpp package (Llama, grammars, samplers), finishing a deferred one."""
    pkg = sys.modules.get("llama_cpp")
    if pkg is not None and getattr(pkg, _DEFERRED, False):
        delattr(pkg, _DEFERRED)
        del pkg.__getattr__
        assert pkg.__spec__ is not None and pkg.__spec__.loader is not None
        pkg.__spec__.loader.exec_module(pkg)  # reuses the bindings already imported
        # The package installs its own log callback, which prints every llama.cpp line to
        # stderr (one per call: a daemon whose stderr is a pipe nobody drains then blocks).
        _quiet(lib())
    return importlib.import_module("llama_cpp")


def _finish_then_get(name: str) -> Any:
    pkg = high_level()
    if name in pkg.__dict__:
        return pkg.__dict__[name]
    raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}")


def _quiet(mod: ModuleType) -> None:
    """llama.cpp logs every load to stderr; keep its errors, as the daemon's log lines."""

    @mod.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _state["log_callback"] = callback  # the C side keeps only a pointer
    mod.llama_log_set(callback, ctypes.c_void_p(0))
