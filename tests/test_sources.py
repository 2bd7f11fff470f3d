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

from .conftest import Pod, Proxy, table_for, wait_for

Factory = Callable[..., Awaitable[Proxy]]
Item = core.Assignment | Failure

PODS = [("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2"), ("c", "http://127.0.0.1:3")]
BOUND = 5.0  # generous bound for anything to arrive


def table(generation: int, pods: list[tuple[str, str]] | None = None) -> core.Assignment:
    return table_for(pods or PODS, generation, slice_count=16)


# -- writing files the ways operators and Kubernetes do -------------------------------


def clock_ticked(path: Path) -> Callable[[], bool]:
    """Whether a file written now gets a later mtime than ``path`` has. Two
    writes of the same size within one tick of the file system's coarse clock
    (and, for a rename, a reused inode number) look alike to an identity
    check; waiting for the tick keeps these tests about what they test."""
    probe = path.parent.parent / f".{path.parent.name}.tick"

    def ticked() -> bool:
        probe.write_bytes(b"")
        return probe.stat().st_mtime_ns > path.stat().st_mtime_ns

    return ticked


async def next_tick(path: Path) -> None:
    await wait_for(clock_ticked(path), BOUND, f"the file system clock to pass the mtime of {path}")


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

    async def until(self, generation: int, timeout: float = BOUND) -> list[Item]:
        """Items until the table of ``generation`` (a marker): what came before it."""
        before: list[Item] = []
        async with asyncio.timeout(timeout):
            while not (isinstance(item := await self.next(), core.Assignment) and item.generation == generation):
                before.append(item)
        return before

    async def failure(self, kind: str, timeout: float = BOUND) -> Failure:
        """The next item, which must be a ``Failure`` of ``kind``."""
        item = await self.next(timeout=timeout)
        assert isinstance(item, Failure), f"got a table (generation {item.generation}), want Failure({kind!r})"
        assert item.kind == kind, item
        return item

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
        await next_tick(path)
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
        await next_tick(path)
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
        await next_tick(cm.path)
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
    await next_tick(path)
    write_in_place(path, b'{"version": 1, "generation": 2, "pods": {}}')  # JSON, but not a table
    await feed.failure("invalid")
    await next_tick(path)
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
    # Nothing newer or older follows the final table: a marker written after
    # the burst comes next (the final table again, at most, before it).
    write_in_place(path, table(40, PODS[:2]).dumps())  # another size: no identity can hide it
    after = await feed.until(40)
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


class Tap:
    """A TCP relay in front of a server that notes the request line of each
    request it has passed on to it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.lines: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Tap:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, note: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    if note and data.startswith(b"GET "):
                        self.lines.append(data.split(b"\r\n", 1)[0])
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def polls(self, after: int) -> int:
        """Long polls passed on that ask for a generation above ``after``."""
        return sum(1 for line in self.lines if re.search(rb"[?&]after=%d(&| )" % after, line))

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_http_long_poll_against_table_server(
    tmp_path: Path, feeds: Callable[[Any], Feed], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table(1).dumps())
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    bound: asyncio.Future[int] = loop.create_future()
    server = loop.create_task(serve_table(str(path), "127.0.0.1", 0, stop, ready=bound.set_result))
    tap: Tap | None = None
    try:
        async with asyncio.timeout(BOUND):
            port = await bound
        tap = await Tap(port).start()
        # poll_interval far above the bound: only the long poll can deliver in time.
        source = HttpSource(f"http://127.0.0.1:{tap.port}/assignment.json", poll_interval=30.0)
        feed = feeds(source)
        await feed.table(1)
        assert source.long_poll
        for gen in (2, 3, 4):
            # The long poll (?after=<gen - 1>&wait=) has reached the server before the write ...
            await wait_for(lambda g=gen: tap.polls(g - 1) == 1, BOUND, f"the long poll after {gen - 1}")
            await next_tick(path)
            write_atomic(path, table(gen).dumps())
            await feed.table(gen)
            # ... and that same request brought the table: no second one was needed.
            assert tap.polls(gen - 1) == 1, tap.lines
        # A stale table on the server's file is refused there (it says so); a
        # newer one written after it is the next thing to arrive.
        await next_tick(path)
        write_atomic(path, table(2).dumps())
        await wait_for(lambda: "table refused, generation 4 stays" in caplog.text, BOUND, "the stale table's refusal")
        write_atomic(path, table(5, PODS[:2]).dumps())
        item = await feed.next()
        assert isinstance(item, core.Assignment) and item.generation == 5, item
        assert source.generation == 5
    finally:
        # A long poll is parked on the server: stopping answers it, not waits for it.
        stop.set_result(None)
        async with asyncio.timeout(BOUND):
            await server
        if tap is not None:
            await tap.close()


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
  log_format status '$status $request_uri';
  access_log {prefix}/access.log status;
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

    def statuses(self) -> list[int]:
        """The status of every request answered so far, in order (nginx writes
        each access log line once the response is sent)."""
        log = self.prefix / "access.log"
        return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []

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
        proc = self.proc

        async def listening() -> bool:
            if proc.returncode is not None:
                log = (self.prefix / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx exited with {proc.returncode}: {log}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            w.close()
            await w.wait_closed()
            return True

        await wait_for(listening, BOUND, "nginx to listen")

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


async def test_http_poll_against_nginx(
    nginx: tuple[Nginx, Path], feeds: Callable[[Any], Feed], monkeypatch: pytest.MonkeyPatch
) -> None:
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
    backoffs: list[tuple[int, float]] = []  # (consecutive failures, pause chosen)
    choose = source._backoff

    def noted(failures: int) -> float:
        pause = choose(failures)
        backoffs.append((failures, pause))
        return pause

    monkeypatch.setattr(source, "_backoff", noted)
    feed = feeds(source)
    await feed.table(1)
    assert not source.long_poll
    # Newer tables of the same size, several within one second: nginx's ETag
    # (mtime in seconds, size) cannot tell them apart.
    for gen in (2, 3, 4):
        write_atomic(path, table(gen).dumps())
        await feed.table(gen)
    # Unchanged file: 304s, nothing yielded. Three of them answered, then a
    # change written after them must be the very next item.
    seen = len(server.statuses())
    await wait_for(lambda: server.statuses()[seen:].count(304) >= 3, BOUND, "three 304s from nginx")
    assert feed.queue.empty()

    good = table(5).dumps()
    write_atomic(path, good[:-40])
    await feed.failure("invalid")
    write_atomic(path, good)
    await feed.table(5)

    # nginx down: errors, each followed by a pause that backs off as they
    # repeat (not a tight loop), and the source keeps trying.
    await server.stop()
    del backoffs[:]
    for _ in range(4):
        await feed.failure("error")
    assert [n for n, _ in backoffs[:4]] == [1, 2, 3, 4], backoffs
    assert all(0 <= pause <= min(1.0, 0.25 * 2**n) for n, pause in backoffs), backoffs
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
            await wait_for(ready, BOUND, "the proxy to be ready")
            async with s.get(px.admin + "/-/readyz") as r:
                assert (await r.json())["generation"] == 5
            await serves(first)

            def counted(result: str, n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await reloads(result) >= n

                return check

            await next_tick(path)

            write_atomic(path, table_for(pods, 3).dumps())
            await wait_for(counted("stale", 1), BOUND, "stale reloads")
            assert "stale" in await last_error()
            await serves(first)

            await next_tick(path)

            write_atomic(path, table_for(pods[:2], 5).dumps())
            await wait_for(counted("conflict", 1), BOUND, "conflict reloads")
            assert "conflicting" in await last_error()
            await serves(first)

            await next_tick(path)

            write_atomic(path, b'{"version": 1, "generation": 6, "pods": {')
            await wait_for(counted("invalid", 1), BOUND, "invalid reloads")
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
            await next_tick(path)
            write_atomic(path, second.dumps())
            await wait_for(counted("applied", 2), BOUND, "applied reloads")
            await serves(second)
            async with s.get(px.admin + "/-/assignment") as r:
                doc = await r.json()
                assert doc["generation"] == 6 and set(doc["table"]["pods"]) == {"pod-a", "pod-b"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
