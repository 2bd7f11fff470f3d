"""Hostile and broken requests: refused by the proxy itself, over real sockets.

Ambiguous framing is answered with a JSON error and the connection is closed;
nothing of such a request reaches a pod (design.md, "What travels on the wire").
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from .conftest import (
    Handler,
    Pod,
    Proxy,
    ProxyFactory,
    Raw,
    RawPod,
    RawPods,
    assert_nothing_reached,
    connect,
    error_response,
    json_body,
    opened,
    send_marker,
    table_for,
    wait_for,
)

GOOD = b"GET /good HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"


def assert_nothing_reached_pods(proxy: Proxy, pods: list[Pod]) -> None:
    assert [p.requests for p in pods] == [[], [], []]
    assert opened(proxy) == 0


async def error_and_close(raw: Raw, status: int, error: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Read a JSON error that ends the connection: it says Connection: close,
    then the proxy closes."""
    headers, doc = await error_response(raw, status, error, timeout=timeout)
    assert headers.get("connection", "").lower() == "close"
    assert await raw.closed(timeout=2)
    return doc


async def refused(
    proxy: Proxy, pods: list[Pod], data: bytes, status: int = 400, error: str | None = None
) -> dict[str, Any]:
    """Send ``data`` in one write; expect a JSON error, then the connection closed,
    and nothing at any pod (proved by markers sent after it)."""
    async with connect(proxy.port) as raw:
        await raw.send(data)
        doc = await error_and_close(raw, status, error)
    assert_nothing_reached_pods(proxy, pods)
    await assert_nothing_reached(proxy, pods)
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


# Refused with a named error, and the connection closed: (request, status, error).
REFUSED = {
    "duplicate_routing_key": (
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nx-routing-key: b\r\n\r\n",
        400,
        "duplicate_key",
    ),
    "duplicate_routing_key_same_value": (
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Routing-Key: a\r\n\r\n",
        400,
        "duplicate_key",
    ),
    "connect_method": (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-Routing-Key: a\r\n\r\n",
        405,
        None,
    ),
    # A request with a body cannot be skipped safely: the connection goes too.
    "via_loop_case_insensitive_with_body": (
        HEAD + b"Via: 1.0 KeyRoute\r\nContent-Length: 3\r\n\r\nabc",
        508,
        "loop_detected",
    ),
    "missing_key_with_body": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", 400, "missing_key"),
}


@pytest.mark.parametrize(("data", "status", "error"), list(REFUSED.values()), ids=list(REFUSED))
async def test_refused_and_closed(proxy: Proxy, pods: list[Pod], data: bytes, status: int, error: str | None) -> None:
    await refused(proxy, pods, data, status, error)


# -- limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [b"X-Big: " + b"b" * 4096 + b"\r\n", b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(100))],
    ids=["one_big_header", "many_headers"],
)
async def test_head_over_max_header_bytes(proxy_factory: ProxyFactory, pods: list[Pod], extra: bytes) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_header_bytes=2048)
    data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n" + extra + b"\r\n"
    await refused(proxy, pods, data, 431, "headers_too_large")


async def test_huge_header_streamed_in_pieces(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_header_bytes=2048)
    async with connect(proxy.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Big: ")
        # The head never ends; the proxy must stop it once it passes the limit
        # (three pieces are enough) rather than buffer it forever.
        for _ in range(3):
            await raw.send(b"b" * 800)
        await error_and_close(raw, 431, "headers_too_large")
    assert_nothing_reached_pods(proxy, pods)
    await assert_nothing_reached(proxy, pods)


async def test_body_over_limit_by_content_length_is_refused_before_it_is_sent(
    proxy_factory: ProxyFactory, pods: list[Pod]
) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_body_bytes=10)
    async with connect(proxy.port) as raw:
        await raw.send(HEAD + b"Content-Length: 100\r\n\r\n")
        # No body sent: the answer must come from the head alone.
        await error_and_close(raw, 413, "body_too_large", timeout=2)
    assert_nothing_reached_pods(proxy, pods)
    await assert_nothing_reached(proxy, pods)
    # At the limit is fine.
    async with connect(proxy.port) as raw:
        await raw.send(HEAD + b"Content-Length: 10\r\n\r\n0123456789")
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["body_len"] == 10


async def test_body_over_limit_chunked(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__max_body_bytes=10)
    async with connect(proxy.port) as raw:
        await raw.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n")
        await error_and_close(raw, 413, "body_too_large")
    # A chunked body's size is only known as it streams, so the proxy may
    # have begun forwarding; but no pod may see a complete request.
    await assert_nothing_reached(proxy, pods)


# -- loops, missing keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (
            b"GET /loop HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nVia: 1.1 other, 1.1 keyroute\r\n\r\n",
            508,
            "loop_detected",
        ),
        (b"GET /nokey HTTP/1.1\r\nHost: t\r\n\r\n", 400, "missing_key"),
    ],
    ids=["via_loop", "missing_key"],
)
async def test_bodiless_refusal_keeps_connection(
    proxy: Proxy, pods: list[Pod], data: bytes, status: int, error: str
) -> None:
    async with connect(proxy.port) as raw:
        await raw.send(data)
        headers, _ = await error_response(raw, status, error)
        # A bodiless request leaves the stream in sync: keep-alive goes on.
        assert "connection" not in headers
        assert_nothing_reached_pods(proxy, pods)
        await raw.send(GOOD)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
    assert [r["path"] for p in pods for r in p.requests] == ["/good"]


# -- pipelining ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipelined", "error"),
    [
        (HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", None),
        (b"GET /bad HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nX-Routing-Key: b\r\n\r\n" + GOOD, "duplicate_key"),
    ],
    ids=["bad_framing", "duplicate_key_then_good"],
)
async def test_pipelined_good_then_refused(proxy: Proxy, pods: list[Pod], pipelined: bytes, error: str | None) -> None:
    async with connect(proxy.port) as raw:
        await raw.send(GOOD + pipelined)
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/good"
        await error_and_close(raw, 400, error)
    assert [r["path"] for p in pods for r in p.requests] == ["/good"]


# -- timeouts ----------------------------------------------------------------------------


async def test_header_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__header_timeout="300ms")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with connect(proxy.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Rout")
        await error_and_close(raw, 408, "request_timeout", timeout=5)
        # A lower bound only, which cannot flake: the proxy's timer (on this
        # same loop clock) was armed after t0, before the connection existed,
        # so the timeout ran out after it.
        assert loop.time() - t0 >= 0.3 - 0.01
    assert proxy.runtime.stats.errors == {"request_timeout": 1}
    assert_nothing_reached_pods(proxy, pods)
    await assert_nothing_reached(proxy, pods)


async def test_header_timeout_not_reset_by_trickle(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    # Room for every line the client sends before the timer runs out: the
    # answer must be the timeout, not 431.
    proxy = await proxy_factory(table_for(pods), proxy__header_timeout="300ms", proxy__max_header_bytes=1 << 26)
    async with connect(proxy.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        sent = 0

        def parsed() -> int:
            """Header lines the proxy has parsed on this connection (-1: closed)."""
            client = next(iter(proxy.runtime.connections), None)
            ex = client.parsing if client is not None else None
            return len(ex.headers) if ex is not None else -1

        async def trickle() -> None:
            # A client that never stops: each header line as soon as the proxy
            # has parsed what came before, for as long as the connection lasts. A timer reset by each line would never
            # run out; the proxy's must, by itself.
            nonlocal sent
            while True:
                # llhttp reports a line once the next one begins (it could be
                # folded): with n lines sent, n are parsed (Host and all but the last).
                await wait_for(lambda n=sent: parsed() in (-1, n), 10, "the proxy to parse the lines sent")
                if parsed() == -1:
                    return
                with contextlib.suppress(ConnectionError):
                    await raw.send(b"X-T%d: 1\r\n" % sent)
                    sent += 1

        task = asyncio.create_task(trickle())
        try:
            await error_and_close(raw, 408, "request_timeout", timeout=10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert sent > 1  # lines kept arriving while the timer ran
    assert proxy.runtime.stats.errors == {"request_timeout": 1}
    assert_nothing_reached_pods(proxy, pods)
    await assert_nothing_reached(proxy, pods)


async def test_idle_keep_alive_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__idle_timeout="300ms")
    async with connect(proxy.port) as raw:
        # Kept alive between requests that follow each other at once ...
        await raw.send(GOOD)
        status, _, _ = await raw.response()
        assert status == 200
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await raw.send(GOOD)
        status, _, _ = await raw.response()
        assert status == 200
        # ... then closed, silently, once idle. A lower bound only, which cannot
        # flake: the idle timer (on this same loop clock) was armed after t0.
        assert await raw.reader.read() == b""
        assert loop.time() - t0 >= 0.3 - 0.01
    assert [r["path"] for p in pods for r in p.requests] == ["/good", "/good"]


async def test_body_timeout(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__body_timeout="300ms")
    async with connect(proxy.port) as raw:
        await raw.send(HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        await error_and_close(raw, 408, "body_timeout", timeout=5)
    assert proxy.runtime.stats.errors == {"body_timeout": 1}
    # The head went ahead to the pod; the pod must not see a complete request.
    await assert_nothing_reached(proxy, pods)


# -- with a warm pool: not one byte of a refused request may reach the pod -----------------


def recording(received: bytearray) -> Handler:
    """A raw pod handler that records every byte it receives and answers each GET."""

    async def handler(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
            if data.startswith(b"GET ") and data.endswith(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return handler


@pytest.mark.parametrize("data", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
async def test_ambiguous_framing_sends_nothing_on_pooled_connection(
    proxy_factory: ProxyFactory, raw_pods: RawPods, data: bytes
) -> None:
    received = bytearray()
    pod = await raw_pods(recording(received), "rec")
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        await raw.send(GOOD)
        status, _, body = await raw.response()
        assert status == 200 and body == b"ok"
    before = bytes(received)
    assert before.startswith(b"GET /good ")
    async with connect(proxy.port) as raw:
        await raw.send(data)
        await error_and_close(raw, 400)
    # A marker on a fresh client connection, to the same pod: whatever of the
    # refused request had been written to the pod would have arrived first.
    await send_marker(proxy, "rec")
    assert bytes(received)[len(before) :].startswith(b"GET /marker "), bytes(received)[len(before) :]
    assert bytes(received).count(b" HTTP/1.1\r\n") == 2
