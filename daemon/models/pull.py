"""`npuserve models pull REPO FILE`: a GGUF model from a Hugging Face hub into the state
directory, checked and registered for a task.

huggingface_hub does the transfer (progress bar; an interrupted download resumes from its
`.incomplete` file, also across runs) and honours HF_ENDPOINT, so a mirror or a local
stand-in works. It does not verify content, so this module does: the hub's ETag for an LFS
file is its sha256, and `--sha256` pins one explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npuserve.daemon.config import TASK_CTX_DEFAULT, ConfigError, load_config, set_config_key
from npuserve.daemon.models.store import ModelRecord, read_manifest, sha256_file, write_manifest

Say = Callable[[str], None]
SHA256 = re.compile(r"^[0-9a-f]{64}$")


# QMD's own default models (QMD main, src/llm.ts), by task: (repository, file, the names
# QMD's clients send for it, registered as aliases).
PRESETS: dict[str, list[tuple[str, str, str, list[str]]]] = {
    "qmd": [
        ("embed", "ggml-org/embeddinggemma-300M-GGUF", "embeddinggemma-300M-Q8_0.gguf",
         ["embeddinggemma", "embeddinggemma-300M-Q8_0"]),
        ("rerank", "ggml-org/Qwen3-Reranker-0.6B-Q8_0-GGUF", "qwen3-reranker-0.6b-q8_0.gguf",
         ["qwen3-reranker", "Qwen3-Reranker-0.6B"]),
        ("expand", "tobil/qmd-query-expansion-1.7B-gguf", "qmd-query-expansion-1.7B-q4_k_m.gguf",
         ["qmd-query-expansion", "qmd-query-expansion-1.7B"]),
    ],
}


class PullError(Exception):
    """A download that failed or does not match its checksum; nothing is registered."""


@dataclass(frozen=True)
class Pulled:
    path: Path
    sha256: str
    size: int
    commit: str | None


def _hub() -> object:
    try:
        import huggingface_hub
    except ImportError:
        raise PullError("huggingface_hub is not installed: pip install huggingface_hub") from None
    return huggingface_hub


def expected_sha256(repo: str, filename: str, revision: str) -> tuple[str | None, str | None]:
    """The hub's sha256 for an LFS file (None for small git-stored files) and the commit."""
    hub = _hub()
    url = hub.hf_hub_url(repo, filename, revision=revision)  # type: ignore[attr-defined]
    try:
        meta = hub.get_hf_file_metadata(url)  # type: ignore[attr-defined]
    except Exception as exc:  # the hub's errors are many classes; all mean "cannot pull"
        raise PullError(f"{repo}/{filename}@{revision}: {exc}") from None
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    return (etag if SHA256.match(etag) else None), meta.commit_hash


def download(repo: str, filename: str, models_dir: Path, revision: str = "main",
             sha256: str | None = None, say: Say = print) -> Pulled:
    """Download into models_dir/<owner>--<name>/<filename> and verify it."""
    hub = _hub()
    expected, commit = expected_sha256(repo, filename, revision)
    if sha256 and expected and sha256.lower() != expected:
        raise PullError(f"--sha256 {sha256} differs from the hub's {expected} for {filename}")
    want = (sha256 or expected or "").lower() or None
    local_dir = models_dir / repo.replace("/", "--")
    say(f"downloading {repo}/{filename} ({revision}) to {local_dir}")
    try:
        path = Path(hub.hf_hub_download(  # type: ignore[attr-defined]
            repo, filename, revision=revision, local_dir=local_dir))
    except Exception as exc:
        raise PullError(f"download of {repo}/{filename} failed: {exc}") from None
    say("verifying checksum")
    digest = sha256_file(path)
    if want is not None and digest != want:
        path.unlink(missing_ok=True)  # a wrong file must not be picked up by the next start
        raise PullError(f"{filename}: sha256 {digest} but expected {want}; file removed")
    if want is None:
        say(f"note: the hub gave no sha256 for {filename} (not an LFS file); recorded {digest}")
    return Pulled(path=path, sha256=digest, size=path.stat().st_size, commit=commit)


def register(pulled: Pulled, repo: str, task: str, models_dir: Path,
             config_path: Path | None, say: Say = print) -> None:
    """Record the file in the manifest and point the task at it in the config file."""
    rel = str(pulled.path.relative_to(models_dir))
    name = pulled.path.stem.lower()
    records = read_manifest(models_dir)
    # tasks=[]: a pulled model serves a task through the config, never by replacing the
    # prepared default set's entries.
    records[name] = ModelRecord(file=rel, sha256=pulled.sha256, tasks=[], name=name,
                                source=f"hf:{repo}@{pulled.commit or 'unknown'}",
                                size=pulled.size)
    write_manifest(models_dir, records)
    if config_path is None:
        say(f"no config file to register it in; use --set models.{task}.path={pulled.path}"
            f" or NPUSERVE_MODELS_{task.upper()}_PATH={pulled.path}")
        return
    set_config_key(config_path, f"models.{task}.path", str(pulled.path))
    load_config(config_path, env={})  # the edited file must still be a valid config
    say(f"registered for {task} in {config_path}: models.{task}.path = {pulled.path}"
        " (restart or reload the daemon to use it)")


def chown_like(path: Path, reference: Path) -> None:
    """Run as root for a system install: give the files to the service's user."""
    if os.geteuid() != 0 or not reference.exists():
        return
    st = reference.stat()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chown(p, st.st_uid, st.st_gid)


def pull(repo: str, filename: str, task: str, models_dir: Path, config_path: Path | None,
         revision: str = "main", sha256: str | None = None, say: Say = print) -> Pulled:
    if task not in TASK_CTX_DEFAULT:
        raise ConfigError(f"--task {task!r}: choose from {', '.join(TASK_CTX_DEFAULT)}")
    if not filename.endswith(".gguf"):
        raise PullError(f"{filename}: only GGUF files are pulled; RKNN model directories come"
                        " from `npuserve convert` on an x86 host")
    pulled = download(repo, filename, models_dir, revision, sha256, say)
    register(pulled, repo, task, models_dir, config_path, say)
    chown_like(models_dir, models_dir.parent)
    return pulled


def pull_preset(name: str, models_dir: Path, config_path: Path | None, say: Say = print
                ) -> list[Pulled]:
    """Every file of a preset, each verified and registered for its task (with the names
    its clients send as aliases); a failure stops before the next file."""
    if name not in PRESETS:
        raise PullError(f"--preset {name!r}: choose from {', '.join(PRESETS)}")
    pulled = []
    for task, repo, filename, aliases in PRESETS[name]:
        say(f"{task}: {repo}/{filename}")
        pulled.append(pull(repo, filename, task, models_dir, config_path, say=say))
        if config_path is not None:
            set_config_key(config_path, f"models.{task}.aliases", aliases)
    if config_path is not None:
        load_config(config_path, env={})
    return pulled
