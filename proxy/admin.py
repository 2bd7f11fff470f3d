"""The admin listener (aiohttp, loopback by default).

``GET /-/healthz``, ``/-/readyz``, ``/-/assignment``, ``/-/lookup?key=K`` and
``/metrics``. ``PUT /-/assignment`` replaces the table and needs the
configured bearer token; with no token it is refused (405). With
``--workers N`` a push reaches one worker, which shares it with the others
through the supervisor's folder (see ``proxy.workers``) before applying it;
each worker follows that folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import assignment as core
from . import native, reload, workers
from .reload import follow
from .sources import judge, verdict_kind
from .sources.http import read_body

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("keyroute.admin")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
MAX_PUT_BYTES = 64 << 20
# Tables up to this many slices are rendered on the event loop (a few ms).
INLINE_RENDER_SLICES = 4096


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, error: str, detail: str, rt: Runtime) -> web.Response:
    gen = rt.table.generation if rt.table is not None else None
    return _json({"error": error, "detail": detail, "generation": gen}, status)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "native": native.ACTIVE, "native_off_because": native.WHY_NOT or None})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.table is None:
        return _json({"ready": False, "detail": "no assignment table in force yet"}, 503)
    return _json({"ready": True, "generation": rt.table.generation})


class Rendered:
    """The JSON of the table in force, made once per table: for a big table
    in the helper process, so that monitoring ``/-/assignment`` does not
    stall the event loop (a 100k-slice table is ~10 MB of JSON)."""

    def __init__(self) -> None:
        self.table: core.Assignment | None = None
        self.body = b""

    async def of(self, rt: Runtime, table: core.Assignment) -> bytes:
        if self.table is table:
            return self.body
        if table.slice_count <= INLINE_RENDER_SLICES:
            body = table.render()
        else:
            body = await rt.offload.run(core.Assignment.render, table)
        # Keep it only if still in force (a slower render of an older table
        # must not replace a newer one).
        if rt.table is not None and rt.table.assignment is table:
            self.table, self.body = table, body
        return body


RENDERED = web.AppKey("rendered", Rendered)


async def get_assignment(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    table = rt.table
    head = {
        "generation": table.generation if table else None,
        "source": rt.settings.assignment.source,
        "loaded_at": rt.table_loaded_at,
        "last_error": rt.last_reload_error,
    }
    if table is None:
        return _json({**head, "shares": None, "table": None})
    rendered = await request.app[RENDERED].of(rt, table.assignment)
    # Both are JSON objects: splice the rendered members into the head.
    body = orjson.dumps(head)[:-1] + b"," + rendered[1:]
    return web.Response(body=body, content_type="application/json")


async def lookup(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    key = request.query.get("key")
    if key is None:
        return _error(400, "missing_key", "give the key as ?key=K", rt)
    if rt.table is None:
        return _error(503, "no_table", "no assignment table is in force yet", rt)
    raw = key.encode("utf-8", "surrogateescape")
    pos = core.position(raw)
    r = rt.table.assignment.lookup_position(pos)
    now = rt.loop.time()
    return _json(
        {
            "key": key,
            "position": pos,
            "position_hex": f"0x{pos:016x}",
            "slice": r.index,
            "slice_start": f"0x{r.start:016x}",
            "owner": r.pod.id,
            "url": r.pod.url,
            "epoch": r.epoch,
            "backups": list(r.backups),
            "generation": r.generation,
            "candidates": [
                {"pod": p.id, "role": "owner" if p is r.pod else "backup", "state": rt.health.state(p.id, now)}
                for p in rt.table.candidates(r)
            ],
            "panic": rt.health.panic(rt.table.assignment.pods, now),
        }
    )


async def put_assignment(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    token = rt.settings.admin.token
    if not token:
        return _error(405, "read_only", "admin.token is not set: state-changing calls are disabled", rt)
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return _error(401, "unauthorized", "a valid 'Authorization: Bearer <admin.token>' is required", rt)
    if request.content_length is not None and request.content_length > MAX_PUT_BYTES:
        return _error(413, "body_too_large", f"tables above {MAX_PUT_BYTES} bytes are refused", rt)
    # The whole body (``content.read(n)`` returns what is buffered: for a big
    # table, a first piece only).
    data = await read_body(request.content, MAX_PUT_BYTES)
    if data is None:
        return _error(413, "body_too_large", f"tables above {MAX_PUT_BYTES} bytes are refused", rt)
    try:
        table = await rt.offload.parse(data)
    except core.AssignmentError as exc:
        reload.note(rt, "invalid", str(exc))
        return _error(400, "invalid_table", str(exc), rt)
    pushes = request.app.get(PUSHES)
    if pushes is not None and judge(rt.table.assignment if rt.table else None, table) is None:
        # Shared before it is applied here, so that no worker serves a table
        # the others will never get.
        try:
            refused = await asyncio.to_thread(workers.share, pushes.folder, data, table.generation)
        except OSError as exc:
            detail = f"cannot share the table with the other workers in {pushes.folder}: {exc}; nothing was applied"
            log.error("%s", detail)
            return _error(500, "not_shared", detail, rt)
        if refused:
            reload.note(rt, verdict_kind(refused), refused)
            return _error(409, "refused", refused, rt)
    verdict = reload.offer(rt, table)
    if verdict:
        return _error(409, "refused", verdict, rt)
    return _json({"applied": True, "generation": table.generation})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[RUNTIME].metrics_text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


class Pushes:
    """With several workers and pushes allowed: the supervisor's folder of
    pushed tables, and the task that applies what other workers were pushed."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.task: asyncio.Task[None] | None = None

    def start(self, rt: Runtime) -> None:
        in_force = rt.table.generation if rt.table is not None else None
        self.task = follow(rt, workers.PushedSource(self.folder, rt.offload, in_force))

    async def stop(self, app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


PUSHES = web.AppKey("pushes", Pushes)


def make_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_PUT_BYTES)
    app[RENDERED] = Rendered()
    app[RUNTIME] = rt
    push_dir = os.environ.get(workers.PUSH_DIR_ENV)
    if push_dir and rt.settings.admin.token:
        app[PUSHES] = pushes = Pushes(push_dir)
        app.on_cleanup.append(pushes.stop)
    app.router.add_get("/-/healthz", healthz)
    app.router.add_get("/-/readyz", readyz)
    app.router.add_get("/-/assignment", get_assignment)
    app.router.add_put("/-/assignment", put_assignment)
    app.router.add_post("/-/assignment", put_assignment)
    app.router.add_get("/-/lookup", lookup)
    app.router.add_get("/metrics", metrics)
    return app


async def start(rt: Runtime, host: str, port: int, *, reuse_port: bool = False) -> web.AppRunner:
    """Start the admin listener; returns the runner (``await runner.cleanup()``)."""
    try:
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("admin listener on non-loopback address %s: anyone who can reach it can read the table", host)
    except ValueError:
        if host != "localhost":
            log.warning("admin listener on %s, which may not be loopback", host)
    runner = web.AppRunner(make_app(rt), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    await site.start()
    pushes = runner.app.get(PUSHES)
    if pushes is not None:
        # Started last: its first step runs once the worker serves, on the
        # table it started with (a restarted worker starts on the newest).
        pushes.start(rt)
    return runner
