"""Work on big tables, done in a helper process so the event loop never stalls.

Parsing a 100k-slice table takes a few hundred milliseconds of Python and
allocates about a million objects. In a thread of the proxy's own process it
would hold the GIL and set off full garbage collections that stop the event
loop for tens of milliseconds at a time. So big tables are parsed (and
compared, for the reload log) in one helper process per proxy worker:

* the helper (``python -m proxy.offload``) is started on first use and kept;
  it runs at nice 19, so on a busy core it takes mostly the time the proxy
  leaves idle (``SCHED_IDLE`` measured the same under 80% load, but starves
  a table completely while the proxy is saturated, which is when an operator
  may be adding pods). It is a fresh
  interpreter that imports only this module: unlike ``multiprocessing``'s
  spawn, it never re-runs the embedding program's main module;
* it returns an ``Assignment`` as flat columns (see ``Assignment.__reduce__``):
  unpickling one is a few memory copies, with no per-slice objects;
* calls go one at a time over a socket pair (pickled, framed by
  ``multiprocessing.connection``), from a thread of the default executor
  that waits on the socket without the GIL;
* the helper keeps the last ``KEEP`` tables it returned, and a call that
  passes one of them back (``moved_share`` of the old and the new table, the
  admin view) sends a reference instead of pickling megabytes again;
* the helper exits after ``idle_exit`` seconds without a call (60 s), so
  its memory (up to ~160 MB while parsing a 100k-slice table) is held only
  around reloads; the next call starts a new one;
* a table parsed in the helper is also checked there against ``baseline``,
  the table in force (``epoch_regression``), which ``judge`` then takes as
  done instead of walking two big tables on the event loop;
* if the helper dies, the call that saw it falls back to a thread, and the
  next call starts a new helper. Inputs beyond the bounds of
  ``proxy.assignment`` (bytes, pods, slices x pods of a generated table) are
  refused before either: nothing huge is ever parsed in the proxy's process.

Small tables are parsed inline: for them the round trip costs more than the
work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from .assignment import (
    DEFAULT_SLICE_COUNT,
    MAX_GENERATED,
    MAX_SLICES,
    MAX_TABLE_BYTES,
    RENDEZVOUS,
    Assignment,
    AssignmentError,
    epoch_regression,
    from_json,
    loads,
    moved_share,
    parse,
    too_big,
)

log = logging.getLogger("keyroute.offload")
T = TypeVar("T")

# Tables up to this size are parsed inline: an explicit table of 256 slices
# (or a pods-only one) is parsed in well under a millisecond.
INLINE_BYTES = 32 * 1024
# A pods-only table is expanded by ``generate()``, which costs about 0.3 µs
# per slice and pod: up to this many (slice_count x pods, e.g. the default
# 4096 slices of 4 pods: ~5 ms) it runs inline, in one go, which beats a round
# trip to a helper that only gets the CPU the proxy leaves idle.
INLINE_GENERATE = 16 * 1024
# ``moved_share`` walks both tables: inline below this many slices in total.
INLINE_COMPARE = 16 * 1024
# A table in the compact form costs about 0.5 µs per slice it spans, however
# few bytes it takes ("0-262143" is every slice of a big grid): up to this
# many slices (~2 ms) it is parsed inline. Its rendezvous backups cost like
# ``generate()`` and count against ``INLINE_GENERATE``.
INLINE_COMPACT = 4096
# Tables the helper keeps (the one in force, the new one, one more).
KEEP = 3


@dataclass(frozen=True, slots=True)
class _Kept:
    """In a call's arguments: the table the helper returned for call ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Vetted:
    """A table and ``epoch_regression(baseline, table)``, from the helper."""

    table: Assignment
    regression: str | None


def read_table(path: str) -> Assignment:
    """Read and parse a table file (runs in the helper for big files)."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_TABLE_BYTES + 1)  # parse() names the limit
    return parse(data)


def vet(fn: Callable[[Any], Assignment], arg: Any, baseline: Assignment) -> Vetted:
    """``fn(arg)``, and how it compares with ``baseline`` (in the helper)."""
    table = fn(arg)
    return Vetted(table, epoch_regression(baseline, table))


def _table_of(value: Any) -> Assignment | None:
    """The table a call returned, if any (the helper keeps it for later calls)."""
    if isinstance(value, Vetted):
        return value.table
    return value if isinstance(value, Assignment) else None


def _helper(conn: Connection, low_priority: bool, idle_exit: float) -> None:
    """The helper process: run each call it is sent, answer with its result
    or its exception. Exits when the proxy closes the pipe (or dies), or
    with status 0 after ``idle_exit`` seconds without a call."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the proxy's to handle
    if low_priority:
        os.nice(19)
    kept: dict[int, Assignment] = {}  # mirrors Offload._kept
    while True:
        try:
            if not conn.poll(idle_exit):
                return
            seq, fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            value = fn(*[kept[a.seq] if isinstance(a, _Kept) else a for a in args])
            result: Any = (True, value)
        except Exception as exc:
            result = (False, exc)
        else:
            table = _table_of(value)
            if table is not None:
                kept[seq] = table
                while len(kept) > KEEP:
                    del kept[min(kept)]
        try:
            conn.send(result)
        except OSError:
            return
        except Exception as exc:  # a result that does not pickle
            conn.send((False, RuntimeError(f"{fn.__name__}: unpicklable result: {exc!r}")))


class Offload:
    """One helper process, started on first use; see the module docstring.
    ``low_priority=False`` keeps the helper at normal priority (``keyroute
    serve-table``, whose only work is tables)."""

    def __init__(self, *, low_priority: bool = True, idle_exit: float = 60.0) -> None:
        self.low_priority = low_priority
        self.idle_exit = idle_exit
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._seq = 0
        self._last_done = 0.0  # when the helper last answered, or started
        # (table, seq), oldest first; weak, so that a table out of service is
        # freed here as soon as elsewhere.
        self._kept: list[tuple[weakref.ref[Assignment], int]] = []
        self.calls = 0  # calls answered by the helper
        self.fallbacks = 0  # calls run in a thread because the helper failed
        # The table in force (set by its owner as it publishes one): big
        # tables are checked against it in the helper (``epoch_regression``).
        self.baseline: Assignment | None = None

    async def parse(self, data: bytes) -> Assignment:
        """Parse and validate a table; raises ``AssignmentError``."""
        if len(data) < INLINE_BYTES:
            doc = loads(data)
            if not _expands(doc):
                return from_json(doc, data)
        elif len(data) > MAX_TABLE_BYTES:
            raise AssignmentError(too_big(len(data)))
        return await self._vetted(parse, data)

    async def read(self, path: str) -> Assignment:
        """Read and parse a table file; raises ``OSError`` or ``AssignmentError``."""
        size = os.stat(path).st_size
        if size < INLINE_BYTES:
            with open(path, "rb") as fh:
                return await self.parse(fh.read(MAX_TABLE_BYTES + 1))
        if size > MAX_TABLE_BYTES:
            raise AssignmentError(too_big(size))
        return await self._vetted(read_table, path)

    async def _vetted(self, fn: Callable[[Any], Assignment], arg: Any) -> Assignment:
        """``fn(arg)`` in the helper, checked there against the baseline."""
        baseline = self.baseline
        if baseline is None:
            return await self.run(fn, arg)
        vetted = await self.run(vet, fn, arg, baseline)
        vetted.table.vetted(baseline, vetted.regression)
        return vetted.table

    async def moved_share(self, old: Assignment, new: Assignment) -> float:
        if old.slice_count + new.slice_count < INLINE_COMPARE:
            return moved_share(old, new)
        return await self.run(moved_share, old, new)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the helper (a thread if the helper fails)."""
        ok, value = await asyncio.get_running_loop().run_in_executor(None, self._call, fn, args)
        if not ok:
            raise value
        result: T = value
        return result

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
        with self._lock:
            for attempt in range(2):
                try:
                    conn = self._connect()
                    self._seq += 1
                    conn.send((self._seq, fn, tuple(map(self._ref, args))))
                    answer: tuple[bool, Any] = conn.recv()
                    self._last_done = time.monotonic()
                    self.calls += 1
                    table = _table_of(answer[1]) if answer[0] else None
                    if table is not None:
                        self._kept = [*self._kept, (weakref.ref(table), self._seq)][-KEEP:]
                    if self._closed:  # closed while we waited: close() left the helper to us
                        self._stop()
                    return answer
                except (EOFError, OSError) as exc:
                    idle = self._idle_for() >= self.idle_exit - self._margin()
                    self._stop()
                    if self._closed:
                        raise OSError("offload is closed") from exc
                    if idle and attempt == 0:
                        continue  # it left as the call arrived: once more, on a new helper
                    self.fallbacks += 1
                    log.warning("table helper process failed (%s); this table is parsed in a thread", exc)
                    break
                except BaseException:
                    # E.g. an answer that does not unpickle: the helper may have
                    # kept a table we did not record. Start both sides afresh.
                    self._stop()
                    raise
        try:
            return True, fn(*args)
        except Exception as exc:
            return False, exc

    def _idle_for(self) -> float:
        """Seconds since the helper last answered (or started)."""
        return time.monotonic() - self._last_done

    def _margin(self) -> float:
        # The helper's idle clock started when it sent its last answer; ours
        # when we received it. A helper this close to leaving is replaced
        # before a call, not raced.
        return min(1.0, self.idle_exit / 4)

    def _ref(self, arg: Any) -> Any:
        for table, seq in self._kept:
            if arg is table():
                return _Kept(seq)
        return arg

    def _connect(self) -> Connection:
        if self._closed:
            raise OSError("offload is closed")
        if (
            self._conn is None
            or self._proc is None
            or self._proc.poll() is not None
            or self._idle_for() >= self.idle_exit - self._margin()
        ):
            self._stop()
            ours, theirs = socket.socketpair()
            with ours, theirs:
                fd = theirs.fileno()
                env = dict(os.environ)
                # The helper imports this package from where the proxy did.
                root = str(Path(__file__).resolve().parent.parent)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
                self._proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        __name__,
                        str(fd),
                        "low" if self.low_priority else "normal",
                        f"{self.idle_exit:g}",
                    ],
                    pass_fds=[fd],
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
                self._conn = Connection(ours.detach())
                self._last_done = time.monotonic()
        return self._conn

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._kept = []  # a new helper keeps nothing yet
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop the helper. Safe to call more than once; calls after it fail.
        Does not block: a call in progress stops the helper when it returns."""
        self._closed = True
        proc = self._proc
        if proc is not None:
            proc.kill()  # a call waiting on the helper gets EOF at once
        if self._lock.acquire(timeout=0.5):
            try:
                self._stop()
            finally:
                self._lock.release()


def _expands(doc: Any) -> bool:
    """Whether ``doc`` is a pods-only table big enough to generate off the
    loop, or a compact one that spans enough slices to parse off the loop."""
    if not isinstance(doc, dict) or "slices" in doc:
        return False
    count = doc.get("slice_count", DEFAULT_SLICE_COUNT)
    pods = doc.get("pods")
    if not isinstance(count, int) or not isinstance(pods, dict):
        return False  # invalid: from_json names the problem
    if "owners" in doc:
        splits = doc.get("splits")
        total = count + (len(splits) if isinstance(splits, list) else 0)
        if total > MAX_SLICES:
            return False  # refused at once
        rendezvous = doc.get("backups") == RENDEZVOUS
        return total > INLINE_COMPACT or (rendezvous and INLINE_GENERATE < total * len(pods) <= MAX_GENERATED)
    # Beyond MAX_GENERATED, from_json refuses it at once: no helper needed.
    return INLINE_GENERATE < count * len(pods) <= MAX_GENERATED


if __name__ == "__main__":
    # Run the helper of the imported module, not of this ``__main__`` copy:
    # the pickled ``_Kept`` references are instances of ``proxy.offload._Kept``.
    from proxy.offload import _helper as helper

    helper(Connection(int(sys.argv[1])), sys.argv[2] != "normal", float(sys.argv[3]))
