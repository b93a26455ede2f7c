"""The reference librkllmrt (rkllm_reference.c): rkllm.h 1.3.0 over llama.cpp's C API, for
machines without an NPU. Built with the C compiler on first use, against the libllama and
headers llama-cpp-python installs, and cached by the source's hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

SOURCE = Path(__file__).with_name("rkllm_reference.c")


class ReferenceBuildError(RuntimeError):
    pass


def _llama_dirs() -> tuple[Path, Path]:
    """(include dir with llama.h, dir with libllama.so) of the installed llama-cpp-python."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ReferenceBuildError("llama-cpp-python is not installed (pip install"
                                  " 'npuserve[cpu]')")
    lib_dir = Path(spec.origin).parent / "lib"
    include = Path(sysconfig.get_paths()["purelib"]) / "include"
    if not (include / "llama.h").is_file():
        include = Path(spec.origin).parent.parent / "include"
    if not (include / "llama.h").is_file() or not (lib_dir / "libllama.so").exists():
        raise ReferenceBuildError(f"llama.h or libllama.so not found beside {spec.origin}")
    return include, lib_dir


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "npuserve"


def reference_library(out_dir: Path | None = None) -> Path:
    """The built reference librkllmrt (built now if this source was never built)."""
    include, lib_dir = _llama_dirs()
    key = hashlib.sha256(SOURCE.read_bytes() + str(lib_dir).encode()).hexdigest()[:12]
    out = (out_dir or _cache_dir()) / f"librkllmrt-reference-{key}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ReferenceBuildError("no C compiler (gcc) to build the reference librkllmrt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE),
           f"-I{include}", f"-L{lib_dir}", "-lllama", f"-Wl,-rpath,{lib_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ReferenceBuildError(f"building the reference librkllmrt failed:\n{done.stderr}")
    tmp.replace(out)  # atomic: a parallel build never loads a half-written library
    return out
