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
from proxy.sources.file import identity, racy

from .conftest import connect, free_port, parse_metrics, wait_for

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
        self.pod: BulkPod | None = None

    async def stopped_accepting(self) -> None:
        """Wait until the proxy's port refuses connections (it has begun shutting down)."""

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except (ConnectionRefusedError, ConnectionResetError):
                # Reset: it was queued on the listening socket as that closed.
                return True
            w.close()
            return False

        await wait_for(refused, 10, "the proxy to stop accepting")

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


class BulkPod:
    """What a test sees of a ``bulk_pod``: its port, and a request held at
    ``/hold`` (``held`` is set when it arrives; it is answered on ``release``)."""

    def __init__(self) -> None:
        self.port = 0
        self.held = asyncio.Event()
        self.release = asyncio.Event()


@contextlib.asynccontextmanager
async def bulk_pod() -> AsyncIterator[BulkPod]:
    """A raw pod: GET /down/N streams N bytes; POST /up counts a Content-Length
    body; GET /hold answers once the test releases it."""
    pod = BulkPod()

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
                elif path == "/hold":
                    pod.held.set()
                    await pod.release.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pod.port = server.sockets[0].getsockname()[1]
    try:
        yield pod
    finally:
        pod.release.set()
        server.close()
        for w in list(getattr(server, "_clients", ())):
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied_bulk_pod(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ProxyProcess]:
    """``keyroute run`` (with ``args``) over a table whose one pod, "p", is a ``bulk_pod``."""
    async with bulk_pod() as pod:
        table = tmp_path / "t.json"
        write_table(table, [("p", pod.port)])
        with run_proxy(table, *args, env=env) as px:
            px.pod = pod
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
        assert px.pod is not None
        async with connect(px.port) as raw:
            await raw.send(b"GET /hold HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n")
            async with asyncio.timeout(10):
                await px.pod.held.wait()  # in flight at the pod
            px.proc.send_signal(signal.SIGTERM)
            await px.stopped_accepting()
            assert px.proc.poll() is None  # draining: the request in flight is not done
            px.pod.release.set()
            status, headers, body = await raw.response(timeout=10)
            assert status == 200 and body == b"held"
            assert headers["connection"] == "close"
        assert await asyncio.to_thread(px.proc.wait, 10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", px.port), timeout=1).close()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with (
        proxied_bulk_pod(tmp_path, env={"KEYROUTE_PROXY_SHUTDOWN_TIMEOUT": "30s"}) as px,
        connect(px.port) as raw,
    ):
        assert px.pod is not None
        await raw.send(b"GET /hold HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k\r\n\r\n")
        async with asyncio.timeout(10):
            await px.pod.held.wait()  # in flight, and the pod will not answer
        px.proc.send_signal(signal.SIGTERM)
        await px.stopped_accepting()  # the first signal is being handled
        assert px.proc.poll() is None  # still draining
        px.proc.send_signal(signal.SIGTERM)
        # Gone long before the 30 s drain could end, without an answer.
        code = await asyncio.to_thread(px.proc.wait, 10)
        assert code != 0
        assert await raw.reader.read() == b""


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
        await wait_for(lambda: len(_children(px.proc.pid)) >= 2, 10, "two workers")
        workers = _children(px.proc.pid)
        assert len(workers) == 2
        for i in range(20):
            async with connect(px.port) as raw:
                await raw.send(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Routing-Key: k%d\r\nConnection: close\r\n\r\n" % i)
                status, headers, body = await raw.response()
                assert status == 200 and body == b"ok" and headers["x-keyroute-pod"] == "p"
        # Any worker's /metrics counts what all workers served.
        samples: dict[str, float] = {}

        async def all_counted() -> bool:
            samples.update(await asyncio.to_thread(_metrics, admin_port))
            served = sum(v for k, v in samples.items() if k.startswith("keyroute_responses_total{"))
            return (served, samples.get("keyroute_workers")) == (20, 2)

        await wait_for(all_counted, 10, "both workers' counts in /metrics")
        # A worker that dies is replaced.
        os.kill(workers[0], signal.SIGKILL)

        def replaced() -> bool:
            now = _children(px.proc.pid)
            return len(now) == 2 and workers[0] not in now

        await wait_for(replaced, 10, "the killed worker's replacement")
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

        async def moved() -> bool:
            return await ask(b"user-1") != owner

        await wait_for(moved, 5, "the key to move")
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
    # A file written moments ago may still change within its timestamps' tick,
    # so workers re-read it whatever its identity: start on a settled file.
    await wait_for(lambda: not racy(identity(str(table))), 10, "the table file's timestamps to settle")

    async def metrics_when(ok: Any, what: str) -> dict[str, float]:
        samples: dict[str, float] = {}

        async def check() -> bool:
            with contextlib.suppress(OSError):  # the admin listener may not be up yet
                samples.clear()
                samples.update(await asyncio.to_thread(_metrics, admin_port))
                return bool(ok(samples))
            return False

        await wait_for(check, 15, what)
        return samples

    with run_proxy(table, "--workers", "2", "--admin", f"127.0.0.1:{admin_port}") as px:
        await metrics_when(lambda m: m.get("keyroute_workers") == 2, "both workers' metrics")
        # A marker change: a small file that is not a table, read in each
        # worker (inline, no helper) by its watch and refused. The watch runs
        # only after a worker's first read: once both have refused the marker,
        # both first reads are done, and had they parsed the big table they
        # would have called the helper.
        (tmp_path / "t.new").write_bytes(b"{}")
        os.replace(tmp_path / "t.new", table)
        samples = await metrics_when(
            lambda m: m.get('keyroute_reloads_total{result="invalid"}') == 2, "both workers to refuse the marker"
        )
        assert samples["keyroute_table_helper_calls_total"] == 0
        # A change is read by each worker, in its helper.
        newer = core.evolve(first, pods, 6, rebalance=True)
        (tmp_path / "t.new").write_bytes(newer.dumps())
        os.replace(tmp_path / "t.new", table)
        samples = await metrics_when(
            lambda m: m.get("keyroute_generation") == 6 and m.get("keyroute_table_helper_calls_total") == 2,
            "both workers on generation 6",
        )
        assert samples["keyroute_generation"] == 6
        assert samples["keyroute_table_helper_calls_total"] == 2
        px.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(px.proc.wait, 15) == 0
