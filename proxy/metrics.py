"""Metrics: cheap counters on the hot path, Prometheus text at scrape time.

The data plane only bumps plain ints in a ``Stats`` object (no locks, no
label lookups). A prometheus-client collector turns them into metric families
when ``/metrics`` is scraped. With ``--workers N`` each worker writes a
snapshot of its counters to a shared folder every second, and a scrape of any
worker sums all snapshots, so counters are fleet-wide whichever worker answers.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds; Prometheus' "le" buckets of the request latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
METRICS_DIR_ENV = "KEYROUTE_METRICS_DIR"


class Stats:
    """Counters of one worker process."""

    __slots__ = ("by_pod", "latency", "latency_sum", "errors", "reloads", "last_reload_ok", "retries", "failovers")

    def __init__(self) -> None:
        self.by_pod: dict[str, list[int]] = {}  # pod -> counts by status class (index status // 100 - 1)
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.errors: dict[str, int] = {}
        self.reloads: dict[str, int] = {}
        self.last_reload_ok: float | None = None  # Unix time
        self.retries = 0
        self.failovers: dict[str, int] = {}

    def failover(self, reason: str) -> None:
        self.failovers[reason] = self.failovers.get(reason, 0) + 1

    def response(self, pod_id: str, status: int, seconds: float) -> None:
        """One response delivered to a client (from a pod, or made by the proxy)."""
        counts = self.by_pod.get(pod_id)
        if counts is None:
            counts = self.by_pod[pod_id] = [0, 0, 0, 0, 0]
        cls = status // 100 - 1
        if 0 <= cls < 5:
            counts[cls] += 1
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1
        if result == "applied":
            self.last_reload_ok = time.time()

    def snapshot(self) -> dict[str, Any]:
        return {
            "by_pod": self.by_pod,
            "latency": self.latency,
            "latency_sum": self.latency_sum,
            "errors": self.errors,
            "reloads": self.reloads,
            "last_reload_ok": self.last_reload_ok,
            "retries": self.retries,
            "failovers": self.failovers,
        }


def merge(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counter snapshots of several workers."""
    out: dict[str, Any] = {
        "by_pod": {},
        "latency": [0] * (len(LATENCY_BUCKETS) + 1),
        "latency_sum": 0.0,
        "errors": {},
        "reloads": {},
        "last_reload_ok": None,
        "retries": 0,
        "failovers": {},
    }
    for snap in snaps:
        for pod, counts in snap["by_pod"].items():
            acc = out["by_pod"].setdefault(pod, [0] * 5)
            for i, n in enumerate(counts):
                acc[i] += n
        out["latency"] = [a + b for a, b in zip(out["latency"], snap["latency"], strict=True)]
        out["latency_sum"] += snap["latency_sum"]
        for key in ("errors", "reloads", "failovers"):
            for k, n in snap[key].items():
                out[key][k] = out[key].get(k, 0) + n
        ok = snap["last_reload_ok"]
        if ok is not None and (out["last_reload_ok"] is None or ok > out["last_reload_ok"]):
            out["last_reload_ok"] = ok
        out["retries"] += snap["retries"]
    return out


class Shared:
    """Snapshot files of the workers of one supervisor, in ``KEYROUTE_METRICS_DIR``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.own = os.path.join(folder, f"{os.getpid()}.json")

    def publish(self, snap: dict[str, Any], gauges: dict[str, float]) -> None:
        tmp = self.own + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"counters": snap, "gauges": gauges}))
        os.replace(tmp, self.own)

    def others(self) -> list[dict[str, Any]]:
        docs = []
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if not name.endswith(".json") or path == self.own:
                continue
            try:
                with open(path, "rb") as fh:
                    docs.append(orjson.loads(fh.read()))
            except (OSError, orjson.JSONDecodeError):
                continue  # a worker mid-write or gone: its next snapshot counts
        return docs


class RuntimeCollector(Collector):
    """Metric families from a worker's ``Stats`` and live gauges (plus the
    other workers' snapshots when there are several)."""

    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, float]], shared: Shared | None) -> None:
        self.stats = stats
        self.gauges = gauges
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        own_gauges = self.gauges()
        snaps = [self.stats.snapshot()]
        gauge_sets = [own_gauges]
        if self.shared is not None:
            for doc in self.shared.others():
                snaps.append(doc["counters"])
                gauge_sets.append(doc["gauges"])
        c = merge(snaps)

        req = CounterMetricFamily(
            "keyroute_responses", "Responses sent to clients, by pod and status class.", labels=["pod", "code"]
        )
        for pod, counts in sorted(c["by_pod"].items()):
            for cls, n in zip(STATUS_CLASSES, counts, strict=True):
                if n:
                    req.add_metric([pod, cls], n)
        yield req

        hist = HistogramMetricFamily(
            "keyroute_request_duration_seconds", "From request head received to response sent, in seconds."
        )
        buckets = []
        running = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), c["latency"], strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        hist.add_metric([], buckets, c["latency_sum"])
        yield hist

        err = CounterMetricFamily(
            "keyroute_proxy_errors", "Errors answered by the proxy itself, by code.", labels=["code"]
        )
        for code, n in sorted(c["errors"].items()):
            err.add_metric([code], n)
        yield err

        rel = CounterMetricFamily("keyroute_reloads", "Table reloads by result.", labels=["result"])
        for result, n in sorted(c["reloads"].items()):
            rel.add_metric([result], n)
        yield rel

        yield CounterMetricFamily(
            "keyroute_retries", "Requests sent again (next candidate or fresh connection).", value=c["retries"]
        )

        fo = CounterMetricFamily(
            "keyroute_failovers", "Requests served by a pod other than the key's owner, by reason.", labels=["reason"]
        )
        for reason, n in sorted(c["failovers"].items()):
            fo.add_metric([reason], n)
        yield fo

        yield CounterMetricFamily(
            "keyroute_ejections",
            "Pods ejected after consecutive failures.",
            value=sum(g.get("ejections", 0) for g in gauge_sets),
        )

        for name, help_text in (
            ("table_helper_calls", "Calls (parse, compare, render a big table) answered by the helper process."),
            ("table_helper_fallbacks", "Calls run in a thread instead, because the helper process failed."),
        ):
            yield CounterMetricFamily(f"keyroute_{name}", help_text, value=sum(g.get(name, 0) for g in gauge_sets))

        age = GaugeMetricFamily(
            "keyroute_seconds_since_last_reload", "Seconds since a table was last applied (-1: never)."
        )
        ok = c["last_reload_ok"]
        age.add_metric([], time.time() - ok if ok is not None else -1.0)
        yield age

        gen = GaugeMetricFamily(
            "keyroute_generation", "Generation of the table in force (0: none), lowest over workers."
        )
        gen.add_metric([], min(g["generation"] for g in gauge_sets))
        yield gen
        for name, help_text in (
            ("in_flight", "Requests in progress."),
            ("client_connections", "Open client connections."),
            ("pool_idle_connections", "Idle pooled connections to pods."),
            ("workers", "Worker processes reporting."),
            ("pods_ejected", "Pods ejected now (summed over workers)."),
            ("panic", "Workers in panic mode (too many pods ejected: routing as if all were healthy)."),
        ):
            g = GaugeMetricFamily(f"keyroute_{name}", help_text)
            g.add_metric([], sum(gs.get(name, 1 if name == "workers" else 0) for gs in gauge_sets))
            yield g


def exposition(collector: RuntimeCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
