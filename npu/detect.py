"""What NPU the board offers: SoC, device node, driver, runtime library, Python runtime.

Each probe reads files only; nothing here loads the vendor runtime, so the
report is safe to run anywhere (x86 CI included).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

SOCS = ("rk3588s", "rk3588", "rk3576", "rk3568")
DEVICE_NODES = ("/dev/rknpu", "/dev/dri/renderD129")
MAINLINE_NODE = "/dev/accel/accel0"
DRIVER_VERSION_FILES = ("/proc/rknpu/version", "/sys/kernel/debug/rknpu/version")
RUNTIME_LIBS = ("/usr/lib/librknnrt.so", "/usr/lib/aarch64-linux-gnu/librknnrt.so")


@dataclass
class NpuReport:
    soc: str | None = None
    device_node: str | None = None
    driver_version: str | None = None
    runtime_lib: str | None = None
    runtime_version: str | None = None
    rknnlite_importable: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)  # (problem, fix)

    @property
    def usable(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.usable:
            return f"NPU available ({self.soc}, driver {self.driver_version or 'unknown'})"
        return "no usable NPU: models run on the CPU"


RKNNLITE_PYTHON_LIMIT = (3, 13)  # first CPython without an rknn-toolkit-lite2 wheel


def _read(path: str | Path, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _runtime_version(lib: str) -> str | None:
    """librknnrt prints 'librknnrt version: X' from a string baked into the binary."""
    try:
        data = Path(lib).read_bytes()
    except OSError:
        return None
    match = re.search(rb"librknnrt version: ([^\x00\n]+)", data)
    return match.group(1).decode("ascii", "replace").strip() if match else None


def _version(text: str | None) -> tuple[int, int, int] | None:
    """(2, 5, 0) from "2.5.0 (abc@2025-...)" or "v2.5.0"; None when there is no version."""
    m = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", text or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def installed_runtime_version(root: str = "/") -> str | None:
    """The version baked into this machine's librknnrt.so, if there is one."""
    for lib in RUNTIME_LIBS:
        path = os.path.join(root, lib.lstrip("/"))
        if os.path.exists(path):
            return _runtime_version(path)
    return None


def model_version_problem(model: str, built_with: str | None,
                          runtime: str | None) -> tuple[str, str] | None:
    """(problem, fix) when `model`'s graphs were built by a newer rknn-toolkit2 than the
    board's librknnrt: the runtime then refuses them at init_runtime ("Invalid RKNN model
    version"; users hit it with 1.3-1.5 runtimes and 2.x models, and with 1.5.2 models on a
    1.5.0 runtime). Unknown versions are not reported."""
    built, have = _version(built_with), _version(runtime)
    if built is None or have is None or have >= built:
        return None
    wanted, older = ".".join(map(str, built)), ".".join(map(str, have))
    return (f"{model} was built by rknn-toolkit2 {wanted}, newer than this board's librknnrt"
            f" {older}: init_runtime will fail with 'Invalid RKNN model version'",
            f"install librknnrt.so {wanted} or newer (rknn-toolkit2's rknpu2 runtime) into"
            f" /usr/lib, or convert the model again with rknn-toolkit2 {older}")


def detect(root: str = "/", python: tuple[int, int] | None = None) -> NpuReport:
    """Probe the machine (or a directory tree standing in for it, for tests); `python` is
    the interpreter version to judge rknn-toolkit-lite2's availability by."""
    python = python or (sys.version_info.major, sys.version_info.minor)

    def p(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    rep = NpuReport()
    compatible = _read(p("/proc/device-tree/compatible")) or ""
    rep.soc = next((s for s in SOCS if s in compatible), None)
    if rep.soc is None:
        rep.problems.append(("no Rockchip NPU SoC in /proc/device-tree/compatible",
                             "run on an RK3588/RK3576/RK3568 board; here every model uses the CPU"))
        return rep
    rep.device_node = next((n for n in DEVICE_NODES if os.path.exists(p(n))), None)
    if rep.device_node is None:
        if os.path.exists(p(MAINLINE_NODE)):
            rep.problems.append((f"only the mainline 'rocket' driver ({MAINLINE_NODE}) is present",
                                 "librknnrt needs the vendor rknpu driver:"
                                 " boot a vendor (BSP) kernel"))
        else:
            rep.problems.append(("no NPU device node (/dev/rknpu or /dev/dri/renderD129)",
                                 "enable the rknpu driver in the kernel / device tree"))
    elif not os.access(p(rep.device_node), os.R_OK | os.W_OK):
        rep.problems.append((f"no read/write access to {rep.device_node}",
                             "add the service user to the 'render' and 'video' groups"))
    for vf in DRIVER_VERSION_FILES:
        text = _read(p(vf))
        if text:
            m = re.search(r"v?(\d+\.\d+\.\d+)", text)
            rep.driver_version = m.group(1) if m else text.strip()
            break
    rep.runtime_lib = next((lib for lib in RUNTIME_LIBS if os.path.exists(p(lib))), None)
    if rep.runtime_lib is None:
        rep.problems.append(("librknnrt.so not found in /usr/lib",
                             "install librknnrt.so from rknn-toolkit2's runtime (rknpu2)"
                             " into /usr/lib"))
    else:
        rep.runtime_version = _runtime_version(p(rep.runtime_lib))
    rep.rknnlite_importable = importlib.util.find_spec("rknnlite") is not None
    if not rep.rknnlite_importable and python >= RKNNLITE_PYTHON_LIMIT:
        # Debian 13 ships Python 3.13; rknn-toolkit-lite2's wheels stop at 3.12.
        rep.problems.append((
            f"rknn-toolkit-lite2 has no wheel for Python {python[0]}.{python[1]}"
            " (its wheels stop at 3.12): models run on the CPU",
            "use Debian 12 or Ubuntu 22.04/24.04 (Python 3.11/3.12), or run npuserve from a"
            " Python 3.12 environment (e.g. uv python install 3.12) with"
            " pip install rknn-toolkit-lite2"))
    elif not rep.rknnlite_importable:
        rep.problems.append(("the rknn-toolkit-lite2 Python package is not installed",
                             "pip install rknn-toolkit-lite2 (aarch64, CPython 3.7-3.12)"))
    return rep
