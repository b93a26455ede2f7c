"""One client, 46 sequential hybrid /query calls over the standard library's documentation
(131 modules), on the embedded default: a few on an idle machine first (the idle figure),
then all 46 while other processes keep both cores busy, then all 46 on the idle machine
again. Prints, per half: answered / refused (503) / failed, p50 and p95 latency, recall@1
and recall@5, and where the time went.

The client behaves as QMD's does: one request at a time, no retry, gives up after 300 s.

Usage: python bench/query_under_load.py [--state-dir DIR] [--load-procs 2] [--baseline 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import post, start_daemon  # noqa: E402
from stdlib_corpus import QUESTIONS, documents, rank_of  # noqa: E402

CLIENT_TIMEOUT = 300.0


@dataclass
class Call:
    status: int  # HTTP status; 0 when the client gave up or the connection failed
    seconds: float
    rank: int | None = None
    stages: dict[str, float] = field(default_factory=dict)
    vector_rank: int | None = None  # the same question by /vsearch alone, for comparison


def ask(base: str, question: str, module: str) -> Call:
    body = json.dumps({"query": question, "limit": 10}).encode()
    req = urllib.request.Request(base + "/query", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as resp:
            out = json.load(resp)
            status = resp.status
    except urllib.error.HTTPError as e:
        return Call(e.code, time.perf_counter() - start)
    except OSError:
        return Call(0, time.perf_counter() - start)
    took = time.perf_counter() - start
    stages = {s["name"]: s["ms"] / 1000 for s in out.get("stages", []) if s.get("ran")}
    vector = post(base + "/vsearch", {"query": question, "limit": 10})
    assert isinstance(vector, dict)
    return Call(status, took, rank_of(out["results"], module), stages,
                rank_of(vector["results"], module))


def busy() -> None:
    while True:
        pass


def run_half(base: str, name: str, questions: list[tuple[str, str]]) -> list[Call]:
    calls = []
    for i, (q, module) in enumerate(questions, start=1):
        c = ask(base, q, module)
        calls.append(c)
        where = " ".join(f"{k} {v:.1f}" for k, v in c.stages.items())
        print(f"  {name} {i:2d}/{len(questions)}: {c.status} {c.seconds:6.1f} s"
              f" rank {c.rank} [{where}]", flush=True)
    return calls


def summary(name: str, calls: list[Call]) -> str:
    ok = [c for c in calls if c.status == 200]
    refused = sum(c.status == 503 for c in calls)
    failed = len(calls) - len(ok) - refused
    secs = sorted(c.seconds for c in ok) or [0.0]
    p95 = secs[min(len(secs) - 1, int(round(0.95 * (len(secs) - 1))))]
    r1 = sum(c.rank == 1 for c in ok)
    r5 = sum(c.rank is not None and c.rank <= 5 for c in ok)
    v1 = sum(c.vector_rank == 1 for c in ok)
    v5 = sum(c.vector_rank is not None and c.vector_rank <= 5 for c in ok)
    stage_names = sorted({k for c in ok for k in c.stages})
    stages = ", ".join(f"{k} {statistics.median(c.stages.get(k, 0.0) for c in ok):.1f}"
                       for k in stage_names)
    return (f"| {name} | {len(calls)} | {len(ok)} | {refused} | {failed} |"
            f" {statistics.median(secs):.1f} | {p95:.1f} | {r1} | {r5} | {v1} | {v5} |"
            f" {stages} |")


def ingest(base: str) -> None:
    with urllib.request.urlopen(base + "/collections", timeout=60) as resp:
        if any(c["name"] == "stdlib" for c in json.load(resp)):
            return  # a reused --state-dir: already ingested
    post(base + "/collections", {"name": "stdlib"})
    docs = documents()
    for first in range(0, len(docs), 16):
        post(base + "/collections/stdlib/documents", {"documents": docs[first:first + 16]})
    start = time.perf_counter()
    while True:
        with urllib.request.urlopen(base + "/status", timeout=60) as resp:
            if not json.load(resp)["needsEmbedding"]:
                break
        time.sleep(2)
    print(f"ingested {len(docs)} documents; embedded in {time.perf_counter() - start:.0f} s",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--baseline", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], help="extra config key=value")
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    models = load_config(None).models_dir
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(args.state_dir) if args.state_dir else Path(tmp) / "state"
        state.mkdir(parents=True, exist_ok=True)
        if not (state / "models").exists():
            (state / "models").symlink_to(models)
        proc, base = start_daemon(state, args.set, log=state / "daemon.log")
        try:
            ingest(base)
            baseline = run_half(base, "idle-before", QUESTIONS[:args.baseline])
            load = [multiprocessing.Process(target=busy, daemon=True)
                    for _ in range(args.load_procs)]
            for p in load:
                p.start()
            loaded = run_half(base, "loaded", QUESTIONS)
            for p in load:
                p.terminate()
            idle = run_half(base, "idle", QUESTIONS)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    halves = [(f"idle before ({args.baseline} questions)", baseline),
              (f"loaded ({args.load_procs} busy processes)", loaded), ("idle after", idle),
              (f"idle after, the same {args.baseline} questions as idle before",
               idle[:args.baseline])]
    print("\n| half | calls | 200 | 503 | failed | p50 s | p95 s | recall@1 | recall@5 |"
          " /vsearch recall@1 | /vsearch recall@5 | median stage s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, calls in halves:
        print(summary(name, calls))
    bad = sum(c.status != 200 for _, calls in halves[:3] for c in calls)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
