"""Two hosts on one machine: network namespaces joined by a veth pair.

The daemon runs in one namespace, discovery and the client in the other, so
everything crosses a real (virtual) link with real multicast. Addresses are
from TEST-NET-1 (192.0.2.0/24), used only inside these namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npuserve.daemon.mdns import instance_name, txt_record

NS_A, NS_B = f"npsa{os.getpid() % 10000}", f"npsb{os.getpid() % 10000}"
ADDR_A, ADDR_B = "192.0.2.1", "192.0.2.2"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    if sh("ip", "netns", "add", NS_A).returncode != 0:
        pytest.skip("this sandbox does not allow creating network namespaces")
    try:
        steps = [
            ("ip", "netns", "add", NS_B),
            ("ip", "link", "add", f"v{NS_A}", "type", "veth", "peer", "name", f"v{NS_B}"),
            ("ip", "link", "set", f"v{NS_A}", "netns", NS_A),
            ("ip", "link", "set", f"v{NS_B}", "netns", NS_B),
            ("ip", "-n", NS_A, "addr", "add", f"{ADDR_A}/24", "dev", f"v{NS_A}"),
            ("ip", "-n", NS_B, "addr", "add", f"{ADDR_B}/24", "dev", f"v{NS_B}"),
            ("ip", "-n", NS_A, "link", "set", f"v{NS_A}", "up"),
            ("ip", "-n", NS_B, "link", "set", f"v{NS_B}", "up"),
            ("ip", "-n", NS_A, "link", "set", "lo", "up"),
            ("ip", "-n", NS_B, "link", "set", "lo", "up"),
        ]
        for step in steps:
            res = sh(*step)
            if res.returncode != 0:
                pytest.skip(f"cannot build the two-host network ({' '.join(step)}):"
                            f" {res.stderr.strip()}")
        yield
    finally:
        sh("ip", "netns", "del", NS_A)
        sh("ip", "netns", "del", NS_B)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def start_daemon_in(state_dir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    return subprocess.Popen(
        in_ns(NS_A, sys.executable, "-m", "npuserve.daemon.cli", "serve", "--host", "0.0.0.0",
              "--port", "7832", "--state-dir", str(state_dir), "--set", "server.name=board one"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def from_b(code: str, timeout: float = 60) -> object:
    res = subprocess.run(in_ns(NS_B, sys.executable, "-c", code), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


DISCOVER = ("import json; from npuserve.daemon.client import discover;"
            " print(json.dumps([{'name': d.name, 'url': d.url, 'txt': d.txt}"
            " for d in discover(4)]))")


def wait_discovered(expect: int, tries: int = 5) -> list[dict]:
    found: list[dict] = []
    for _ in range(tries):
        found = from_b(DISCOVER)  # type: ignore[assignment]
        if len(found) == expect:
            return found
    return found


@pytest.mark.slow  # slow: two network namespaces and three daemon starts
def test_discovery_and_client_across_a_link_and_after_restart(two_hosts, state_dir):
    proc = start_daemon_in(state_dir)
    try:
        found = wait_discovered(1)
        assert len(found) == 1, found
        d = found[0]
        assert d["name"] == "board one" and d["url"] == f"http://{ADDR_A}:7832"
        txt = d["txt"]
        assert txt["txtvers"] == "1" and txt["embed"] == "all-minilm-l6-v2"
        assert txt["gen"] == "smollm2-135m-instruct" and txt["auth"] == "0"
        assert txt["dev"] == "embed:cpu,rerank:cpu,expand:cpu" and int(txt["timeout"]) > 0
        assert "qmd" in txt["api"]
        out = from_b("import json; from npuserve.daemon.client import Client;"
                     " c = Client(discover=True, discover_timeout=4);"
                     " print(json.dumps([len(c.embed('hello from B')), c.url,"
                     " c.rerank('cats', ['cats sleep', 'stocks fell'])[0]['file']]))")
        assert out[0] == 384 and out[1] == f"http://{ADDR_A}:7832"
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    assert "mDNS: advertising 'board one'" in log
    # Goodbye packets: the stopped daemon is gone from browsers at once.
    assert wait_discovered(0, tries=2) == []
    proc = start_daemon_in(state_dir)
    try:
        again = wait_discovered(1)
        assert [d["name"] for d in again] == ["board one"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_loopback_daemon_is_not_advertised(state_dir):
    from .conftest import start_daemon, wait_http

    proc, port = start_daemon(state_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "not advertising, 127.0.0.1 is loopback-only" in out


def test_txt_record_fits_and_names_are_labels():
    long = {"embed": "e" * 200, "rerank": "r" * 200, "gen": "g" * 200, "version": "0.1.0"}
    txt = txt_record(long)
    assert list(txt)[0] == "txtvers"
    assert sum(2 + len(k) + len(v) for k, v in txt.items()) <= 400
    assert all(len(k) <= 9 for k in txt)
    name = instance_name("ä" * 40)
    assert len(name.encode()) <= 63 and name == "ä" * 31


def test_client_imports_without_model_runtimes():
    """An agent's laptop installs the client without llama.cpp, numpy or the NPU runtime."""
    code = ("import sys\n"
            "for mod in ('llama_cpp', 'numpy', 'rknnlite', 'onnxruntime', 'apsw'):\n"
            "    sys.modules[mod] = None  # importing it would now fail\n"
            "from npuserve.daemon.client import AsyncClient, Client, discover\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
