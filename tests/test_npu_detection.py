"""`npuserve doctor` and the model plan on boards stood in for by directory trees (the
files the probes read: device tree, device nodes, sysfs driver links, the driver's version
file, the runtime libraries). rknn-toolkit-lite2 is made importable by a stand-in package
where a test needs a board whose Python side is complete. Untested on hardware."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from npuserve.daemon.cli import cmd_doctor
from npuserve.daemon.models.registry import npu_model_problems, plan_models
from npuserve.npu.detect import detect


class Board:
    """A board's root file system, as much of it as the probes read."""

    def __init__(self, root: Path, soc: str = "rk3588") -> None:
        self.root = root
        self.write("proc/device-tree/compatible",
                   f"radxa,rock-5b\x00rockchip,{soc}\x00".encode())

    def write(self, rel: str, data: bytes | str = b"") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def node(self, dev: str, sysfs: str, driver: str) -> None:
        """A device node, and its sysfs entry's link to the driver bound to it."""
        self.write(dev.lstrip("/"))
        entry = self.root / sysfs.lstrip("/") / "device"
        entry.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../bus/platform/drivers/{driver}", entry / "driver")

    def vendor(self, driver_version: str = "0.9.8", rkllm: bool = True,
               rkllm_version: str = "1.3.0") -> Board:
        self.node("/dev/rknpu", "/sys/class/misc/rknpu", "RKNPU")
        self.write("proc/rknpu/version", f"RKNPU driver: v{driver_version}\n")
        self.write("usr/lib/librknnrt.so", b"\x00librknnrt version: 2.3.2 (429f97ae6b@2025)\x00")
        if rkllm:
            self.write("usr/lib/librkllmrt.so", f"\x00rkllm-runtime version: {rkllm_version}\x00")
        return self


@pytest.fixture
def rknnlite(tmp_path, monkeypatch):
    """rknn-toolkit-lite2 importable (it only ships for aarch64)."""
    pkg = tmp_path / "site" / "rknnlite"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def doctor(cfg, board: Board, capsys) -> str:
    cmd_doctor(cfg, str(board.root))
    return capsys.readouterr().out


def test_vendor_driver_on_an_rk3588(tmp_path, rknnlite, make_config, capsys):
    board = Board(tmp_path / "board").vendor()
    rep = detect(str(board.root))
    assert rep.usable and rep.rkllm_usable
    assert (rep.driver, rep.driver_version, rep.profile.cores) == ("RKNPU", "0.9.8", 3)
    assert (rep.runtime_version, rep.rkllm_version) == ("2.3.2 (429f97ae6b@2025)", "1.3.0")
    out = doctor(make_config(), board, capsys)
    assert "NPU available (rk3588, 3 cores, driver RKNPU 0.9.8)" in out
    assert "librknnrt 2.3.2" in out and "librkllmrt 1.3.0" in out
    assert "RKLLM (.rkllm models: embed, rerank, expansion): usable" in out


def test_mainline_rocket_driver_says_why_and_what_to_do(tmp_path, rknnlite, make_config,
                                                         capsys):
    board = Board(tmp_path / "board")
    board.node("/dev/accel/accel0", "/sys/class/accel/accel0", "rocket")
    board.write("usr/lib/librknnrt.so", b"librknnrt version: 2.3.2\x00")
    rep = detect(str(board.root))
    assert not rep.usable
    [(problem, fix)] = rep.problems
    assert "mainline 'rocket' driver" in problem and "vendor rknpu driver" in problem
    assert "vendor (BSP) kernel" in fix
    out = doctor(make_config(), board, capsys)
    assert "no usable NPU: models run on the CPU" in out and "rocket" in out


def test_a_render_node_of_another_driver_is_not_the_npu(tmp_path, rknnlite):
    """Mainline kernels number render nodes differently: renderD129 may be the GPU's."""
    board = Board(tmp_path / "board")
    board.node("/dev/dri/renderD129", "/sys/class/drm/renderD129", "panthor")
    board.write("usr/lib/librknnrt.so", b"librknnrt version: 2.3.2\x00")
    rep = detect(str(board.root))
    assert not rep.usable and rep.device_node is None
    assert any("belongs to the 'panthor' driver" in p for p, _ in rep.problems)


def test_old_driver_keeps_rknn_and_refuses_rkllm(tmp_path, rknnlite, make_config, capsys):
    board = Board(tmp_path / "board").vendor(driver_version="0.8.2")
    rep = detect(str(board.root))
    assert rep.usable and not rep.rkllm_usable
    [(problem, fix)] = rep.rkllm_problems
    assert "0.8.2 is older than 0.9.7" in problem and "0.9.8" in fix
    out = doctor(make_config(), board, capsys)
    assert "RKNN graphs (embedding, cross-encoder, rerank): usable" in out
    assert "expansion): not usable: rknpu driver 0.8.2 is older than 0.9.7" in out


def test_rk3576_uses_its_two_cores_and_refuses_rk3588_graphs(tmp_path, rknnlite, make_config,
                                                             npu_model, capsys):
    board = Board(tmp_path / "board", soc="rk3576").vendor()
    rep = detect(str(board.root))
    assert rep.usable and (rep.profile.cores, rep.profile.target) == (2, "rk3576")

    def model_for(target: str) -> Path:
        out = tmp_path / f"minilm-{target}"
        out.mkdir()
        for f in npu_model.iterdir():
            if f.name != "manifest.json":
                (out / f.name).symlink_to(f)
        manifest = json.loads((npu_model / "manifest.json").read_text())
        (out / "manifest.json").write_text(json.dumps(
            manifest | {"toolkit_version": "2.3.2", "target_platform": target}))
        return out

    cfg = make_config(models__embed__path=str(model_for("rk3576")))
    plans, task_model = plan_models(cfg, str(board.root))
    embed = plans[task_model["embed"]]
    assert embed.device == "npu" and embed.spec.option("npu_cores") == 2

    cfg = make_config(models__embed__path=str(model_for("rk3588")))
    plans, task_model = plan_models(cfg, str(board.root))
    embed = plans[task_model["embed"]]
    assert embed.device == "cpu"
    assert "built for the rk3588, this board is an rk3576" in embed.device_reason
    [(problem, fix)] = npu_model_problems(cfg, rep)
    assert "--target rk3576" in fix
    assert "convert it again with --target rk3576" in doctor(cfg, board, capsys)


def test_no_npu_at_all(tmp_path, make_config, capsys):
    board = Board(tmp_path / "pc", soc="x86")  # a device tree without a Rockchip SoC
    rep = detect(str(board.root))
    assert rep.soc is None and not rep.usable
    out = doctor(make_config(), board, capsys)
    assert "no usable NPU" in out and "librknnrt" not in out
    plans, task_model = plan_models(make_config(), str(board.root))
    assert {plans[m].device for m in task_model.values()} == {"cpu"}


@pytest.fixture
def rkllm_dir(tmp_path, models_dir) -> Path:
    """An RKLLM directory whose .rkllm stands in for rkllm-toolkit's output (the plan reads
    the manifest only; nothing here loads it)."""
    from npuserve.npu.rkllm_convert import convert_rkllm
    from tests.conftest import rerank_gguf

    model = tmp_path / "qwen3-0.6b.rkllm"
    model.write_bytes(b"RKLLM model bytes")
    return convert_rkllm(rerank_gguf(models_dir), tmp_path / "smollm2-rkllm", "smollm2",
                         "rerank", rkllm=model, max_context_len=2048)


def test_rkllm_directory_goes_to_the_npu_only_where_rkllm_runs(tmp_path, rknnlite, make_config,
                                                               rkllm_dir, capsys):
    def rerank_plan(board: Board) -> tuple[str, str, str]:
        cfg = make_config(models__rerank__path=str(rkllm_dir),
                          models__rerank__cpu_path=str(rerank_gguf_of(rkllm_dir)))
        plans, task_model = plan_models(cfg, str(board.root))
        plan = plans[task_model["rerank"]]
        return plan.device, plan.spec.kind, plan.device_reason + doctor(cfg, board, capsys)

    device, kind, _ = rerank_plan(Board(tmp_path / "ok").vendor())
    assert (device, kind) == ("npu", "rkllm")

    device, _, said = rerank_plan(Board(tmp_path / "old").vendor(rkllm_version="1.2.1"))
    assert device == "cpu"
    assert "librkllmrt 1.2.1: npuserve speaks rkllm.h 1.3.0 only" in said
    assert "release-v1.3.0" in said  # what to do

    device, _, said = rerank_plan(Board(tmp_path / "rk3566", soc="rk3566").vendor())
    assert device == "cpu" and "RKLLM does not support the rk3566" in said

    device, _, said = rerank_plan(Board(tmp_path / "nolib").vendor(rkllm=False))
    assert device == "cpu" and "librkllmrt.so not found" in said


def rerank_gguf_of(rkllm_dir: Path) -> Path:
    return Path(json.loads((rkllm_dir / "manifest.json").read_text())["gguf"])
