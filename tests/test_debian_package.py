"""The .deb, for real: built by packaging/build_deb.py, installed with dpkg into a fresh
Debian 12 root made by debootstrap, started there as the `npuserve` user with the packaged
config, upgraded with the config and state kept, purged with the state gone.

Needs root, debootstrap, dpkg-deb and Debian's mirror; skipped without them unless
NPUSERVE_TEST_REQUIRE_PACKAGING=1 (CI sets it), which turns a skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pytest

from .conftest import free_port, http_json
from .pg_support import fresh_database, pg_server  # noqa: F401 - the fixture, by name

ROOT = Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("NPUSERVE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "npuserve-tests"

pytestmark = pytest.mark.slow


def _require() -> None:
    missing = [t for t in ("debootstrap", "dpkg-deb", "chroot") if shutil.which(t) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (debootstrap, chroot, mount)"
    elif missing:
        reason = f"needs {', '.join(missing)} (apt-get install debootstrap)"
    elif not Path("/usr/bin/python3").exists():
        reason = "needs Debian's /usr/bin/python3 to build the package"
    if reason:
        if os.environ.get("NPUSERVE_TEST_REQUIRE_PACKAGING") == "1":
            pytest.fail(f"packaging test required but {reason}")
        pytest.skip(reason)


def sh(*cmd: str | Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {res.returncode}\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require()
    if os.environ.get("NPUSERVE_TEST_DEB"):  # a package built beforehand (the arm64 workflow)
        return Path(os.environ["NPUSERVE_TEST_DEB"]).resolve()
    out = tmp_path_factory.mktemp("dist")
    sh("/usr/bin/python3", ROOT / "packaging" / "build_deb.py", "--out", out,
       "--work", out / "work")
    shutil.rmtree(out / "work")
    (found,) = out.glob("npuserve_*.deb")
    return found


def depends_of(deb: Path) -> list[str]:
    text = sh("dpkg-deb", "-f", deb, "Depends").stdout
    return sorted({re.split(r"[\s(]", d.strip())[0] for d in text.split(",")})


@pytest.fixture(scope="module")
def debian_root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh Debian 12 minbase with only the package's dependencies: dpkg -i must then
    succeed with no network. /proc and /dev are mounted for the daemon's processes."""
    root = tmp_path_factory.mktemp("bookworm") / "root"
    cache = CACHE / "debootstrap"
    cache.mkdir(parents=True, exist_ok=True)
    sh("debootstrap", "--variant=minbase", f"--include={','.join(depends_of(deb))}",
       f"--cache-dir={cache}", "bookworm", root, MIRROR, timeout=1200)
    mounts = [root / "proc", root / "dev"]
    sh("mount", "-t", "proc", "proc", mounts[0])
    sh("mount", "--rbind", "/dev", mounts[1])
    try:
        yield root
    finally:
        for m in reversed(mounts):
            sh("umount", "-R", "-l", m, check=False)


def chroot(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("chroot", root, *cmd, check=check)


def _uid_gid(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {user} in {root}/etc/passwd")


def _serve(root: Path, *args: str) -> subprocess.Popen:
    # As the service would run it: the npuserve user, the packaged /etc/npuserve/config.toml.
    return subprocess.Popen(
        ["chroot", "--userspec=npuserve:npuserve", str(root), "/usr/bin/env", "-i",
         "HOME=/var/lib/npuserve", "PATH=/usr/bin:/bin", "/opt/npuserve/bin/npuserve", "serve",
         *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_health(proc: subprocess.Popen, port: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            status, body = http_json(f"http://127.0.0.1:{port}/health")
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("no healthy answer from the packaged daemon")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_install_serve_upgrade_purge(deb: Path, debian_root: Path, models_dir: Path,
                                     request: pytest.FixtureRequest):
    root = debian_root
    shutil.copy(deb, root / "tmp" / deb.name)
    chroot(root, "dpkg", "-i", f"/tmp/{deb.name}")

    # The system user is in the NPU device groups; the service is enabled for boot.
    groups = chroot(root, "id", "-nG", "npuserve").stdout.split()
    assert {"npuserve", "render", "video"} <= set(groups), groups
    wants = root / "etc/systemd/system/multi-user.target.wants/npuserve.service"
    assert wants.is_symlink() and os.readlink(wants).endswith("npuserve.service")
    uid, gid = _uid_gid(root, "npuserve")
    conf = root / "etc/npuserve/config.toml"
    st = conf.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, gid)  # holds the API key
    assert (root / "var/lib/npuserve").stat().st_uid == uid
    assert (root / "usr/share/man/man1/npuserve.1.gz").is_file()

    # Models are copied in, as an admin does with a prepared set; the package has none.
    shutil.copytree(models_dir, root / "var/lib/npuserve/models", symlinks=False,
                    ignore=shutil.ignore_patterns("*-npu"))
    sh("chown", "-R", f"{uid}:{gid}", root / "var/lib/npuserve/models")

    port = free_port()
    proc = _serve(root, "--port", str(port))
    try:
        health = _wait_health(proc, port)
        assert health["ok"] is True, health
        status, body = http_json(f"http://127.0.0.1:{port}/v1/embeddings",
                            {"input": ["a packaged daemon"], "model": "x"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384
        assert http_json(f"http://127.0.0.1:{port}/collections", {"name": "notes"})[0] == 201
        status, _ = http_json(f"http://127.0.0.1:{port}/collections/notes/documents",
                         {"documents": [{"path": "a.md", "body": "kept across upgrades"}]})
        assert status in (200, 201), status
    finally:
        code, out = _stop(proc)
    assert code == 0, out
    assert (root / "var/lib/npuserve/index.sqlite").is_file()
    _serve_on_postgres(root, _postgres_or_none(request))

    # Upgrade: the admin's config edit and the state survive a newer package, and the
    # upgraded daemon uses both (it listens where the edit says, finds the document).
    port = free_port()
    conf.write_text(conf.read_text().replace("#port = 7832", f"port = {port}  # admin edit"))
    newer = _rebuild_with_version(deb, root / "tmp", "0.1.0+upgrade1")
    chroot(root, "dpkg", "-i", f"/tmp/{newer.name}")
    assert f"port = {port}  # admin edit" in conf.read_text()
    assert chroot(root, "dpkg-query", "-W", "-f=${Version}", "npuserve").stdout == \
        "0.1.0+upgrade1"
    proc = _serve(root)
    try:
        assert _wait_health(proc, port)["ok"] is True
        status, hits = http_json(f"http://127.0.0.1:{port}/search?q=upgrades")
        assert status == 200 and [h["displayPath"] for h in hits["results"]] == ["notes/a.md"], hits
    finally:
        code, out = _stop(proc)
    assert code == 0, out

    chroot(root, "dpkg", "--purge", "npuserve")
    for gone in ("var/lib/npuserve", "var/cache/npuserve", "etc/npuserve", "opt/npuserve",
                 "usr/bin/npuserve", "lib/systemd/system/npuserve.service"):
        assert not (root / gone).exists(), f"/{gone} left after purge"
    assert not wants.exists()
    # --list exits 1 when no override is left at all.
    assert "npuserve" not in chroot(root, "dpkg-statoverride", "--list", check=False).stdout


def _postgres_or_none(request: pytest.FixtureRequest) -> object | None:
    """The test's PostgreSQL; where it cannot start, the rest of the package test still
    runs (and CI, which requires the packaging test whole, fails instead)."""
    try:
        return request.getfixturevalue("pg_server")
    except pytest.skip.Exception as exc:
        if os.environ.get("NPUSERVE_TEST_REQUIRE_PACKAGING") == "1":
            pytest.fail(f"packaging test required but PostgreSQL cannot start: {exc}")
        return None


def _serve_on_postgres(root: Path, server: object | None) -> None:
    """The package alone runs the shared index: its environment brings psycopg (with its
    own libpq) and pgvector, so a board joins a PostgreSQL index with two config keys."""
    if server is None:
        return
    uri = urlsplit(fresh_database(server))
    sockets = Path(dict(parse_qsl(uri.query))["host"])
    # The socket file alone is bound in: its directory (PGDATA) is closed to other users.
    (sock,) = [p for p in sockets.glob(".s.PGSQL.*") if p.suffix != ".lock"]
    mount = root / "run" / "pg" / sock.name
    mount.parent.mkdir(parents=True, exist_ok=True)
    mount.touch()
    sh("mount", "--bind", sock, mount)
    try:
        dsn = urlunsplit(uri._replace(query="host=/run/pg"))
        port = free_port()
        proc = _serve(root, "--port", str(port), "--set", "index.backend=postgres",
                      "--set", f"index.dsn={dsn}")
        try:
            assert _wait_health(proc, port)["ok"] is True
            assert http_json(f"http://127.0.0.1:{port}/collections", {"name": "shared"})[0] == 201
            status, _ = http_json(f"http://127.0.0.1:{port}/collections/shared/documents",
                                  {"documents": [{"path": "b.md", "body": "one corpus, boards"}]})
            assert status in (200, 201), status
            status, hits = http_json(f"http://127.0.0.1:{port}/search?q=corpus")
            assert status == 200 and [h["displayPath"] for h in hits["results"]] == \
                ["shared/b.md"], hits
        finally:
            code, out = _stop(proc)
        assert code == 0, out
    finally:
        sh("umount", "-l", mount, check=False)


def _rebuild_with_version(deb: Path, where: Path, version: str) -> Path:
    tree = where / "repack"
    sh("dpkg-deb", "-R", deb, tree)
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(),
                              flags=re.M))
    out = where / f"npuserve_{version}.deb"
    sh("dpkg-deb", "--root-owner-group", "-Zxz", "-z1", "--build", tree, out)
    shutil.rmtree(tree)
    return out


def test_lintian_clean_or_justified(deb: Path):
    if shutil.which("lintian") is None:
        if os.environ.get("NPUSERVE_TEST_REQUIRE_PACKAGING") == "1":
            pytest.fail("lintian is required (apt-get install lintian)")
        pytest.skip("lintian is not installed")
    res = sh("lintian", "--no-tag-display-limit", "--fail-on", "none", deb, timeout=1800)
    # Overridden tags are silent; anything printed is an error, warning or info tag
    # without a justified override in packaging/debian/lintian-overrides.
    tags = [line for line in res.stdout.splitlines() if re.match(r"^[EWI]: ", line)]
    assert not tags, "\n".join(tags[:50])
