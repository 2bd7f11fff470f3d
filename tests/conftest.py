"""Fixtures: real pods and a real proxy on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import pytest
import uvloop
from aiohttp import web

from proxy import assignment as core
from proxy.config import load as load_settings
from proxy.runtime import Runtime
from proxy.server import serve


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # The data plane runs on uvloop in production; test it there too.
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Pod:
    """A test pod: an aiohttp app that echoes what it received as JSON."""

    id: str
    port: int
    runner: web.AppRunner
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


POD = web.AppKey("pod", Pod)


async def _echo(request: web.Request) -> web.StreamResponse:
    pod = request.app[POD]
    body = await request.read()
    info = {
        "pod": pod.id,
        "method": request.method,
        "path": request.path_qs,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_len": len(body),
        "body_sha": hashlib.sha256(body).hexdigest(),
    }
    pod.requests.append(info)
    return web.Response(body=orjson.dumps(info), content_type="application/json", headers={"X-Pod": pod.id})


async def start_pod(pod_id: str, extra: Callable[[web.Application], None] | None = None) -> Pod:
    app = web.Application(client_max_size=1 << 30)
    runner = web.AppRunner(app, access_log=None)
    pod = Pod(pod_id, 0, runner)
    app[POD] = pod
    if extra is not None:
        extra(app)
    app.router.add_route("*", "/{tail:.*}", _echo)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pod.port = runner.addresses[0][1]
    return pod


EchoPods = Callable[..., Awaitable[Pod]]


@pytest.fixture
async def echo_pods() -> AsyncIterator[EchoPods]:
    """``make(pod_id, extra=None)``: an echo pod, stopped after the test."""
    started: list[Pod] = []

    async def make(pod_id: str, extra: Callable[[web.Application], None] | None = None) -> Pod:
        pod = await start_pod(pod_id, extra)
        started.append(pod)
        return pod

    yield make
    for pod in started:
        await pod.runner.cleanup()


@pytest.fixture
async def pods(echo_pods: EchoPods) -> list[Pod]:
    return [await echo_pods(f"pod-{c}") for c in "abc"]


class Listening(Protocol):
    """Anything a table can point at: a pod id and its URL."""

    @property
    def id(self) -> str: ...

    @property
    def url(self) -> str: ...


def pod_specs(pods: Sequence[Listening | tuple[str, str]]) -> list[tuple[str, str, float, str]]:
    """``core.make_pods`` specs for pod objects or (id, url) pairs: weight 1, active."""
    return [(p[0], p[1], 1.0, "active") if isinstance(p, tuple) else (p.id, p.url, 1.0, "active") for p in pods]


def table_for(
    pods: Sequence[Listening | tuple[str, str]], generation: int = 7, slice_count: int = 64
) -> core.Assignment:
    """A generated table over ``pods``."""
    return core.generate(generation, core.make_pods(pod_specs(pods)), slice_count)


def free_port() -> int:
    """A loopback port nothing listens on: free to listen on, refused to connect to."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_pod(pod_id: str) -> tuple[str, str]:
    """A pod (id, url) at a port nothing listens on."""
    return pod_id, f"http://127.0.0.1:{free_port()}"


@dataclass
class Proxy:
    runtime: Runtime
    port: int
    stop: asyncio.Future[None]
    task: asyncio.Task[Runtime]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.runtime.admin_port}"

    async def close(self) -> None:
        if not self.stop.done():
            self.stop.set_result(None)
        await self.task


async def start_proxy(table: core.Assignment | None, admin: bool = False, **overrides: Any) -> Proxy:
    """Run the real data plane in this loop. ``overrides`` are dotted keys with
    '__' for '.', e.g. ``proxy__missing_key="random"``."""
    opts = {"proxy.listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    settings = load_settings(None, env={}, overrides=opts)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    ready: asyncio.Future[tuple[Runtime, int]] = loop.create_future()

    def on_ready(rt: Runtime, socks: list[socket.socket]) -> None:
        ready.set_result((rt, socks[0].getsockname()[1]))

    task = loop.create_task(serve(settings, table, stop, on_ready=on_ready, with_admin=admin))
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    rt, port = ready.result()
    return Proxy(rt, port, stop, task)


ProxyFactory = Callable[..., Awaitable[Proxy]]


def opened(proxy: Proxy) -> int:
    """Upstream connections the proxy has opened so far, to any pod."""
    return sum(p.opened for p in proxy.runtime.upstreams.pools.values())


@pytest.fixture
async def proxy_factory() -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def make(table: core.Assignment | None, admin: bool = False, **overrides: Any) -> Proxy:
        p = await start_proxy(table, admin, **overrides)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.close()


@pytest.fixture
async def proxy(pods: list[Pod], proxy_factory: ProxyFactory) -> Proxy:
    return await proxy_factory(table_for(pods), proxy__shutdown_timeout="2s")


# -- raw sockets ------------------------------------------------------------------


class Raw:
    """A raw TCP client for byte-exact requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one response (Content-Length, chunked or close-delimited)."""
        async with asyncio.timeout(timeout):
            line = await self.reader.readuntil(b"\r\n")
            status = int(line.split()[1])
            headers: dict[str, str] = {}
            raw_headers: list[tuple[str, str]] = []
            while True:
                h = await self.reader.readuntil(b"\r\n")
                if h == b"\r\n":
                    break
                k, _, v = h.decode("latin-1").partition(":")
                raw_headers.append((k.strip(), v.strip()))
                headers[k.strip().lower()] = v.strip()
            if head or status in (204, 304) or 100 <= status < 200:
                return status, headers, b""
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                            pass
                        break
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readexactly(2)
                body = b"".join(parts)
            else:
                body = await self.reader.read()
            return status, headers, body

    async def closed(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection (EOF or reset) in time."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
                while data:
                    data = await self.reader.read(65536)
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Raw]:
    """A raw connection to ``port``, closed on the way out."""
    raw = await Raw.open(port)
    try:
        yield raw
    finally:
        await raw.close()


Handler = Callable[["RawPod", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawPod:
    """A pod made of bytes: ``handler(pod, reader, writer)`` runs once per
    accepted connection."""

    def __init__(self, pod_id: str, handler: Handler) -> None:
        self.id = pod_id
        self.handler = handler
        self.port = 0
        self.accepts = 0
        self.requests: list[bytes] = []  # what read_request read: head and body
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawPod:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: close() ends the handlers; end quietly
        finally:
            writer.close()
            self.tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: its head and its Content-Length body, if any."""
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and int(value) > 0:
                body = await reader.readexactly(int(value))
        self.requests.append(head + body)
        return head + body

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1)
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self.server.wait_closed()


RawPods = Callable[..., Awaitable[RawPod]]


@pytest.fixture
async def raw_pods() -> AsyncIterator[RawPods]:
    """``make(handler, pod_id="raw")``: a started ``RawPod``, closed after the test."""
    started: list[RawPod] = []

    async def make(handler: Handler, pod_id: str = "raw") -> RawPod:
        pod = await RawPod(pod_id, handler).start()
        started.append(pod)
        return pod

    yield make
    for pod in started:
        await pod.close()


def error_doc(
    headers: dict[str, str], body: bytes, error: str | None = None, generation: int | None = 7
) -> dict[str, Any]:
    """The proxy's JSON error body, checked: its keys, a non-empty error and
    detail, the generation in force, and ``error`` when given."""
    assert headers["content-type"] == "application/json"
    doc = json_body(body)
    assert isinstance(doc, dict)
    assert set(doc) == {"error", "detail", "generation"}
    assert isinstance(doc["error"], str) and doc["error"]
    if error is not None:
        assert doc["error"] == error, doc
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert doc["generation"] == generation
    return doc


async def error_response(
    raw: Raw, status: int, error: str | None = None, generation: int | None = 7, timeout: float = 5.0
) -> tuple[dict[str, str], dict[str, Any]]:
    """Read one response: ``status`` with the proxy's JSON error body (see
    ``error_doc``). Returns the headers and the error document."""
    got, headers, body = await raw.response(timeout=timeout)
    assert got == status, body
    return headers, error_doc(headers, body, error, generation)


# -- waiting for events -------------------------------------------------------------


async def wait_for(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0, what: str = "the condition"
) -> None:
    """Poll ``check`` (plain or async) until it is true; fail naming ``what``
    after ``timeout`` seconds. The bound only turns a hang into a clear
    failure: no test depends on how long the wait takes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    pause = 0.0
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        assert loop.time() < end, f"timed out after {timeout:g}s waiting for {what}"
        # A short yield, growing to 10 ms: other tasks (and processes, on a
        # busy machine) run while we wait, and a plain check does not spin.
        await asyncio.sleep(pause)
        pause = min(0.01, pause * 2 or 0.0005)


def idle_upstreams(proxy: Proxy) -> int:
    """Pooled connections the proxy still holds open to pods (not yet seen closed)."""
    return sum(1 for p in proxy.runtime.upstreams.pools.values() for c in p.idle if not c.closed)


def key_for(proxy: Proxy, pod_id: str, prefix: str = "marker") -> str:
    """A routing key the table in force sends to ``pod_id``."""
    table = proxy.runtime.table
    assert table is not None
    for i in range(10_000):
        key = f"{prefix}-{i}"
        if table.assignment.lookup(key.encode()).pod.id == pod_id:
            return key
    raise AssertionError(f"no key routes to pod {pod_id}")


async def send_marker(proxy: Proxy, pod_id: str, path: str = "/marker") -> None:
    """A known-good GET to ``pod_id`` on a fresh connection, answered by it."""
    key = key_for(proxy, pod_id)
    async with connect(proxy.port) as raw:
        await raw.send(f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\n\r\n".encode())
        status, headers, body = await raw.response()
    assert status == 200 and headers.get("x-keyroute-pod") == pod_id, (status, headers, body)


async def assert_nothing_reached(proxy: Proxy, pods: Sequence[Pod]) -> None:
    """Prove that nothing sent so far reached any of ``pods``, as a check that
    could have failed: each pod gets a marker request on a fresh connection,
    and only once every marker is answered do we look. Whatever the proxy had
    (wrongly) forwarded before would have reached its pod ahead of the marker,
    and any upstream connection it had opened for it would be counted."""
    before = opened(proxy)
    for pod in pods:
        await send_marker(proxy, pod.id, f"/marker-{pod.id}")
    assert [[r["path"] for r in p.requests] for p in pods] == [[f"/marker-{p.id}"] for p in pods]
    if before == 0:
        # A cold pool: one new connection per marker and none for anything else.
        assert opened(proxy) == len(pods)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def json_body(body: bytes) -> Any:
    return orjson.loads(body)


def header_map(info: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out
