"""``--workers N``: N processes share the listening port with SO_REUSEPORT.

The parent binds the port first (so port 0 resolves once for all workers),
forks the workers, restarts any that die, and forwards SIGTERM/SIGINT to them.
A second signal is forwarded too, which makes the workers exit at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

from .assignment import Assignment
from .config import Settings
from .metrics import METRICS_DIR_ENV

log = logging.getLogger("keyroute.workers")


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
    children: dict[int, float] = {}
    stopping = 0

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            reserved.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(settings, assignment, known)
            finally:
                os._exit(code)
        children[pid] = time.monotonic()

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
    return status
