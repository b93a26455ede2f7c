"""Hybrid /query before and after its rerank stage was planned to a time budget, in one
run on one index: the standard library's documentation (131 pydoc pages), the same
questions, one client at a time on an idle machine.

  before  index.rerank_seconds = 0: every candidate reranked as its whole chunk (as QMD
          does; ~56 s a query on the embedded default on a 2-core machine)
  after   the default (6 s): each candidate cut to its best-matching window, fewer
          candidates when even short windows do not fit

Prints p50/p95 latency and recall@1/@5 of each, with /vsearch's recall on the same
questions for reference. The "after" daemon runs first: the index is built once by it.

Usage: python bench/query_before_after.py [--questions 12] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import start_daemon  # noqa: E402
from query_under_load import ingest, run_half, summary  # noqa: E402
from stdlib_corpus import QUESTIONS  # noqa: E402

SETTINGS = {"after (index.rerank_seconds = 6, the default)": [],
            "before (index.rerank_seconds = 0: whole chunks)": ["index.rerank_seconds=0"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--state-dir", default=None)
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    models = load_config(None).models_dir
    # Every few questions of the list, so each part of the standard library is asked.
    step = max(1, len(QUESTIONS) // args.questions)
    questions = QUESTIONS[::step][:args.questions]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(args.state_dir) if args.state_dir else Path(tmp) / "state"
        state.mkdir(parents=True, exist_ok=True)
        if not (state / "models").exists():
            (state / "models").symlink_to(models)
        for name, settings in SETTINGS.items():
            proc, base = start_daemon(state, settings, log=state / "daemon.log")
            try:
                ingest(base)
                calls = run_half(base, name.split()[0], questions)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            rows.append(summary(name, calls))
    print(f"\n{len(questions)} questions, one client, idle machine")
    print("| run | calls | 200 | 503 | failed | p50 s | p95 s | recall@1 | recall@5 |"
          " /vsearch recall@1 | /vsearch recall@5 | median stage s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
