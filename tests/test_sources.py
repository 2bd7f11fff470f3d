"""Table sources over real files, inotify, sockets, nginx and the long-poll table server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import assignment as core
from proxy.reload import follow
from proxy.sources import Failure
from proxy.sources.file import FileSource
from proxy.sources.http import HttpSource
from proxy.tableserver import serve_table

from .conftest import Pod, Proxy, table_for

Factory = Callable[..., Awaitable[Proxy]]
Item = core.Assignment | Failure

PODS = [("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2"), ("c", "http://127.0.0.1:3")]
BOUND = 5.0  # generous bound for anything to arrive


def table(generation: int, pods: list[tuple[str, str]] | None = None) -> core.Assignment:
    return table_for(pods or PODS, generation, slice_count=16)


# -- writing files the ways operators and Kubernetes do -------------------------------


def write_in_place(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ConfigMap:
    """A mounted ConfigMap as kubelet lays it out: ``name -> ..data/name`` and
    ``..data -> ..<timestamp>``; an update writes a new timestamped folder,
    swaps ``..data`` atomically, then removes the old folder."""

    def __init__(self, folder: Path, name: str = "assignment.json") -> None:
        self.folder = folder
        self.name = name
        self.path = folder / name
        self.version = 0
        self.current: Path | None = None

    def write(self, data: bytes) -> None:
        self.version += 1
        stamp = self.folder / f"..2024_01_{self.version:02d}"
        stamp.mkdir()
        (stamp / self.name).write_bytes(data)
        tmp = self.folder / "..data_tmp"
        os.symlink(stamp.name, tmp)
        os.replace(tmp, self.folder / "..data")
        if not self.path.is_symlink():
            os.symlink(f"..data/{self.name}", self.path)
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = stamp


# -- consuming a source ---------------------------------------------------------------


class Feed:
    """Reads a source's ``updates()`` in a task, so that waits with a bound
    never cancel the source itself."""

    def __init__(self, source: Any) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.seen: list[Item] = []
        self.task = asyncio.get_running_loop().create_task(self._pump(source))

    async def _pump(self, source: Any) -> None:
        async for item in source.updates():
            self.queue.put_nowait(item)

    async def next(self, timeout: float = BOUND) -> Item:
        if self.queue.empty():
            get = asyncio.ensure_future(self.queue.get())
            try:
                await asyncio.wait([get, self.task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                get.cancel()
            if not get.done() or get.cancelled():
                if self.task.done():
                    self.task.result()  # the source's own error
                    raise AssertionError("the source ended")
                raise TimeoutError(f"nothing from the source within {timeout} s; seen: {self.seen}")
            item = get.result()
        else:
            item = self.queue.get_nowait()
        self.seen.append(item)
        return item

    async def table(self, generation: int, timeout: float = BOUND) -> core.Assignment:
        """Items until the table of ``generation``; fails on any other table."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            item = await self.next(timeout=max(0.0, deadline - loop.time()))
            if isinstance(item, core.Assignment):
                assert item.generation == generation, f"got generation {item.generation}, want {generation}"
                return item

    async def failure(self, kind: str, timeout: float = BOUND) -> Failure:
        """The next item, which must be a ``Failure`` of ``kind``."""
        item = await self.next(timeout=timeout)
        assert isinstance(item, Failure), f"got a table (generation {item.generation}), want Failure({kind!r})"
        assert item.kind == kind, item
        return item

    async def quiet(self, seconds: float) -> list[Item]:
        """What arrives within ``seconds`` (expected: nothing)."""
        await asyncio.sleep(seconds)
        got: list[Item] = []
        while not self.queue.empty():
            got.append(self.queue.get_nowait())
        self.seen += got
        return got

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task  # re-raises a source's own error


@pytest.fixture
async def feeds() -> AsyncIterator[Callable[[Any], Feed]]:
    opened: list[Feed] = []

    def make(source: Any) -> Feed:
        feed = Feed(source)
        opened.append(feed)
        return feed

    yield make
    for feed in opened:
        await feed.close()


def file_source(path: Path, watch: str) -> FileSource:
    # With inotify the fallback identity check is pushed past the bound, so
    # only inotify events can deliver in time; polling checks every 50 ms.
    return FileSource(str(path), watch=watch, poll_interval=30.0 if watch == "auto" else 0.05)


WATCH = pytest.mark.parametrize("watch", ["auto", "poll"])


# -- file sources ---------------------------------------------------------------------


@WATCH
async def test_file_in_place_write(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table(1).dumps())
    feed = feeds(file_source(path, watch))
    assert (await feed.table(1)).shares() == table(1).shares()
    for gen in (2, 3, 4):
        await asyncio.sleep(0.05)
        write_in_place(path, table(gen, PODS[:2] if gen % 2 else PODS).dumps())
        got = await feed.table(gen)
        assert set(got.pods) == ({"a", "b"} if gen % 2 else {"a", "b", "c"})


@WATCH
async def test_file_atomic_rename(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    write_atomic(path, table(1).dumps())
    feed = feeds(file_source(path, watch))
    await feed.table(1)
    for gen in (2, 3, 4):
        await asyncio.sleep(0.05)
        write_atomic(path, table(gen).dumps())
        await feed.table(gen)
    assert all(isinstance(i, core.Assignment) for i in feed.seen)


@WATCH
async def test_file_configmap_symlink_swap(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    cm = ConfigMap(tmp_path)
    cm.write(table(1).dumps())
    assert os.path.realpath(cm.path).endswith("..2024_01_01/assignment.json")
    feed = feeds(file_source(cm.path, watch))
    await feed.table(1)
    for gen in (2, 3, 4):  # the folder watched for the first table is gone after the first swap
        await asyncio.sleep(0.05)
        cm.write(table(gen).dumps())
        assert os.path.realpath(cm.path).endswith(f"..2024_01_{gen:02d}/assignment.json")
        await feed.table(gen)
    assert all(isinstance(i, core.Assignment) for i in feed.seen)


@WATCH
async def test_file_invalid_then_fixed(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table(1).dumps())
    feed = feeds(file_source(path, watch))
    await feed.table(1)
    good = table(2).dumps()
    write_in_place(path, good[: len(good) // 2])  # half-written
    fail = await feed.failure("invalid")
    assert str(path) in fail.detail
    await asyncio.sleep(0.05)
    write_in_place(path, b'{"version": 1, "generation": 2, "pods": {}}')  # JSON, but not a table
    await feed.failure("invalid")
    await asyncio.sleep(0.05)
    write_in_place(path, good)
    await feed.table(2)


@WATCH
async def test_file_missing_then_created(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    feed = feeds(file_source(path, watch))
    fail = await feed.failure("error")
    assert "cannot read" in fail.detail
    write_atomic(path, table(3).dumps())
    await feed.table(3)


@WATCH
async def test_file_burst_yields_final_table(tmp_path: Path, watch: str, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table(1).dumps())
    feed = feeds(file_source(path, watch))
    await feed.table(1)
    # Same size every time: only the content tells these tables apart.
    for gen in range(10, 40):
        write_in_place(path, table(gen).dumps())
    last: core.Assignment | None = None
    async with asyncio.timeout(BOUND):
        while last is None or last.generation != 39:
            item = await feed.next()
            if isinstance(item, core.Assignment):
                assert last is None or item.generation > last.generation
                last = item
    # Nothing newer or older follows the final table.
    after = await feed.quiet(0.3)
    assert all(isinstance(i, core.Assignment) and i.generation == 39 for i in after), after


async def test_file_without_inotify_falls_back_to_polling(
    tmp_path: Path, feeds: Callable[[Any], Feed], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel refuses a new inotify instance (fs.inotify.max_user_instances
    # reached, common on busy Kubernetes nodes): the source polls instead.
    import inotify_simple

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(inotify_simple, "INotify", refuse)
    path = tmp_path / "assignment.json"
    write_atomic(path, table(1).dumps())
    feed = feeds(FileSource(str(path), watch="auto", poll_interval=0.05))
    await feed.table(1)
    write_atomic(path, table(2).dumps())
    await feed.table(2)
    assert "no inotify" in caplog.text and "Too many open files" in caplog.text


# -- HTTP: the long-poll table server -------------------------------------------------


async def test_http_long_poll_against_table_server(tmp_path: Path, feeds: Callable[[Any], Feed]) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table(1).dumps())
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    bound: asyncio.Future[int] = loop.create_future()
    server = loop.create_task(serve_table(str(path), "127.0.0.1", 0, stop, ready=bound.set_result))
    try:
        async with asyncio.timeout(BOUND):
            port = await bound
        # poll_interval far above the bound: only the long poll can deliver in time.
        source = HttpSource(f"http://127.0.0.1:{port}/assignment.json", poll_interval=30.0)
        feed = feeds(source)
        await feed.table(1)
        assert source.long_poll
        for gen in (2, 3, 4):
            await asyncio.sleep(0.1)  # let the long poll (?after=<gen>&wait=) be parked on the server
            write_atomic(path, table(gen).dumps())
            await feed.table(gen)
        # A stale table on the server's file is refused there; nothing arrives.
        write_atomic(path, table(2).dumps())
        assert await feed.quiet(0.5) == []
        write_atomic(path, table(5).dumps())
        await feed.table(5)
        assert source.generation == 5
    finally:
        # A long poll is parked on the server: stopping answers it, not waits for it.
        stop.set_result(None)
        async with asyncio.timeout(BOUND):
            await server


async def test_http_authorization_is_sent(tmp_path: Path, feeds: Callable[[Any], Feed]) -> None:
    seen: list[str | None] = []
    body = table(9).dumps()

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer t0k3n":
            return web.Response(status=401)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/table", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/table"
    try:
        feed = feeds(HttpSource(url, poll_interval=0.2, authorization="Bearer t0k3n"))
        await feed.table(9)
        assert seen and all(a == "Bearer t0k3n" for a in seen)
        refused = feeds(HttpSource(url, poll_interval=0.2))
        fail = await refused.failure("error")
        assert "HTTP 401" in fail.detail
        assert None in seen
    finally:
        await runner.cleanup()


async def test_http_large_table(tmp_path: Path, feeds: Callable[[Any], Feed]) -> None:
    big = table_for(PODS, 12, slice_count=16384)  # explicit: about 1.5 MB, many TCP reads
    body = big.dumps()
    assert len(body) > 1 << 20

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 65536):  # in pieces, as a slow link would
            await resp.write(body[i : i + 65536])
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/table", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        feed = feeds(HttpSource(f"http://127.0.0.1:{runner.addresses[0][1]}/table", poll_interval=0.2))
        got = await feed.table(12)
        assert got.slice_count == 16384 and got.to_json() == big.to_json()
    finally:
        await runner.cleanup()


# -- HTTP: nginx serving the file -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """The Debian nginx, one process (``master_process off``), in a temp prefix."""

    def __init__(self, prefix: Path, root: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        assert os.path.exists(binary), "nginx is not installed (apt-get install nginx)"
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        temp = "\n".join(
            f"  {name}_temp_path {prefix}/tmp/{sub};"
            for name, sub in [
                ("client_body", "body"),
                ("proxy", "proxy"),
                ("fastcgi", "fastcgi"),
                ("uwsgi", "uwsgi"),
                ("scgi", "scgi"),
            ]
        )
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
{temp}
  types {{ application/json json; }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
  }}
}}
"""
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf),
            "-e",
            str(self.prefix / "error.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(BOUND):
            while True:
                if self.proc.returncode is not None:
                    log = (self.prefix / "error.log").read_text(errors="replace")
                    raise AssertionError(f"nginx exited with {self.proc.returncode}: {log}")
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                w.close()
                await w.wait_closed()
                return

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(BOUND):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[tuple[Nginx, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    server = Nginx(tmp_path / "nginx", root)
    try:
        yield server, root
    finally:
        await server.stop()


async def test_http_poll_against_nginx(nginx: tuple[Nginx, Path], feeds: Callable[[Any], Feed]) -> None:
    server, root = nginx
    path = root / "assignment.json"
    write_atomic(path, table(1).dumps())
    await server.start()
    async with aiohttp.ClientSession() as s, s.get(server.url + "/assignment.json") as r:
        etag = r.headers["ETag"]
        assert r.status == 200 and r.headers.get("Last-Modified")
        async with s.get(server.url + "/assignment.json", headers={"If-None-Match": etag}) as r2:
            assert r2.status == 304
    source = HttpSource(server.url + "/assignment.json", poll_interval=0.2, backoff_cap=1.0)
    feed = feeds(source)
    await feed.table(1)
    assert not source.long_poll
    # Newer tables of the same size, several within one second: nginx's ETag
    # (mtime in seconds, size) cannot tell them apart.
    for gen in (2, 3, 4):
        await asyncio.sleep(0.05)
        write_atomic(path, table(gen).dumps())
        await feed.table(gen)
    # Unchanged file: 304s, nothing yielded.
    assert await feed.quiet(1.2) == []

    good = table(5).dumps()
    write_atomic(path, good[:-40])
    await feed.failure("invalid")
    write_atomic(path, good)
    await feed.table(5)

    # nginx down: errors, backed off (not a tight loop), and the source keeps trying.
    await server.stop()
    await feed.failure("error")
    errors = await feed.quiet(1.5)
    assert all(isinstance(i, Failure) and i.kind == "error" for i in errors)
    assert len(errors) < 20, f"{len(errors)} errors in 1.5 s: no backoff"
    write_atomic(path, table(6).dumps())
    await server.start()
    async with asyncio.timeout(BOUND):
        while True:
            item = await feed.next()
            if isinstance(item, core.Assignment):
                assert item.generation == 6
                break
            assert item.kind == "error"


# -- the proxy following a file -------------------------------------------------------


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def test_proxy_follows_file_source(tmp_path: Path, proxy_factory: Factory, pods: list[Pod]) -> None:
    px = await proxy_factory(None, admin=True)
    path = tmp_path / "assignment.json"
    key = {"X-Routing-Key": "user-42"}
    async with aiohttp.ClientSession() as s:

        async def metrics() -> str:
            async with s.get(px.admin + "/metrics") as r:
                assert r.status == 200
                return await r.text()

        async def reloads(result: str) -> float:
            return metric(await metrics(), "keyroute_reloads_total", f'result="{result}"')

        async def wait_for(check: Callable[[], Awaitable[bool]]) -> None:
            async with asyncio.timeout(BOUND):
                while not await check():
                    await asyncio.sleep(0.02)

        async def ready() -> bool:
            async with s.get(px.admin + "/-/readyz") as r:
                return r.status == 200

        async def serves(expected: core.Assignment) -> None:
            async with s.get(px.base + "/", headers=key) as r:
                assert r.status == 200
                assert r.headers["X-Keyroute-Generation"] == str(expected.generation)
                assert (await r.json())["pod"] == expected.lookup(b"user-42").pod.id

        async def last_error() -> str:
            async with s.get(px.admin + "/-/assignment") as r:
                doc = await r.json()
                return str(doc["last_error"])

        async with s.get(px.base + "/", headers=key) as r:
            assert r.status == 503 and (await r.json())["error"] == "no_table"
        assert not await ready()

        first = table_for(pods, 5)
        write_atomic(path, first.dumps())
        task = follow(px.runtime, FileSource(str(path), watch="auto"))
        try:
            await wait_for(ready)
            async with s.get(px.admin + "/-/readyz") as r:
                assert (await r.json())["generation"] == 5
            await serves(first)

            def counted(result: str, n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await reloads(result) >= n

                return check

            write_atomic(path, table_for(pods, 3).dumps())
            await wait_for(counted("stale", 1))
            assert "stale" in await last_error()
            await serves(first)

            write_atomic(path, table_for(pods[:2], 5).dumps())
            await wait_for(counted("conflict", 1))
            assert "conflicting" in await last_error()
            await serves(first)

            write_atomic(path, b'{"version": 1, "generation": 6, "pods": {')
            await wait_for(counted("invalid", 1))
            assert str(path) in await last_error()
            await serves(first)

            text = await metrics()
            counts = {
                r: metric(text, "keyroute_reloads_total", f'result="{r}"')
                for r in ("applied", "stale", "conflict", "invalid")
            }
            assert counts == {"applied": 1, "stale": 1, "conflict": 1, "invalid": 1}
            assert metric(text, "keyroute_generation") == 5
            async with s.get(px.admin + "/-/assignment") as r:
                assert (await r.json())["generation"] == 5

            second = table_for(pods[:2], 6)
            write_atomic(path, second.dumps())
            await wait_for(counted("applied", 2))
            await serves(second)
            async with s.get(px.admin + "/-/assignment") as r:
                doc = await r.json()
                assert doc["generation"] == 6 and set(doc["table"]["pods"]) == {"pod-a", "pod-b"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
