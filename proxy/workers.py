"""``--workers N``: N processes share the listening port with SO_REUSEPORT.

The parent binds the port first (so port 0 resolves once for all workers),
forks the workers, restarts any that die, and forwards SIGTERM/SIGINT to them.
A second signal is forwarded too, which makes the workers exit at once.

A table pushed to the admin listener (``PUT /-/assignment``) reaches one
worker. That worker shares it with the others through a folder of the
supervisor's (``KEYROUTE_PUSH_DIR``): ``assignment.json`` there is a symlink to
``table-<generation>.json``, swapped atomically and only ever to a higher
generation (under a lock, so two pushes to two workers cannot interleave).
Every worker follows it like a table file. A worker started again after a
crash starts on the newest table: the pushed one, or the table file if it
changed since the supervisor read it, whichever generation is higher.

Workers share metrics through another folder (``KEYROUTE_METRICS_DIR``, see
``metrics``). When the supervisor reaps a worker it folds the worker's last
snapshot into the retired totals before it starts the next one, so the dead
worker's gauges stop counting at once and its counters are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, cast

from .assignment import Assignment
from .config import Settings
from .metrics import METRICS_DIR_ENV, retire
from .sources import Failure

if TYPE_CHECKING:
    from .offload import Offload

log = logging.getLogger("keyroute.workers")

PUSH_DIR_ENV = "KEYROUTE_PUSH_DIR"
PUSHED = "assignment.json"


def pushed_path(folder: str) -> str:
    """The shared file of pushed tables (a symlink; absent until a push)."""
    return os.path.join(folder, PUSHED)


def pushed_generation(folder: str) -> int | None:
    """The generation of the last pushed table (read from the symlink's
    target, so it matches the content), or None before any push."""
    try:
        target = os.readlink(pushed_path(folder))
    except OSError:
        return None
    if not (target.startswith("table-") and target.endswith(".json")):
        return None
    try:
        return int(target[6:-5])
    except ValueError:
        return None


def share(folder: str, data: bytes, generation: int) -> str | None:
    """Publish a pushed table (``data``, already validated) to every worker.
    Returns None once shared (or if this very table was), else why not: a
    table of a higher or the same generation was pushed to a worker already.
    Raises ``OSError`` if the folder cannot be written."""
    link = pushed_path(folder)
    with open(os.path.join(folder, "lock"), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        current = pushed_generation(folder)
        if current is not None and generation <= current:
            if generation < current:
                return f"stale table: generation {generation} is below {current}, already pushed to another worker"
            with open(link, "rb") as fh:
                if fh.read() == data:
                    return None
            return f"conflicting table: generation {generation} was pushed to another worker with different content"
        name = f"table-{generation}.json"
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(folder, name))
        tmp_link = link + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_link)
        os.symlink(name, tmp_link)
        os.replace(tmp_link, link)
        if current is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, f"table-{current}.json"))
    return None


class PushedSource:
    """The tables pushed to the other workers: the shared file, followed like
    a table file. No file (nothing pushed yet) is not an error. ``in_force``:
    the generation this worker starts on; a pushed table not above it is not
    read again."""

    def __init__(self, folder: str, offload: Offload, in_force: int | None) -> None:
        from .sources.file import FileSource, identity

        self.path = pushed_path(folder)
        # Identity first: a push between the two reads makes it stale, so the
        # newer table is read.
        ident = identity(self.path)
        gen = pushed_generation(folder)
        known = ident if gen is not None and in_force is not None and in_force >= gen else None
        self.file = FileSource(self.path, offload=offload, known=known)

    @property
    def name(self) -> str:
        return f"push:{self.path}"

    async def updates(self) -> AsyncIterator[Assignment | Failure]:
        items = cast(AsyncGenerator[Assignment | Failure, None], self.file.updates())
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, Failure) and not os.path.lexists(self.path):
                    continue
                yield item


def _newest(
    settings: Settings, assignment: Assignment | None, known: tuple[int, ...] | None, push_dir: str
) -> tuple[Assignment | None, tuple[int, ...] | None]:
    """The table a (re)started worker starts on, and the identity of the
    table file it was read from: the supervisor's, unless the table file
    changed since (a reload) or a table was pushed, with a higher generation.
    Problems are logged and leave the worker on what it has (its sources
    report them once it serves)."""
    from . import sources

    best = assignment

    def consider(table: Assignment) -> None:
        nonlocal best
        if best is None or table.generation > best.generation:
            best = table

    source = settings.assignment.source
    now = sources.initial_identity(source)
    if now is not None and now != known:
        try:
            consider(sources.read_file(sources.file_path(source)))
            known = now
        except Exception as exc:
            log.warning("worker %d: table file changed and cannot be read now: %s", os.getpid(), exc)
    if os.path.lexists(pushed_path(push_dir)):
        try:
            consider(sources.read_file(pushed_path(push_dir)))
        except Exception as exc:
            log.warning("worker %d: pushed table cannot be read: %s", os.getpid(), exc)
    return best, known


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(settings: Settings, assignment: Assignment | None, n: int, known: tuple[int, ...] | None = None) -> int:
    from .server import run_worker

    host, port = settings.listen_address
    reserved = _reserve(host, port)
    port = reserved.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings = dataclasses.replace(settings, proxy=dataclasses.replace(settings.proxy, listen=listen))

    # Workers share their metrics through snapshot files here.
    metrics_dir = tempfile.mkdtemp(prefix="keyroute-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    # Tables pushed to one worker, for all of them (and for restarted ones).
    push_dir = tempfile.mkdtemp(prefix="keyroute-push-")
    os.environ[PUSH_DIR_ENV] = push_dir
    children: dict[int, float] = {}
    stopping = 0

    def spawn() -> None:
        # SIGTERM/SIGINT held until the new worker is in ``children``: one
        # that lands in between would not reach it (the supervisor would then
        # wait for it forever), and the worker must not run our handler.
        held = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            pid = os.fork()
            if pid == 0:
                reserved.close()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
                code = 1
                try:
                    code = run_worker(settings, *_newest(settings, assignment, known, push_dir))
                finally:
                    os._exit(code)
            children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping += 1
        for pid in list(children):
            try:
                os.kill(pid, signum if stopping == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(n):
        spawn()
    log.info("supervising %d workers on %s", n, listen)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        try:
            retire(metrics_dir, pid)
        except OSError as exc:  # the workers fold it when they find the pid gone
            log.warning("cannot fold the metrics of worker %d into %s: %s", pid, metrics_dir, exc)
        if stopping:
            continue
        exit_code = os.waitstatus_to_exitcode(code)
        log.warning("worker %d exited with %d; restarting", pid, exit_code)
        if time.monotonic() - started < 1.0:
            time.sleep(1.0)  # a worker that dies at once would otherwise spin
        if not stopping:
            spawn()
    reserved.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    shutil.rmtree(push_dir, ignore_errors=True)
    return status
