"""The whole reliability suite in one command, with a table at the end.

    python bench/reliability.py [--seconds 60] [--clients 32] [--fuzz-examples 40]

Runs, against real daemon processes on loopback with the prepared default models:
  - the load test: N clients for S seconds mixing every endpoint, every answer checked
    (vectors against llama-cpp-python called directly, rerank files echoed, documents read
    back), server RSS and file descriptors sampled;
  - fault injection: model worker SIGKILL mid-batch, NPU runtime failure (reference
    runtime), corrupt model file, disk full during ingest, read-only state file system;
  - hostile input: schemathesis over /openapi.json (random seed) and raw-socket cases;
  - graceful shutdown: SIGTERM under load, then a restart on the same index;
  - a hostile LAN: one test per defect an independent probe found (browsers, 500s,
    descriptors, poisoned calibration, long documents, disconnects), a row each.
The tests are tests/test_reliability.py, tests/test_hostile_clients.py,
tests/test_hostile_lan.py and tests/test_openapi_fuzz.py; CI runs the same tests shorter.
Mounting the small and the read-only file systems needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_reliability.py", "tests/test_hostile_clients.py", "tests/test_hostile_lan.py",
         "tests/test_openapi_fuzz.py::test_fuzzing_finds_no_server_error_hang_or_non_json_error"]
# The hostile-LAN probe's defects (issue 23), each with the test that reproduces it.
HOSTILE_LAN = [
    ("1 calibration poisoned by one long rerank document",
     "test_one_long_rerank_document_does_not_poison_the_estimate"),
    ("1 calibration poisoned by refused expansions",
     "test_refused_expansions_do_not_make_the_model_look_fast"),
    ("1 an outlier call moves the cost figure",
     "test_one_outlier_does_not_move_the_per_token_figure"),
    ("1 old per-item calibration files", "test_a_per_item_calibration_file_keeps_loads_and_drops"),
    ("2 a 95,000-character document kills the reranker",
     "test_a_95000_character_document_is_cut_not_killed"),
    ("3 cross-origin preflight", "test_a_cross_origin_preflight_is_refused"),
    ("3 text/plain cross-origin POST", "test_a_simple_cross_origin_post_writes_nothing"),
    ("3 DNS rebinding (foreign Host)", "test_a_foreign_host_is_refused_against_dns_rebinding"),
    ("4 non-UTF-8 Authorization byte", "test_an_authorization_header_that_is_not_utf8_is_401"),
    ("4 lone surrogates (7 fields)", "test_a_lone_surrogate_is_400_naming_the_field"),
    ("4 a 5,000-digit JSON integer", "test_a_json_integer_of_5000_digits_is_400"),
    ("4 a body that is not the gzip it claims", "test_a_body_that_is_not_the_gzip_it_claims"),
    ("5 1,100 idle sockets under ulimit -n 1024", "test_1100_idle_sockets_under_ulimit_1024"),
    ("6 a collection name ending in a newline", "test_a_collection_name_cannot_end_in_a_newline"),
    ("7 disconnects counted as 500s, tracebacks", "test_a_client_leaving_mid_body_is_no_500"),
    ("8 a leaving client's running call goes on", "test_a_client_that_leaves_stops_its_running"),
    ("- a 60 MB body announced with Expect: 100-continue",
     "test_an_announced_60_mb_body_is_413_before_it_is_sent"),
    ("- /openapi.json public although README says keyed",
     "test_with_a_key_only_health_answers_without_it"),
    ("- /search returns whole multi-MB bodies", "test_search_results_carry_a_snippet"),
]


def run_suite(seconds: float, clients: int, fuzz_examples: int, report: Path, junit: Path
              ) -> int:
    env = dict(os.environ, NPUSERVE_TEST_LOAD_SECONDS=str(seconds),
               NPUSERVE_TEST_LOAD_CLIENTS=str(clients),
               NPUSERVE_TEST_FUZZ_EXAMPLES=str(fuzz_examples),
               NPUSERVE_TEST_FUZZ_SEED=str(random.randrange(1, 2**31)),
               NPUSERVE_TEST_RELIABILITY_REPORT=str(report))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *TESTS]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def outcomes(junit: Path) -> dict[str, str]:
    """Test function name -> passed / failed / skipped (parametrized cases: the worst)."""
    if not junit.exists():
        return {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    out: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("name", "").split("[")[0]
        state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                 else "skipped" if case.find("skipped") is not None else "passed")
        if rank[state] >= rank.get(out.get(name, "passed"), 0):
            out[name] = state
    return out


def hostile_lan_rows(results: dict[str, str]) -> list[tuple[str, str]]:
    rows = []
    for defect, prefix in HOSTILE_LAN:
        names = [n for n in results if n.startswith(prefix)]
        state = results[names[0]] if names else "not run"
        rows.append((f"hostile LAN defect {defect}", f"{state} ({names[0] if names else prefix})"))
    return rows


def summarize(data: dict, pytest_code: int, results: dict[str, str] | None = None) -> str:
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
    rows += hostile_lan_rows(results or {})
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
        report, junit = Path(tmp) / "report.json", Path(tmp) / "junit.xml"
        code = run_suite(args.seconds, args.clients, args.fuzz_examples, report, junit)
        data = json.loads(report.read_text()) if report.exists() else {}
        results = outcomes(junit)
    print("\nnpuserve reliability suite\n")
    print(summarize(data, code, results))
    return code


if __name__ == "__main__":
    sys.exit(main())
