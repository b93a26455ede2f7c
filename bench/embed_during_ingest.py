"""Interactive /embed while the index embeds a large document in the background.

The index's own embedding is background work: it runs only when no interactive request
waits, one call of about a second at a time. Prints the latency of single-text /embed
calls on an idle daemon and then while a multi-megabyte document is being embedded, and
the ratio (1.0: the background work costs interactive clients nothing).

Usage: python bench/embed_during_ingest.py [--mb 4] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import post, start_daemon  # noqa: E402
from stdlib_corpus import MODULES, render  # noqa: E402


def pending(base: str) -> int:
    with urllib.request.urlopen(base + "/status", timeout=60) as resp:
        return int(json.load(resp)["needsEmbedding"])


def embed_latencies(base: str, calls: int, while_pending: bool) -> list[float]:
    out = []
    for i in range(calls):
        if while_pending and not pending(base):
            break
        start = time.perf_counter()
        post(base + "/embed", {"text": f"interactive question {i} about sockets"})
        out.append(time.perf_counter() - start)
        time.sleep(0.5)
    return out


def big_document(mb: float) -> str:
    text, i = [], 0
    size = 0
    while size < mb * 1_000_000:
        page = render(MODULES[i % len(MODULES)], 100_000)
        text.append(page)
        size += len(page)
        i += 1
    return "\n\n".join(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    models = load_config(None).models_dir
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "models").symlink_to(models)
        proc, base = start_daemon(state, [f"server.max_body_mb={args.mb * 2 + 1}",
                                          f"server.max_text_chars={int(args.mb * 1.1e6)}"])
        try:
            post(base + "/embed", {"text": "warm up"})
            idle = embed_latencies(base, args.calls, False)
            post(base + "/collections", {"name": "big"})
            post(base + "/collections/big/documents",
                 {"documents": [{"path": "big.txt", "body": big_document(args.mb)}]})
            time.sleep(2)  # the embedder has started its first calls
            busy = embed_latencies(base, args.calls, True)
            left = pending(base)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    med_idle, med_busy = statistics.median(idle), statistics.median(busy)
    print(f"/embed on an idle daemon: median {med_idle * 1000:.0f} ms, slowest"
          f" {max(idle) * 1000:.0f} ms ({len(idle)} calls)")
    print(f"/embed while a {args.mb:g} MB document is embedded: median"
          f" {med_busy * 1000:.0f} ms, slowest {max(busy) * 1000:.0f} ms ({len(busy)} calls;"
          f" {left} chunks still pending at the end)")
    print(f"ratio busy / idle: median {med_busy / med_idle:.2f}, slowest"
          f" {max(busy) / max(idle):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
