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


def start_daemon_in(state_dir: Path, port: int = 7832, name: str = "board one",
                    *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    return subprocess.Popen(
        in_ns(NS_A, sys.executable, "-m", "npuserve.daemon.cli", "serve", "--host", "0.0.0.0",
              "--port", str(port), "--state-dir", str(state_dir), "--set",
              f"server.name={name}", *extra),
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


# Run in host B: discover, then 4 agents of /embed for LOAD_SECONDS; every call's (time,
# board) and every error surfaced to a caller, as JSON.
SPREAD = """
import json, sys, threading, time
from npuserve.daemon.client import Client, discover
found = discover(4)
print(json.dumps({"boards": sorted(d.url for d in found)}), flush=True)
start, calls, errors, lock = time.time(), [], [], threading.Lock()
def agent(k):
    # A client per agent (client.url is the board of its own latest call).
    client, n = Client(daemons=found, retries=4, backoff=0.05), 0
    while time.time() - start < %(seconds)s:
        try:
            assert len(client.embed(f"agent {k} call {n}")) == 384
            with lock:
                calls.append((time.time(), client.url))
        except BaseException as exc:
            with lock:
                errors.append(repr(exc))
            return
        n += 1
threads = [threading.Thread(target=agent, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"calls": calls, "errors": errors}), flush=True)
"""
LOAD_SECONDS, STOP_AFTER = 16, 8


@pytest.mark.slow  # slow: two daemons in a namespace, a 16 s load across the link
def test_discovered_boards_share_the_load_and_one_leaving_surfaces_no_error(
        two_hosts, state_dir, tmp_path, models_dir):
    """The client in host B discovers both boards of host A over mDNS (same embedding
    model), spreads its calls over them, and goes on through the other when one stops."""
    second = tmp_path / "second"
    second.mkdir()
    (second / "models").symlink_to(models_dir, target_is_directory=True)
    quiet = ("--set", "index.enabled=false", "--set", "models.embed.threads=1")
    boards = [start_daemon_in(state_dir, 7832, "board one", *quiet),
              start_daemon_in(second, 7833, "board two", *quiet)]
    try:
        assert len(wait_discovered(2)) == 2
        load = subprocess.Popen(in_ns(NS_B, sys.executable, "-c",
                                      SPREAD % {"seconds": LOAD_SECONDS}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = json.loads(load.stdout.readline())
        assert first["boards"] == [f"http://{ADDR_A}:7832", f"http://{ADDR_A}:7833"], first
        time.sleep(STOP_AFTER)
        stopped_at = time.time()
        boards[0].send_signal(signal.SIGTERM)  # board one leaves mid-load
        out, err = load.communicate(timeout=LOAD_SECONDS + 120)
        assert load.returncode == 0, err
    finally:
        for proc in boards:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == []
    before = [url for t, url in result["calls"] if t < stopped_at]
    after = [url for t, url in result["calls"] if t > stopped_at + 2]
    print(f"\nbefore the stop: {before.count(first['boards'][0])} / "
          f"{before.count(first['boards'][1])} calls; after: {len(after)}, all on board two")
    assert before.count(first["boards"][0]) > 0 and before.count(first["boards"][1]) > 0
    assert after and set(after) == {first["boards"][1]}


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
