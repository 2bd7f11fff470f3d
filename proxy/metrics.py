"""Metrics: cheap counters on the hot path, Prometheus text at scrape time.

The data plane only bumps plain ints in a ``Stats`` object (no locks, no
label lookups). A prometheus-client collector turns them into metric families
when ``/metrics`` is scraped. With ``--workers N`` each worker writes a
snapshot of its counters and gauges to a shared folder every second
(``<pid>.json``), and a scrape of any worker merges them, so the numbers are
fleet-wide whichever worker answers:

- Counters are sums over every worker that ever ran. When a worker dies, its
  last snapshot is folded once into ``retired.json`` (by the supervisor when it
  reaps the pid, or by any worker that finds the pid gone) and the snapshot is
  removed, so a counter never goes back and never counts a worker twice. What
  a worker counted after its last snapshot (at most a second's worth) is lost
  if it is killed outright.
- Gauges come from live workers only: ``keyroute_workers`` is the number of
  live workers, and ``keyroute_generation`` the *lowest* generation in force
  over them, so one worker stuck on an older table shows.
- A scrape publishes the answering worker's snapshot before it reads the
  others', so successive scrapes never go back, whichever worker answers.

One lock file orders the two: folding holds it exclusively, a scrape holds it
shared while it reads, so a scrape sees a dead worker's counters either in its
snapshot or in ``retired.json``, never both and never neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("keyroute.metrics")

# Seconds; Prometheus' "le" buckets of the request latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
METRICS_DIR_ENV = "KEYROUTE_METRICS_DIR"
# Counters a worker reports among its gauges (they live outside ``Stats``):
# kept in the totals when the worker dies, like the ``Stats`` counters.
COUNTER_GAUGES = ("ejections", "table_helper_calls", "table_helper_fallbacks")
RETIRED = "retired.json"


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
    """Sum counter snapshots of several workers (``totals``: the
    ``COUNTER_GAUGES``, when a snapshot has them)."""
    out: dict[str, Any] = {
        "by_pod": {},
        "latency": [0] * (len(LATENCY_BUCKETS) + 1),
        "latency_sum": 0.0,
        "errors": {},
        "reloads": {},
        "last_reload_ok": None,
        "retries": 0,
        "failovers": {},
        "totals": {},
    }
    for snap in snaps:
        for pod, counts in snap["by_pod"].items():
            acc = out["by_pod"].setdefault(pod, [0] * 5)
            for i, n in enumerate(counts):
                acc[i] += n
        out["latency"] = [a + b for a, b in zip(out["latency"], snap["latency"], strict=True)]
        out["latency_sum"] += snap["latency_sum"]
        for key in ("errors", "reloads", "failovers", "totals"):
            for k, n in snap.get(key, {}).items():
                out[key][k] = out[key].get(k, 0) + n
        ok = snap["last_reload_ok"]
        if ok is not None and (out["last_reload_ok"] is None or ok > out["last_reload_ok"]):
            out["last_reload_ok"] = ok
        out["retries"] += snap["retries"]
    return out


def counters_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The counters of a published snapshot, with its ``COUNTER_GAUGES``."""
    gauges = doc["gauges"]
    return {**doc["counters"], "totals": {k: gauges[k] for k in COUNTER_GAUGES if k in gauges}}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: the pid was reused, but it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True  # no /proc: trust kill
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


class Retired:
    """What the dead workers counted: ``counters`` (a ``merge`` of their last
    snapshots) and ``workers`` (how many were folded in)."""

    __slots__ = ("counters", "workers")

    def __init__(self, counters: dict[str, Any] | None = None, workers: int = 0) -> None:
        self.counters = counters if counters is not None else merge([])
        self.workers = workers


@contextlib.contextmanager
def _locked(folder: str, how: int) -> Iterator[None]:
    with open(os.path.join(folder, "lock"), "ab") as lock:
        fcntl.flock(lock, how)  # released when closed
        yield


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            doc: dict[str, Any] = orjson.loads(fh.read())
    except FileNotFoundError:
        return None
    return doc


def _read_retired(folder: str) -> Retired:
    doc = _read(os.path.join(folder, RETIRED))
    return Retired() if doc is None else Retired(doc["counters"], doc["workers"])


def retire(folder: str, pid: int) -> bool:
    """Fold the last snapshot of dead worker ``pid`` into the retired totals
    and remove it. Safe to call from several processes at once (and again):
    only the first one to find the snapshot folds it. True if this call did."""
    path = os.path.join(folder, f"{pid}.json")
    with _locked(folder, fcntl.LOCK_EX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".tmp")  # killed mid-publish
        try:
            doc = _read(path)
        except orjson.JSONDecodeError:
            doc = None  # cannot happen with os.replace; drop it rather than fail every scrape
            os.unlink(path)
        if doc is None:
            return False
        retired = _read_retired(folder)
        data = orjson.dumps({"counters": merge([retired.counters, counters_of(doc)]), "workers": retired.workers + 1})
        tmp = os.path.join(folder, f".{RETIRED}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        # The new totals first, then the snapshot gone: both happen under the
        # lock, so a scrape never sees the worker twice or not at all.
        os.replace(tmp, os.path.join(folder, RETIRED))
        os.unlink(path)
    return True


class Gathered:
    """What a scrape reads from the shared folder: the snapshots of the other
    live workers, the counters of dead ones not yet folded, and the retired totals."""

    __slots__ = ("live", "dead", "retired")

    def __init__(self, live: list[dict[str, Any]], dead: list[dict[str, Any]], retired: Retired) -> None:
        self.live = live
        self.dead = dead
        self.retired = retired


class Shared:
    """Snapshot files of the workers of one supervisor, in ``KEYROUTE_METRICS_DIR``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pid = os.getpid()
        self.own = os.path.join(folder, f"{self.pid}.json")

    def publish(self, snap: dict[str, Any], gauges: dict[str, float]) -> None:
        """Share this worker's numbers; fold those of workers found dead."""
        self.write(snap, gauges)
        self.sweep()

    def write(self, snap: dict[str, Any], gauges: dict[str, float]) -> None:
        """Replace this worker's snapshot (atomically: a reader sees the old or the new one)."""
        tmp = self.own + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"counters": snap, "gauges": gauges}))
        os.replace(tmp, self.own)

    def sweep(self) -> None:
        """Fold the snapshots of workers that are gone (the supervisor does
        when it reaps one; this covers a supervisor that could not)."""
        for pid in self._pids():
            if not alive(pid):
                retire(self.folder, pid)

    def _pids(self) -> list[int]:
        pids = []
        for name in os.listdir(self.folder):
            stem, dot, ext = name.partition(".")
            if dot and ext == "json" and stem.isdigit() and int(stem) != self.pid:
                pids.append(int(stem))
        return pids

    def gather(self) -> Gathered:
        """The other workers' numbers, read under the shared lock. Snapshots of
        dead workers count as counters only, and are folded right after."""
        live: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        gone: list[int] = []
        with _locked(self.folder, fcntl.LOCK_SH):
            for pid in self._pids():
                try:
                    doc = _read(os.path.join(self.folder, f"{pid}.json"))
                except orjson.JSONDecodeError:
                    doc = None
                if doc is None:
                    continue
                if alive(pid):
                    live.append(doc)
                else:
                    dead.append(counters_of(doc))
                    gone.append(pid)
            retired = _read_retired(self.folder)
        for pid in gone:
            try:
                retire(self.folder, pid)
            except OSError as exc:  # read above all the same; the next scrape or publish folds it
                log.warning("cannot fold the metrics of dead worker %d into %s: %s", pid, self.folder, exc)
        return Gathered(live, dead, retired)


class RuntimeCollector(Collector):
    """Metric families from a worker's ``Stats`` and live gauges (plus the
    other workers' snapshots and the retired totals when there are several)."""

    def __init__(self, stats: Stats, gauges: Callable[[], dict[str, float]], shared: Shared | None) -> None:
        self.stats = stats
        self.gauges = gauges
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        own_gauges = self.gauges()
        own = self.stats.snapshot()
        snaps = [counters_of({"counters": own, "gauges": own_gauges})]
        gauge_sets = [own_gauges]
        retired = Retired()
        if self.shared is not None:
            try:
                # Published first: a later scrape answered by another worker
                # then reads at least what this one shows, so counters (and
                # the lowest generation) never appear to go back between
                # scrapes, whichever worker answers.
                self.shared.write(own, own_gauges)
                got = self.shared.gather()
            except OSError as exc:
                log.warning("cannot read the other workers' metrics in %s: %s", self.shared.folder, exc)
            else:
                snaps += [counters_of(doc) for doc in got.live] + got.dead + [got.retired.counters]
                gauge_sets += [doc["gauges"] for doc in got.live]
                retired = got.retired
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

        totals = c["totals"]
        for name, help_text in (
            ("ejections", "Pods ejected after consecutive failures."),
            ("table_helper_calls", "Calls (parse, compare, render a big table) answered by the helper process."),
            ("table_helper_fallbacks", "Calls run in a thread instead, because the helper process failed."),
        ):
            yield CounterMetricFamily(f"keyroute_{name}", help_text, value=totals.get(name, 0))
        yield CounterMetricFamily(
            "keyroute_workers_retired",
            "Worker processes that exited; what they counted is kept in the other counters.",
            value=retired.workers,
        )

        age = GaugeMetricFamily(
            "keyroute_seconds_since_last_reload", "Seconds since a table was last applied (-1: never)."
        )
        ok = c["last_reload_ok"]
        age.add_metric([], time.time() - ok if ok is not None else -1.0)
        yield age

        gen = GaugeMetricFamily(
            "keyroute_generation",
            "Generation of the table in force (0: none); with several workers the lowest over the live ones.",
        )
        gen.add_metric([], min(g["generation"] for g in gauge_sets))
        yield gen
        for name, help_text in (
            ("in_flight", "Requests in progress."),
            ("client_connections", "Open client connections."),
            ("pool_idle_connections", "Idle pooled connections to pods."),
            ("workers", "Live worker processes."),
            ("pods_ejected", "Pods ejected now (summed over workers)."),
            ("panic", "Workers in panic mode (too many pods ejected: routing as if all were healthy)."),
            ("native", "Workers running the compiled fast path (0: the pure-Python path)."),
        ):
            g = GaugeMetricFamily(f"keyroute_{name}", help_text)
            g.add_metric([], len(gauge_sets) if name == "workers" else sum(gs.get(name, 0) for gs in gauge_sets))
            yield g


def exposition(collector: RuntimeCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
