"""Reference backend pod: how a soft leader uses keyroute's headers.

Run it with the venv's Python (it imports keyroute's ``proxy`` package)::

    python bench/pod.py --id pod-a --listen 127.0.0.1:9001 \\
        --store /tmp/fleet.sqlite --table file:/tmp/table.json

Every pod of a table runs one of these, all with the same ``--store`` (a SQLite
file shared by the pods on the machine) and the same ``--table`` (the source
keyroute follows: ``file:PATH`` or keyroute serve-table's ``http://...``).

The HTTP interface, for requests that come through keyroute (the key is the
value of ``--key-header``, the path does not matter):

* ``GET`` / ``HEAD``: read the key's value. Served from this pod's memory when
  it loaded or wrote the key under the request's epoch (it is the key's soft
  leader), else from the store.
* ``PUT`` / ``POST``: write the body as the key's value, through the store,
  fenced by ``X-Keyroute-Epoch``: 200 when accepted, 409 ``stale_epoch`` when
  the store already holds a higher epoch for the key (a newer owner wrote it;
  this pod has been deposed for that key and drops what it held in memory).
  A write without an epoch is refused with 400: writes must come through
  keyroute.
* ``GET /stats`` (straight to the pod, not through keyroute): counters as JSON.
  ``GET /health``: 200.

Every answer names the pod (``X-Pod`` header and ``"pod"`` in the JSON body).

What it counts (``/stats``):

* ``writes_refused``: fencing refusals, writes whose epoch was below the
  highest epoch already written for the key (by any pod sharing the store);
* ``foreign_keys``: requests for a key whose owner, in the table of the
  generation stamped on the request (``X-Keyroute-Generation``), is another
  pod; ``foreign_as_backup`` of them came with ``X-Keyroute-Role: backup``
  (failover: expected while the owner is down); the others mean a request went
  to the wrong pod;
* ``misrouted``: ``X-Keyroute-Pod`` names another pod (the table maps this
  pod's URL to another id);
* ``unverified``: requests whose generation this pod never saw, so their owner
  could not be checked (see below).

How the pod knows the owner under a generation: it follows the same table
source as keyroute, with keyroute's own source code (``proxy.sources``: inotify
plus polling, atomic renames and the Kubernetes ConfigMap symlink swap, or the
long-poll protocol), keeps the last ``--history`` generations it has seen and
looks keys up with ``proxy.assignment``. A request stamped with a generation
newer than any it has seen waits up to ``--generation-wait`` seconds for the
source to deliver it (the proxy and the pod watch the same file, so that takes
milliseconds). Asking keyroute's admin ``/-/lookup`` instead would answer for
the table in force *now*, not for the generation the request was routed with,
which is exactly what differs during a change. A generation that was never
seen (a file rewritten twice faster than the watcher looked, or older than
this pod) is counted as ``unverified``, never guessed.

The store is one SQLite table with a conditional upsert, so the check and the
write are one atomic statement and two pods cannot both win. SQLite calls are
made on the event loop: each is one short statement in WAL mode, and a
reference pod should be easy to read. A fleet spread over machines needs a
shared store with the same conditional write (``UPDATE ... WHERE epoch <= ?``
in any SQL database, a compare-and-set elsewhere); the logic here stays the
same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy import assignment as core
from proxy.config import parse_address
from proxy.sources import Failure, open_source

log = logging.getLogger("keyroute.pod")

# -------------------------------------------------------------------- store


class FencedStore:
    """Per-key values in a SQLite file shared by every pod on the machine.

    A write carries its epoch and is applied only if no higher epoch was
    written for the key before; equal epochs are accepted (the same owner
    writing again, or a backup standing in under the same table)."""

    _UPSERT = (
        "INSERT INTO fenced (key, epoch, value, pod, generation) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(key) DO UPDATE SET epoch = excluded.epoch, value = excluded.value, "
        "pod = excluded.pod, generation = excluded.generation WHERE excluded.epoch >= fenced.epoch"
    )

    def __init__(self, path: str) -> None:
        self.path = path
        # Autocommit: every statement is its own transaction; wait for the
        # write lock rather than fail when another pod holds it.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        # Pods starting together race to create the file; switching it to WAL
        # does not wait for the lock (SQLite answers "locked" at once), so retry.
        for attempt in range(200):
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.05)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS fenced (key BLOB PRIMARY KEY, epoch INTEGER NOT NULL, "
            "value BLOB NOT NULL, pod TEXT NOT NULL, generation INTEGER NOT NULL) WITHOUT ROWID"
        )

    def write(self, key: bytes, epoch: int, value: bytes, pod: str, generation: int) -> int | None:
        """None when the write was applied, else the higher epoch that refused it."""
        if self.db.execute(self._UPSERT, (key, epoch, value, pod, generation)).rowcount == 1:
            return None
        row = self.db.execute("SELECT epoch FROM fenced WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else epoch

    def read(self, key: bytes) -> tuple[bytes, int, str] | None:
        """(value, epoch, writer pod) of the key, or None if it was never written."""
        row = self.db.execute("SELECT value, epoch, pod FROM fenced WHERE key = ?", (key,)).fetchone()
        return (bytes(row[0]), int(row[1]), str(row[2])) if row else None

    def close(self) -> None:
        self.db.close()


# -------------------------------------------------------------------- tables


class Generations:
    """The tables of the last ``keep`` generations seen on a source, by generation."""

    def __init__(self, source: str, keep: int, wait: float) -> None:
        self.source = source
        self.keep = keep
        self.wait = wait
        self.tables: OrderedDict[int, core.Assignment] = OrderedDict()
        self.latest = 0
        self.last_error: str | None = None
        self._changed = asyncio.Event()

    async def follow(self) -> None:
        """Feed ``tables`` from the source until cancelled."""
        src = open_source(self.source)
        async for item in src.updates():
            if isinstance(item, Failure):
                self.last_error = item.detail
                log.warning("table source %s: %s", self.source, item.detail)
                continue
            if item.generation in self.tables:
                continue
            self.tables[item.generation] = item
            self.latest = max(self.latest, item.generation)
            while len(self.tables) > self.keep:
                self.tables.popitem(last=False)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def get(self, generation: int) -> core.Assignment | None:
        """The table of ``generation``; waits a little for one newer than all seen."""
        table = self.tables.get(generation)
        if table is not None or generation <= self.latest:
            return table
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait):
                while generation not in self.tables and generation > self.latest:
                    await self._changed.wait()
        return self.tables.get(generation)


# -------------------------------------------------------------------- pod


@dataclass(slots=True)
class Counters:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    writes_refused: int = 0
    foreign_keys: int = 0
    foreign_as_backup: int = 0
    misrouted: int = 0
    unverified: int = 0
    cache_hits: int = 0
    bad_requests: int = 0


@dataclass(slots=True)
class Held:
    """What the pod holds in memory for a key it leads: valid while requests
    carry this epoch (a higher one means the key moved away and back)."""

    value: bytes | None
    epoch: int


class ReferencePod:
    def __init__(self, pod_id: str, key_header: str, store: FencedStore, generations: Generations) -> None:
        self.id = pod_id
        self.key_header = key_header
        self.store = store
        self.generations = generations
        self.counters = Counters()
        self.memory: dict[bytes, Held] = {}
        self._pod_header = {"X-Pod": pod_id}

    def _answer(self, status: int, doc: dict[str, Any]) -> web.Response:
        doc["pod"] = self.id
        return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json",
                            headers=self._pod_header)  # fmt: skip

    def _bad(self, detail: str) -> web.Response:
        self.counters.bad_requests += 1
        return self._answer(400, {"error": "bad_request", "detail": detail})

    async def handle(self, request: web.Request) -> web.Response:
        c = self.counters
        c.requests += 1
        h = request.headers
        raw_key = h.get(self.key_header)
        if raw_key is None:
            return self._bad(f"no {self.key_header} header")
        key = raw_key.encode("utf-8", "surrogateescape")
        try:
            generation = int(h.get("X-Keyroute-Generation", "0"))
            epoch = int(h.get("X-Keyroute-Epoch", "0"))
        except ValueError:
            return self._bad("X-Keyroute-Generation and X-Keyroute-Epoch must be integers")
        role = h.get("X-Keyroute-Role", "")
        via_pod = h.get("X-Keyroute-Pod")
        if via_pod is not None and via_pod != self.id:
            c.misrouted += 1
        if generation:
            table = await self.generations.get(generation)
            if table is None:
                c.unverified += 1
            elif table.lookup(key).pod.id != self.id:
                c.foreign_keys += 1
                if role == "backup":
                    c.foreign_as_backup += 1
        if request.method in ("GET", "HEAD"):
            return self._read(key, epoch, generation, role)
        if request.method in ("PUT", "POST"):
            return self._write(key, epoch, generation, role, await request.read())
        return self._answer(405, {"error": "method_not_allowed", "detail": "GET/HEAD read, PUT/POST write"})

    def _read(self, key: bytes, epoch: int, generation: int, role: str) -> web.Response:
        self.counters.reads += 1
        held = self.memory.get(key)
        cached = held is not None and epoch and held.epoch == epoch
        if cached:
            self.counters.cache_hits += 1
            value = held.value  # type: ignore[union-attr]
        else:
            row = self.store.read(key)
            value = row[0] if row else None
            stored_epoch = row[1] if row else 0
            # Hold it only as the key's leader under an epoch no newer owner has written past.
            if epoch and role != "backup" and stored_epoch <= epoch:
                self.memory[key] = Held(value, epoch)
        doc = {
            "key": key.decode("utf-8", "replace"),
            "value": None if value is None else value.decode("utf-8", "replace"),
            "epoch": epoch,
            "generation": generation,
            "cached": bool(cached),
        }
        return self._answer(200, doc)

    def _write(self, key: bytes, epoch: int, generation: int, role: str, value: bytes) -> web.Response:
        c = self.counters
        c.writes += 1
        if not epoch:
            return self._bad("a write needs X-Keyroute-Epoch: send it through keyroute")
        higher = self.store.write(key, epoch, value, self.id, generation)
        doc: dict[str, Any] = {"key": key.decode("utf-8", "replace"), "epoch": epoch, "generation": generation}
        if higher is not None:
            c.writes_refused += 1
            # A newer owner has written this key: what this pod holds for it under an
            # older epoch is stale (a late request with an old epoch changes nothing else).
            held = self.memory.get(key)
            if held is not None and held.epoch < higher:
                del self.memory[key]
            doc.update(error="stale_epoch", detail=f"epoch {epoch} is below {higher}, already written", highest=higher)
            return self._answer(409, doc)
        if role != "backup":
            self.memory[key] = Held(value, epoch)
        doc["written"] = True
        return self._answer(200, doc)

    async def stats(self, request: web.Request) -> web.Response:
        g = self.generations
        doc = asdict(self.counters)
        doc.update(
            keys_in_memory=len(self.memory),
            generation_latest=g.latest,
            generations_known=list(g.tables),
            table_error=g.last_error,
            store=self.store.path,
        )
        return self._answer(200, doc)

    async def health(self, request: web.Request) -> web.Response:
        return self._answer(200, {"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def serve(args: argparse.Namespace) -> None:
    host, port = parse_address(args.listen, "--listen")
    store = FencedStore(args.store)
    generations = Generations(args.table, args.history, args.generation_wait)
    pod = ReferencePod(args.id, args.key_header, store, generations)
    follower = asyncio.create_task(generations.follow())
    runner = web.AppRunner(pod.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s", orjson.dumps({"pod": args.id, "listen": f"{host}:{port}", "store": args.store,
                                 "table": args.table}).decode())  # fmt: skip
    try:
        await stop.wait()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await runner.cleanup()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", required=True, help="this pod's id in the table")
    ap.add_argument("--listen", default="127.0.0.1:9001", help="HOST:PORT (default 127.0.0.1:9001)")
    ap.add_argument("--store", required=True, help="SQLite file shared by the pods (created if missing)")
    ap.add_argument("--table", required=True, help="the table source keyroute follows: file:PATH or http(s)://...")
    ap.add_argument("--key-header", default="X-Routing-Key", help="keyroute's proxy.key_header")
    ap.add_argument("--history", type=int, default=64, help="generations kept to check owners (default 64)")
    ap.add_argument(
        "--generation-wait",
        type=float,
        default=2.0,
        help="seconds a request stamped with an unseen newer generation waits for the source (default 2)",
    )
    args = ap.parse_args(argv)
    if not args.table.startswith(("file:", "http://", "https://")):
        args.table = f"file:{args.table}"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per file event otherwise
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a keyroute dependency
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
