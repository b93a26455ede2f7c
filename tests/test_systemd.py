"""The systemd unit (checked with systemd-analyze, since systemd is not PID 1 here) and
the notify protocol as a real daemon speaks it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "npuserve.service"


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's npuserve (verify checks it)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    exe = shutil.which("npuserve") or str(Path(sys.executable).parent / "npuserve")
    path = tmp_path / "npuserve.service"
    path.write_text(UNIT.read_text().replace("/opt/npuserve/bin/npuserve", exe))
    return path


def test_unit_verifies_without_warnings(unit_here: Path):
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_here)],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 even on unknown keys: any output at all is a failure.
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_unit_security_exposure_at_most_2_5(unit_here: Path):
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit_here)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
    assert match, res.stdout[-500:]
    assert float(match.group(1)) <= 2.5
    text = UNIT.read_text()
    assert "PrivateDevices=yes" not in text  # it would hide /dev/dri and /dev/rknpu
    assert "DeviceAllow=/dev/rknpu rw" in text and "Type=notify" in text


def test_daemon_speaks_the_notify_protocol(state_dir: Path, tmp_path: Path):
    """READY=1 comes after the preloaded model is resident, preceded by EXTEND_TIMEOUT_USEC
    for that load; WATCHDOG=1 flows throughout; STOPPING=1 extends the stop timeout."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    env.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "npuserve.daemon.cli", "serve",
                             "--state-dir", str(state_dir), "--port", str(port),
                             "--set", "server.preload=embed"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    messages: list[str] = []
    resident_at_ready: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                sum("WATCHDOG=1" in m for m in messages) < 3 or not resident_at_ready):
            messages.append(sock.recv(4096).decode())
            if "READY=1" in messages[-1]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ps", timeout=10) as r:
                    resident_at_ready = [m["name"] for m in json.load(r)["models"]]
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in "".join(messages):
            messages.append(sock.recv(4096).decode())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        sock.close()
    ready = [m for m in messages if "READY=1" in m]
    assert ready and f"STATUS=listening on 127.0.0.1:{port}" in ready[0]
    extend = next(i for i, m in enumerate(messages) if "EXTEND_TIMEOUT_USEC=" in m)
    assert extend < messages.index(ready[0]) and "STATUS=loading" in messages[extend]
    assert len(resident_at_ready) == 1, resident_at_ready  # the embedding model, loaded
    stopping = next(m for m in messages if "STOPPING=1" in m)
    assert re.search(r"EXTEND_TIMEOUT_USEC=4\d{7}\b", stopping), stopping  # 30 s + 10 s
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert proc.returncode == 0, out


def test_sighup_reloads_what_is_safe(state_dir: Path, tmp_path: Path):
    import json
    import urllib.request

    from .conftest import wait_http

    cfg = tmp_path / "config.toml"
    cfg.write_text("[scheduler]\nkeep_alive = 300\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "npuserve.daemon.cli", "serve", "--config",
                             str(cfg), "--state-dir", str(state_dir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def keep_alive() -> float:
        with urllib.request.urlopen(base + "/admin/models") as resp:
            return json.load(resp)["keep_alive"]

    try:
        wait_http(base + "/health")
        assert keep_alive() == 300
        cfg.write_text("[scheduler]\nkeep_alive = 7\npolicy = \"resident\"\n")
        proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            if keep_alive() == 7:
                break
            time.sleep(0.1)
        assert keep_alive() == 7
        cfg.write_text("[scheduler]\nkeep_alive = 9\nbogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert keep_alive() == 7 and proc.poll() is None  # a bad file changes nothing
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "need a restart: scheduler.policy" in out
    assert "reload refused" in out and "scheduler.bogus" in out
