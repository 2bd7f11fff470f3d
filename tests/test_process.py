"""The proxy as a real process: `keyroute run`, big bodies with flat memory,
graceful shutdown, workers, startup errors, the demo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import assignment as core

from .conftest import connect, free_port, parse_metrics

GIB = 1 << 30


def write_table(path: Path, pods: list[tuple[str, int]], generation: int = 5) -> None:
    specs = [(pid, f"http://127.0.0.1:{port}", 1.0, "active") for pid, port in pods]
    path.write_bytes(core.generate(generation, core.make_pods(specs), 16).dumps())


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError("proxy did not start listening")


@contextlib.contextmanager
def run_proxy(table: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[ProxyProcess]:
    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", "--assignment", f"file:{table}"]
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    try:
        wait_listening(port, proc)
        yield ProxyProcess(proc, port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *rest = head.split("\r\n")
    headers = {}
    for h in rest:
        if ":" in h:
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
    return line, headers


@contextlib.asynccontextmanager
async def bulk_pod() -> AsyncIterator[int]:
    """A raw pod: GET /down/N streams N bytes; POST /up counts a Content-Length
    body; GET /slow/S answers after S seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, headers = await _read_head(reader)
                path = line.split()[1]
                if path.startswith("/down/"):
                    n = int(path[6:])
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    block = b"z" * (1 << 20)
                    while n > 0:
                        writer.write(block[: min(n, len(block))])
                        n -= len(block)
                        await writer.drain()
                elif path == "/up":
                    left = int(headers["content-length"])
                    got = 0
                    while left > 0:
                        data = await reader.read(min(left, 1 << 20))
                        if not data:
                            return
                        got += len(data)
                        left -= len(data)
                    body = b"%d" % got
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                elif path.startswith("/slow/"):
                    await asyncio.sleep(float(path[6:]))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in list(getattr(server, "_clients", ())):
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied_bulk_pod(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ProxyProcess]:
    """``keyroute run`` (with ``args``) over a table whose one pod, "p", is a ``bulk_pod``."""
    async with bulk_pod() as pod_port:
        table = tmp_path / "t.json"
        write_table(table, [("p", pod_port)])
        with run_proxy(table, *args, env=env) as px:
            yield px


@pytest.mark.timeout(120)
async def test_gib_download_and_upload_with_flat_memory(tmp_path: Path) -> None:
    async with proxied_bulk_pod(tmp_path) as px:
        async with connect(px.port) as raw:
            # Warm up, then take the baseline resident size.
            await raw.send(b"GET /down/1000 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n")
            await raw.response()
            base = vm_kib(px.proc.pid, "VmRSS")

            await raw.send(b"GET /down/%d HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n" % GIB)
            await raw.reader.readuntil(b"\r\n\r\n")
            got = 0
            slow_until = 64 << 20  # read slowly at first: the proxy must stop reading the pod
            while got < GIB:
                data = await raw.reader.read(1 << 20)
                assert data
                got += len(data)
                if got < slow_until:
                    await asyncio.sleep(0.002)
            assert got == GIB

            await raw.send(b"POST /up HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\nContent-Length: %d\r\n\r\n" % GIB)
            block = b"u" * (1 << 20)
            for _ in range(GIB >> 20):
                raw.writer.write(block)
                await raw.writer.drain()
            status, _, body = await raw.response(timeout=60)
            assert status == 200 and int(body) == GIB
            peak = vm_kib(px.proc.pid, "VmHWM")
        # 2 GiB went through; the proxy's peak resident size grew by far less.
        assert peak - base < 64 * 1024, f"peak RSS {peak} KiB vs baseline {base} KiB"


async def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    async with proxied_bulk_pod(tmp_path) as px:
        async with connect(px.port) as raw:
            await raw.send(b"GET /slow/0.8 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n")
            await asyncio.sleep(0.2)
            px.proc.send_signal(signal.SIGTERM)
            status, headers, body = await raw.response(timeout=10)
            assert status == 200 and body == b"slow"
            assert headers["connection"] == "close"
        assert await asyncio.to_thread(px.proc.wait, 10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", px.port), timeout=1).close()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with (
        proxied_bulk_pod(tmp_path, env={"KEYROUTE_PROXY_SHUTDOWN_TIMEOUT": "30s"}) as px,
        connect(px.port) as raw,
    ):
        await raw.send(b"GET /slow/20 HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n")
        await asyncio.sleep(0.3)
        px.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert px.proc.poll() is None  # still draining
        started = time.monotonic()
        px.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(px.proc.wait, 10)
        assert code != 0 and time.monotonic() - started < 5


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


async def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    admin_port = free_port()
    async with proxied_bulk_pod(tmp_path, "--workers", "2", "--admin", f"127.0.0.1:{admin_port}") as px:
        deadline = time.monotonic() + 10
        while len(_children(px.proc.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        workers = _children(px.proc.pid)
        assert len(workers) == 2
        for i in range(20):
            async with connect(px.port) as raw:
                await raw.send(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k%d\r\nConnection: close\r\n\r\n" % i)
                status, headers, body = await raw.response()
                assert status == 200 and body == b"ok" and headers["x-keyroute-pod"] == "p"
        # Any worker's /metrics counts what all workers served.
        deadline = time.monotonic() + 10
        while True:
            samples = await asyncio.to_thread(_metrics, admin_port)
            served = sum(v for k, v in samples.items() if k.startswith("keyroute_responses_total{"))
            if (served, samples.get("keyroute_workers")) == (20, 2) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert served == 20 and samples["keyroute_workers"] == 2
        # A worker that dies is replaced.
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = _children(px.proc.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.1)
        assert len(_children(px.proc.pid)) == 2
        px.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(px.proc.wait, 15) == 0


def _metrics(port: int) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse_metrics(data.split(b"\r\n\r\n", 1)[1].decode())


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_run_refuses_missing_and_bad_tables_and_bad_config(tmp_path: Path) -> None:
    r = _run("run", "--listen", "127.0.0.1:0", "--assignment", f"file:{tmp_path / 'nope.json'}")
    assert r.returncode == 2 and "not found" in r.stderr and "nope.json" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "generation": 3, "pods": {"a": {"url": "ftp://x"}}}')
    r = _run("run", "--listen", "127.0.0.1:0", "--assignment", f"file:{bad}")
    assert r.returncode == 1 and "pods.a.url: not an http URL" in r.stderr
    cfg = tmp_path / "k.toml"
    cfg.write_text('[proxy]\nlisten = "127.0.0.1:0"\nlisen = "x"\n')
    r = _run("run", "--config", str(cfg))
    assert r.returncode == 2 and "proxy.lisen" in r.stderr
    r = _run("run", env={"KEYROUTE_UPSTREAM_RETRIES": "many"})
    assert r.returncode == 2 and "upstream.retries" in r.stderr


def test_run_refuses_without_uvloop() -> None:
    code = "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; sys.exit(main(['run']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "uvloop is required" in r.stderr


async def test_demo_routes_and_moves_a_key(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        text = ""
        while "Ctrl-C" not in text:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, proc.stderr.read().decode() if proc.stderr else ""
            text += line.decode()
        table = re.search(r"table: (\S+) \(generation", text)
        assert table is not None

        async def ask(key: bytes) -> str:
            async with connect(port) as raw:
                await raw.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Routing-Key: %s\r\n\r\n" % key)
                status, headers, body = await raw.response()
            assert status == 200 and body.startswith(headers["x-keyroute-pod"].encode())
            return headers["x-keyroute-pod"]

        first = {await ask(b"user-1") for _ in range(3)}
        assert len(first) == 1
        owner = first.pop()
        r = _run("gen", "--from", table.group(1), "--drain", owner, "-o", table.group(1))
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 5
        while await ask(b"user-1") == owner:
            assert time.monotonic() < deadline, "the key did not move"
            await asyncio.sleep(0.1)
        doc = orjson.loads(Path(table.group(1)).read_bytes())
        assert doc["pods"][owner]["state"] == "draining"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()


async def test_workers_do_not_reparse_an_unchanged_big_table(tmp_path: Path) -> None:
    # A 5000-slice table goes to the table helper. The supervisor read it at
    # startup; workers see the file unchanged and start no helper for it.
    pods = core.make_pods([("p", "http://127.0.0.1:9", 1.0, "active"), ("q", "http://127.0.0.1:10", 1.0, "active")])
    first = core.generate(5, pods, 5000)
    table = tmp_path / "t.json"
    table.write_bytes(first.dumps())
    admin_port = free_port()

    async def metrics_when(ok: Any) -> dict[str, float]:
        deadline = time.monotonic() + 15
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # the admin listener may not be up yet
                samples = await asyncio.to_thread(_metrics, admin_port)
                if ok(samples):
                    break
            await asyncio.sleep(0.2)
        return samples

    with run_proxy(table, "--workers", "2", "--admin", f"127.0.0.1:{admin_port}") as px:
        samples = await metrics_when(lambda m: m.get("keyroute_workers") == 2)
        assert samples.get("keyroute_workers") == 2
        await asyncio.sleep(2.5)  # a worker's first read would be done, and published, by now
        samples = await asyncio.to_thread(_metrics, admin_port)
        assert samples["keyroute_table_helper_calls_total"] == 0
        # A change is read by each worker, in its helper.
        newer = core.evolve(first, pods, 6, rebalance=True)
        (tmp_path / "t.new").write_bytes(newer.dumps())
        os.replace(tmp_path / "t.new", table)
        samples = await metrics_when(
            lambda m: m.get("keyroute_generation") == 6 and m.get("keyroute_table_helper_calls_total") == 2
        )
        assert samples["keyroute_generation"] == 6
        assert samples["keyroute_table_helper_calls_total"] == 2
        px.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(px.proc.wait, 15) == 0
