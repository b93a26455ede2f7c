"""The whole reliability suite in one command, with a table at the end.

    python bench/reliability.py [--seconds 60] [--clients 32] [--fuzz-examples 40]

Runs, against real daemon processes on loopback with the prepared default models:
  - the load test: N clients for S seconds mixing every endpoint, every answer checked
    (vectors against llama-cpp-python called directly, rerank files echoed, documents read
    back), server RSS and file descriptors sampled;
  - fault injection: model worker SIGKILL mid-batch, NPU runtime failure (reference
    runtime), corrupt model file, disk full during ingest, read-only state file system;
  - hostile input: schemathesis over /openapi.json (random seed) and raw-socket cases;
  - graceful shutdown: SIGTERM under load, then a restart on the same index.
The tests are tests/test_reliability.py, tests/test_hostile_clients.py and
tests/test_openapi_fuzz.py; CI runs the same tests shorter. Mounting the small and the
read-only file systems needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_reliability.py", "tests/test_hostile_clients.py",
         "tests/test_openapi_fuzz.py::test_fuzzing_finds_no_server_error_hang_or_non_json_error"]


def run_suite(seconds: float, clients: int, fuzz_examples: int, report: Path) -> int:
    env = dict(os.environ, NPUSERVE_TEST_LOAD_SECONDS=str(seconds),
               NPUSERVE_TEST_LOAD_CLIENTS=str(clients),
               NPUSERVE_TEST_FUZZ_EXAMPLES=str(fuzz_examples),
               NPUSERVE_TEST_FUZZ_SEED=str(random.randrange(1, 2**31)),
               NPUSERVE_TEST_RELIABILITY_REPORT=str(report))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def summarize(data: dict, pytest_code: int) -> str:
    rows: list[tuple[str, str]] = []
    for load in data.get("load", []):
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(load["by_class"].items()))
        rows += [
            ("load: requests / concurrency / seconds",
             f"{load['requests']} / {load['clients']} clients / {load['seconds']:g} s"),
            ("load: answers by class", classes),
            ("load: undesigned answers, mixed-up results",
             f"{load['undesigned']}, {load['mismatches']}"),
            ("load: latency p50 / p99 (all), p99 /embed",
             f"{load['p50_ms']:.0f} ms / {load['p99_ms']:.0f} ms, {load['p99_embed_ms']:.0f} ms"),
            ("load: server RSS growth after warm-up, fd growth, peak RSS (with workers)",
             f"{load['main_rss_growth_mb']:+.1f} MB, {load['fd_growth']:+d},"
             f" {load['peak_rss_mb']:.0f} MB"),
            ("load: documents acknowledged / lost",
             f"{load['docs_acked']} / {load['docs_lost']}")]
    faults = data.get("faults", [])
    survived = sum(f["survived"] and f["recovered"] for f in faults)
    rows.append(("faults injected / survived and recovered", f"{len(faults)} / {survived}"))
    for f in faults:
        extra = f"; {f['index']}" if "index" in f else ""
        rows.append((f"  {f['fault']}", f"{f['affected']}; {f['reported']}{extra}"))
    for fz in data.get("fuzz", []):
        rows.append(("fuzz cases tried (schemathesis) / failures",
                     f"{fz['cases']} / {fz['failures']} (seed {fz['seed']})"))
    for h in data.get("hostile", []):
        rows.append(("hostile raw-socket cases", f"{h['cases']}: " + ", ".join(h["detail"])))
    for sd in data.get("shutdown", []):
        rows += [("SIGTERM under load: in flight / completed",
                  f"{sd['in_flight']} / {sd['in_flight_completed']}"),
                 ("SIGTERM: new requests answered 503 / refused after close / exit",
                  f"{sd['new_503']} / {sd['refused_after_close']} / {sd['exit_code']}")]
    lost = sum(x.get("docs_lost", 0) for x in data.get("load", []) + data.get("shutdown", []))
    rows.append(("documents lost (must be 0)", str(lost)))
    rows.append(("suite result", "PASS" if pytest_code == 0 else f"FAIL (pytest {pytest_code})"))
    return table(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="load test duration")
    ap.add_argument("--clients", type=int, default=32, help="concurrent load clients")
    ap.add_argument("--fuzz-examples", type=int, default=40,
                    help="schemathesis examples per operation")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        code = run_suite(args.seconds, args.clients, args.fuzz_examples, report)
        data = json.loads(report.read_text()) if report.exists() else {}
    print("\nnpuserve reliability suite\n")
    print(summarize(data, code))
    return code


if __name__ == "__main__":
    sys.exit(main())
