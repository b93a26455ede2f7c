"""QMD's query flow as its RemoteQMD client sends it - GET /health, POST /expand, POST
/embed-batch of the formatted variants, POST /rerank of 20 documents x ~3,500 characters -
on the embedded default, three times in a row, while another client calls /embed every
second; then once more after a 571-second rerank has been measured.

Each step must answer 200 within the client's 300 s (QMD never retries and never reads
Retry-After); the /embed client must keep being answered within its own timeout.

"A 571-second rerank measured": the daemon is stopped, one rerank call of this flow's
size taking 571 s is recorded in its calibration.json exactly as the daemon records a call
that ran (CalibrationStore.observe_call), and the daemon is started again on it. That is
what a QMD user saw: a rerank that ran 571 s on a loaded machine, after which every
QMD-sized rerank was refused at once.

Usage: python bench/qmd_flow.py [--state-dir DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import start_daemon  # noqa: E402
from stdlib_corpus import MODULES, render  # noqa: E402

CLIENT_TIMEOUT = 300.0
EMBED_TIMEOUT = 30.0
SLOW_RERANK_SECONDS = 571.0
QUERY = "how do I compress a directory into an archive"


def call(base: str, method: str, path: str, body: object | None, timeout: float
         ) -> tuple[int, float, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, time.perf_counter() - start, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - start, e.read().decode(errors="replace")
    except OSError as e:
        return 0, time.perf_counter() - start, str(e)


def rerank_documents() -> list[dict[str, str]]:
    """20 chunks of ~3,500 characters, as QMD sends its best chunk per file."""
    names = [m for m in MODULES if m in (
        "tarfile zipfile gzip bz2 lzma zlib shutil pathlib os glob fnmatch tempfile io "
        "zipimport zipapp filecmp codecs pickle shelve csv").split()]
    return [{"file": f"qmd://stdlib/{n}.txt", "text": render(n, 3500)} for n in names[:20]]


@dataclass
class Flow:
    steps: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(status == 200 and secs <= CLIENT_TIMEOUT for _, status, secs in self.steps)

    def line(self, name: str) -> str:
        cells = " | ".join(f"{status} in {secs:.1f} s" for _, status, secs in self.steps)
        total = sum(secs for _, _, secs in self.steps)
        return f"| {name} | {cells} | {total:.1f} s |"


def qmd_query(base: str, docs: list[dict[str, str]]) -> Flow:
    flow = Flow()
    status, secs, _ = call(base, "GET", "/health", None, CLIENT_TIMEOUT)
    flow.steps.append(("health", status, secs))
    status, secs, lines = call(base, "POST", "/expand", {"query": QUERY}, CLIENT_TIMEOUT)
    flow.steps.append(("expand", status, secs))
    variants = [QUERY] + [x["text"] for x in lines if x["type"] != "lex"] \
        if status == 200 and isinstance(lines, list) else [QUERY]
    texts = [f"task: search result | query: {v}" for v in variants]
    status, secs, _ = call(base, "POST", "/embed-batch", {"texts": texts}, CLIENT_TIMEOUT)
    flow.steps.append(("embed-batch", status, secs))
    status, secs, out = call(base, "POST", "/rerank", {"query": QUERY, "documents": docs},
                             CLIENT_TIMEOUT)
    flow.steps.append(("rerank", status, secs))
    if status == 200 and isinstance(out, dict):
        cut = sum(bool(r.get("truncated")) for r in out["results"])
        print(f"    rerank: {len(out['results'])} results, {cut} truncated", flush=True)
    return flow


class EmbedClient(threading.Thread):
    """Another agent: one /embed a second, each with its own timeout."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.results: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            status, secs, _ = call(self.base, "POST", "/embed",
                                   {"text": f"note {i} about archives"}, EMBED_TIMEOUT)
            self.results.append((status, secs))
            i += 1
            self.stop.wait(1.0)

    def summary(self) -> str:
        ok = [s for st, s in self.results if st == 200]
        bad = sorted({st for st, _ in self.results if st != 200})
        worst = max(ok, default=0.0)
        med = statistics.median(ok) if ok else 0.0
        return (f"{len(self.results)} /embed calls (client timeout {EMBED_TIMEOUT:.0f} s):"
                f" {len(ok)} answered 200 (median {med:.2f} s, slowest {worst:.2f} s),"
                f" {len(self.results) - len(ok)} not (statuses {bad}, 0: timed out)")


def record_slow_rerank(state: Path, docs: list[dict[str, str]]) -> str:
    """Record one rerank of `docs` that took SLOW_RERANK_SECONDS, as the daemon does."""
    from npuserve.daemon.sched.calibration import CalibrationStore

    store = CalibrationStore(state / "calibration.json")
    key = next(k for k in store.models if k.endswith("/rerank"))
    costs = store.costs(key)
    chars = sum(len(d["text"]) for d in docs) + len(QUERY)
    tokens = int(costs.tokens_for(chars))
    before = costs.sec_per_token
    costs.observe_call(tokens, SLOW_RERANK_SECONDS, chars)
    store.save()
    return (f"recorded a {SLOW_RERANK_SECONDS:.0f} s rerank of {tokens} tokens in {key}:"
            f" {before * 1000:.2f} -> {costs.sec_per_token * 1000:.2f} ms per token"
            f" (median of the last {len(costs.rates)} calls)")


def run_flows(state: Path, docs: list[dict[str, str]], names: list[str]) -> list[bool]:
    proc, base = start_daemon(state, [], log=state / "daemon.log")
    embedder = EmbedClient(base)
    embedder.start()
    oks = []
    try:
        for name in names:
            flow = qmd_query(base, docs)
            print(flow.line(name), flush=True)
            oks.append(flow.ok)
    finally:
        embedder.stop.set()
        embedder.join()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"  meanwhile another client: {embedder.summary()}", flush=True)
    oks.append(all(st == 200 for st, _ in embedder.results))
    return oks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    models = load_config(None).models_dir
    docs = rerank_documents()
    print(f"rerank: {len(docs)} documents, {sum(len(d['text']) for d in docs)} characters",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(args.state_dir) if args.state_dir else Path(tmp) / "state"
        state.mkdir(parents=True, exist_ok=True)
        if not (state / "models").exists():
            (state / "models").symlink_to(models)
        print("| run | health | expand | embed-batch | rerank | total |")
        print("|---|---|---|---|---|---|")
        oks = run_flows(state, docs, [f"{i + 1}" for i in range(args.runs)])
        print(record_slow_rerank(state, docs), flush=True)
        oks += run_flows(state, docs, ["after the 571 s rerank"])
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
