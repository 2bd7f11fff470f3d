"""What operators run into: a drain that loses nothing, Kubernetes' environment,
every response counted, a parseable access log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import orjson

from .conftest import (
    EchoPods,
    ProxyFactory,
    RawPod,
    RawPods,
    connect,
    free_port,
    parse_metrics,
    table_for,
    wait_for,
)
from .test_config import SERVICE_LINKS
from .test_process import run_proxy, write_table

GOOD = b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"


async def test_sigterm_drain_loses_no_request_on_busy_keep_alive_connections(
    tmp_path: Path, echo_pods: EchoPods
) -> None:
    pods = [await echo_pods(f"pod-{i}") for i in range(2)]
    table = tmp_path / "table.json"
    write_table(table, [(p.id, p.port) for p in pods])
    with run_proxy(table, env={"KEYROUTE_PROXY_SHUTDOWN_TIMEOUT": "10s"}) as px:
        served = [0] * 16
        failures: list[str] = []
        closed_by_response = [False] * 16

        async def client(i: int) -> None:
            """Requests back to back on one connection, until a response says
            Connection: close. A request sent on the open connection that gets
            no whole response is a failure."""
            async with connect(px.port) as raw:
                while True:
                    await raw.send(f"GET /c{i}/{served[i]} HTTP/1.1\r\nHost: t\r\nX-Routing-Key: c{i}\r\n\r\n".encode())
                    try:
                        status, headers, _ = await raw.response(timeout=10)
                    except (asyncio.IncompleteReadError, ConnectionError) as exc:
                        failures.append(f"client {i}, request {served[i]}: {exc!r}")
                        return
                    if status != 200:
                        failures.append(f"client {i}, request {served[i]}: HTTP {status}")
                        return
                    served[i] += 1
                    if headers.get("connection", "").lower() == "close":
                        closed_by_response[i] = True
                        return

        tasks = [asyncio.create_task(client(i)) for i in range(16)]
        await wait_for(lambda: min(served) >= 20, timeout=30, what="every client to be busy")
        px.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert failures == []
        assert all(closed_by_response)
        assert await asyncio.to_thread(px.proc.wait, 30) == 0


async def test_run_starts_with_kubernetes_service_links(tmp_path: Path, echo_pods: EchoPods) -> None:
    pod = await echo_pods("pod-a")
    table = tmp_path / "table.json"
    write_table(table, [(pod.id, pod.port)])
    with run_proxy(table, env=SERVICE_LINKS) as px:
        async with connect(px.port) as raw:
            await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n")
            status, headers, _ = await raw.response()
        assert status == 200 and headers["x-keyroute-pod"] == "pod-a"
    # An unknown key in one of keyroute's sections still stops startup, naming it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--assignment",
        f"file:{table}",
        env={**os.environ, **SERVICE_LINKS, "KEYROUTE_PROXY_LISTN": "127.0.0.1:1"},
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"proxy.listn" in err


async def test_errors_that_close_the_connection_are_counted(pods: list, proxy_factory: ProxyFactory) -> None:
    px = await proxy_factory(table_for(pods), admin=True)
    bad = [
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Routing-Key: a\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ]
    for data in bad:
        async with connect(px.port) as raw:
            await raw.send(data)
            status, _, _ = await raw.response()
            assert status >= 400
            assert await raw.closed()
    # A pipelined bad request behind a good one: two responses, both counted.
    async with connect(px.port) as raw:
        await raw.send(
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
        )
        assert (await raw.response())[0] == 200
        assert (await raw.response())[0] == 400
        assert await raw.closed()
    by_pod = px.runtime.stats.by_pod
    assert by_pod["-"][3] == 4  # the 400s made by the proxy
    assert by_pod["-"][4] == 1  # the 505
    text = await asyncio.to_thread(_get_metrics, px.runtime.admin_port)
    metrics = parse_metrics(text)
    total = sum(v for k, v in metrics.items() if k.startswith("keyroute_responses_total"))
    count = metrics["keyroute_request_duration_seconds_count"]
    assert total == count == 6


def _get_metrics(port: int | None) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def test_access_log_is_one_json_object_per_line(tmp_path: Path, echo_pods: EchoPods) -> None:
    pods = [await echo_pods("pod-a"), await echo_pods("pod-b")]
    table = tmp_path / "table.json"
    write_table(table, [(p.id, p.port) for p in pods])
    env = {"KEYROUTE_PROXY_ACCESS_LOG": "true", "KEYROUTE_PROXY_ACCESS_LOG_KEYS": "true"}
    with run_proxy(table, env=env) as px:
        async with connect(px.port) as raw:
            await raw.send(b"GET /one HTTP/1.1\r\nHost: t\r\nX-Routing-Key: user-1\r\n\r\n")
            assert (await raw.response())[0] == 200
            await raw.send(b"GET /two HTTP/1.1\r\nX-Routing-Key: user-2\r\n\r\n")  # no Host: 400
            assert (await raw.response())[0] == 400
        px.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(px.proc.wait, 30)
        err = px.stderr()
    lines = [line for line in err.splitlines() if line.startswith("{")]
    docs = [orjson.loads(line) for line in lines]
    access = [d for d in docs if "status" in d]
    assert [(d["path"], d["status"], d["key"]) for d in access] == [("/one", 200, "user-1"), ("/two", 400, None)]
    first = access[0]
    assert first["role"] == "owner" and first["retries"] == 0 and first["pod"] in ("pod-a", "pod-b")
    assert first["id"] != access[1]["id"] and isinstance(first["ts"], float)
    # Every other stderr line is a plain log line with its prefix, not JSON.
    assert all(not line.startswith("{") for line in err.splitlines() if "keyroute " in line)


async def test_healthz_and_metrics_say_which_path_runs(tmp_path: Path, echo_pods: EchoPods) -> None:
    pod = await echo_pods("pod-a")
    table = tmp_path / "table.json"
    write_table(table, [(pod.id, pod.port)])
    for off in (False, True):
        admin = free_port()
        env = {"KEYROUTE_NO_EXTENSIONS": "1" if off else ""}  # empty: not set, whatever the suite runs with
        with run_proxy(table, "--admin", f"127.0.0.1:{admin}", env=env) as px:
            await wait_for(lambda port=admin: _answers(port), what="the admin listener")
            health = orjson.loads(await asyncio.to_thread(_get, admin, "/-/healthz"))
            metrics = parse_metrics(await asyncio.to_thread(_get, admin, "/metrics"))
            px.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(px.proc.wait, 30)
            err = px.stderr()
        assert health["native"] is (not off) and metrics["keyroute_native"] == (0 if off else 1)
        if off:
            assert "KEYROUTE_NO_EXTENSIONS" in health["native_off_because"]
            assert "pure-Python path" in err
        else:
            assert "compiled fast path in use" in err


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


async def test_drain_serves_pipelined_requests_already_received(raw_pods: RawPods, proxy_factory: ProxyFactory) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow_first(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await pod.read_request(reader)
            if b"/slow" in head:
                arrived.set()
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    pod = await raw_pods(slow_first)
    px = await proxy_factory(table_for([pod]), proxy__shutdown_timeout="10s")
    async with connect(px.port) as raw:
        await raw.send(
            b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: t\r\nX-Routing-Key: a\r\n\r\n"
        )
        await asyncio.wait_for(arrived.wait(), 5)
        await wait_for(lambda: any(c.queue for c in px.runtime.connections), what="the second request queued")
        px.stop.set_result(None)  # the drain starts with one request at the pod and one queued
        await wait_for(lambda: px.runtime.closing, what="the drain")
        release.set()
        first = await raw.response()
        second = await raw.response()
        assert (first[0], first[1].get("connection")) == (200, None)
        assert (second[0], second[1]["connection"]) == (200, "close")
        assert await raw.closed()
    assert [r.split(b" ")[1] for r in pod.requests] == [b"/slow", b"/second"]


async def test_unreachable_table_server_error_names_host_and_reason() -> None:
    from proxy.sources import Failure
    from proxy.sources.http import HttpSource

    port = free_port()
    source = HttpSource(f"http://127.0.0.1:{port}/table.json", poll_interval=0.05)
    updates = source.updates()
    try:
        item = await asyncio.wait_for(anext(updates), 10)
    finally:
        await updates.aclose()
    assert isinstance(item, Failure) and item.kind == "error"
    assert f"cannot connect to 127.0.0.1:{port}" in item.detail
    assert "ssl" not in item.detail
