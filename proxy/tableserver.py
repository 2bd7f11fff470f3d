"""``keyroute serve-table FILE``: a reference server for the long-poll protocol.

Watches FILE like the proxy does and serves the last valid table:

* ``GET /`` -> 200 with the table, ``ETag: "<generation>"``; 304 if
  ``If-None-Match`` matches.
* ``GET /?after=G&wait=S`` -> the table as soon as its generation is above G,
  or 304 after S seconds (at most 300).

Every answer carries ``X-Keyroute-Long-Poll: 1`` so proxies know they may
long-poll. One server can feed many proxies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from .assignment import Assignment
from .offload import Offload
from .sources import Failure, judge, read_file
from .sources.file import FileSource
from .sources.http import LONG_POLL_HEADER

log = logging.getLogger("keyroute.serve-table")
MAX_WAIT = 300.0
INLINE_DUMP_SLICES = 4096


class TableServer:
    def __init__(self, path: str, table: Assignment) -> None:
        self.path = path
        self.table = table
        self.body = table.dumps(explicit=not table.generated)
        self.changed = asyncio.Event()
        self.closing = False

    def close(self) -> None:
        """Answer parked long polls now (304), so that shutdown need not wait
        for their ``wait`` to run out."""
        self.closing = True
        self.changed.set()

    def publish(self, table: Assignment, body: bytes | None = None) -> None:
        self.table = table
        self.body = table.dumps(explicit=not table.generated) if body is None else body
        self.changed.set()
        self.changed = asyncio.Event()

    def _etag(self) -> str:
        return f'"{self.table.generation}"'

    def _answer(self, request: web.Request) -> web.Response:
        headers = {"ETag": self._etag(), LONG_POLL_HEADER: "1", "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == self._etag() and "after" not in request.query:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, content_type="application/json", headers=headers)

    async def handle(self, request: web.Request) -> web.Response:
        q = request.query
        if "after" not in q:
            return self._answer(request)
        try:
            after = int(q["after"])
            wait = min(float(q.get("wait", "30")), MAX_WAIT)
        except ValueError:
            return web.json_response(
                {"error": "bad_request", "detail": "after must be an integer and wait a number of seconds"},
                status=400,
            )
        if self.table.generation > after:
            return self._answer(request)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                while self.table.generation <= after and not self.closing:
                    await self.changed.wait()
        except TimeoutError:
            pass
        if self.table.generation <= after:
            return web.Response(status=304, headers={"ETag": self._etag(), LONG_POLL_HEADER: "1"})
        return self._answer(request)

    async def watch(self, source: FileSource, offload: Offload) -> None:
        async for item in source.updates():
            if isinstance(item, Failure):
                log.warning("table refused, generation %d stays: %s", self.table.generation, item.detail)
                continue
            verdict = judge(self.table, item)
            if verdict is None:
                log.info("serving generation %d", item.generation)
                body = None
                if not item.generated and item.slice_count > INLINE_DUMP_SLICES:
                    body = await offload.run(Assignment.dumps, item)  # ~10 MB for 100k slices
                self.publish(item, body)
            elif verdict:
                log.warning("table refused, generation %d stays: %s", self.table.generation, verdict)


async def serve_table(
    path: str,
    host: str,
    port: int,
    stop: asyncio.Future[None],
    poll_interval: float = 1.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is done. ``ready`` is called with the bound port
    (useful with port 0) once the listener accepts connections."""
    server = TableServer(path, read_file(path))
    # Tables are all this server does: its helper runs at normal priority.
    offload = Offload(low_priority=False)
    app = web.Application()
    app.router.add_get("/", server.handle)
    app.router.add_get("/assignment.json", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("serving %s on %s:%d (generation %d)", path, host, runner.addresses[0][1], server.table.generation)
    source = FileSource(path, poll_interval=poll_interval, offload=offload)
    watcher = asyncio.get_running_loop().create_task(server.watch(source, offload))
    if ready is not None:
        ready(runner.addresses[0][1])
    try:
        await stop
    finally:
        watcher.cancel()
        server.close()
        await runner.cleanup()
        offload.close()
