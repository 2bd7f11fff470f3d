"""Framing, timeouts and the exchange: each defect of the data-plane review,
reproduced over real sockets (the refused-Upgrade smuggle, HEAD with a retried
fail status, timeouts, Host, transfer codings, Via, pooled-connection races,
pods that leave the table)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from aiohttp import web

from proxy import reload
from proxy.http1.upstream import UpstreamConnection

from .conftest import (
    EchoPods,
    Pod,
    ProxyFactory,
    RawPod,
    RawPods,
    connect,
    dead_pod,
    error_response,
    header_map,
    json_body,
    opened,
    table_for,
    wait_for,
)

POST_A = b"POST / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n"


def header_lines(request: bytes) -> list[bytes]:
    return request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# -- 1. Upgrade --------------------------------------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\nX-Routing-Key: other\r\nX-Keyroute-Epoch: 1\r\n\r\n"


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := await reader.read(65536):
            chunks.append(data)
    return b"".join(chunks)


async def test_refused_upgrade_never_lets_the_next_bytes_reach_the_pod(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    seen: asyncio.Queue[bytes] = asyncio.Queue()

    async def refuse(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await pod.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # All that follows on this connection, until the proxy closes it.
        await seen.put(head + await read_to_eof(reader))

    pod = await raw_pods(refuse)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(UPGRADE + SMUGGLED)
        status, headers, body = await raw.response()
        assert (status, body) == (200, b"ok")
        assert headers["connection"] == "close"
        assert await raw.closed()
    got = await asyncio.wait_for(seen.get(), 5)  # the proxy discarded the pod connection
    assert b"/smuggled" not in got
    assert got.count(b"HTTP/1.1\r\n") == 1 and got.startswith(b"GET /ws ")
    assert pod.accepts == 1


async def test_accepted_upgrade_delivers_the_held_bytes_after_101(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def accept(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(SWITCHED)
        data = await reader.readexactly(len(b"frame-1frame-2"))
        writer.write(b"echo:" + data)
        await writer.drain()

    pod = await raw_pods(accept)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(UPGRADE + b"frame-1")
        status, headers, _ = await raw.response()
        assert status == 101 and headers["upgrade"] == "websocket"
        await raw.send(b"frame-2")
        assert await raw.reader.readexactly(19) == b"echo:frame-1frame-2"


async def test_101_to_a_request_without_upgrade_is_502(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    async def switch(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: evil\r\n\r\nraw bytes")
        await writer.drain()
        await read_to_eof(reader)

    pod = await raw_pods(switch)
    px = await proxy_factory(table_for([pod]), upstream__retries=0)
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        await error_response(raw, 502, "bad_response")


# -- 2 and 8. HEAD ----------------------------------------------------------------


async def test_head_retried_after_fail_status_gets_exactly_one_response(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def by_role(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await pod.read_request(reader)
            if b"X-Keyroute-Role: owner" in head:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\n")
                if not head.startswith(b"HEAD"):
                    writer.write(b"0123456789")
            elif head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Served: backup\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Served: backup\r\n\r\nhello")
            await writer.drain()

    pods = [await raw_pods(by_role, f"p{i}") for i in range(2)]
    px = await proxy_factory(table_for(pods), upstream__eject_after=100)
    async with connect(px.port) as raw:
        await raw.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response(head=True)
        assert (status, headers["content-length"], headers["x-served"], body) == (200, "5", "backup", b"")
        await raw.send(b"GET /g HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response()
        assert (status, headers["x-served"], body) == (200, "backup", b"hello")


async def test_head_keeps_its_pod_connection(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        for path in ("/1", "/2", "/3"):
            await raw.send(f"HEAD {path} HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n".encode())
            status, headers, _ = await raw.response(head=True)
            assert status == 200 and int(headers["content-length"]) > 0
        await raw.send(b"GET /4 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/4"
    assert [r["method"] for r in pods[0].requests] == ["HEAD", "HEAD", "HEAD", "GET"]
    assert opened(px) == 1


async def test_head_answered_with_a_body_does_not_reuse_the_connection(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def body_on_head(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await pod.read_request(reader)
            path = head.split(b" ")[1]
            # A broken pod: a HEAD answer with a body, in the same write.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Path: %s\r\n\r\nbody" % path)
            await writer.drain()

    pod = await raw_pods(body_on_head)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(b"HEAD /1 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, _ = await raw.response(head=True)
        assert (status, headers["x-path"]) == (200, "/1")
        await raw.send(b"GET /2 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response()
        assert (status, headers["x-path"], body) == (200, "/2", b"body")
    assert pod.accepts == 2


# -- 3 and 4. Timeouts ------------------------------------------------------------------


async def test_response_timeout_does_not_run_while_the_client_uploads(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def ok(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await pod.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Body: %s\r\n\r\n" % req.split(b"\r\n\r\n", 1)[1])
        await writer.drain()

    pod = await raw_pods(ok)
    px = await proxy_factory(table_for([pod]), upstream__response_timeout="200ms", upstream__retries=0)
    async with connect(px.port) as raw:
        await raw.send(b"POST /up HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 10\r\n\r\n01234")

        def conn_of() -> UpstreamConnection | None:
            client = next(iter(px.runtime.connections), None)
            ex = client.exchange if client is not None else None
            return ex.conn if ex is not None else None

        await wait_for(lambda: conn_of() is not None, what="the request's head sent to the pod")
        conn = conn_of()
        assert conn is not None and not pod.requests
        first = conn.deadline
        # The response timer comes due while the client still owes half its
        # body: it must wait on the client (move the deadline), not answer 504.
        await wait_for(lambda: conn.closed or conn.deadline > first, what="the response timer to come due")
        await raw.send(b"56789")
        status, headers, _ = await raw.response()
    assert (status, headers["x-body"]) == (200, "0123456789")
    assert px.runtime.stats.errors.get("pod_timeout") is None
    assert px.runtime.health.pods == {}


async def test_client_that_stops_reading_is_closed_after_send_timeout(
    echo_pods: EchoPods, proxy_factory: ProxyFactory
) -> None:
    ended = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"x" * 65536)
        finally:
            ended.set()  # the proxy let go of the pod connection

    def routes(app: web.Application) -> None:
        app.router.add_get("/endless", endless)

    pod = await echo_pods("pod-a", routes)
    px = await proxy_factory(table_for([pod]), proxy__send_timeout="300ms")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", px.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"GET /endless HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        # Read nothing: the proxy's buffers fill, it pauses, then gives up.
        await asyncio.wait_for(ended.wait(), 10)
        await wait_for(lambda: not px.runtime.connections, what="the client connection to be closed")
        assert px.runtime.stats.errors.get("send_timeout") == 1
    finally:
        sock.close()


# -- 5. Host and the request target ----------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: local host\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:80x\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\nX-Routing-Key: a\r\n\r\n",
        b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\nX-Routing-Key: a\r\n\r\n",
        b"GET http://a b/ HTTP/1.1\r\nHost: a\r\nX-Routing-Key: a\r\n\r\n",
        b"GET x/y HTTP/1.1\r\nHost: a\r\nX-Routing-Key: a\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\nX-Routing-Key: a\r\n\r\n",
    ],
    ids=[
        "no-host",
        "two-hosts",
        "two-equal-hosts",
        "host-with-space",
        "host-with-slash",
        "host-bad-port",
        "http10-two-hosts",
        "absolute-userinfo",
        "absolute-bad-authority",
        "relative-target",
        "asterisk-not-options",
    ],
)
async def test_bad_host_or_target_is_400(pods: list[Pod], proxy_factory: ProxyFactory, head: bytes) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(head)
        headers, _ = await error_response(raw, 400)
        assert headers["connection"] == "close"
        assert await raw.closed()
    assert pods[0].requests == [] and opened(px) == 0


@pytest.mark.parametrize(
    ("target", "host", "path", "pod_host"),
    [
        (b"http://example.com:8080/p?q=1", b"other", "/p?q=1", "example.com:8080"),
        (b"HTTP://Example.com", b"other", "/", "Example.com"),
        (b"http://[::1]:9/x", b"[::1]:9", "/x", "[::1]:9"),
        (b"http://a.b?x=1", b"a.b", "/?x=1", "a.b"),
    ],
)
async def test_absolute_form_becomes_origin_form(
    pods: list[Pod], proxy_factory: ProxyFactory, target: bytes, host: bytes, path: str, pod_host: str
) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"GET %s HTTP/1.1\r\nHost: %s\r\nX-Routing-Key: a\r\n\r\n" % (target, host))
        status, _, body = await raw.response()
    assert status == 200
    info = json_body(body)
    assert info["path"] == path
    assert header_map(info)["host"] == [pod_host]


async def test_options_asterisk_and_http10_without_host_pass(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"OPTIONS * HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, _, _ = await raw.response()
        assert status in (200, 404, 405)  # whatever the pod says: the request reached it
    async with connect(px.port) as raw:
        await raw.send(b"GET /old HTTP/1.0\r\nX-Routing-Key: a\r\n\r\n")
        status, _, body = await raw.response()
    assert status == 200
    assert header_map(json_body(body))["host"] == [f"127.0.0.1:{pods[0].port}"]


async def test_empty_routing_key_is_a_missing_key(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key:\r\n\r\n")
        await error_response(raw, 400, "missing_key")
    px2 = await proxy_factory(table_for(pods[:1]), proxy__allow_empty_key=True)
    async with connect(px2.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: \r\n\r\n")
        status, _, _ = await raw.response()
    assert status == 200


# -- 6. Connection, Transfer-Encoding, versions -------------------------------------


async def test_every_connection_header_of_a_response_is_honoured(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def named(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: x-first\r\nConnection: x-second, keep-alive\r\n"
            b"X-First: 1\r\nX-Second: 2\r\nX-Kept: 3\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()

    pod = await raw_pods(named)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, _ = await raw.response()
    assert status == 200 and headers["x-kept"] == "3"
    assert "x-first" not in headers and "x-second" not in headers


async def recording_pod(raw_pods: RawPods) -> RawPod:
    """A pod that answers every request with 200 and keeps what it read
    (chunked bodies read to their last chunk)."""

    async def record(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            if b"chunked\r\n" in head.lower():
                while not body.endswith(b"\r\n0\r\n\r\n") and body != b"0\r\n\r\n":
                    body += await reader.read(65536)
            pod.requests.append(head + body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    return await raw_pods(record)


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" CHUNKED", b"cHuNkEd"])
async def test_request_transfer_encoding_is_forwarded_as_chunked(
    raw_pods: RawPods, proxy_factory: ProxyFactory, value: bytes
) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(POST_A + b"Transfer-Encoding: %s\r\n\r\n5 ;ext=1\r\nhello\r\n0\r\n\r\n" % value)
        status, _, _ = await raw.response()
    assert status == 200
    (req,) = pod.requests
    te = [line for line in header_lines(req) if line.lower().startswith(b"transfer-encoding")]
    assert te == [b"Transfer-Encoding: chunked"]
    assert req.split(b"\r\n\r\n", 1)[1] == b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        POST_A + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: t\r\nX-Routing-Key: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        POST_A + b"Transfer-Encoding: chunked, \r\n\r\n",
        POST_A + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n",
    ],
    ids=["chunked-twice", "http10-te", "chunked-comma", "chunked-then-empty"],
)
async def test_ambiguous_transfer_encoding_is_400(raw_pods: RawPods, proxy_factory: ProxyFactory, head: bytes) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(head + b"5\r\nhello\r\n0\r\n\r\n")
        await error_response(raw, 400)
        assert await raw.closed()
    assert pod.accepts == 0


async def test_http_1_2_is_served_as_1_1_and_http_2_is_505(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(b"GET /v HTTP/1.2\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, _, _ = await raw.response()
        assert status == 200
        await raw.send(b"GET /w HTTP/1.2\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")  # still keep-alive
        status, _, _ = await raw.response()
        assert status == 200
    assert [header_lines(r)[0] for r in pod.requests] == [b"GET /v HTTP/1.1", b"GET /w HTTP/1.1"]
    for version in (b"2.0", b"3.0", b"0.9"):
        async with connect(px.port) as raw:
            await raw.send(b"GET / HTTP/%s\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n" % version)
            await error_response(raw, 505, "version_not_supported")
            assert await raw.closed()
    assert len(pod.requests) == 2


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (b"gzip, chunked", b"gzip, chunked"),
        (b"GZIP,CHUNKED", b"gzip, chunked"),
        (b"identity, chunked", b"chunked"),
        (b"gzip\r\nTransfer-Encoding: chunked", b"gzip, chunked"),
    ],
)
async def test_transfer_coding_lists_ending_in_chunked_are_normalized(
    raw_pods: RawPods, proxy_factory: ProxyFactory, value: bytes, sent: bytes
) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(POST_A + b"Transfer-Encoding: %s\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % value)
        status, _, _ = await raw.response()
    assert status == 200
    (req,) = pod.requests
    assert [line for line in header_lines(req) if line.lower().startswith(b"transfer-encoding")] == [
        b"Transfer-Encoding: " + sent
    ]


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 5\r\n\r\nhello",
        b"HEAD / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["get-cl", "head-cl", "get-te"],
)
async def test_get_or_head_with_a_body_is_refused_unless_allowed(
    raw_pods: RawPods, proxy_factory: ProxyFactory, head: bytes
) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(head)
        status, headers, _ = await raw.response(head=head.startswith(b"HEAD"))
        assert status == 400 and headers["connection"] == "close"
        assert await raw.closed()
    assert pod.accepts == 0
    px2 = await proxy_factory(table_for([pod]), proxy__get_body="forward")
    async with connect(px2.port) as raw:
        await raw.send(head)
        status, _, _ = await raw.response(head=head.startswith(b"HEAD"))
    assert status == 200 and len(pod.requests) == 1


async def test_lookalike_framing_headers_are_dropped(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    pod = await recording_pod(raw_pods)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(
            POST_A + b"Content-Length: 5\r\nTransfer_Encoding: chunked\r\nContent__Length: 99\r\n"
            b"Transfer---Encoding: chunked\r\nX_Keyroute_Epoch: 1\r\nMy_Header: kept\r\n\r\nhello"
        )
        status, _, _ = await raw.response()
    assert status == 200
    (req,) = pod.requests
    names = [line.split(b":")[0] for line in header_lines(req)[1:]]
    assert b"My_Header" in names
    assert not [n for n in names if b"_" in n and n != b"My_Header"] and b"Transfer---Encoding" not in names


async def test_upgrade_request_with_a_body_is_forwarded_without_the_upgrade(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    pod = await raw_pods(_answer_and_record)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 10\r\n\r\nhello"
        )
        await raw.send(b"world" + SMUGGLED)
        status, headers, body = await raw.response()
        assert (status, body) == (200, b"helloworld")
        assert headers["connection"] == "close"
        assert await raw.closed()
    (req,) = pod.requests
    assert req.endswith(b"\r\n\r\nhelloworld")
    assert b"pgrade" not in req


async def test_upgrade_request_with_a_body_beyond_2_63_bytes_is_forwarded(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    # llhttp takes a Content-Length up to 2**64 - 1; counting such a body out
    # must not overflow on the compiled path (it was an OverflowError there:
    # the connection closed with no answer).
    async def early(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(5)
        pod.requests.append(head + body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ngot")
        await writer.drain()

    pod = await raw_pods(early)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 9223372036854775808\r\n\r\n"
        )
        await raw.send(b"hello")
        status, headers, body = await raw.response()
        assert (status, body) == (200, b"got")
        assert headers["connection"] == "close"
    (req,) = pod.requests
    assert b"\r\nContent-Length: 9223372036854775808\r\n" in req and req.endswith(b"\r\n\r\nhello")
    assert b"pgrade" not in req


async def _answer_and_record(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request with its body; then record what follows until the proxy closes."""
    req = await pod.read_request(reader)
    body = req.split(b"\r\n\r\n", 1)[1]
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    rest = await read_to_eof(reader)
    if rest:
        pod.requests.append(rest)


# -- 7. Via ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("via", "loop"),
    [
        (b"1.1 keyroute-edge", False),
        (b"1.1 edge-keyroute, 1.0 mykeyroute", False),
        (b"1.1 keyroute", True),
        (b"1.0 edge, HTTP/1.1 KeyRoute (proxy)", True),
    ],
)
async def test_via_loop_matches_the_received_by_field(
    pods: list[Pod], proxy_factory: ProxyFactory, via: bytes, loop: bool
) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nVia: %s\r\n\r\n" % via)
        if loop:
            await error_response(raw, 508, "loop_detected")
        else:
            status, _, body = await raw.response()
            assert status == 200
            assert header_map(json_body(body))["via"] == [via.decode() + ", 1.1 keyroute"]


# -- 9. Close-delimited responses ----------------------------------------------------


async def test_close_delimited_response_with_a_transfer_coding_ends_cleanly(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    payload = b"gzip-coded bytes, delimited by the close"

    async def coded(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + payload)
        await writer.drain()
        writer.close()

    pod = await raw_pods(coded)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        for _ in range(2):  # the last chunk came: the connection is good for another request
            await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
            status, headers, _ = await raw.response(head=True)
            assert status == 200 and headers["transfer-encoding"] == "gzip, chunked"
            body = b""
            while size := int(await raw.reader.readuntil(b"\r\n"), 16):
                body += await raw.reader.readexactly(size)
                assert await raw.reader.readexactly(2) == b"\r\n"
            assert await raw.reader.readexactly(2) == b"\r\n"
            assert body == payload


# -- 10. Pooled connections the pod closes --------------------------------------------


async def test_post_on_a_pooled_connection_the_pod_closed_is_not_a_pod_failure(
    raw_pods: RawPods, proxy_factory: ProxyFactory
) -> None:
    async def close_second(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        # The pod's keep-alive ran out just as the proxy sent the next request.
        await pod.read_request(reader)
        writer.transport.abort()

    pod = await raw_pods(close_second)
    px = await proxy_factory(table_for([pod]), upstream__eject_after=1)
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        assert (await raw.response())[0] == 200
        await raw.send(b"POST / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 2\r\n\r\nhi")
        await error_response(raw, 502, "pod_closed")
    assert len(pod.requests) == 2 and pod.accepts == 1
    assert px.runtime.health.pods == {}
    # Not ejected: the next request goes to the pod (on a new connection).
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        assert (await raw.response())[0] == 200


# -- 17. Pods that leave the table ---------------------------------------------------


async def test_pods_that_leave_the_table_leave_nothing_behind(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    gone, leaving = dead_pod("gone"), pods[2]
    px = await proxy_factory(table_for([pods[0], leaving, gone], generation=7), upstream__retries=2)
    rt = px.runtime
    table = rt.table
    assert table is not None

    def key_to(pod_id: str) -> str:
        assert table is not None
        return next(k for k in (f"k{i}" for i in range(10_000)) if table.assignment.lookup(k.encode()).pod.id == pod_id)

    async with connect(px.port) as raw:
        for key in (key_to("gone"), key_to(leaving.id), key_to(pods[0].id)):
            await raw.send(f"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\n\r\n".encode())
            status, headers, _ = await raw.response()
            assert status == 200 and headers["x-keyroute-pod"] != "gone"
    leaving_addr = ("127.0.0.1", leaving.port)
    assert "gone" in rt.health.pods and leaving.id in rt.stats.by_pod and leaving_addr in rt.upstreams.pools
    assert reload.offer(rt, table_for([pods[0], pods[1]], generation=8)) == ""
    assert rt.health.pods == {}
    assert leaving_addr not in rt.upstreams.pools
    assert ("127.0.0.1", pods[0].port) in rt.upstreams.pools
    assert leaving.id not in rt.stats.by_pod and pods[0].id in rt.stats.by_pod
    # A pod that leaves and comes back starts afresh on a new pool.
    assert reload.offer(rt, table_for([pods[0], leaving], generation=9)) == ""
    async with connect(px.port) as raw:
        await raw.send(f"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key_to(leaving.id)}\r\n\r\n".encode())
        status, headers, _ = await raw.response()
    assert status == 200


def test_panic_is_cached_until_an_ejection_ends() -> None:
    from proxy.health import Health

    now = [100.0]
    h = Health(eject_after=1, eject_base=5.0, max_ejected_percent=40, clock=lambda: now[0])
    h.set_pods(["a", "b", "c"])
    assert h.panic_now(now[0]) is False
    h.failure("a", "x")
    h.failure("b", "x")
    assert h.panic_now(now[0]) is True
    now[0] += 6.0  # both ejections end
    assert h.panic_now(now[0]) is False
    h.set_pods(["c"])
    assert h.pods == {} and h.in_panic is False
    h.failure("a", "late answer from an older table")
    assert h.pods == {}


async def test_errors_made_by_the_proxy_for_head_have_no_body(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")  # no key: 400, connection kept
        status, headers, _ = await raw.response(head=True)
        assert status == 400 and int(headers["content-length"]) > 0
        await raw.send(b"GET /g HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["path"] == "/g"
    async with connect(px.port) as raw:
        await raw.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Routing-Key: a\r\n\r\n")  # 400, then close
        status, headers, _ = await raw.response(head=True)
        assert status == 400 and headers["connection"] == "close"
        assert await raw.reader.read() == b""


async def test_a_pod_error_is_counted_once(proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for([dead_pod("gone")]), upstream__retries=0)
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        await error_response(raw, 502, "connect_failed")
    assert px.runtime.stats.errors == {"connect_failed": 1}


# -- found in review ---------------------------------------------------------------


async def test_upgrade_request_whose_body_stalls_gets_408(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    closed = asyncio.Event()

    async def wait_body(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await read_to_eof(reader)
        closed.set()  # the proxy let go of the pod connection

    pod = await raw_pods(wait_body)
    px = await proxy_factory(table_for([pod]), proxy__body_timeout="300ms")
    async with connect(px.port) as raw:
        await raw.send(POST_A + b"Connection: Upgrade\r\nUpgrade: foo\r\nContent-Length: 10\r\n\r\nhello")
        await error_response(raw, 408, "body_timeout")
        assert await raw.closed()
    await asyncio.wait_for(closed.wait(), 5)


async def test_upgrade_request_refused_by_the_proxy_gets_one_response(
    pods: list[Pod], proxy_factory: ProxyFactory
) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + SMUGGLED)
        headers, _ = await error_response(raw, 400, "missing_key")
        assert headers["connection"] == "close"
        assert await raw.reader.read() == b""
    assert pods[0].requests == []


async def test_refused_upgrade_is_not_a_pod_failure(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    async def refuse(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_to_eof(reader)

    pod = await raw_pods(refuse)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(UPGRADE)
        status, _, body = await raw.response()
        assert (status, body) == (200, b"ok")
        assert await raw.closed()
    await wait_for(lambda: not px.runtime.connections, what="the client connection to close")
    assert px.runtime.health.pods == {}
    assert "pod_closed" not in px.runtime.stats.errors


async def test_client_half_close_before_101_reaches_the_pod(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    async def accept(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        writer.write(SWITCHED)
        got = await read_to_eof(reader)  # ends only if the client's EOF is passed on
        writer.write(b"got:" + got)
        await writer.drain()

    pod = await raw_pods(accept)
    px = await proxy_factory(table_for([pod]))
    async with connect(px.port) as raw:
        await raw.send(UPGRADE + b"hello")
        raw.writer.write_eof()
        status, _, _ = await raw.response(head=True)
        assert status == 101
        assert await asyncio.wait_for(raw.reader.read(), 5) == b"got:hello"
    assert px.runtime.stats.by_pod[pod.id][0] == 1  # the 101 is counted


async def test_lookalike_key_header_is_dropped(pods: list[Pod], proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods[:1]))
    async with connect(px.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: alice\r\nX_Routing_Key: mallory\r\n\r\n")
        status, _, body = await raw.response()
    assert status == 200
    names = [k.lower() for k, _ in json_body(body)["headers"]]
    assert "x-routing-key" in names and "x_routing_key" not in names


async def test_tunnel_keeps_back_pressure(proxy_factory: ProxyFactory) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: the pod takes little
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def pod() -> socket.socket:
        conn, _ = await loop.sock_accept(listener)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(conn, 65536)
        # The 101, then nothing more is read.
        await loop.sock_sendall(conn, SWITCHED)
        return conn

    px = await proxy_factory(table_for([("p", f"http://127.0.0.1:{port}")]))
    pod_task = asyncio.create_task(pod())
    client = socket.socket()
    client.connect(("127.0.0.1", px.port))
    client.setblocking(False)
    # The request and, in the same burst, more bytes than the proxy holds before a 101.
    sender = asyncio.create_task(loop.sock_sendall(client, UPGRADE + b"x" * (16 << 20)))
    try:
        pod_conn = await asyncio.wait_for(pod_task, 10)
        proto = None

        def tunnel_blocked() -> bool:
            nonlocal proto
            proto = next(iter(px.runtime.connections), None)
            return proto is not None and proto.tunnel is not None and proto.tunnel.write_blocked

        await wait_for(tunnel_blocked, timeout=10, what="the pod side to stop taking bytes")
        assert proto is not None and proto.tunnel is not None and proto.tunnel.transport is not None
        # Reading the client stays paused while the pod takes nothing: the
        # proxy's buffer for the pod stays near its high-water mark.
        assert proto.paused_mask != 0
        assert proto.tunnel.transport.get_write_buffer_size() < 4 << 20
        assert not sender.done()
        pod_conn.close()
    finally:
        sender.cancel()
        client.close()
        listener.close()
