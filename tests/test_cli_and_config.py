"""The command line and configuration as a user meets them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from npuserve.daemon.config import ConfigError, load_config, render_example

from .conftest import start_daemon, wait_http


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSERVE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "npuserve.daemon.cli", *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_serve_answers_health_with_three_models_and_stops_on_sigterm(state_dir: Path):
    proc, port = start_daemon(state_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as resp:
            body = json.load(resp)
        assert body["ok"] is True
        assert set(body["models"]) == {"embed", "rerank", "generate"}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/embed",
                                     data=json.dumps({"text": "hi"}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            assert len(json.load(resp)["embedding"]) == 384
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"listening on http://127.0.0.1:{port}" in out
    assert "embed  -> all-minilm-l6-v2 on cpu" in out


def test_lan_bind_without_key_warns_loudly(state_dir: Path):
    proc, port = start_daemon(state_dir, "--host", "0.0.0.0")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "WITHOUT an API key" in out


def test_health_is_503_with_reason_when_models_missing(tmp_path: Path):
    proc, port = start_daemon(tmp_path / "empty-state")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
            raise AssertionError("expected 503")
        except urllib.error.HTTPError as err:
            assert err.code == 503
            body = json.load(err)
        assert body["ok"] is False and "npuserve models prepare" in body["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_config_errors_name_the_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 80\n")
    res = run_cli("config", "--check", "--config", str(bad))
    assert res.returncode == 2 and "server.prot: unknown key" in res.stderr
    bad.write_text('[scheduler]\npolicy = "greedy"\n')
    res = run_cli("config", "--check", "--config", str(bad))
    assert res.returncode == 2 and "scheduler.policy: must be one of" in res.stderr
    bad.write_text("[server]\nport = \"eighty\"\n")
    res = run_cli("config", "--check", "--config", str(bad))
    assert "server.port: expected int" in res.stderr
    res = run_cli("config", "--check", env={"NPUSERVE_SERVER_PORTT": "1"})
    assert res.returncode == 2 and "NPUSERVE_SERVER_PORTT: unknown" in res.stderr
    res = run_cli("serve", "--set", "models.embed.n_ctx=-5")
    assert res.returncode == 2 and "models.embed.n_ctx: must be >= 0" in res.stderr
    res = run_cli("serve", "--set", "scheduler.memory_budget_mb=-1")
    assert res.returncode == 2 and "scheduler.memory_budget_mb: must be >= 0" in res.stderr
    res = run_cli("serve", "--set", "scheduler.anticipate_ms=-50")
    assert res.returncode == 2 and "scheduler.anticipate_ms: must be >= 0" in res.stderr
    res = run_cli("serve", "--set", "models.rerank.lanes=0")  # no context to rerank on
    assert res.returncode == 2 and "models.rerank.lanes: must be >= 1" in res.stderr
    res = run_cli("serve", "--set", "server.preload=embed,rerankk")
    assert res.returncode == 2 and "server.preload: unknown task(s) rerankk" in res.stderr
    # The test suite's own variables (NPUSERVE_TEST_*) are not config keys.
    assert load_config(env={"NPUSERVE_TEST_MODELS": "/x", "HOME": str(tmp_path)})


def test_precedence_file_env_flags(tmp_path: Path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[server]\nport = 1000\nhost = \"0.0.0.0\"\n[scheduler]\nkeep_alive = 5\n")
    cfg = load_config(cfg_file, env={"NPUSERVE_SERVER_PORT": "2000"},
                      overrides={"scheduler.keep_alive": "7.5"})
    assert cfg.get("server.port") == 2000  # env beats file
    assert cfg.get("server.host") == "0.0.0.0"  # file beats default
    assert cfg.get("scheduler.keep_alive") == 7.5  # flag beats file
    with pytest.raises(ConfigError, match="models.rerank.device"):
        load_config(None, env={"NPUSERVE_MODELS_RERANK_DEVICE": "gpu"})


def test_state_dir_defaults(tmp_path: Path):
    user = load_config(None, env={"HOME": str(tmp_path)})
    assert user.state_dir == tmp_path / ".local/share/npuserve"
    xdg = load_config(None, env={"XDG_DATA_HOME": str(tmp_path / "x")})
    assert xdg.state_dir == tmp_path / "x/npuserve"
    service = load_config(None, env={"STATE_DIRECTORY": "/var/lib/npuserve"})
    assert service.state_dir == Path("/var/lib/npuserve")
    assert load_config(None, env={"NPUSERVE_STATE_DIR": "/srv/n"}).state_dir == Path("/srv/n")


def test_example_config_lists_every_key_and_parses(tmp_path: Path):
    text = render_example()
    uncommented = "\n".join(
        line[1:] if line.startswith("#") and "=" in line and not line.startswith("# ") else line
        for line in text.splitlines())
    data = tomllib.loads(uncommented)
    assert data["server"]["port"] == 7832
    assert "template" in data["models"]["rerank"]
    path = tmp_path / "full.toml"
    path.write_text(uncommented)
    assert load_config(path, env={}).get("server.port") == 7832


def test_models_prepare_twice_does_nothing_the_second_time(models_dir: Path, tmp_path: Path):
    state = tmp_path / "s"
    state.mkdir()
    (state / "models").symlink_to(models_dir)
    manifest = models_dir / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    res = run_cli("models", "prepare", "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    assert "all-minilm-l6-v2: present" in res.stdout
    assert "smollm2-135m-instruct: present" in res.stdout
    assert manifest.stat().st_mtime_ns == mtime
    data = json.loads(manifest.read_text())["models"]
    assert data["all-minilm-l6-v2"]["tasks"] == ["embed"]
    assert len(data["smollm2-135m-instruct"]["sha256"]) == 64
    listing = run_cli("models", "list", "--state-dir", str(state))
    assert "embed   -> all-minilm-l6-v2 on cpu [ok]" in listing.stdout


def test_doctor_explains_no_npu(state_dir: Path):
    res = run_cli("doctor", "--state-dir", str(state_dir))
    assert "no usable NPU: models run on the CPU" in res.stdout
    assert "fix:" in res.stdout
    assert "verdict: ready" in res.stdout and res.returncode == 0
