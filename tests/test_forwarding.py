"""HTTP/1.1 semantics of the data plane, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
from aiohttp import web

from .conftest import POD, EchoPods, Pod, Proxy, ProxyFactory, connect, header_map, json_body, opened, table_for


async def test_same_key_same_pod_and_wire_headers(proxy: Proxy, pods: list[Pod]) -> None:
    table = proxy.runtime.table
    assert table is not None
    async with aiohttp.ClientSession() as s:
        for key in ("user-1", "user-2", "tenant/42", "ключ"):
            route = table.assignment.lookup(key.encode())
            seen = set()
            for _ in range(3):
                async with s.get(proxy.base + "/x?q=1", headers={"X-Routing-Key": key}) as r:
                    assert r.status == 200
                    info = await r.json()
                    seen.add(info["pod"])
                    assert r.headers["X-Keyroute-Pod"] == route.pod.id
                    assert r.headers["X-Keyroute-Generation"] == str(table.generation)
                    h = header_map(info)
                    assert h["x-keyroute-pod"] == [route.pod.id]
                    assert h["x-keyroute-generation"] == [str(table.generation)]
                    assert h["x-keyroute-epoch"] == [str(route.epoch)]
                    assert h["x-keyroute-role"] == ["owner"]
                    assert info["path"] == "/x?q=1"
            assert seen == {route.pod.id}


async def test_keep_alive_reuses_both_sides(proxy: Proxy, pods: list[Pod]) -> None:
    async with connect(proxy.port) as raw:
        for i in range(5):
            await raw.send(b"GET /k%d HTTP/1.1\r\nHost: t\r\nX-Routing-Key: same\r\n\r\n" % i)
            status, headers, body = await raw.response()
            assert status == 200
            assert json_body(body)["path"] == f"/k{i}"
            assert "connection" not in headers
        assert opened(proxy) == 1


async def test_pipelined_requests_answered_in_order(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\nX-Routing-Key: key-%d\r\n\r\n" % (i, i) for i in range(8))
        await raw.send(reqs)
        for i in range(8):
            status, _, body = await raw.response()
            assert status == 200
            assert json_body(body)["path"] == f"/p{i}"


async def test_pipelined_posts_with_bodies(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        reqs = b""
        for i in range(4):
            body = bytes([65 + i]) * (1000 * (i + 1))
            reqs += b"POST /b%d HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k%d\r\nContent-Length: %d\r\n\r\n%s" % (
                i,
                i,
                len(body),
                body,
            )
        await raw.send(reqs)
        for i in range(4):
            status, _, body = await raw.response()
            info = json_body(body)
            assert status == 200 and info["path"] == f"/b{i}"
            assert info["body_len"] == 1000 * (i + 1)
            assert info["body_sha"] == hashlib.sha256(bytes([65 + i]) * (1000 * (i + 1))).hexdigest()


async def test_connection_close_is_honoured(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nConnection: close\r\n\r\n")
        status, headers, _ = await raw.response()
        assert status == 200
        assert headers["connection"] == "close"
        assert await raw.closed()


async def test_http10_client(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        await raw.send(b"GET /old HTTP/1.0\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 200
        info = json_body(body)
        # The pod gets HTTP/1.1 with a Host header made from its address.
        assert info["version"] == "1.1"
        assert header_map(info)["host"][0].startswith("127.0.0.1:")
        assert header_map(info)["via"] == ["1.0 keyroute"]
        assert await raw.closed()
    # An HTTP/1.0 client that asks for keep-alive gets it.
    async with connect(proxy.port) as raw:
        for _ in range(2):
            await raw.send(b"GET /old HTTP/1.0\r\nX-Routing-Key: a\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = await raw.response()
            assert status == 200 and headers["connection"].lower() == "keep-alive"


async def test_chunked_upload_is_reframed(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        chunks = [b"hello ", b"chunked ", b"world" * 1000]
        body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"
        await raw.send(b"POST /up HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        status, _, resp = await raw.response()
        info = json_body(resp)
        assert status == 200
        assert info["body_sha"] == hashlib.sha256(b"".join(chunks)).hexdigest()
        h = header_map(info)
        assert h["transfer-encoding"] == ["chunked"]
        assert "x-trailer" not in h  # trailers are dropped
        # The connection is still good.
        await raw.send(b"GET /after HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, _, resp = await raw.response()
        assert status == 200 and json_body(resp)["path"] == "/after"


async def _streamer(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"X-Pod": "s"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(50):
        await resp.write(b"part-%d;" % i)
    await resp.write_eof()
    return resp


async def test_chunked_download_and_head_204_304(
    proxy_factory: ProxyFactory, pods: list[Pod], echo_pods: EchoPods
) -> None:
    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Pod": "n"})

    async def not_modified(request: web.Request) -> web.Response:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    async def head_target(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1234)

    def routes(app: web.Application) -> None:
        app.router.add_get("/stream", _streamer)
        app.router.add_get("/204", no_content)
        app.router.add_get("/304", not_modified)
        app.router.add_get("/sized", head_target)

    pod = await echo_pods("pod-s", routes)
    proxy = await proxy_factory(table_for([pod]))
    async with connect(proxy.port) as raw:
        await raw.send(b"GET /stream HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == b"".join(b"part-%d;" % i for i in range(50))
        await raw.send(b"HEAD /sized HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response(head=True)
        assert status == 200 and headers["content-length"] == "1234"
        await raw.send(b"GET /204 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, _ = await raw.response()
        assert status == 204
        await raw.send(b'GET /304 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nIf-None-Match: "v1"\r\n\r\n')
        status, headers, _ = await raw.response()
        assert status == 304 and headers["etag"] == '"v1"'
        # After all that, the connection still carries a normal request.
        await raw.send(b"GET /sized HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
        status, headers, body = await raw.response()
        assert status == 200 and body == b"x" * 1234


async def test_expect_100_continue(proxy: Proxy) -> None:
    async with connect(proxy.port) as raw:
        await raw.send(
            b"POST /e HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        status, _, _ = await raw.response()
        assert status == 100
        await raw.send(b"abcde")
        status, _, body = await raw.response()
        assert status == 200 and json_body(body)["body_len"] == 5


async def test_websocket_upgrade_is_spliced(proxy_factory: ProxyFactory, echo_pods: EchoPods) -> None:
    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{request.app[POD].id}:{msg.data}")
        return ws

    def routes(app: web.Application) -> None:
        app.router.add_get("/ws", ws_handler)

    pods = [await echo_pods(f"ws-{i}", routes) for i in range(3)]
    proxy = await proxy_factory(table_for(pods))
    table = proxy.runtime.table
    assert table is not None
    async with aiohttp.ClientSession() as s:
        for key in ("room-1", "room-2", "room-3"):
            owner = table.assignment.lookup(key.encode()).pod.id
            async with s.ws_connect(proxy.base + "/ws", headers={"X-Routing-Key": key}) as ws:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    msg = await ws.receive(timeout=5)
                    assert msg.data == f"{owner}:m{i}"


async def test_concurrent_clients_many_keys(proxy: Proxy) -> None:
    table = proxy.runtime.table
    assert table is not None

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        for i in range(20):
            key = f"k-{n}-{i}"
            async with session.post(proxy.base + "/c", data=key.encode() * 10, headers={"X-Routing-Key": key}) as r:
                info = await r.json()
                assert info["pod"] == table.assignment.lookup(key.encode()).pod.id
                assert info["body_len"] == len(key) * 10

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(worker(s, n) for n in range(20)))
