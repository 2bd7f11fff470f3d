"""Table and reload safety: a failing source is restarted (never a silent
death), a long-poll server that answers at once is not hammered, and with
``--workers N`` every worker applies a pushed table, also after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import assignment as core
from proxy.reload import follow, restart_delay
from proxy.sources import Failure
from proxy.sources.file import FileSource
from proxy.sources.http import LONG_POLL_HEADER, HttpSource
from proxy.workers import pushed_generation, pushed_path, share

from .conftest import EchoPods, Pod, ProxyFactory, connect, free_port, parse_metrics, table_for, wait_for

BOUND = 10.0  # generous bound for anything to happen
PODS_AB = [("pod-a", "http://127.0.0.1:1"), ("pod-b", "http://127.0.0.1:2")]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def metrics(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with session.get(admin + "/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text())


def reloads(samples: dict[str, float], result: str) -> float:
    return samples.get(f'keyroute_reloads_total{{result="{result}"}}', 0.0)


async def served_by(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, str]:
    """(generation, pod) of a proxied request for ``key``."""
    async with session.get(base + "/", headers={"X-Routing-Key": key}) as r:
        assert r.status == 200
        return int(r.headers["X-Keyroute-Generation"]), r.headers["X-Keyroute-Pod"]


# -- 14: the reload watcher never dies silently ---------------------------------------


class Exploding:
    """A real file source, except that its first run raises where it would
    have yielded generation ``at``: an exception that no source handles, as
    from a bug or a helper call failing in an unforeseen way."""

    def __init__(self, inner: FileSource, at: int, runtime: Any) -> None:
        self.inner = inner
        self.at = at
        self.runtime = runtime
        self.runs = 0
        self.in_force_at_restart: int | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    async def updates(self) -> AsyncIterator[core.Assignment | Failure]:
        self.runs += 1
        run = self.runs
        if run > 1:
            self.in_force_at_restart = self.runtime.table.generation
        async with contextlib.aclosing(self.inner.updates()) as items:
            async for item in items:
                if run == 1 and isinstance(item, core.Assignment) and item.generation == self.at:
                    raise RuntimeError("injected: the table source broke")
                yield item


async def test_a_failing_source_is_logged_counted_and_restarted(
    tmp_path: Path, proxy_factory: ProxyFactory, pods: list[Pod], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "keyroute")
    first = table_for(pods[:1], 5)
    second = table_for(pods[1:2], 6)  # every key moves to pod-b
    path = tmp_path / "assignment.json"
    write_atomic(path, first.dumps())
    px = await proxy_factory(first, admin=True)
    source = Exploding(FileSource(str(path), offload=px.runtime.offload), 6, px.runtime)
    watcher = follow(px.runtime, source)
    try:
        async with aiohttp.ClientSession() as s:
            assert await served_by(s, px.base, "user-1") == (5, "pod-a")
            write_atomic(path, second.dumps())

            async def counted() -> bool:
                return reloads(await metrics(s, px.admin), "error") >= 1

            await wait_for(counted, BOUND, 'reloads_total{result="error"}')

            async def applied() -> bool:
                return (await served_by(s, px.base, "user-1")) == (6, "pod-b")

            # The restarted source reads the file again: the good table applies.
            await wait_for(applied, BOUND, "generation 6 after the restart")
            assert source.runs == 2 and source.in_force_at_restart == 5
            samples = await metrics(s, px.admin)
            assert reloads(samples, "error") == 1 and reloads(samples, "applied") == 1
            async with s.get(px.admin + "/-/assignment") as r:
                assert "injected: the table source broke" in (await r.json())["last_error"]["error"]
        failed = [r for r in caplog.records if r.name == "keyroute.reload" and r.levelno == logging.ERROR]
        assert len(failed) == 1 and failed[0].exc_info is not None
        assert f"table source {source.name} failed" in failed[0].getMessage()
        assert not watcher.done()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


class Broken:
    """A source that never works: odd runs raise at once, even runs end at
    once (a source must never end by itself: that is a failure too)."""

    name = "broken:"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.starts: list[float] = []

    async def updates(self) -> AsyncIterator[core.Assignment | Failure]:
        self.starts.append(self.loop.time())
        if len(self.starts) % 2:
            raise OSError("injected: cannot reach the source")
        return
        yield  # an async generator that yields nothing


async def test_a_source_that_keeps_failing_is_restarted_with_backoff(
    proxy_factory: ProxyFactory, pods: list[Pod]
) -> None:
    px = await proxy_factory(table_for(pods, 5), admin=True)
    loop = asyncio.get_running_loop()
    source = Broken(loop)
    base = 0.04
    watcher = follow(px.runtime, source, restart_base=base, restart_cap=10.0)
    try:
        async with aiohttp.ClientSession() as s:

            async def restarted() -> bool:
                return len(source.starts) >= 5

            await wait_for(restarted, BOUND, "four restarts")
            # Each wait is at least half its exponential step: 1, 2, 4, 8 x base.
            gaps = [b - a for a, b in zip(source.starts, source.starts[1:], strict=False)]
            for n, gap in enumerate(gaps[:4]):
                assert gap >= base * 2**n / 2 - 0.002, gaps
            samples = await metrics(s, px.admin)
            assert reloads(samples, "error") >= 4
            assert px.runtime.table is not None and px.runtime.table.generation == 5
            async with s.get(px.admin + "/-/assignment") as r:
                last = (await r.json())["last_error"]["error"]
                assert last.startswith("broken:: ") and "restarting it in" in last
        assert not watcher.done()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def test_restart_delay_is_jittered_and_capped() -> None:
    rng = random.Random(7)
    for failures in range(1, 80):
        step = min(30.0, 0.25 * 2 ** (failures - 1))
        delays = {restart_delay(failures, 0.25, 30.0, rng) for _ in range(20)}
        assert all(step / 2 <= d <= step <= 30.0 for d in delays)
        assert len(delays) > 1  # jittered: workers restarting together spread out


# -- 15: a long-poll server that answers at once is not hammered ----------------------


class EagerServer:
    """A long-poll table endpoint behind a cache that answers every request at
    once: the first with generation 2, the rest as ``mode`` says. Records the
    loop time and query of each request."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.newest = table_for([("a", "http://127.0.0.1:1")], 2, slice_count=16).dumps()
        self.older = table_for([("a", "http://127.0.0.1:1")], 1, slice_count=16).dumps()
        self.arrivals: list[float] = []
        self.queries: list[dict[str, str]] = []
        self.enough = asyncio.Event()
        self.want = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(asyncio.get_running_loop().time())
        self.queries.append(dict(request.query))
        if len(self.arrivals) >= self.want:
            self.enough.set()
        headers = {LONG_POLL_HEADER: "1", "ETag": '"2"'}
        if len(self.arrivals) == 1 or self.mode == "same":
            return web.Response(body=self.newest, content_type="application/json", headers=headers)
        if self.mode == "304":
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.older, content_type="application/json", headers=headers)


@contextlib.asynccontextmanager
async def eager_server(mode: str) -> AsyncIterator[tuple[EagerServer, str]]:
    server = EagerServer(mode)
    app = web.Application()
    app.router.add_get("/", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["304", "same", "stale"])
async def test_long_poll_answered_at_once_waits_poll_interval(mode: str) -> None:
    interval = 0.1
    requests = 6
    loop = asyncio.get_running_loop()
    async with eager_server(mode) as (server, url):
        server.want = requests
        source = HttpSource(url, poll_interval=interval)
        items: list[core.Assignment | Failure] = []

        async def consume() -> None:
            async for item in source.updates():
                items.append(item)

        started = loop.time()
        task = loop.create_task(consume())
        try:
            async with asyncio.timeout(BOUND):
                await server.enough.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # The first answer is news: the long poll follows at once. Each answer
    # after it brought nothing newer, so every further request was sent at
    # least poll_interval after the one before (the loop clock never runs
    # slow: a slower machine only spreads them further).
    span = server.arrivals[requests - 1] - started
    assert span >= (requests - 2) * interval - 0.02, (len(server.arrivals), span)
    assert isinstance(items[0], core.Assignment) and items[0].generation == 2
    assert all(isinstance(i, core.Assignment) for i in items)
    assert len(items) == (2 if mode == "stale" else 1)
    # Long-polled throughout, and never for less than what is in force.
    assert server.queries[0] == {}
    assert all(q.get("after") == "2" for q in server.queries[1:requests]), server.queries


# -- 16: with --workers N, a pushed table reaches every worker ------------------------

TOKEN = "s3cret"
SERVING = re.compile(r"pid (\d+) serving on \S+, admin port \S+, generation (\d+)")


class Supervised:
    """``keyroute run --workers 2`` as a real process; its log lines are
    collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def log(self) -> str:
        return "".join(self.lines)

    async def serving(self, count: int) -> dict[int, int]:
        """Wait for ``count`` "serving" lines in all; {pid: generation} of all so far."""

        async def enough() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"keyroute exited: {self.log()}")
            return len(SERVING.findall(self.log())) >= count

        await wait_for(enough, BOUND, f"{count} workers serving")
        return {int(pid): int(gen) for pid, gen in SERVING.findall(self.log())}


@contextlib.contextmanager
def supervised(table: Path, workers: int = 2) -> Iterator[Supervised]:
    port, admin_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--admin", f"127.0.0.1:{admin_port}", "--assignment", f"file:{table}", "--workers", str(workers)]
    env = {**os.environ, "KEYROUTE_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sup = Supervised(proc, port, admin_port)
    try:
        yield sup
    finally:
        # SIGTERM first: the supervisor stops its workers. Then make sure: a
        # worker left behind would hold the log pipe (and the port) open.
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for pid in [proc.pid, *(int(p) for p, _ in SERVING.findall(sup.log()))]:
            with contextlib.suppress(OSError):  # gone (the pid not reused by another program)
                if b"proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        sup.reader.join(10)
        if proc.stderr is not None and not sup.reader.is_alive():
            proc.stderr.close()


def socket_owner(local_port: int, peer_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the TCP socket 127.0.0.1:local_port <->
    127.0.0.1:peer_port (/proc/net/tcp gives its inode, /proc/PID/fd who has it)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == peer_port:
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return pid
    return None


async def ask(sup: Supervised, key: str, pids: list[int]) -> tuple[int | None, int, str]:
    """One request on a new connection: (worker pid that served it, generation, pod)."""
    async with connect(sup.port) as raw:
        await raw.send(f"GET /x HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\n\r\n".encode())
        status, headers, _ = await raw.response()
        assert status == 200
        client_port = raw.writer.get_extra_info("sockname")[1]
        owner = await asyncio.to_thread(socket_owner, sup.port, client_port, pids)
        return owner, int(headers["x-keyroute-generation"]), headers["x-keyroute-pod"]


async def every_worker_serves(sup: Supervised, pids: list[int], generation: int, pod: str) -> None:
    """Wait until each worker in ``pids`` has served ``generation``; then many
    new connections, landing on every worker, all route by it."""
    seen: set[int] = set()
    n = 0

    async def all_seen() -> bool:
        nonlocal n
        n += 1
        owner, gen, _ = await ask(sup, f"probe-{n}", pids)
        if gen == generation and owner is not None:
            seen.add(owner)
        return seen == set(pids)

    await wait_for(all_seen, BOUND, f"workers {pids} serving generation {generation}")
    landed: set[int | None] = set()
    for i in range(40):
        owner, gen, got = await ask(sup, f"user-{i}", pids)
        assert (gen, got) == (generation, pod), (owner, gen, got)
        landed.add(owner)
    assert landed == set(pids)


async def test_workers_all_apply_a_push_and_restart_on_the_newest_table(tmp_path: Path, echo_pods: EchoPods) -> None:
    a, b = await echo_pods("pod-a"), await echo_pods("pod-b")
    path = tmp_path / "assignment.json"
    write_atomic(path, table_for([a], 5).dumps())  # every key on pod-a
    with supervised(path) as sup:
        workers = await sup.serving(2)
        assert set(workers.values()) == {5}
        pids = list(workers)

        # A push reaches one worker (SO_REUSEPORT picks it); all apply it.
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{sup.admin_port}/-/assignment"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with s.put(url, data=table_for([b], 6).dumps(), headers=auth) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["generation"] == 6
            # Pushed again (to whichever worker): the same table is no news;
            # an older one is refused, whichever worker it reaches.
            for _ in range(4):
                async with s.put(url, data=table_for([b], 6).dumps(), headers=auth) as r:
                    assert r.status == 200, await r.text()
                async with s.put(url, data=table_for([a], 4).dumps(), headers=auth) as r:
                    assert r.status == 409 and "stale" in (await r.json())["detail"]
        await every_worker_serves(sup, pids, 6, "pod-b")

        # A worker killed comes back on the pushed table, not the one the
        # supervisor read at startup.
        os.kill(pids[0], signal.SIGKILL)
        workers = await sup.serving(3)
        (new,) = set(workers) - set(pids)
        assert workers[new] == 6, sup.log()
        old, pids = set(workers), [pids[1], new]
        await every_worker_serves(sup, pids, 6, "pod-b")

        # A reload of the table file, then a restart: back on the reloaded one.
        write_atomic(path, table_for([a], 7).dumps())
        await every_worker_serves(sup, pids, 7, "pod-a")
        os.kill(pids[1], signal.SIGKILL)
        workers = await sup.serving(4)
        (new,) = set(workers) - old
        assert workers[new] == 7, sup.log()
        pids = [pids[0], new]
        await every_worker_serves(sup, pids, 7, "pod-a")

        sup.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sup.proc.wait, 15) == 0


def test_shared_push_only_moves_to_a_higher_generation(tmp_path: Path) -> None:
    # What two workers pushed at once would meet: the shared file, swapped under its lock.
    folder = str(tmp_path)
    six, other_six = table_for(PODS_AB, 6).dumps(), table_for(PODS_AB[:1], 6).dumps()
    assert pushed_generation(folder) is None
    assert share(folder, six, 6) is None
    assert pushed_generation(folder) == 6 and Path(pushed_path(folder)).read_bytes() == six
    assert share(folder, six, 6) is None  # the same push again (to another worker)
    assert (share(folder, other_six, 6) or "").startswith("conflicting table: generation 6")
    assert (share(folder, table_for(PODS_AB, 5).dumps(), 5) or "").startswith("stale table: generation 5 is below 6")
    seven = table_for(PODS_AB, 7).dumps()
    assert share(folder, seven, 7) is None
    assert Path(pushed_path(folder)).read_bytes() == seven
    # The old table is gone; only the link, its target and the lock remain.
    assert sorted(os.listdir(folder)) == ["assignment.json", "lock", "table-7.json"]
