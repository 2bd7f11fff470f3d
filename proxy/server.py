"""The proxy process: serve the data plane (``http1``) on uvloop, with the
admin listener, health checks and metrics beside it, and shut down in a
fixed order; ``keyroute run`` and its workers start here."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

from . import native
from .assignment import Assignment
from .config import Settings
from .health import probe_loop
from .http1.client import ClientProtocol, access_log
from .runtime import Runtime

log = logging.getLogger("keyroute")

__all__ = ["Runtime", "check_accelerators", "main", "run_worker", "serve", "shutdown"]


def plain_json_access_log() -> None:
    """Access log lines are bare JSON objects on stderr (no logger prefix), so
    a log shipper can parse each line as it is."""
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False


def check_accelerators() -> None:
    """Refuse to run without uvloop and httptools' C parser."""
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"keyroute run: uvloop is required for the data plane and could not be imported ({exc})"
        ) from None
    try:
        from httptools.parser import parser  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"keyroute run: httptools' C parser is required and could not be imported ({exc})") from None


async def serve(
    settings: Settings,
    assignment: Assignment | None,
    shutdown_trigger: Awaitable[Any],
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[Runtime, list[socket.socket]], None] | None = None,
    with_admin: bool = False,
) -> Runtime:
    """Serve until ``shutdown_trigger`` completes, then shut down in order:
    stop accepting, let in-flight exchanges finish up to
    ``proxy.shutdown_timeout``, abort the rest, close the pools."""
    loop = asyncio.get_running_loop()
    rt = Runtime(settings, loop)
    if assignment is not None:
        rt.set_assignment(assignment)
    # Not an asyncio.Protocol subclass (a compiled class cannot be one), but
    # it has every method the loop calls.
    factory = lambda: cast(asyncio.Protocol, ClientProtocol(rt))  # noqa: E731
    if sock is not None:
        server = await loop.create_server(factory, sock=sock, backlog=4096)
    else:
        host, port = settings.listen_address
        server = await loop.create_server(
            factory,
            host,
            port,
            reuse_address=True,
            reuse_port=settings.worker_count > 1,
            backlog=4096,
        )
    admin_runner = None
    if with_admin:
        from . import admin

        host, port = settings.admin_address
        admin_runner = await admin.start(rt, host, port, reuse_port=settings.worker_count > 1)
        rt.admin_port = admin_runner.addresses[0][1]
    publisher = loop.create_task(rt.publish_metrics()) if rt.shared is not None else None
    prober = None
    u = settings.upstream
    if u.health_path:

        def targets() -> list[tuple[str, str, int]]:
            t = rt.table
            return [(p.id, p.host, p.port) for p in t.assignment.pods.values()] if t is not None else []

        prober = loop.create_task(
            probe_loop(
                targets,
                rt.health,
                path=u.health_path,
                interval=u.health_interval,
                timeout=u.connect_timeout,
                healthy_after=u.healthy_after,
            )
        )
    if on_ready is not None:
        on_ready(rt, list(server.sockets))
    try:
        await shutdown_trigger
    finally:
        for task in (publisher, prober):
            if task is not None:
                task.cancel()
        await shutdown(rt, server)
        if admin_runner is not None:
            await admin_runner.cleanup()
    return rt


async def shutdown(rt: Runtime, server: asyncio.base_events.Server) -> None:
    rt.closing = True
    server.close()
    for conn in list(rt.connections):
        conn.shutdown()
    deadline = rt.loop.time() + rt.settings.proxy.shutdown_timeout
    while rt.connections and rt.loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(rt.connections):
        conn.abort()
    rt.upstreams.close()
    rt.offload.close()
    await server.wait_closed()


# -- process entry points ---------------------------------------------------------


def main(settings: Settings) -> int:
    """``keyroute run``: load the table, then serve in this process or in
    ``proxy.workers`` supervised worker processes."""
    from . import sources, workers
    from .assignment import AssignmentError

    check_accelerators()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    plain_json_access_log()
    if native.ACTIVE:
        log.info("compiled fast path in use")
    else:
        log.warning("compiled fast path not in use: %s; running on the pure-Python path", native.WHY_NOT)
    try:
        # Taken before the read: a change after it is read again by the source.
        known = sources.initial_identity(settings.assignment.source)
        assignment = sources.load_initial(settings.assignment.source)
    except sources.SourceError as exc:
        print(f"keyroute run: {exc}", file=sys.stderr)
        return 2
    except AssignmentError as exc:
        print(f"keyroute run: invalid table: {exc}", file=sys.stderr)
        return 1
    n = settings.worker_count
    if n > 1:
        return workers.supervise(settings, assignment, n, known)
    return run_worker(settings, assignment, known)


def run_worker(settings: Settings, assignment: Assignment | None, known: tuple[int, ...] | None = None) -> int:
    """Serve on uvloop until SIGTERM/SIGINT; a second signal exits at once.
    ``known``: the identity of the table file when ``assignment`` was read
    from it; the file source skips its first read if the file still has it."""
    import uvloop

    from . import reload, sources

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[int] = loop.create_future()
        seen = 0

        def on_signal(signum: int) -> None:
            nonlocal seen
            seen += 1
            if seen == 1:
                log.info("signal %d: draining for up to %gs", signum, settings.proxy.shutdown_timeout)
                if not stop.done():
                    stop.set_result(signum)
            else:
                log.warning("signal %d again: exiting now", signum)
                os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        def ready(rt: Runtime, socks: list[socket.socket]) -> None:
            addrs = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in socks)
            table = rt.table
            gen = table.generation if table is not None else None
            log.info("pid %d serving on %s, admin port %s, generation %s", os.getpid(), addrs, rt.admin_port, gen)

            a = settings.assignment
            source = sources.open_source(
                a.source,
                watch=a.watch,
                poll_interval=a.poll_interval,
                authorization=a.authorization,
                offload=rt.offload,
                known=known,
            )
            watcher.append(reload.follow(rt, source))

        watcher: list[asyncio.Task[None]] = []
        try:
            await serve(settings, assignment, stop, on_ready=ready, with_admin=True)
        finally:
            for task in watcher:
                task.cancel()
        log.info("pid %d stopped", os.getpid())

    # What is loaded by now (modules, the first table) lives as long as the
    # worker: keep it out of full garbage collections, which then walk only
    # what serving creates. Without this, each one walks every object of the
    # process and stops the loop for 10-50 ms.
    gc.collect()
    gc.freeze()
    uvloop.run(_main())
    return 0
