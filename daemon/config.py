"""Configuration: a TOML file, overridden by NPUSERVE_* variables, overridden by flags.

Every key is declared once in SCHEMA with its type and default; the loader
rejects unknown keys and wrong types with a message that names the key, so a
typo in /etc/npuserve/config.toml stops the service at start-up instead of
being silently ignored.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM_CONFIG = Path("/etc/npuserve/config.toml")
ENV_PREFIX = "NPUSERVE_"
# Variables that are not config keys but are still ours.
ENV_NON_KEYS = {"NPUSERVE_CONFIG", "NPUSERVE_LOG_LEVEL", "NPUSERVE_WORKER_PYTHON"}
ENV_TEST_PREFIX = "NPUSERVE_TEST_"  # the test suite's own settings, not config keys

DEFAULT_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
    'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n"
    "<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None


_SERVER: dict[str, Key] = {
    "host": Key(str, "127.0.0.1", "bind address; anything but loopback needs api_key"),
    "port": Key(int, 7832, "TCP port", minimum=0),
    "api_key": Key(str, "", "Bearer key for every endpoint but /health (empty: none)"),
    "name": Key(str, "", "instance name for mDNS (empty: 'npuserve on <hostname>')"),
    "mdns": Key(bool, True, "advertise over mDNS/DNS-SD when listening on a LAN address"),
    "max_body_mb": Key(float, 50.0, "largest request body in MB (413 above)", minimum=0.001),
    "max_batch": Key(int, 512, "most texts or documents in one request", minimum=1),
    "max_text_chars": Key(int, 100_000, "longest single text in characters", minimum=1),
    "strict_models": Key(bool, False, "refuse (409) a request that names a model other than"
                         " the one serving its task or its aliases (off: serve it, say which"
                         " model answered, count it in /metrics)"),
    "max_tokens": Key(int, 1024, "chat and completion endpoints: most tokens one request may"
                      " generate (a larger max_tokens is lowered to this)", minimum=1),
    "shutdown_timeout": Key(float, 30.0, "seconds in-flight requests get on SIGTERM", minimum=0),
    "body_timeout": Key(float, 30.0, "seconds a client may take to send its request body"
                        " (408 after)", minimum=0.1),
    "preload": Key(str, "", "tasks whose models load before the service reports ready,"
                   " comma-separated, e.g. \"embed\" (empty: load on first use)"),
    "max_connections": Key(int, 512, "most open client connections (also kept below the"
                           " descriptor limit); at the cap the longest-idle one is closed for a"
                           " new one, or, all busy, the new one gets 503", minimum=8),
    "idle_timeout": Key(float, 15.0, "seconds an idle connection (or one whose request headers"
                        " never complete) stays open", minimum=1.0),
    "cors_origins": Key(list, [], "web origins allowed to call the API from a browser, e.g."
                        " [\"https://notes.example\"] (empty: none; any other Origin gets 403)"),
    "allowed_hosts": Key(list, [], "Host names the daemon answers to besides its own (localhost,"
                         " its host name, <host>.local, any IP address); others get 421, which"
                         " stops DNS rebinding"),
}
_SCHEDULER: dict[str, Key] = {
    "policy": Key(
        str, "auto", "models resident per device (auto: as many as fit in the memory"
        " available)", ("auto", "sequential", "resident")
    ),
    "keep_alive": Key(
        float, 300.0, "seconds an idle model stays loaded (0: unload at once, <0: never)"
    ),
    "aging_ms": Key(
        float, 10000.0, "a queue whose head waited this long takes the device next, however"
        " busy the resident model is", minimum=0
    ),
    "switch_hysteresis_ms": Key(
        float, 2000.0, "another queue's oldest request must be this much older than the"
        " resident model's before the device switches (at least two measured swaps)",
        minimum=0),
    "anticipate_ms": Key(
        float, 50.0, "after a batch, wait this long (at most a quarter of the swap) before"
        " swapping models: a pipeline's next stage arrives a few ms after its reply, and a"
        " swap decided without it serves a straggler instead (0: decide at once)", minimum=0),
    "coalesce_texts": Key(int, 64, "most texts merged into one embedding call", minimum=1),
    "coalesce_expansions": Key(int, 8, "most expansions generated side by side in one call",
                               minimum=1),
    "max_queue": Key(int, 4096, "most queued items before 503", minimum=1),
    "request_timeout": Key(
        float, 300.0, "the longest any request may take (QMD's client gives up at 300 s)",
        minimum=0.1),
    "deadline_multiplier": Key(
        float, 4.0, "a request's deadline: this many times its calibrated wait", minimum=1.0),
    "deadline_floor": Key(float, 30.0, "shortest deadline in seconds", minimum=0.1),
    "switching": Key(
        str, "aging", "model switching: aging (serve the resident queue, switch on the aging"
        " bound) or fifo (oldest request first; for comparison only)", ("aging", "fifo")),
    "memory_reserve_mb": Key(float, 512.0, "RAM kept free by the auto policy", minimum=0),
    "memory_budget_mb": Key(float, 0.0, "most RAM the auto policy lets resident models hold,"
                            " by their measured footprints (0: no cap but the free memory)",
                            minimum=0),
    "prefetch": Key(bool, False, "read the model to be loaded next into the page cache while"
                    " the current one computes, as far as free memory allows (off: no gain"
                    " measured under a 500 MB board limit)"),
}
_MODEL: dict[str, Key] = {
    "name": Key(str, "", "model name reported to clients (empty: from the file)"),
    "aliases": Key(list, [], "other names clients may ask for this model by (their own"
                   " default's name, say) without counting as a model mismatch"),
    "path": Key(str, "", "model file or directory (empty: the prepared default)"),
    "device": Key(str, "auto", "where it runs", ("auto", "npu", "cpu")),
    "n_ctx": Key(int, 0, "context length in tokens (0: task default)", minimum=0),
    "threads": Key(int, 0, "CPU threads (0: at each call, one per core no other process is"
                   " busy on)", minimum=0),
    "flash_attn": Key(bool, True, "llama.cpp flash attention on the CPU: ~1.5x (100 tokens)"
                      " to ~2x (440 tokens) faster embeddings, the same vectors, and short texts"
                      " packed per decode; faster expansion (docs/benchmarks.md, design notes)"),
    "n_ubatch": Key(int, 128, "llama.cpp micro-batch of rerank/expansion models: its compute"
                    " buffer holds vocabulary logits per position (gemma-3-270m: 515 MB at 512,"
                    " 129 MB at 128; speed the same). Embedding models use their context",
                    minimum=1),
    "backend": Key(
        str, "local", "local (llama.cpp / RKNN in a worker) or ollama (an Ollama-compatible"
        " server such as rkllama)", ("local", "ollama")),
    "ollama_url": Key(str, "", "backend = ollama: the server, e.g. http://127.0.0.1:8080"),
    "ollama_model": Key(str, "", "backend = ollama: the model name on that server"),
    "ollama_timeout": Key(float, 120.0, "backend = ollama: seconds per call", minimum=1.0),
    "ollama_retries": Key(int, 2, "backend = ollama: retries on 429/5xx and connection"
                          " errors", minimum=0),
    "cpu_path": Key(
        str, "", "GGUF twin used on the CPU when an NPU model directory cannot run"
        " (empty: the prepared default for this task)"),
}
_RERANK: dict[str, Key] = {
    "template": Key(
        str, "", "rerank prompt with {instruction} {query} {document}"
        " (empty: the model's own from the manifest, else Qwen3-Reranker's)"
    ),
    "instruction": Key(str, DEFAULT_INSTRUCTION, "rerank instruction"),
    "yes_token": Key(str, "yes", "rerank token whose probability is the score"),
    "no_token": Key(str, "no", "rerank counter token"),
    "lanes": Key(int, 2, "llama.cpp rerank contexts scoring documents side by side, the"
                 " call's threads shared among them: 1.09x the documents per second of one"
                 " context on 2 cores, the same scores; each costs a KV cache and compute"
                 " buffer (1: one context)", minimum=1),
    "flash_attn": Key(bool, False, "llama.cpp flash attention for rerank: off, because on the"
                      " CPU it made P(yes) depend on how the prompt was split into decodes (up to"
                      " 0.1 with the prefix reused); on is a little faster"
                      " (docs/benchmarks.md, design notes)"),
}
_EXPAND: dict[str, Key] = {
    "max_tokens": Key(int, 600, "expansion: most generated tokens", minimum=1),
    "max_lines": Key(int, 6, "expansion: most lex/vec/hyde lines (the grammar bound)", minimum=1),
    "max_line_chars": Key(int, 160, "expansion: longest line (the grammar bound)", minimum=8),
    "temperature": Key(float, 0.7, "expansion sampling temperature", minimum=0),
    "top_k": Key(int, 20, "expansion top-k", minimum=0),
    "top_p": Key(float, 0.8, "expansion top-p", minimum=0),
    "presence_penalty": Key(float, 0.5, "expansion presence penalty over the last 64 tokens"),
    "seed": Key(int, -1, "expansion RNG seed (-1: random)"),
}
_NPU: dict[str, Key] = {
    "runtime": Key(
        str, "auto", "NPU runtime: auto (the vendor runtimes when the board has a usable NPU),"
        " rknnlite, reference (ONNX twins on onnxruntime, GGUF twins on the reference"
        " librkllmrt: for x86 testing, not acceleration)",
        ("auto", "rknnlite", "reference")),
    "cores": Key(int, 0, "NPU cores to use, one RKNNLite context each (0: all the SoC has:"
                 " 3 on the RK3588, 2 on the RK3576, 1 on the RK3566/RK3568)", minimum=0),
    "rkllm_library": Key(
        str, "", "librkllmrt to load for RKLLM model directories (empty: /usr/lib's; with"
        " runtime reference, the reference library built from npu/reference_rkllm)"),
    "failure_threshold": Key(
        int, 2, "consecutive NPU failures before its work moves to the CPU twin", minimum=1),
    "reprobe_seconds": Key(
        float, 30.0, "first wait before the NPU is tried again (doubles up to 10 min)",
        minimum=1.0),
}
_INDEX: dict[str, Key] = {
    "enabled": Key(bool, True, "keep a document index (SQLite FTS5 + sqlite-vec)"),
    "backend": Key(str, "sqlite", "where the index lives: sqlite (a file in the state"
                   " directory) or postgres (PostgreSQL + pgvector at index.dsn: several"
                   " boards share one corpus)", ("sqlite", "postgres")),
    "dsn": Key(str, "", "with backend = postgres: the libpq connection string (e.g."
               " \"host=db.lan dbname=npuserve user=npuserve password=...\")"),
    "claim_seconds": Key(
        float, 120.0, "with backend = postgres: how long a daemon's claim on a batch of the"
        " shared embedding backlog lasts; a daemon that dies leaves its batch to the others"
        " after this", minimum=1.0),
    "chunk_tokens": Key(
        int, 0, "chunk size in embedding-model tokens (0: 900, or the model's context"
        " if smaller)", minimum=0),
    "chunk_overlap": Key(float, 0.15, "share of a chunk repeated in the next", minimum=0),
    "embed_batch": Key(int, 32, "chunks per embedding call", minimum=1),
    "result_body_chars": Key(int, 4000, "characters of each document's body in /search,"
                             " /vsearch and /query results unless the request asks for"
                             " \"full\" (bodyTruncated says so; 0: always whole)", minimum=0),
    "rerank_seconds": Key(float, 6.0, "/query: seconds its rerank stage is planned to take by"
                          " the reranker's measured cost; each candidate is cut to its"
                          " best-matching window to fit (0: whole chunks, as QMD)", minimum=0),
}
TASK_CTX_DEFAULT = {"embed": 512, "rerank": 2048, "expand": 2048, "generate": 2048}

SCHEMA: dict[str, Any] = {
    "state_dir": Key(str, "", "models, index, calibration"
                     " (empty: $STATE_DIRECTORY, else ~/.local/share/npuserve)"),
    "log_level": Key(str, "info", "logging level", ("debug", "info", "warning", "error")),
    "server": _SERVER,
    "scheduler": _SCHEDULER,
    "index": _INDEX,
    "npu": _NPU,
    "models": {"embed": _MODEL, "rerank": _MODEL | _RERANK, "expand": _MODEL | _EXPAND},
}


def _coerce(path: str, key: Key, value: Any, from_text: bool) -> Any:
    """Check (or, for env/flag text, parse) one value against its declared type."""
    if from_text:
        value = _parse_text(path, key, str(value))
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not key.type:
        raise ConfigError(f"{path}: expected {key.type.__name__}, got {type(value).__name__}")
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{path}: expected a list of strings")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{path}: must be one of {', '.join(key.choices)}, got {value!r}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{path}: must be >= {key.minimum}, got {value!r}")
    return value


def _parse_text(path: str, key: Key, text: str) -> Any:
    try:
        if key.type is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if key.type is list:  # NPUSERVE_SERVER_CORS_ORIGINS="https://a,https://b"
            if text.lstrip().startswith("["):  # or as TOML/JSON writes it: ["a", "b"]
                items = json.loads(text)
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise ValueError(text)
                return items
            return [item.strip() for item in text.split(",") if item.strip()]
        return key.type(text)
    except ValueError:
        raise ConfigError(f"{path}: cannot read {text!r} as {key.type.__name__}") from None


def _walk(schema: Mapping[str, Any], prefix: str = "") -> dict[str, Key]:
    """Flatten the schema to dotted paths."""
    flat: dict[str, Key] = {}
    for name, node in schema.items():
        path = f"{prefix}{name}"
        if isinstance(node, Key):
            flat[path] = node
        else:
            flat.update(_walk(node, path + "."))
    return flat


FLAT_SCHEMA = _walk(SCHEMA)


def _flatten_file(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten_file(value, path + "."))
        else:
            flat[path] = value
    return flat


def env_name(path: str) -> str:
    return ENV_PREFIX + path.upper().replace(".", "_")


@dataclass
class ModelConfig:
    task: str
    name: str
    path: str
    device: str
    n_ctx: int
    threads: int
    cpu_path: str
    options: dict[str, Any]


@dataclass
class Config:
    values: dict[str, Any]
    source: str

    def get(self, path: str) -> Any:
        return self.values[path]

    @property
    def server(self) -> ServerSettings:
        return ServerSettings.from_values(self.values)

    @property
    def index(self) -> IndexSettings:
        return IndexSettings.from_values(self.values)

    @property
    def state_dir(self) -> Path:
        return Path(self.values["state_dir"])

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    def model(self, task: str) -> ModelConfig:
        prefix = f"models.{task}."
        opts = {k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)}
        n_ctx = opts.pop("n_ctx") or TASK_CTX_DEFAULT[task]
        return ModelConfig(
            task=task,
            name=opts.pop("name"),
            path=opts.pop("path"),
            device=opts.pop("device"),
            n_ctx=n_ctx,
            threads=opts.pop("threads"),
            cpu_path=opts.pop("cpu_path"),
            options=opts,
        )


@dataclass(frozen=True)
class ServerSettings:
    """[server], typed (the values were checked and converted when the file was read)."""

    host: str
    port: int
    api_key: str
    name: str
    mdns: bool
    max_body_bytes: int
    max_batch: int
    max_text_chars: int
    shutdown_timeout: float
    body_timeout: float
    preload: tuple[str, ...]
    max_connections: int = 512
    idle_timeout: float = 15.0
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_tokens: int = 1024
    strict_models: bool = False

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> ServerSettings:
        return cls(
            host=v["server.host"], port=v["server.port"], api_key=v["server.api_key"],
            name=v["server.name"], mdns=v["server.mdns"],
            max_body_bytes=int(v["server.max_body_mb"] * 1024 * 1024),
            max_batch=v["server.max_batch"], max_text_chars=v["server.max_text_chars"],
            shutdown_timeout=v["server.shutdown_timeout"],
            body_timeout=v["server.body_timeout"],
            preload=tuple(preload_tasks(v["server.preload"])),
            max_connections=v["server.max_connections"],
            idle_timeout=v["server.idle_timeout"],
            cors_origins=tuple(v["server.cors_origins"]),
            allowed_hosts=tuple(v["server.allowed_hosts"]),
            max_tokens=v["server.max_tokens"], strict_models=v["server.strict_models"])


@dataclass(frozen=True)
class IndexSettings:
    """[index], typed."""

    enabled: bool
    chunk_tokens: int
    chunk_overlap: float
    embed_batch: int
    result_body_chars: int = 4000
    rerank_seconds: float = 6.0
    backend: str = "sqlite"
    dsn: str = ""
    claim_seconds: float = 120.0

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> IndexSettings:
        return cls(v["index.enabled"], v["index.chunk_tokens"], v["index.chunk_overlap"],
                   v["index.embed_batch"], v["index.result_body_chars"],
                   v["index.rerank_seconds"], v["index.backend"], v["index.dsn"],
                   v["index.claim_seconds"])


def default_state_dir(env: Mapping[str, str]) -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY: that is the service's case.
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local/share")
    return Path(base) / "npuserve"


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < file < environment < overrides (CLI flags, already typed or text)."""
    env = os.environ if env is None else env
    values = {p: k.default for p, k in FLAT_SCHEMA.items()}
    source = "defaults"
    if path is None and env.get("NPUSERVE_CONFIG"):
        path = env["NPUSERVE_CONFIG"]
    if path is None and SYSTEM_CONFIG.is_file():
        path = SYSTEM_CONFIG
    if path is not None:
        values.update(_read_file(Path(path)))
        source = str(path)
    for name, text in env.items():
        if (not name.startswith(ENV_PREFIX) or name in ENV_NON_KEYS
                or name.startswith(ENV_TEST_PREFIX)):
            continue
        key_path = _env_to_path(name)
        values[key_path] = _coerce(f"{name} ({key_path})", FLAT_SCHEMA[key_path], text,
                                   from_text=True)
    for key_path, value in (overrides or {}).items():
        if key_path not in FLAT_SCHEMA:
            raise ConfigError(f"{key_path}: unknown key")
        values[key_path] = _coerce(
            key_path, FLAT_SCHEMA[key_path], value, from_text=isinstance(value, str)
        )
    if not values["state_dir"]:
        values["state_dir"] = str(default_state_dir(env))
    unknown = set(preload_tasks(values["server.preload"])) - set(TASK_CTX_DEFAULT)
    if unknown:
        raise ConfigError(f"server.preload: unknown task(s) {', '.join(sorted(unknown))};"
                          f" choose from {', '.join(TASK_CTX_DEFAULT)}")
    return Config(values=values, source=source)


def preload_tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_ENV_INDEX = {env_name(p): p for p in FLAT_SCHEMA}


def _env_to_path(name: str) -> str:
    try:
        return _ENV_INDEX[name]
    except KeyError:
        raise ConfigError(f"{name}: unknown NPUSERVE_ variable") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key_path, value in _flatten_file(data).items():
        if key_path not in FLAT_SCHEMA:
            raise ConfigError(f"{key_path}: unknown key in {path}")
        out[key_path] = _coerce(key_path, FLAT_SCHEMA[key_path], value, from_text=False)
    return out


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def render_example(settings: Mapping[str, Any] | None = None) -> str:
    """A config.toml with every key commented out at its default (for docs and the .deb);
    keys in `settings` are written live with their value (the package sets a few)."""
    settings = settings or {}
    unknown = set(settings) - set(FLAT_SCHEMA)
    if unknown:
        raise ConfigError(f"render_example: unknown keys {sorted(unknown)}")
    lines = ["# npuserve configuration. Every key is shown at its default.", ""]
    sections: dict[str, list[str]] = {}
    for key_path, key in FLAT_SCHEMA.items():
        section, _, name = key_path.rpartition(".")
        choices = f" [{'|'.join(key.choices)}]" if key.choices else ""
        if key_path in settings:
            entry = (f"# {key.help}{choices} (default {_toml_value(key.default)})\n"
                     f"{name} = {_toml_value(settings[key_path])}")
        else:
            entry = f"# {key.help}{choices}\n#{name} = {_toml_value(key.default)}"
        sections.setdefault(section, []).append(entry)
    for section, entries in sections.items():
        if section:
            lines.append(f"[{section}]")
        lines.extend(entries)
        lines.append("")
    return "\n".join(lines)


def set_config_key(path: Path, key_path: str, value: Any) -> None:
    """Set one key in a TOML config file, keeping every comment and key an admin (or the
    package) wrote: tomlkit edits the document, not its lines. A commented-out default of
    the key stays as it was; the key is set in its section (made if missing). Written via
    a temporary file and rename, with the file's owner and mode."""
    import tomlkit

    if key_path not in FLAT_SCHEMA:
        raise ConfigError(f"{key_path}: unknown key")
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
    *sections, name = key_path.split(".")
    table: Any = doc
    for i, section in enumerate(sections):
        if section not in table:
            # [models] only holds [models.embed] etc.: a super table, never written bare.
            table[section] = tomlkit.table(is_super_table=i < len(sections) - 1)
        table = table[section]
    table[name] = value
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    if path.exists():
        st = path.stat()
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False
