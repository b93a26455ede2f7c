"""Which CPUs keep llama.cpp's repacked weight buffers: all but those with AMX, where a
native build's AMX buffer crashed every quantized rerank and expansion (segfault)."""

from __future__ import annotations

from pathlib import Path

from npuserve.fallback.llama_common import cpu_flags, extra_buffers_safe

XEON = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
        "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
EPYC = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma f16c\n"
RK3588 = "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"


def _flags(tmp_path: Path, text: str) -> set[str]:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return cpu_flags(path)


def test_amx_cpus_turn_extra_buffers_off(tmp_path):
    assert "amx_int8" in _flags(tmp_path, XEON)
    assert extra_buffers_safe(_flags(tmp_path, XEON)) is False


def test_other_cpus_keep_them(tmp_path):
    assert extra_buffers_safe(_flags(tmp_path, EPYC)) is True
    board = _flags(tmp_path, RK3588)
    assert "asimddp" in board and extra_buffers_safe(board) is True


def test_unreadable_cpuinfo_keeps_them(tmp_path):
    assert cpu_flags(tmp_path / "missing") == set()
    assert extra_buffers_safe(set()) is True


def test_this_machine_is_read():
    flags = cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags, "no flags or Features line read from /proc/cpuinfo"
