"""Locust load for keyroute in front of reference pods (bench/pod.py).

Start the pods and keyroute first (``python bench/fleet.py`` does all of it),
then, with locust installed (``pip install -e '.[bench]'``)::

    locust -f bench/locustfile.py --headless -u 32 -r 32 -t 30s \\
        --host http://127.0.0.1:8080 --table /path/to/table.json
    # the same while the table is rewritten every 3 s (a pod drained, then back):
    locust -f bench/locustfile.py --headless -u 32 -r 32 -t 30s \\
        --host http://127.0.0.1:8080 --table /path/to/table.json --rewrite-every 3

``--table`` is the file keyroute follows (``assignment.source = "file:..."``).

Each user sends, with no wait between requests, one request at a time for a
key drawn Zipf-like (``--zipf-s``, 1.1) from ``--keys`` (100,000) keys, in the
``--key-header`` header: a write (``PUT /kv``, share ``--write-share``, 0.2) or
a read (``GET /kv``). Every answer is checked:

* 200, or 409 for a write the pod refused by fencing (counted as ``fenced``,
  not a failure: the pod did its job);
* the pod that answered (its ``X-Pod``) is the one keyroute names in
  ``X-Keyroute-Pod``;
* that pod owns the key in the table of the generation keyroute stamped on the
  answer (``X-Keyroute-Generation``). Tables come from ``--table``: read at
  the start, re-read when the file changes (checked every 0.2 s, and at once
  when an answer names an unknown generation), and, with ``--rewrite-every``,
  recorded as this file writes them, so every generation in force is known.

An answer served by another pod is a locust failure ("served by X; owner
under generation G is Y"), so it shows in locust's stats and failures tables
and makes locust exit with 1. The *affinity*, the share of checked answers
served by their owner, is logged every 10 s and at exit (with the counts of
fenced writes and of answers whose generation was unknown), and written as
JSON to ``--fleet-summary PATH`` if given. With ``--master``/``--worker`` the
workers' counts are summed on the master.

``--proxies URL,URL``: several keyroute replicas in front of the same pods;
user i sends to replica i mod n (``--host`` is still required by locust).

``--rewrite-every S`` (run by the master, or the single local process):
every S seconds a new generation of the table is written to ``--table`` with
an atomic rename, cycling through the pods: drain one (its slices move to
their first active backup, with new epochs), then bring it back with a
rebalance (slices move to it, with new epochs), then the next pod. This is
what ``keyroute gen --from T --drain P`` and ``--rebalance`` write.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.runners import MasterRunner, WorkerRunner

from proxy import assignment as core

log = logging.getLogger("keyroute.locust")
REPORT_EVERY = 10.0
FILE_CHECK_EVERY = 0.2


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("keyroute fleet")
    group.add_argument("--table", default="", help="the table file keyroute follows (needed for the affinity check)")
    group.add_argument("--keys", type=int, default=100_000, help="distinct routing keys (default 100000)")
    group.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of key popularity (default 1.1)")
    group.add_argument("--write-share", type=float, default=0.2, help="share of requests that are writes (default 0.2)")
    group.add_argument("--key-header", default="X-Routing-Key", help="keyroute's proxy.key_header")
    group.add_argument(
        "--rewrite-every", type=float, default=0.0, help="seconds between table rewrites (default 0: never)"
    )
    group.add_argument("--fleet-summary", default="", help="write the affinity counts as JSON to this file at exit")
    group.add_argument(
        "--proxies",
        default="",
        help="comma list of keyroute base URLs (replicas): users are spread over them (default: --host)",
    )


# -------------------------------------------------------------------- keys


class ZipfKeys:
    """Keys ``k1 .. kN``; key ``kr`` is drawn with probability proportional to ``1 / r**s``."""

    def __init__(self, n: int, s: float) -> None:
        self.names = [f"k{r}" for r in range(1, n + 1)]
        self.cum = list(itertools.accumulate(1.0 / r**s for r in range(1, n + 1)))

    def draw(self, rnd: random.Random) -> str:
        return self.names[bisect.bisect_left(self.cum, rnd.random() * self.cum[-1])]


# -------------------------------------------------------------------- tables


class Tables:
    """Every generation of the table seen in the file or written by the rewriter."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.by_generation: dict[int, core.Assignment] = {}
        self.latest: core.Assignment | None = None
        self._seen: tuple[int, int, int] | None = None
        self._written: tuple[int, int, int] | None = None  # the rewriter's last file: known already

    def wrote(self) -> None:
        st = os.stat(self.path)
        self._written = (st.st_ino, st.st_size, st.st_mtime_ns)

    def add(self, table: core.Assignment) -> None:
        self.by_generation[table.generation] = table
        if self.latest is None or table.generation > self.latest.generation:
            self.latest = table

    def reload(self) -> None:
        """Read the file if it changed since the last read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        if ident == self._seen or ident == self._written:
            return
        try:
            table = core.parse(Path(self.path).read_bytes())
        except (OSError, core.AssignmentError) as exc:
            log.warning("table %s: %s", self.path, exc)
            return
        self._seen = ident
        self.add(table)

    def owner(self, key: bytes, generation: int) -> str | None:
        table = self.by_generation.get(generation)
        if table is None:
            self.reload()
            table = self.by_generation.get(generation)
        return None if table is None else table.lookup(key).pod.id

    def watch(self) -> None:
        while True:
            self.reload()
            gevent.sleep(FILE_CHECK_EVERY)


class Rewriter:
    """Writes a new generation every ``every`` seconds: drain a pod, bring it back, next pod."""

    def __init__(self, tables: Tables, every: float) -> None:
        self.tables = tables
        self.every = every
        self.writes = 0
        self.moved: list[float] = []

    def run(self) -> None:
        assert self.tables.latest is not None
        order = sorted(p.id for p in self.tables.latest.pods.values() if p.active)
        for pod_id in itertools.cycle(order):
            for state in ("draining", "active"):
                gevent.sleep(self.every)
                self.step(pod_id, state)

    def step(self, pod_id: str, state: str) -> None:
        old = self.tables.latest
        assert old is not None
        specs = [(p.id, p.url, p.weight, state if p.id == pod_id else p.state) for p in old.pods.values()]
        generation = max(old.generation + 1, int(time.time() * 1000))
        new = core.evolve(old, core.make_pods(specs), generation, rebalance=state == "active")
        # Known before keyroute can stamp it on an answer.
        self.tables.add(new)
        path = Path(self.tables.path)
        tmp = path.with_name(f".{path.name}.{generation}.tmp")
        tmp.write_bytes(new.dumps())
        os.replace(tmp, path)
        self.tables.wrote()
        self.writes += 1
        self.moved.append(core.moved_share(old, new))
        log.info("table generation %d: %s %s, moved %.1f%% of the key space",
                 generation, pod_id, state, 100 * self.moved[-1])  # fmt: skip


# -------------------------------------------------------------------- affinity


@dataclass
class Affinity:
    requests: int = 0
    owner: int = 0  # served by the key's owner under the stamped generation
    other: int = 0  # served by another pod
    unverified: int = 0  # generation unknown here
    fenced: int = 0  # writes refused by the pod's fencing (409)
    errors: int = 0  # other statuses, missing headers, X-Pod != X-Keyroute-Pod

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def share(self) -> float | None:
        checked = self.owner + self.other
        return self.owner / checked if checked else None

    def line(self) -> str:
        share = "n/a" if self.share is None else f"{100 * self.share:.3f}%"
        return (
            f"affinity {share} ({self.owner:,} served by their owner, {self.other:,} by another pod, "
            f"{self.unverified:,} of unknown generation); fenced writes {self.fenced:,}; "
            f"other errors {self.errors:,}; answers {self.requests:,}"
        )


class Fleet:
    """State shared by the users of this process."""

    def __init__(self) -> None:
        self.affinity = Affinity()
        self.workers: dict[str, dict[str, int]] = {}  # master: latest totals per worker
        self.keys: ZipfKeys | None = None
        self.tables: Tables | None = None
        self.rewriter: Rewriter | None = None
        self.greenlets: list[gevent.Greenlet] = []

    def totals(self) -> Affinity:
        total = Affinity(**asdict(self.affinity))
        for counts in self.workers.values():
            total.add(counts)
        return total


FLEET = Fleet()


@events.init.add_listener
def _init(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    if isinstance(environment.runner, WorkerRunner):

        @events.report_to_master.add_listener
        def _report(client_id: str, data: dict[str, Any]) -> None:
            data["keyroute_affinity"] = asdict(FLEET.affinity)

    if isinstance(environment.runner, MasterRunner):

        @events.worker_report.add_listener
        def _collect(client_id: str, data: dict[str, Any]) -> None:
            if "keyroute_affinity" in data:
                FLEET.workers[client_id] = data["keyroute_affinity"]


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if not opts.table:
        log.warning("no --table: answers cannot be checked against their owner (affinity n/a)")
    FLEET.tables = Tables(opts.table) if opts.table else None
    if FLEET.tables is not None:
        FLEET.tables.reload()
        if FLEET.tables.latest is None:
            raise SystemExit(f"--table {opts.table}: cannot read a table there")
        FLEET.greenlets.append(gevent.spawn(FLEET.tables.watch))
    if not isinstance(environment.runner, MasterRunner):
        FLEET.keys = ZipfKeys(opts.keys, opts.zipf_s)
    if not isinstance(environment.runner, WorkerRunner):
        FLEET.greenlets.append(gevent.spawn(_report_loop))
        if opts.rewrite_every > 0:
            if FLEET.tables is None:
                raise SystemExit("--rewrite-every needs --table")
            FLEET.rewriter = Rewriter(FLEET.tables, opts.rewrite_every)
            FLEET.greenlets.append(gevent.spawn(FLEET.rewriter.run))


def _report_loop() -> None:
    while True:
        gevent.sleep(REPORT_EVERY)
        log.info("%s", FLEET.totals().line())


@events.test_stop.add_listener
def _stop(environment: Any, **_: Any) -> None:
    for g in FLEET.greenlets:
        g.kill(block=False)
    FLEET.greenlets.clear()


@events.quitting.add_listener
def _quitting(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    total = FLEET.totals()
    print(total.line(), flush=True)
    path = environment.parsed_options.fleet_summary if environment.parsed_options else ""
    if path:
        doc: dict[str, Any] = {**asdict(total), "affinity": total.share}
        rw = FLEET.rewriter
        doc["table_writes"] = rw.writes if rw else 0
        doc["moved_shares"] = rw.moved if rw else []
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# -------------------------------------------------------------------- users


class FleetUser(FastHttpUser):
    """One client: a request at a time, no wait, for Zipf-drawn keys."""

    _count = itertools.count()

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.rnd = random.Random()
        self.header = opts.key_header
        self.write_share = opts.write_share
        self.seq = 0
        proxies = [u.rstrip("/") for u in opts.proxies.split(",") if u]
        # With several replicas, user i talks to replica i mod n, all the time.
        self.url = f"{proxies[next(self._count) % len(proxies)]}/kv" if proxies else "/kv"

    @task
    def request(self) -> None:
        assert FLEET.keys is not None
        key = FLEET.keys.draw(self.rnd)
        headers = {self.header: key}
        if self.rnd.random() < self.write_share:
            self.seq += 1
            method, body = "PUT", f"{id(self):x}-{self.seq}".encode()
        else:
            method, body = "GET", None
        with self.client.request(
            method, self.url, name=f"{method} /kv", headers=headers, data=body, catch_response=True
        ) as r:
            self.check(r, key, method)

    def check(self, r: Any, key: str, method: str) -> None:
        a = FLEET.affinity
        a.requests += 1
        status = r.status_code
        if status == 409 and method == "PUT":
            a.fenced += 1
        elif status != 200:
            a.errors += 1
            r.failure(f"status {status}")
            return
        pod = r.headers.get("X-Keyroute-Pod")
        generation = r.headers.get("X-Keyroute-Generation")
        if pod is None or generation is None or r.headers.get("X-Pod") != pod:
            a.errors += 1
            r.failure(f"X-Keyroute-Pod {pod!r}, X-Keyroute-Generation {generation!r}, X-Pod {r.headers.get('X-Pod')!r}")
            return
        if FLEET.tables is None:
            r.success()
            return
        owner = FLEET.tables.owner(key.encode(), int(generation))
        if owner is None:
            a.unverified += 1
        elif owner == pod:
            a.owner += 1
        else:
            a.other += 1
            r.failure(f"served by {pod}; owner under generation {generation} is {owner}")
            return
        r.success()
