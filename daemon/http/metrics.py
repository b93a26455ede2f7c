"""A small Prometheus text-format registry: counters and latency histograms."""

from __future__ import annotations

import collections
from collections.abc import Iterable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, str, Labels, float]  # name, help, labels, value


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class Registry:
    def __init__(self) -> None:
        self.counters: dict[str, collections.Counter[Labels]] = collections.defaultdict(
            collections.Counter)
        self.histograms: dict[str, dict[Labels, Histogram]] = collections.defaultdict(dict)
        self.help: dict[str, str] = {}

    def inc(self, name: str, labels: Labels = (), value: float = 1, help: str = "") -> None:
        self.counters[name][labels] += value
        self.help.setdefault(name, help)

    def observe(self, name: str, labels: Labels, value: float, help: str = "") -> None:
        hist = self.histograms[name].get(labels)
        if hist is None:
            hist = self.histograms[name][labels] = Histogram()
        hist.observe(value)
        self.help.setdefault(name, help)

    def render(self, gauges: Iterable[Sample] = (), totals: Iterable[Sample] = ()) -> str:
        """Text exposition. `gauges` and `totals` are (name, help, labels, value) read at
        scrape time: gauges go up and down (queue depth), totals only grow (loads, bytes
        read) and are typed `counter` so rate() works on them; their names end in _total."""
        out: list[str] = []
        for name, series in sorted(self.counters.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}")
            out.append(f"# TYPE {name} counter")
            out.extend(f"{name}{_fmt_labels(lb)} {v:g}" for lb, v in sorted(series.items()))
        for name, series in sorted(self.histograms.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}")
            out.append(f"# TYPE {name} histogram")
            for lb, h in sorted(series.items()):
                for bound, count in zip(BUCKETS, h.counts, strict=True):
                    out.append(f"{name}_bucket{_fmt_labels(lb, [('le', f'{bound:g}')])} {count}")
                out.append(f"{name}_bucket{_fmt_labels(lb, [('le', '+Inf')])} {h.total}")
                out.append(f"{name}_sum{_fmt_labels(lb)} {h.sum:.6f}")
                out.append(f"{name}_count{_fmt_labels(lb)} {h.total}")
        out += _samples(gauges, "gauge") + _samples(totals, "counter")
        return "\n".join(out) + "\n"


def _samples(samples: Iterable[Sample], kind: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for name, help_text, lb, value in samples:
        if name not in seen:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            seen.add(name)
        out.append(f"{name}{_fmt_labels(lb)} {value:g}")
    return out
