"""Build npuserve_<version>_<arch>.deb for the machine it runs on.

    /usr/bin/python3 packaging/build_deb.py [--out dist]

What dh-virtualenv does, without a debian/ source tree: a virtual environment is made
with the system's python3 in a staging copy of /opt/npuserve, the project and its runtime
extras are installed into it from wheels (so installing the .deb needs no network and no
compiler), then its paths are rewritten to /opt/npuserve. The shared libraries inside are
scanned and the Debian packages that provide what they link against become Depends, the
way dpkg-shlibdeps would. Run it on the oldest release you target (Debian 12 here): the
wheels are built against its glibc and Python.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "packaging"
PREFIX = "/opt/npuserve"
# postgres: psycopg's binary wheel carries its own libpq, so index.backend = "postgres"
# works on an installed board with no pip and no extra Debian package.
EXTRAS = "cpu,npu,postgres"
MAINTAINER = "npuserve developers <dev@npuserve.org>"
# Keys the package sets in /etc/npuserve/config.toml; everything else stays commented.
PACKAGED_SETTINGS = {"state_dir": "/var/lib/npuserve", "server.preload": "embed"}
DESCRIPTION = """\
LAN model server for retrieval on RK3588-class boards
 npuserve loads embedding, reranking and query-expansion models once and serves
 every agent on the network: OpenAI /v1/embeddings, Cohere/Jina /v1/rerank,
 QMD's remote protocol and a document index (SQLite FTS5 + sqlite-vec, or
 PostgreSQL + pgvector shared by several boards) with BM25, vector and hybrid
 search. Models run on the RK3588 NPU through
 rknn-toolkit-lite2 where available and on the CPU through llama.cpp otherwise.
 It advertises itself over mDNS.
 .
 This package ships a self-contained Python environment in /opt/npuserve and
 no model weights: see `npuserve models prepare` and `npuserve models pull`."""


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)  # type: ignore[call-overload]


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def make_venv(stage: Path, python: str) -> Path:
    venv = stage / PREFIX.lstrip("/")
    run(python, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    # Not editable, no byte-code: postinst compiles against the final paths.
    run(pip, "install", "--quiet", "--no-compile", f"{ROOT}[{EXTRAS}]")
    return venv


# Not needed to run the daemon, and each trips lintian: apsw's optional SQLite command-line
# tools (non-PIE, own zlib), test suites of dependencies.
PRUNE = ["apsw/sqlite_extra_binaries", "*/tests", "*/*/tests"]


def prune(venv: Path) -> None:
    """An appliance's environment: no pip or setuptools (upgrades come as a new .deb),
    no test suites, shared objects not marked executable. Not stripped: wheels repaired by
    auditwheel/patchelf break when stripped (numpy's OpenBLAS then fails to load with "ELF
    load command address/offset not page-aligned")."""
    run(venv / "bin" / "python3", "-m", "pip", "uninstall", "--quiet", "--yes", "pip",
        "setuptools")
    site = next(venv.glob("lib/python3*/site-packages"))
    for pattern in PRUNE:
        for path in site.glob(pattern):
            shutil.rmtree(path)
    for path in site.rglob("*.so*"):
        if path.is_file() and not path.is_symlink() and _is_elf(path):
            path.chmod(0o644)


def relocate(venv: Path) -> None:
    """Rewrite the staging path to /opt/npuserve wherever a text file names it (script
    shebangs, activate scripts, pyvenv.cfg's command line)."""
    for cache in list(venv.rglob("__pycache__")):
        shutil.rmtree(cache)  # byte-code embeds the staging path; postinst recompiles
    old = str(venv).encode()
    for path in venv.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data:
            continue
        if b"\0" in data[:4096]:
            raise SystemExit(f"binary file names the staging path, cannot relocate: {path}")
        path.write_bytes(data.replace(old, PREFIX.encode()))


def dedupe_libraries(venv: Path) -> int:
    """Wheels cannot hold symlinks, so libfoo.so, libfoo.so.0 and libfoo.so.0.5.0 arrive as
    three copies (llama-cpp-python: ~25 MB wasted). Make the shorter names symlinks to the
    longest one again, as the libraries were installed before packing. Returns bytes saved."""
    saved = 0
    for lib in sorted(venv.rglob("*.so.*")) + sorted(venv.rglob("*.so")):
        if lib.is_symlink() or not lib.is_file():
            continue
        stem = lib.name.split(".so")[0] + ".so"
        siblings = [p for p in lib.parent.glob(stem + "*")
                    if p.is_file() and not p.is_symlink() and p != lib]
        target = max([lib, *siblings], key=lambda p: len(p.name))
        if target != lib or not siblings:
            continue
        data = target.read_bytes()
        for other in siblings:
            if other.stat().st_size == len(data) and other.read_bytes() == data:
                saved += len(data)
                other.unlink()
                other.symlink_to(target.name)
    return saved


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def shlib_depends(venv: Path, python: str) -> list[str]:
    """Debian packages providing the system libraries the environment's ELF files need."""
    bundled = {p.name for p in venv.rglob("*.so*") if p.is_file()}
    sonames: set[str] = set()
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink() and _is_elf(path):
            sonames.update(n for n in _needed(path) if n not in bundled)
    multiarch = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('MULTIARCH'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    cache = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    packages: set[str] = set()
    for soname in sorted(sonames):
        paths = [p for p in re.findall(rf"^\s+{re.escape(soname)} .*=> (\S+)$", cache, re.M)
                 if f"/{multiarch}/" in p]
        if not paths:
            raise SystemExit(f"no system library provides {soname} for {multiarch}")
        packages.add(_owner(Path(paths[0])))
    return sorted(packages)


def _owner(path: Path) -> str:
    real = os.path.realpath(path)
    # usrmerge: dpkg may know a library by its /lib or its /usr/lib spelling.
    for candidate in (real, real.replace("/usr/lib/", "/lib/", 1), str(path)):
        owner = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if owner.returncode == 0:
            return owner.stdout.split(":")[0]
    raise SystemExit(f"no Debian package owns {path}")


def python_depends(python: str) -> str:
    ver = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    major, minor = ver.split(".")
    # Wheels with compiled code are tied to this minor version's ABI.
    return f"python3 (>= {ver}), python3 (<< {major}.{int(minor) + 1})"


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def install_file(dest: Path, data: bytes | str, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data.encode() if isinstance(data, str) else data)
    dest.chmod(mode)


def write_payload(stage: Path, venv: Path, version: str) -> None:
    python = venv / "bin" / "python3"
    config = subprocess.run(
        [python, "-c", "import sys; from npuserve.daemon.config import render_example;"
         f"sys.stdout.write(render_example({PACKAGED_SETTINGS!r}))"],
        capture_output=True, text=True, check=True).stdout
    install_file(stage / "etc/npuserve/config.toml", config)
    install_file(stage / "lib/systemd/system/npuserve.service",
                 (HERE / "npuserve.service").read_text())
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    (stage / "usr/bin/npuserve").symlink_to(f"{PREFIX}/bin/npuserve")
    man = subprocess.run([python, HERE / "manpage.py"], capture_output=True, text=True,
                         check=True).stdout
    install_file(stage / "usr/share/man/man1/npuserve.1.gz", gzip_bytes(man.encode()))
    doc = stage / "usr/share/doc/npuserve"
    install_file(doc / "copyright", (HERE / "debian/copyright").read_text())
    install_file(doc / "changelog.gz", gzip_bytes(changelog(version).encode()))
    install_file(stage / "usr/share/lintian/overrides/npuserve",
                 (HERE / "debian/lintian-overrides").read_text())


def changelog(version: str) -> str:
    date = subprocess.run(["date", "-R", "-d", "@" + os.environ.get("SOURCE_DATE_EPOCH",
                           str(int(ROOT.joinpath("pyproject.toml").stat().st_mtime)))],
                          capture_output=True, text=True, check=True).stdout.strip()
    return (f"npuserve ({version}) unstable; urgency=medium\n\n"
            f"  * Release {version}; see README.md for what it contains.\n\n"
            f" -- {MAINTAINER}  {date}\n")


def write_control(stage: Path, venv: Path, version: str, arch: str, python: str) -> None:
    debian = stage / "DEBIAN"
    debian.mkdir()
    depends = [python_depends(python), "adduser", *shlib_depends(venv, python)]
    size_kb = sum(p.lstat().st_size for p in stage.rglob("*") if not p.is_dir()) // 1024
    control = (f"Package: npuserve\nVersion: {version}\nArchitecture: {arch}\n"
               f"Maintainer: {MAINTAINER}\nInstalled-Size: {size_kb}\n"
               f"Depends: {', '.join(depends)}\nSection: net\nPriority: optional\n"
               f"Homepage: https://github.com/npuserve/npuserve\n"
               f"Description: {DESCRIPTION}\n")
    install_file(debian / "control", control)
    install_file(debian / "conffiles", "/etc/npuserve/config.toml\n")
    for script in ("postinst", "prerm", "postrm"):
        install_file(debian / script, (HERE / "debian" / script).read_text(), 0o755)
    sums = []
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage)
        if rel.parts[0] in ("DEBIAN", "etc") or path.is_symlink() or not path.is_file():
            continue  # conffiles are checked by dpkg itself
        sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    install_file(debian / "md5sums", "".join(sums))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="where the .deb goes")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the target system's python3 (the venv links to it)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "deb", help="staging area")
    args = ap.parse_args(argv)
    for tool in ("dpkg-deb", "readelf", "dpkg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (build on Debian or Ubuntu)")
    version = project_version()
    arch = run("dpkg", "--print-architecture", capture_output=True).stdout.strip()
    stage = args.work / f"npuserve_{version}_{arch}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    venv = make_venv(stage, args.python)
    prune(venv)
    relocate(venv)
    print(f"deduplicated libraries: {dedupe_libraries(venv) >> 20} MB saved")
    write_payload(stage, venv, version)
    write_control(stage, venv, version, arch, args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    deb = args.out / f"npuserve_{version}_{arch}.deb"
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb)
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
