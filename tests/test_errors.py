"""Pod-side failures and what crosses the proxy in each direction, over real sockets."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import (
    Handler,
    Pod,
    Proxy,
    ProxyFactory,
    Raw,
    RawPod,
    RawPods,
    connect,
    dead_pod,
    error_response,
    header_map,
    idle_upstreams,
    json_body,
    opened,
    table_for,
    wait_for,
)

GET = b"GET /x HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def replies(*responses: bytes, then_close: bool = False, linger: bool = True) -> Handler:
    """A handler that reads one request and writes each of ``responses``, per
    connection; then closes, or (``linger``) holds the connection, unanswered,
    until the proxy closes it."""

    async def handler(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await pod.read_request(reader)
            for i, data in enumerate(responses):
                if i:
                    # A pod writing its response in pieces, a moment apart, so
                    # that they reach the proxy as separate reads. Not
                    # synchronisation: the tests pass whatever the pause.
                    await asyncio.sleep(0.02)
                writer.write(data)
                await writer.drain()
            if then_close:
                return
            if linger:
                await reader.read()
                return

    return handler


async def read_head(raw: Raw, timeout: float = 5.0) -> tuple[int, list[tuple[str, str]]]:
    """Status and headers in order, duplicates kept."""
    async with asyncio.timeout(timeout):
        line = await raw.reader.readuntil(b"\r\n")
        headers = []
        while (h := await raw.reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = h.decode("latin-1").partition(":")
            headers.append((k.strip().lower(), v.strip()))
    return int(line.split()[1]), headers


async def read_rest(raw: Raw, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything until EOF or reset; (data, closed in time)."""
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await raw.reader.read(65536):
                data += chunk
    except ConnectionResetError:
        return bytes(data), True
    except TimeoutError:
        return bytes(data), False
    return bytes(data), True


# -- the pod cannot be reached or does not answer -----------------------------------------


async def test_nothing_listening_is_502_connect_failed(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(table_for([dead_pod("gone")]))
    async with connect(proxy.port) as raw:
        # Bodiless request: the client connection stays usable.
        for _ in range(2):
            await raw.send(GET)
            await error_response(raw, 502, "connect_failed")


async def test_silent_pod_is_504_pod_timeout(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    hung_up = asyncio.Event()

    async def silent(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pod.read_request(reader)
        # Never answers; notes when the proxy gives up on the connection.
        await reader.read()
        hung_up.set()

    pod = await raw_pods(silent)
    proxy = await proxy_factory(table_for([pod]), upstream__response_timeout="300ms")
    async with connect(proxy.port) as raw:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await raw.send(GET)
        await error_response(raw, 504, "pod_timeout", timeout=5)
        # A lower bound only, which cannot flake: the proxy armed its timer
        # (on this same loop clock) after t0.
        assert loop.time() - t0 >= 0.3 - 0.01
    async with asyncio.timeout(5):
        await hung_up.wait()  # the timed-out pod connection is closed, not pooled
    assert len(pod.requests) == 1
    assert set(proxy.runtime.stats.errors) == {"pod_timeout"}


BAD_RESPONSES = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
    "two_differing_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "garbage_status_line": b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "not_http_at_all": b"SSH-2.0-OpenSSH_9.6\r\n",
    "non_numeric_status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "bad_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
}


@pytest.mark.parametrize("response", list(BAD_RESPONSES.values()), ids=list(BAD_RESPONSES))
async def test_bad_response_is_502_and_connection_not_reused(
    proxy_factory: ProxyFactory, raw_pods: RawPods, response: bytes
) -> None:
    pod = await raw_pods(replies(response))
    proxy = await proxy_factory(table_for([pod]), upstream__response_timeout="1s")
    async with connect(proxy.port) as raw:
        for n in (1, 2):
            await raw.send(GET)
            await error_response(raw, 502, "bad_response", timeout=3)
            # A pod connection that spoke bad HTTP is never used again.
            assert pod.accepts == n
            assert opened(proxy) == n


# -- the pod fails part way through a response ----------------------------------------------


async def cut_short(proxy_factory: ProxyFactory, raw_pods: RawPods, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """A pod writes ``parts`` of a response, then closes: the status, headers and
    rest the client got. The client connection must be closed, not left hanging."""
    pod = await raw_pods(replies(*parts, then_close=True))
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        await raw.send(GET)
        status, headers = await read_head(raw)
        rest, closed = await read_rest(raw, timeout=3)
        assert closed, "the client connection must be closed, not left hanging"
    return status, dict(headers), rest


async def test_truncated_content_length_body_is_not_completed(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    status, headers, rest = await cut_short(
        proxy_factory, raw_pods, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 100
    )
    assert status == 200 and headers["content-length"] == "1000"
    assert len(rest) < 1000


async def test_chunked_response_cut_short_has_no_final_chunk(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    status, headers, rest = await cut_short(
        proxy_factory,
        raw_pods,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"6\r\n world\r\n3\r\nab",
    )
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert b"0\r\n\r\n" not in rest


async def test_close_delimited_response(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    parts = [b"first part;", b"second part;", b"third" * 1000]
    pod = await raw_pods(replies(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", *parts, then_close=True))
    proxy = await proxy_factory(table_for([pod]))
    # HTTP/1.1 client: re-framed as chunked, and the connection lives on.
    async with connect(proxy.port) as raw:
        for _ in range(2):
            await raw.send(GET)
            status, headers, body = await raw.response()
            assert status == 200
            assert headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in headers
            assert body == b"".join(parts)
    # HTTP/1.0 client: close-delimited in turn.
    async with connect(proxy.port) as raw:
        await raw.send(b"GET /x HTTP/1.0\r\nX-Routing-Key: a\r\nConnection: keep-alive\r\n\r\n")
        status, head = await read_head(raw)
        h = dict(head)
        assert status == 200
        assert "transfer-encoding" not in h and "content-length" not in h
        assert h.get("connection", "close").lower() == "close"
        rest, closed = await read_rest(raw)
        assert closed and rest == b"".join(parts)


# -- headers in each direction --------------------------------------------------------------


SPOOF = (
    b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
    b"X-Keyroute-Pod: spoof\r\nX-Keyroute-Generation: 999\r\nX-Other: kept\r\nContent-Length: 2\r\n\r\nok"
)


async def test_response_hop_by_hop_and_spoofed_headers(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    pod = await raw_pods(replies(SPOOF, linger=False))
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        await raw.send(GET)
        status, headers = await read_head(raw)
        assert status == 200
        names = [k for k, _ in headers]
        assert "x-secret" not in names
        assert "keep-alive" not in names
        assert ("connection", "X-Secret") not in headers
        assert [v for k, v in headers if k == "x-keyroute-pod"] == [pod.id]
        assert [v for k, v in headers if k == "x-keyroute-generation"] == ["7"]
        assert ("x-other", "kept") in headers
        assert await raw.reader.readexactly(2) == b"ok"


async def test_response_headers_switched_off(proxy_factory: ProxyFactory, raw_pods: RawPods, pods: list[Pod]) -> None:
    spoofer = await raw_pods(replies(SPOOF, linger=False))
    for table in (table_for(pods), table_for([spoofer])):
        proxy = await proxy_factory(table, proxy__response_headers=False)
        async with connect(proxy.port) as raw:
            await raw.send(GET)
            status, headers = await read_head(raw)
            assert status == 200
            assert not [k for k, _ in headers if k.startswith("x-keyroute-")], headers
    # The pod still gets its headers.
    info = next(r for p in pods for r in p.requests)
    assert "x-keyroute-pod" in header_map(info)


async def test_request_headers_to_pod(proxy: Proxy, pods: list[Pod]) -> None:
    table = proxy.runtime.table
    assert table is not None
    route = table.assignment.lookup(b"a")
    async with connect(proxy.port) as raw:
        await raw.send(
            b"GET /h HTTP/1.1\r\nHost: example.test\r\nX-Routing-Key: a\r\n"
            b"Connection: X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 1\r\nTE: trailers\r\nProxy-Connection: x\r\n"
            b"X-Keyroute-Epoch: 999\r\nX-Keyroute-Pod: evil\r\nX-Keyroute-Role: backup\r\n"
            b"X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n"
            b"Via: 1.1 edge\r\nX-Keep: yes\r\n\r\n"
        )
        status, _, body = await raw.response()
        assert status == 200
        h = header_map(json_body(body))
        for gone in ("x-drop", "keep-alive", "te", "proxy-connection"):
            assert gone not in h, gone
        assert all("x-drop" not in v.lower() for v in h.get("connection", []))
        assert h["x-keyroute-epoch"] == [str(route.epoch)]
        assert h["x-keyroute-pod"] == [route.pod.id]
        assert h["x-keyroute-role"] == ["owner"]
        assert h["x-keyroute-generation"] == ["7"]
        assert h["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
        assert h["x-forwarded-proto"] == ["http"]
        assert h["x-forwarded-host"] == ["example.test"]
        assert h["via"] == ["1.1 edge, 1.1 keyroute"]
        assert h["host"] == ["example.test"]
        assert h["x-keep"] == ["yes"]
        # Without client copies: ours alone.
        await raw.send(b"GET /h2 HTTP/1.1\r\nHost: plain.test\r\nX-Routing-Key: a\r\n\r\n")
        status, _, body = await raw.response()
        assert status == 200
        h = header_map(json_body(body))
        assert h["x-forwarded-for"] == ["127.0.0.1"]
        assert h["x-forwarded-proto"] == ["http"]
        assert h["x-forwarded-host"] == ["plain.test"]
        assert h["via"] == ["1.1 keyroute"]


# -- requests without a key, without a table -------------------------------------------------


NOKEY = b"GET /nokey HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_missing_key_random_spreads(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__missing_key="random")
    seen = []
    async with connect(proxy.port) as raw:
        for _ in range(60):
            await raw.send(NOKEY)
            status, headers, body = await raw.response()
            assert status == 200
            pod_id = json_body(body)["pod"]
            assert headers["x-keyroute-pod"] == pod_id
            seen.append(pod_id)
    assert set(seen) == {"pod-a", "pod-b", "pod-c"}


async def test_missing_key_fixed_pod(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__missing_key="pod:pod-b")
    async with connect(proxy.port) as raw:
        for _ in range(10):
            await raw.send(NOKEY)
            status, headers, body = await raw.response()
            assert status == 200
            assert json_body(body)["pod"] == "pod-b"
            assert headers["x-keyroute-pod"] == "pod-b"
        # A request with a key is still routed by it.
        table = proxy.runtime.table
        assert table is not None
        for key in ("user-1", "user-2", "tenant/42"):
            await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: %s\r\n\r\n" % key.encode())
            status, _, body = await raw.response()
            assert json_body(body)["pod"] == table.assignment.lookup(key.encode()).pod.id


async def test_missing_key_unknown_pod_is_503_no_route(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    proxy = await proxy_factory(table_for(pods), proxy__missing_key="pod:nope")
    async with connect(proxy.port) as raw:
        await raw.send(NOKEY)
        await error_response(raw, 503, "no_route")
    assert [p.requests for p in pods] == [[], [], []]


async def test_no_table_is_503(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(None)
    async with connect(proxy.port) as raw:
        await raw.send(GET)
        await error_response(raw, 503, "no_table", generation=None)
    assert opened(proxy) == 0


# -- pooled connections the pod closed ---------------------------------------------------------


async def test_pod_closes_idle_pooled_connection(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    # Answers one request per connection, then closes without saying so.
    pod = await raw_pods(replies(OK, then_close=True))
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        for n in (1, 2, 3):
            await raw.send(GET)
            status, _, body = await raw.response()
            assert status == 200 and body == b"ok"
            # The pod's close reaches the idle pooled connection: the proxy
            # sees it and never sends on that connection again.
            await wait_for(lambda: idle_upstreams(proxy) == 0, what="the proxy to see the pod's close")
            assert opened(proxy) == n
    assert pod.accepts == 3
    assert len(pod.requests) == 3  # each sent once: no request met a dead connection
    assert proxy.runtime.stats.retries == 0


async def _one_then_hang_up(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the first request; close on the second without answering (the
    race of a pod's keep-alive timeout against the proxy's reuse)."""
    await pod.read_request(reader)
    writer.write(OK)
    await writer.drain()
    await pod.read_request(reader)
    transport = writer.transport
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


async def test_reused_connection_dead_on_arrival_is_retried(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    pod = await raw_pods(_one_then_hang_up)
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        for i in range(3):
            await raw.send(b"GET /r%d HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n" % i)
            status, _, body = await raw.response()
            assert status == 200 and body == b"ok"
    # Request 1 on conn 1; request 2 sent on conn 1 (dropped), retried on conn 2;
    # request 3 likewise on conn 2 then conn 3.
    assert pod.accepts == 3
    assert [h.split(b" ")[1] for h in pod.requests] == [b"/r0", b"/r1", b"/r1", b"/r2", b"/r2"]


async def test_post_on_dead_reused_connection_is_not_retried(proxy_factory: ProxyFactory, raw_pods: RawPods) -> None:
    pod = await raw_pods(_one_then_hang_up)
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        await raw.send(GET)
        status, _, _ = await raw.response()
        assert status == 200
        await raw.send(b"POST /p HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 3\r\n\r\nabc")
        await error_response(raw, 502, "pod_closed")
    assert [h.split(b" ")[0] for h in pod.requests].count(b"POST") == 1
    assert pod.accepts == 1
