"""``keyroute demo``: three local pods, a table in a temp dir and the proxy.

Everything runs on loopback. Each pod is its own process (``python -m
proxy.demo POD_ID``, a small aiohttp app that says who it is and counts the
body it received, of any size), so a user can kill one by the PID the demo
prints and watch its keys fail over. The proxy is the real data plane in the
demo's process, and the table file is watched, so editing it moves keys while
you watch.

The demo owns what it creates: when it stops (Ctrl-C, SIGTERM, or an error
at startup) it stops the pods and removes its temp folder. A pod also exits
when the demo's end of its stdin pipe closes, so even a demo killed with
SIGKILL leaves no pod behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TextIO

from aiohttp import web

from . import assignment as core
from .config import load as load_settings
from .reload import follow
from .runtime import Runtime
from .server import check_accelerators, serve
from .sources.file import FileSource

POD_IDS = ("pod-a", "pod-b", "pod-c")
POD_ID = web.AppKey("pod_id", str)
POD_STOP_TIMEOUT = 5.0


# -- a demo pod, run as its own process ------------------------------------------


async def _pod_handler(request: web.Request) -> web.Response:
    pod = request.app[POD_ID]
    h = request.headers
    # Counted as it streams: no body limit (aiohttp's 1 MiB applies to read()),
    # and no memory held for it, so a big upload reaches keyroute's own limits only.
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    text = (
        f"{pod} handled key={h.get('X-Routing-Key', '-')!s} generation={h.get('X-Keyroute-Generation')} "
        f"epoch={h.get('X-Keyroute-Epoch')} role={h.get('X-Keyroute-Role')} "
        f"{request.method} {request.path_qs} body={size}B\n"
    )
    return web.Response(text=text, headers={"X-Pod": pod})


class _StdinClosed(asyncio.Protocol):
    def __init__(self, stop: asyncio.Future[None]) -> None:
        self.stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop.done():
            self.stop.set_result(None)


async def _pod_serve(pod_id: str) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None if stop.done() else stop.set_result(None))
    # The demo holds the other end of stdin: its exit, however it happens, ends the pod.
    await loop.connect_read_pipe(lambda: _StdinClosed(stop), sys.stdin)
    app = web.Application()
    app[POD_ID] = pod_id
    app.router.add_route("*", "/{tail:.*}", _pod_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(runner.addresses[0][1], flush=True)
        await stop
    finally:
        await runner.cleanup()


def pod_main(argv: Sequence[str]) -> int:
    """``python -m proxy.demo POD_ID``: serve on a free loopback port, print it."""
    if len(argv) != 1:
        print("usage: python -m proxy.demo POD_ID", file=sys.stderr)
        return 2
    asyncio.run(_pod_serve(argv[0]))
    return 0


class DemoPod:
    """A pod process the demo started, and the address it printed."""

    __slots__ = ("id", "proc", "url")

    def __init__(self, pod_id: str, proc: asyncio.subprocess.Process, url: str) -> None:
        self.id = pod_id
        self.proc = proc
        self.url = url


async def start_pod(pod_id: str) -> DemoPod:
    # Its own session: Ctrl-C in the terminal reaches the demo only, which
    # then stops the pods after the proxy has drained.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo",
        pod_id,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line.strip().isdigit():
        await stop_pods([DemoPod(pod_id, proc, "")])
        raise RuntimeError(f"demo pod {pod_id} did not start (exit status {proc.returncode}); see its error above")
    return DemoPod(pod_id, proc, f"http://127.0.0.1:{int(line)}")


async def stop_pods(pods: Sequence[DemoPod]) -> None:
    for pod in pods:
        if pod.proc.returncode is None:
            pod.proc.terminate()
    for pod in pods:
        try:
            await asyncio.wait_for(pod.proc.wait(), POD_STOP_TIMEOUT)
        except TimeoutError:
            pod.proc.kill()
            await pod.proc.wait()


def keyroute_command() -> str:
    """How to run keyroute from any shell: the script next to this Python
    (a venv's bin need not be on PATH), or ``python -m proxy``."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "keyroute")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return shlex.quote(script)
    return shlex.join([sys.executable, "-m", "proxy"])


# -- the demo ---------------------------------------------------------------------


def main(listen: str | None, admin: str | None, out: TextIO) -> int:
    check_accelerators()
    import uvloop

    return uvloop.run(_main(listen, admin, out))


async def _main(listen: str | None, admin: str | None, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("keyroute").addHandler(handler)
    logging.getLogger("keyroute").setLevel(logging.INFO)
    folder = tempfile.mkdtemp(prefix="keyroute-demo-")
    table_path = os.path.join(folder, "assignment.json")
    pods: list[DemoPod] = []
    exits: list[asyncio.Task[None]] = []
    watcher: asyncio.Task[None] | None = None
    try:
        # KEYROUTE_* variables apply as for `keyroute run`; flags win over them.
        settings = load_settings(
            None,
            overrides={"proxy.listen": listen, "admin.listen": admin, "assignment.source": f"file:{table_path}"},
        )
        for pid in POD_IDS:
            pods.append(await start_pod(pid))
        specs = [(p.id, p.url, 1.0, "active") for p in pods]
        table = core.generate(int(time.time() * 1000), core.make_pods(specs), 64)
        with open(table_path, "wb") as fh:
            fh.write(table.dumps(explicit=False))
        stopping = False

        async def report_exit(pod: DemoPod) -> None:
            code = await pod.proc.wait()
            if not stopping:
                how = f"signal {-code}" if code < 0 else f"status {code}"
                print(f"{pod.id} (pid {pod.proc.pid}) exited ({how}): its keys fail over to their backups", file=out)

        exits = [asyncio.create_task(report_exit(p)) for p in pods]

        def ready(rt: Runtime, socks: list[socket.socket]) -> None:
            nonlocal watcher
            host, port = socks[0].getsockname()[:2]
            base = f"http://{host}:{port}"
            watcher = follow(rt, FileSource(table_path, poll_interval=1.0, offload=rt.offload))
            owner = table.lookup(b"user-1").pod.id
            owner_pid = next(p.proc.pid for p in pods if p.id == owner)
            kr = keyroute_command()
            lines = [
                f"keyroute demo: proxy on {base}, pods "
                + ", ".join(f"{p.id}={p.url} (pid {p.proc.pid})" for p in pods),
                f"table: {table_path} (generation {table.generation})",
                f"admin: http://127.0.0.1:{rt.admin_port}/-/assignment  /-/lookup?key=user-1  /metrics",
                "",
                "Same key, same pod, every time:",
                f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
                f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
                f"  curl -s -H 'X-Routing-Key: user-2' {base}/hello",
                "No key is a 400 with a JSON body:",
                f"  curl -s {base}/hello",
                "Bodies of any size stream through (the pods count them):",
                f"  head -c 5000000 /dev/zero | curl -s -H 'X-Routing-Key: user-1' --data-binary @- {base}/upload",
                "",
                f"Move user-1 off {owner}: drain it (a new generation, written atomically; the proxy reloads):",
                f"  {kr} gen --from {table_path} --drain {owner} -o {table_path}",
                f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
                'Or edit the file by hand: raise "generation", then remove a pod or set "state": "draining".',
                "Where a key goes under the table:",
                f"  {kr} lookup {table_path} user-1 user-2",
                f"Or stop {owner}'s process and watch user-1 fail over to its backup (role=backup):",
                f"  kill {owner_pid}",
                f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
                "",
                "Ctrl-C stops the demo (and its pods; the temp folder is removed).",
            ]
            print("\n".join(lines), file=out, flush=True)

        try:
            await serve(settings, table, stop, on_ready=ready, with_admin=True)
        except OSError as exc:
            print(
                f"keyroute demo: cannot listen on {settings.proxy.listen} or {settings.admin.listen}: {exc.strerror}"
                " (try --listen 127.0.0.1:8081 --admin 127.0.0.1:9902)",
                file=sys.stderr,
            )
            return 2
        finally:
            stopping = True
    finally:
        if watcher is not None:
            watcher.cancel()
        await stop_pods(pods)
        for task in exits:
            task.cancel()
        shutil.rmtree(folder, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


if __name__ == "__main__":
    sys.exit(pod_main(sys.argv[1:]))
