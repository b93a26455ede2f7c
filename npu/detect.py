"""What NPU the board offers: SoC, device node, driver, runtime library, Python runtime.

Each probe reads files only; nothing here loads the vendor runtime, so the
report is safe to run anywhere (x86 CI included).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SocProfile:
    """What a Rockchip SoC's NPU offers: cores (one RKNNLite context each), the
    rknn-toolkit2 target_platform its graphs must be built for, and whether Rockchip's
    RKLLM runtime supports it."""

    cores: int
    target: str
    rkllm: bool


# Longest names first: "rk3588s" must not be read as "rk3588". RKLLM: rknn-llm supports
# the RK3588 and RK3576 series (and the RK3562 since 1.2); the RK3566/RK3568 have no RKLLM.
SOC_PROFILES = {
    "rk3588s": SocProfile(3, "rk3588", True),
    "rk3588": SocProfile(3, "rk3588", True),
    "rk3576": SocProfile(2, "rk3576", True),
    "rk3568": SocProfile(1, "rk3568", False),
    "rk3566": SocProfile(1, "rk3566", False),
    "rk3562": SocProfile(1, "rk3562", True),
}
SOCS = tuple(SOC_PROFILES)
# Device node -> its sysfs class entry; the driver bound to it is <entry>/device/driver.
DEVICE_NODES = {"/dev/rknpu": "/sys/class/misc/rknpu",
                "/dev/dri/renderD129": "/sys/class/drm/renderD129"}
MAINLINE_NODE = "/dev/accel/accel0"
MAINLINE_SYSFS = "/sys/class/accel/accel0"
VENDOR_DRIVER = "RKNPU"  # the platform driver name of Rockchip's rknpu
MAINLINE_DRIVER = "rocket"
DRIVER_VERSION_FILES = ("/proc/rknpu/version", "/sys/kernel/debug/rknpu/version")
RUNTIME_LIBS = ("/usr/lib/librknnrt.so", "/usr/lib/aarch64-linux-gnu/librknnrt.so")
RKLLM_LIBS = ("/usr/lib/librkllmrt.so", "/usr/lib/aarch64-linux-gnu/librkllmrt.so")
# librkllmrt warns "Your rknpu driver version is too low, please upgrade to 0.9.7" below
# this (seen with runtime 1.1.2 on driver 0.8.2, where models then failed to load).
RKLLM_MIN_DRIVER = (0, 9, 7)
# The rkllm.h npuserve's ctypes structs describe (npu/rkllm_api.py); others are refused.
RKLLM_VERSION = "1.3.0"


@dataclass
class NpuReport:
    soc: str | None = None
    device_node: str | None = None
    driver: str | None = None  # the kernel driver bound to the node (None: not readable)
    driver_version: str | None = None
    runtime_lib: str | None = None
    runtime_version: str | None = None
    rknnlite_importable: bool = False
    rkllm_lib: str | None = None
    rkllm_version: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (problem, fix)
    # Why RKLLM cannot run here, apart from `problems` (which stop the NPU altogether).
    rkllm_problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def profile(self) -> SocProfile | None:
        return SOC_PROFILES.get(self.soc or "")

    @property
    def rkllm_usable(self) -> bool:
        return self.usable and self.rkllm_lib is not None and not self.rkllm_problems

    def verdict(self) -> str:
        if self.usable:
            prof = self.profile
            cores = f", {prof.cores} core{'s' if prof.cores > 1 else ''}" if prof else ""
            return (f"NPU available ({self.soc}{cores}, driver {self.driver or VENDOR_DRIVER}"
                    f" {self.driver_version or 'version unknown'})")
        return "no usable NPU: models run on the CPU"

    def runtimes(self) -> list[str]:
        """One line per Rockchip runtime: found or not, its version, what it would run."""
        rknn = (f"librknnrt {self.runtime_version or 'version unknown'} ({self.runtime_lib})"
                if self.runtime_lib else "librknnrt: not found")
        rkllm = (f"librkllmrt {self.rkllm_version or 'version unknown'} ({self.rkllm_lib})"
                 if self.rkllm_lib else "librkllmrt: not found")
        rkllm_use = ("usable" if self.rkllm_usable
                     else "not usable: " + "; ".join(p for p, _ in self.rkllm_problems)
                     if self.rkllm_problems else "not usable")
        return [f"{rknn} - RKNN graphs (embedding, cross-encoder, rerank):"
                f" {'usable' if self.usable else 'not usable'}",
                f"{rkllm} - RKLLM (.rkllm models: embed, rerank, expansion):"
                f" {rkllm_use}"]


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


def _driver_of(root: str, sysfs_entry: str) -> str | None:
    """The name of the kernel driver bound to a device (the last part of its sysfs
    device/driver link), None when sysfs does not say."""
    link = os.path.join(root, sysfs_entry.lstrip("/"), "device", "driver")
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def _lib_version(path: str, pattern: bytes) -> str | None:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    match = re.search(pattern, data)
    return match.group(1).decode("ascii", "replace").strip() if match else None


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
    _probe_node(rep, root, p)
    _probe_driver_version(rep, p)
    _probe_runtimes(rep, p, python)
    return rep


def _probe_node(rep: NpuReport, root: str, p: Callable[[str], str]) -> None:
    """The vendor driver's node, and which driver really owns it: on mainline kernels
    renderD129 may be another device's, and the NPU is the `rocket` driver's accel0."""
    for node, sysfs in DEVICE_NODES.items():
        if not os.path.exists(p(node)):
            continue
        driver = _driver_of(root, sysfs)
        if driver is not None and driver != VENDOR_DRIVER:
            rep.problems.append((f"{node} belongs to the '{driver}' driver, not Rockchip's"
                                 f" {VENDOR_DRIVER}", _vendor_kernel_fix(driver)))
            return
        rep.device_node, rep.driver = node, driver
        break
    if rep.device_node is None and not rep.problems:
        if os.path.exists(p(MAINLINE_NODE)):
            owner = _driver_of(root, MAINLINE_SYSFS) or MAINLINE_DRIVER
            rep.problems.append((
                f"the NPU is driven by the mainline '{owner}' driver ({MAINLINE_NODE}):"
                " Rockchip's librknnrt and librkllmrt only talk to the vendor rknpu driver,"
                " and mainline's own stack (Mesa Teflon) runs TFLite INT8 CNNs, not these"
                " transformers", _vendor_kernel_fix(owner)))
        else:
            rep.problems.append(("no NPU device node (/dev/rknpu or /dev/dri/renderD129)",
                                 "enable the rknpu driver in the kernel / device tree"))
        return
    if rep.device_node and not os.access(p(rep.device_node), os.R_OK | os.W_OK):
        rep.problems.append((f"no read/write access to {rep.device_node}",
                             "add the service user to the 'render' and 'video' groups"))


def _vendor_kernel_fix(driver: str) -> str:
    return (f"boot a vendor (BSP) kernel with Rockchip's rknpu driver (the board maker's"
            f" or Armbian's 'vendor' kernel, 5.10/6.1); until then npuserve runs every model"
            f" on the CPU ('{driver}' cannot be used by Rockchip's runtimes)")


def _probe_driver_version(rep: NpuReport, p: Callable[[str], str]) -> None:
    for vf in DRIVER_VERSION_FILES:
        text = _read(p(vf))
        if text:
            m = re.search(r"v?(\d+\.\d+\.\d+)", text)
            rep.driver_version = m.group(1) if m else text.strip()
            break
    have = _version(rep.driver_version)
    if have is not None and have < RKLLM_MIN_DRIVER:
        wanted = ".".join(map(str, RKLLM_MIN_DRIVER))
        rep.rkllm_problems.append((
            f"rknpu driver {rep.driver_version} is older than {wanted}, which librkllmrt"
            " needs", f"update the kernel to one with rknpu {wanted} or newer (0.9.8 is"
            " in rknn-llm's rknpu-driver/ and in current vendor kernels); RKNN graphs"
            " still run"))
    elif rep.driver_version is None and not rep.problems:
        rep.rkllm_problems.append((
            "the rknpu driver version is not readable (/proc/rknpu/version, or"
            " /sys/kernel/debug/rknpu/version as root)", "mount debugfs or run doctor as"
            " root to see it; librkllmrt checks it itself when it starts"))


def _probe_runtimes(rep: NpuReport, p: Callable[[str], str], python: tuple[int, int]) -> None:
    rep.runtime_lib = next((lib for lib in RUNTIME_LIBS if os.path.exists(p(lib))), None)
    if rep.runtime_lib is None:
        rep.problems.append(("librknnrt.so not found in /usr/lib",
                             "install librknnrt.so from rknn-toolkit2's runtime (rknpu2)"
                             " into /usr/lib"))
    else:
        rep.runtime_version = _runtime_version(p(rep.runtime_lib))
    rep.rkllm_lib = next((lib for lib in RKLLM_LIBS if os.path.exists(p(lib))), None)
    if rep.rkllm_lib is not None:
        rep.rkllm_version = _lib_version(p(rep.rkllm_lib),
                                         rb"rkllm-runtime version:? v?(\d+\.\d+\.\d+)")
    prof = rep.profile
    if prof is not None and not prof.rkllm:
        rep.rkllm_problems.append((f"RKLLM does not support the {rep.soc}",
                                   "causal LMs run on the CPU on this board"))
    elif rep.rkllm_lib is None:
        rep.rkllm_problems.append(("librkllmrt.so not found in /usr/lib",
                                   "install librkllmrt.so from rknn-llm's rkllm-runtime into"
                                   " /usr/lib (RKLLM runs .rkllm models)"))
    elif rep.rkllm_version != RKLLM_VERSION:
        rep.rkllm_problems.append((
            f"librkllmrt {rep.rkllm_version or 'of unknown version'}: npuserve speaks"
            f" rkllm.h {RKLLM_VERSION} only (the structs differ between versions)",
            f"install librkllmrt.so {RKLLM_VERSION} from rknn-llm's release-v{RKLLM_VERSION}"
            " (rkllm-runtime/Linux/librkllm_api/aarch64), with .rkllm files converted by"
            f" rkllm-toolkit {RKLLM_VERSION}"))
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
