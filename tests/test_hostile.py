"""Hostile and broken requests: refused by the proxy itself, over real sockets.

Ambiguous framing is answered with a JSON error and the connection is closed;
nothing of such a request reaches a pod (design.md, "What travels on the wire").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from .conftest import Pod, Proxy, Raw, json_body, table_for

ProxyFactory = Callable[..., Awaitable[Proxy]]

GOOD = b"GET /good HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"


def opened(proxy: Proxy) -> int:
    """Upstream connections the proxy has opened so far, to any pod."""
    return sum(p.opened for p in proxy.runtime.upstreams.pools.values())


def assert_error_body(headers: dict[str, str], body: bytes, error: str | None = None) -> dict[str, Any]:
    assert headers["content-type"] == "application/json"
    doc = json_body(body)
    assert isinstance(doc, dict)
    assert set(doc) == {"error", "detail", "generation"}
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert doc["generation"] == 7
    if error is not None:
        assert doc["error"] == error
    return doc


def assert_nothing_reached_pods(proxy: Proxy, pods: list[Pod]) -> None:
    assert [p.requests for p in pods] == [[], [], []]
    assert opened(proxy) == 0


async def refused(
    proxy: Proxy, pods: list[Pod], data: bytes, status: int = 400, error: str | None = None
) -> dict[str, Any]:
    """Send ``data`` in one write; expect a JSON error, then the connection closed,
    and nothing at any pod."""
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(data)
        got, headers, body = await raw.response()
        assert got == status, body
        doc = assert_error_body(headers, body, error)
        assert headers.get("connection", "").lower() == "close"
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    await asyncio.sleep(0.05)  # give a (wrongly) started upstream connect time to show
    assert_nothing_reached_pods(proxy, pods)
    return doc


HEAD = b"POST /x HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n"

AMBIGUOUS = {
    "cl_and_te": HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te_and_cl": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "two_differing_cl": HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "two_equal_cl": HEAD + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl_list": HEAD + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl_not_a_number": HEAD + b"Content-Length: +3\r\n\r\nabc",
    "te_gzip": HEAD + b"Transfer-Encoding: gzip\r\n\r\nabc",
    "te_chunked_then_gzip": HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te_duplicate_headers": HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te_chunked_header_then_gzip_header": HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Folded: one\r\n two\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: one\r\n\ttwo\r\nX-Routing-Key: a\r\n\r\n",
    "bad_chunk_size": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "negative_chunk_size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "nul_in_header_value": b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Bad: a\x00b\r\n\r\n",
    "cr_in_header_value": b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Bad: a\rb\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key : a\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: t\nX-Routing-Key: a\n\n",
    "bare_lf_in_one_header": b"GET / HTTP/1.1\r\nHost: t\nX-Routing-Key: a\r\n\r\n",
    "garbage_request_line": b"HELLO\r\n\r\n",
}


@pytest.mark.parametrize("data", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
async def test_ambiguous_framing_is_refused(proxy: Proxy, pods: list[Pod], data: bytes) -> None:
    await refused(proxy, pods, data, 400)


async def test_duplicate_routing_key(proxy: Proxy, pods: list[Pod]) -> None:
    await refused(
        proxy, pods, b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nx-routing-key: b\r\n\r\n", 400, "duplicate_key"
    )


async def test_duplicate_routing_key_same_value(proxy: Proxy, pods: list[Pod]) -> None:
    await refused(
        proxy, pods, b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Routing-Key: a\r\n\r\n", 400, "duplicate_key"
    )


async def test_connect_is_refused(proxy: Proxy, pods: list[Pod]) -> None:
    await refused(
        proxy, pods, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-Routing-Key: a\r\n\r\n", 405
    )


# -- limits -----------------------------------------------------------------------


async def test_head_over_max_header_bytes(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_header_bytes=2048)
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Big: " + b"b" * 4096 + b"\r\n\r\n"
    await refused(proxy, pods, data, 431, "headers_too_large")


async def test_many_headers_over_max_header_bytes(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_header_bytes=2048)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(100))
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n" + many + b"\r\n"
    await refused(proxy, pods, data, 431, "headers_too_large")


async def test_huge_header_streamed_in_pieces(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_header_bytes=2048)
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Big: ")
        # The head never ends; the proxy must stop it once it passes the limit
        # (three pieces are enough) rather than buffer it forever.
        for _ in range(3):
            await asyncio.sleep(0.02)
            await raw.send(b"b" * 800)
        status, headers, body = await raw.response()
        assert status == 431
        assert_error_body(headers, body, "headers_too_large")
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    assert_nothing_reached_pods(proxy, pods)


async def test_body_over_limit_by_content_length_is_refused_before_it_is_sent(
    proxy_factory: ProxyFactory, pods: list[Pod]
) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_body_bytes=10)
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(HEAD + b"Content-Length: 100\r\n\r\n")
        # No body sent: the answer must come from the head alone.
        status, headers, body = await raw.response(timeout=2)
        assert status == 413
        assert_error_body(headers, body, "body_too_large")
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    assert_nothing_reached_pods(proxy, pods)
    # At the limit is fine.
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(HEAD + b"Content-Length: 10\r\n\r\n0123456789")
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["body_len"] == 10
    finally:
        await raw.close()


async def test_body_over_limit_chunked(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_body_bytes=10)
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 413
        assert_error_body(headers, body, "body_too_large")
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    await asyncio.sleep(0.05)
    # A chunked body's size is only known as it streams, so the proxy may
    # have begun forwarding; but no pod may see a complete request.
    assert [p.requests for p in pods] == [[], [], []]


# -- loops, missing keys --------------------------------------------------------------


async def test_via_loop_bodiless_keeps_connection(proxy: Proxy, pods: list[Pod]) -> None:
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(b"GET /loop HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nVia: 1.1 other, 1.1 keyroute\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 508
        assert_error_body(headers, body, "loop_detected")
        # A bodiless request leaves the stream in sync: keep-alive goes on.
        assert "connection" not in headers
        assert_nothing_reached_pods(proxy, pods)
        await raw.send(GOOD)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
    finally:
        await raw.close()
    assert [r["path"] for p in pods for r in p.requests] == ["/good"]


async def test_via_loop_case_insensitive_with_body_closes(proxy: Proxy, pods: list[Pod]) -> None:
    await refused(proxy, pods, HEAD + b"Via: 1.0 KeyRoute\r\nContent-Length: 3\r\n\r\nabc", 508, "loop_detected")


async def test_missing_key_keeps_connection(proxy: Proxy, pods: list[Pod]) -> None:
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(b"GET /nokey HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 400
        assert_error_body(headers, body, "missing_key")
        assert "connection" not in headers
        assert_nothing_reached_pods(proxy, pods)
        await raw.send(GOOD)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
    finally:
        await raw.close()


async def test_missing_key_with_body_closes(proxy: Proxy, pods: list[Pod]) -> None:
    await refused(proxy, pods, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", 400, "missing_key")


# -- pipelining ----------------------------------------------------------------------


async def test_pipelined_good_then_bad(proxy: Proxy, pods: list[Pod]) -> None:
    raw = await Raw.open(proxy.port)
    try:
        bad = HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        await raw.send(GOOD + bad)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
        status, headers, body = await raw.response()
        assert status == 400
        assert_error_body(headers, body)
        assert headers["connection"].lower() == "close"
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    assert [r["path"] for p in pods for r in p.requests] == ["/good"]


async def test_pipelined_good_then_duplicate_key(proxy: Proxy, pods: list[Pod]) -> None:
    raw = await Raw.open(proxy.port)
    try:
        bad = b"GET /bad HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Routing-Key: b\r\n\r\n"
        await raw.send(GOOD + bad + GOOD)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
        status, headers, body = await raw.response()
        assert status == 400
        assert_error_body(headers, body, "duplicate_key")
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    assert [r["path"] for p in pods for r in p.requests] == ["/good"]


# -- timeouts ----------------------------------------------------------------------------


async def test_header_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__header_timeout="300ms")
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Rout")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        status, headers, body = await raw.response(timeout=3)
        assert 0.2 <= loop.time() - t0 < 2
        assert status == 408
        assert_error_body(headers, body)
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    assert_nothing_reached_pods(proxy, pods)


async def test_header_timeout_not_reset_by_trickle(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__header_timeout="300ms")
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\n")

        async def trickle() -> None:
            for i in range(30):
                await asyncio.sleep(0.05)
                with contextlib.suppress(ConnectionError):
                    await raw.send(b"X-T%d: 1\r\n" % i)

        task = asyncio.create_task(trickle())
        try:
            status, _, _ = await raw.response(timeout=1.2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert status == 408
    finally:
        await raw.close()
    assert_nothing_reached_pods(proxy, pods)


async def test_idle_keep_alive_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__idle_timeout="300ms")
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(GOOD)
        status, _, _ = await raw.response()
        assert status == 200
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await raw.closed(timeout=2)
        assert loop.time() - t0 >= 0.2
    finally:
        await raw.close()


async def test_body_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__body_timeout="300ms")
    raw = await Raw.open(proxy.port)
    try:
        await raw.send(HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        status, headers, body = await raw.response(timeout=3)
        assert status == 408
        assert_error_body(headers, body)
        assert await raw.closed(timeout=2)
    finally:
        await raw.close()
    await asyncio.sleep(0.05)
    assert [p.requests for p in pods] == [[], [], []]


# -- with a warm pool: not one byte of a refused request may reach the pod -----------------


class RecordingPod:
    """A raw pod that records every byte it receives and answers each GET."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RecordingPod:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while data := await reader.read(65536):
                self.received += data
                if data.startswith(b"GET ") and data.endswith(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1)
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("data", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
async def test_ambiguous_framing_sends_nothing_on_pooled_connection(proxy_factory: ProxyFactory, data: bytes) -> None:
    pod = await RecordingPod().start()
    try:
        proxy = await proxy_factory(table_for([("rec", f"http://127.0.0.1:{pod.port}")]))
        raw = await Raw.open(proxy.port)
        try:
            await raw.send(GOOD)
            status, _, body = await raw.response()
            assert status == 200 and body == b"ok"
        finally:
            await raw.close()
        before = bytes(pod.received)
        assert before.startswith(b"GET /good ")
        raw = await Raw.open(proxy.port)
        try:
            await raw.send(data)
            status, headers, body = await raw.response()
            assert status == 400
            assert_error_body(headers, body)
            assert await raw.closed(timeout=2)
        finally:
            await raw.close()
        await asyncio.sleep(0.05)
        assert bytes(pod.received)[len(before) :] == b""
    finally:
        await pod.close()
