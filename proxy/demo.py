"""``keyroute demo``: three local pods, a table in a temp dir and the proxy.

Everything runs in this process on loopback: the pods are small aiohttp apps
that say who they are, the proxy is the real data plane, and the table file is
watched, so editing it moves keys while you watch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from typing import TextIO

from aiohttp import web

from . import assignment as core
from .config import load as load_settings
from .reload import follow
from .server import Runtime, check_accelerators, serve
from .sources.file import FileSource

POD_IDS = ("pod-a", "pod-b", "pod-c")
POD_ID = web.AppKey("pod_id", str)


async def _pod_handler(request: web.Request) -> web.Response:
    pod = request.app[POD_ID]
    h = request.headers
    body = await request.read()
    text = (
        f"{pod} handled key={h.get('X-Routing-Key', '-')!s} generation={h.get('X-Keyroute-Generation')} "
        f"epoch={h.get('X-Keyroute-Epoch')} role={h.get('X-Keyroute-Role')} "
        f"{request.method} {request.path_qs} body={len(body)}B\n"
    )
    return web.Response(text=text, headers={"X-Pod": pod})


async def start_pod(pod_id: str) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app[POD_ID] = pod_id
    app.router.add_route("*", "/{tail:.*}", _pod_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


def main(listen: str, admin: str, out: TextIO) -> int:
    check_accelerators()
    import uvloop

    return uvloop.run(_main(listen, admin, out))


async def _main(listen: str, admin: str, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("keyroute").addHandler(handler)
    logging.getLogger("keyroute").setLevel(logging.INFO)
    folder = tempfile.mkdtemp(prefix="keyroute-demo-")
    table_path = os.path.join(folder, "assignment.json")
    runners = []
    pods = []
    for pid in POD_IDS:
        runner, port = await start_pod(pid)
        runners.append(runner)
        pods.append((pid, f"http://127.0.0.1:{port}", 1.0, "active"))
    table = core.generate(int(time.time() * 1000), core.make_pods(pods), 64)
    with open(table_path, "wb") as fh:
        fh.write(table.dumps(explicit=False))
    settings = load_settings(
        None,
        env={},
        overrides={"proxy.listen": listen, "admin.listen": admin, "assignment.source": f"file:{table_path}"},
    )
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    watcher: asyncio.Task[None] | None = None

    def ready(rt: Runtime, socks: list[socket.socket]) -> None:
        nonlocal watcher
        host, port = socks[0].getsockname()[:2]
        base = f"http://{host}:{port}"

        watcher = follow(rt, FileSource(table_path, poll_interval=1.0, offload=rt.offload))
        owner = table.lookup(b"user-1").pod.id
        lines = [
            f"keyroute demo: proxy on {base}, pods {', '.join(f'{p[0]}={p[1]}' for p in pods)}",
            f"table: {table_path} (generation {table.generation})",
            f"admin: http://127.0.0.1:{rt.admin_port}/-/assignment  /-/lookup?key=user-1  /metrics",
            "",
            "Same key, same pod, every time:",
            f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
            f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
            f"  curl -s -H 'X-Routing-Key: user-2' {base}/hello",
            "No key is a 400 with a JSON body:",
            f"  curl -s {base}/hello",
            "",
            f"Move user-1 off {owner}: drain it (a new generation, written atomically; the proxy reloads):",
            f"  keyroute gen --from {table_path} --drain {owner} -o {table_path}",
            f"  curl -s -H 'X-Routing-Key: user-1' {base}/hello",
            'Or edit the file by hand: raise "generation", then remove a pod or set "state": "draining".',
            "Where a key goes under the table:",
            f"  keyroute lookup {table_path} user-1 user-2",
            "",
            "Ctrl-C stops the demo.",
        ]
        print("\n".join(lines), file=out, flush=True)

    try:
        await serve(settings, table, stop, on_ready=ready, with_admin=True)
    except OSError as exc:
        print(
            f"keyroute demo: cannot listen on {listen}: {exc.strerror} (try --listen 127.0.0.1:8081)", file=sys.stderr
        )
        return 2
    finally:
        if watcher is not None:
            watcher.cancel()
        for runner in runners:
            await runner.cleanup()
    return 0
