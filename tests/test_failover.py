"""Failover over real sockets: pods that die (SIGKILL of a real process), answer
503, reset, stall or vanish mid-request; failover modes; ejection, panic mode
and active health checks."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy import assignment as core
from proxy.health import Health

from .conftest import (
    EchoPods,
    Listening,
    Pod,
    Proxy,
    ProxyFactory,
    Raw,
    RawPod,
    RawPods,
    connect,
    dead_pod,
    header_map,
    parse_metrics,
    pod_specs,
    table_for,
    wait_for,
)

CONNECT_TIMEOUT = 0.3
# A request that gets no answer within this long has hung: it counts as failed.
DEADLINE = 3.0

# A pod as a separate process: HTTP/1.1 keep-alive, answers every request with
# JSON naming itself and echoing what the proxy told it (role, epoch, key).
POD_SCRIPT = r"""
import asyncio, json, sys

pod_id, port = sys.argv[1], int(sys.argv[2])

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            n = int(headers.get("content-length") or 0)
            if n:
                await reader.readexactly(n)
            body = json.dumps({
                "pod": pod_id,
                "method": method,
                "path": path,
                "role": headers.get("x-keyroute-role"),
                "epoch": headers.get("x-keyroute-epoch"),
                "key": headers.get("x-routing-key"),
            }).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class ProcPod:
    """A pod in its own process, killed with SIGKILL and restarted on its port."""

    def __init__(self, pod_id: str) -> None:
        self.id = pod_id
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ProcPod:
        async def listening() -> bool:
            proc = subprocess.Popen(
                [sys.executable, "-c", POD_SCRIPT, self.id, str(self.port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            # The pod prints its port once it listens: that line is the event.
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
            proc.stdout.close()
            if line.strip():
                self.proc = proc
                self.port = int(line)
                return True
            # Could not bind (the port is briefly in use after a kill): again.
            proc.wait(5)
            return False

        await wait_for(listening, 20, f"pod {self.id} to listen on port {self.port}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    async def restart(self) -> None:
        assert self.proc is None and self.port
        await self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


ProcPods = Callable[[str], Awaitable[ProcPod]]


@pytest.fixture
async def proc_pods() -> AsyncIterator[ProcPods]:
    """``make(pod_id)``: a started ``ProcPod``, stopped after the test."""
    started: list[ProcPod] = []

    async def make(pod_id: str) -> ProcPod:
        pod = ProcPod(pod_id)
        started.append(pod)
        return await pod.start()

    yield make
    for pod in started:
        pod.stop()


def explicit_table(
    pods: Sequence[Listening | tuple[str, str]], owner: str, backups: tuple[str, ...], generation: int = 9
) -> core.Assignment:
    """One slice over the whole key space: ``owner`` first, then ``backups``."""
    return core.build(generation, core.make_pods(pod_specs(pods)), [core.SliceSpec(0, owner, None, backups)])


async def get(port: int, key: str, path: str = "/x", timeout: float = DEADLINE) -> tuple[int, dict[str, str], bytes]:
    """One keyed GET on a connection of its own."""
    async with connect(port) as raw:
        await raw.send(f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\n\r\n".encode())
        return await raw.response(timeout=timeout)


async def post(port: int, key: str, body: bytes, path: str = "/pay") -> tuple[int, dict[str, str], bytes]:
    """One keyed POST with a Content-Length body on a connection of its own."""
    async with connect(port) as raw:
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n"
        await raw.send(head.encode() + body)
        return await raw.response(timeout=DEADLINE)


async def admin_get(proxy: Proxy, path: str) -> bytes:
    async with connect(proxy.runtime.admin_port or 0) as raw:
        await raw.send(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        status, _, body = await raw.response()
        assert status == 200, body
        return body


async def lookup(proxy: Proxy, key: str) -> dict[str, Any]:
    doc = orjson.loads(await admin_get(proxy, f"/-/lookup?key={key}"))
    assert isinstance(doc, dict)
    return doc


async def metrics(proxy: Proxy) -> dict[str, float]:
    return parse_metrics((await admin_get(proxy, "/metrics")).decode())


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def failover_reasons(samples: dict[str, float]) -> set[str]:
    """The reasons of the failovers counted so far."""
    prefix = 'keyroute_failovers_total{reason="'
    return {k[len(prefix) : -2] for k, v in samples.items() if k.startswith(prefix) and v}


# Failures that cost a request a timeout before it moved on.
WAITED = {"connect_timeout", "pod_timeout"}


async def pod_state(proxy: Proxy, key: str, pod_id: str) -> str:
    doc = await lookup(proxy, key)
    return str(next(c["state"] for c in doc["candidates"] if c["pod"] == pod_id))


async def is_state(proxy: Proxy, key: str, pod_id: str, state: str) -> bool:
    return await pod_state(proxy, key, pod_id) == state


def keys_by_owner(table: core.Assignment, n: int = 90) -> dict[str, list[str]]:
    """Keys user-0 .. user-(n-1) by their owner; every pod of ``table`` owns some."""
    out: dict[str, list[str]] = {}
    for i in range(n):
        key = f"user-{i}"
        out.setdefault(table.lookup(key.encode()).pod.id, []).append(key)
    assert all(out.get(pid) for pid in table.pods), out
    return out


# -- steady traffic ------------------------------------------------------------


@dataclass
class Result:
    key: str
    sent: float
    done: float
    status: int
    pod: str | None  # X-Keyroute-Pod
    seen_by: str | None  # the pod that answered, by its own word
    role: str | None  # X-Keyroute-Role as the pod saw it
    epoch: str | None  # X-Keyroute-Epoch as the pod saw it
    error: str | None


async def drive(port: int, keys: list[str], stop: asyncio.Event, out: list[Result], workers: int = 6) -> None:
    """Keep-alive GETs over ``keys`` from ``workers`` connections until ``stop``."""
    loop = asyncio.get_running_loop()

    async def worker(i: int) -> None:
        raw: Raw | None = None
        n = i
        while not stop.is_set():
            key = keys[n % len(keys)]
            n += workers
            sent = loop.time()
            try:
                if raw is None:
                    raw = await Raw.open(port)
                await raw.send(f"GET /w HTTP/1.1\r\nHost: t\r\nX-Routing-Key: {key}\r\n\r\n".encode())
                status, headers, body = await raw.response(timeout=DEADLINE)
                info = orjson.loads(body) if status == 200 else {}
                out.append(
                    Result(
                        key,
                        sent,
                        loop.time(),
                        status,
                        headers.get("x-keyroute-pod"),
                        info.get("pod"),
                        info.get("role"),
                        info.get("epoch"),
                        None if status == 200 else body.decode(errors="replace"),
                    )
                )
                if headers.get("connection") == "close":
                    await raw.close()
                    raw = None
            except Exception as exc:  # a hang (TimeoutError) or a broken connection
                out.append(Result(key, sent, loop.time(), 0, None, None, None, None, repr(exc)))
                if raw is not None:
                    await raw.close()
                raw = None
        if raw is not None:
            await raw.close()

    await asyncio.gather(*(worker(i) for i in range(workers)))


# -- tests ---------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigkill_of_a_pod_under_traffic(proc_pods: ProcPods, proxy_factory: ProxyFactory) -> None:
    pods = [await proc_pods(f"pod-{c}") for c in "abc"]
    table = table_for(pods)
    proxy = await proxy_factory(
        table,
        admin=True,
        upstream__connect_timeout=f"{int(CONNECT_TIMEOUT * 1000)}ms",
        upstream__eject_base="200ms",
        upstream__eject_max="1s",
        proxy__shutdown_timeout="1s",
    )
    victim = pods[0]
    owned = keys_by_owner(table)
    keys = [k for ks in owned.values() for k in ks]
    route = {k: table.lookup(k.encode()) for k in keys}
    assert all(route[k].backups for k in keys)  # generated tables have backups
    loop = asyncio.get_running_loop()
    results: list[Result] = []
    stop = asyncio.Event()
    traffic = loop.create_task(drive(proxy.port, keys, stop, results))

    def victims(after: float) -> list[Result]:
        """Requests for the victim's keys sent after ``after``, answered."""
        return [r for r in results if r.key in owned[victim.id] and r.sent > after]

    try:
        await wait_for(lambda: len(results) > 50, 10, "traffic before the kill")
        before_kill = len(results)
        t_kill = loop.time()
        victim.kill()
        # Ejected: /-/lookup says so for the victim's keys.
        await wait_for(lambda: is_state(proxy, owned[victim.id][0], victim.id, "ejected"), 5, "the pod's ejection")
        await wait_for(lambda: len(victims(t_kill)) > 20, 10, "traffic for the dead pod's keys")
        t_restart = loop.time()
        samples = await metrics(proxy)
        await victim.restart()

        def home() -> list[Result]:
            return [r for r in victims(t_restart) if r.seen_by == victim.id]

        await wait_for(lambda: bool(home()), 5, "the victim's keys to come back to it")
        t_back = min(r.done for r in home())
        await wait_for(lambda: len(victims(t_back)) >= 10, 10, "traffic on the victim's keys once back")
    finally:
        stop.set()
        await traffic

    assert before_kill > 50, "too little traffic before the kill"
    # A request that hung would have ended in a TimeoutError (after DEADLINE): failed.
    failed = [r for r in results if r.status != 200 or r.error]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    # Fast failover: refused connections and the ejection moved requests on;
    # none waited out a timeout first.
    assert failover_reasons(samples) and not failover_reasons(samples) & WAITED, failover_reasons(samples)
    for r in results:
        rt = route[r.key]
        assert r.pod == r.seen_by, r  # X-Keyroute-Pod names the pod that served
        assert r.epoch == str(rt.epoch), r  # the slice's fencing token, whoever serves it
        if rt.pod.id != victim.id:
            # Keys of the living pods stay with their owner throughout.
            assert (r.seen_by, r.role) == (rt.pod.id, "owner"), r
        elif r.done < t_kill:
            assert (r.seen_by, r.role) == (victim.id, "owner"), r
        elif t_kill < r.sent and r.done <= t_restart:
            # The dead pod's keys: its first backup, told it is a backup.
            assert (r.seen_by, r.role) == (rt.backups[0], "backup"), r
        elif r.sent > t_back:
            # Back home once the restarted pod answered.
            assert (r.seen_by, r.role) == (victim.id, "owner"), r
        else:
            assert (r.seen_by, r.role) in ((rt.backups[0], "backup"), (victim.id, "owner")), r
    affected = [r for r in results if route[r.key].pod.id == victim.id and t_kill < r.sent and r.done <= t_restart]
    assert len(affected) > 20
    assert samples["keyroute_ejections_total"] >= 1
    assert total(samples, "keyroute_failovers_total") > 0
    assert (await lookup(proxy, owned[victim.id][0]))["candidates"][0] == {
        "pod": victim.id,
        "role": "owner",
        "state": "healthy",
    }


def five_oh_three(calls: list[str]) -> Callable[[web.Application], None]:
    """An aiohttp pod that answers every request with 503 (and notes the role it was told)."""

    def extra(app: web.Application) -> None:
        @web.middleware
        async def busy(request: web.Request, handler: Any) -> web.StreamResponse:
            calls.append(request.headers.get("X-Keyroute-Role", ""))
            return web.Response(status=503, text="busy")

        app.middlewares.append(busy)

    return extra


def roles(pod: Pod) -> list[tuple[str, str]]:
    """(method, X-Keyroute-Role) of each forwarded request the pod saw (health probes left out)."""
    return [(r["method"], header_map(r)["x-keyroute-role"][0]) for r in forwarded(pod)]


def forwarded(pod: Pod) -> list[dict[str, Any]]:
    return [r for r in pod.requests if r["path"] != "/health"]


async def test_503_pod_is_retried_on_the_backup_then_ejected(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    calls: list[str] = []
    bad = await echo_pods("bad", five_oh_three(calls))
    good = await echo_pods("good")
    other = await echo_pods("other")
    table = explicit_table([bad, good, other], "bad", ("good",))
    proxy = await proxy_factory(table, admin=True, upstream__eject_after="3", upstream__eject_base="10s")
    for i in range(3):
        status, headers, body = await get(proxy.port, f"k{i}")
        assert status == 200 and headers["x-keyroute-pod"] == "good", body
        assert orjson.loads(body)["pod"] == "good"
    assert calls == ["owner"] * 3
    assert roles(good) == [("GET", "backup")] * 3
    # Three consecutive failures: ejected; the owner is no longer asked.
    assert await pod_state(proxy, "k0", "bad") == "ejected"
    status, headers, _ = await get(proxy.port, "k9")
    assert status == 200 and headers["x-keyroute-pod"] == "good"
    assert len(calls) == 3 and len(roles(good)) == 4
    assert other.requests == []
    samples = await metrics(proxy)
    assert samples['keyroute_failovers_total{reason="status_503"}'] == 3
    assert samples['keyroute_failovers_total{reason="owner_ejected"}'] == 1
    assert samples["keyroute_ejections_total"] == 1
    assert samples["keyroute_pods_ejected"] == 1


async def test_503_is_relayed_when_no_candidate_is_left(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    calls: list[str] = []
    bad = await echo_pods("bad", five_oh_three(calls))
    good = await echo_pods("good")
    table = explicit_table([bad, good], "bad", ())
    proxy = await proxy_factory(table)
    status, headers, body = await get(proxy.port, "k")
    assert (status, body) == (503, b"busy")
    assert headers["x-keyroute-pod"] == "bad"
    assert good.requests == []


async def reset_on_accept(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, then reset (SO_LINGER 0 and close)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def close_after_request(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one whole request (head and body), then close without answering."""
    await pod.read_request(reader)


async def never_answer(pod: RawPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, never answer; hold the connection until the proxy closes it."""
    await pod.read_request(reader)
    await reader.read()


@pytest.mark.parametrize(
    ("handler", "overrides", "waited"),
    [
        (reset_on_accept, {}, set()),
        (close_after_request, {}, set()),
        # The pod's 30 s of silence is cut to the response timeout.
        (never_answer, {"upstream__response_timeout": "300ms"}, {"pod_timeout"}),
    ],
    ids=["reset", "close-after-request", "slow"],
)
async def test_get_fails_over_from_a_broken_pod(
    handler: Callable[..., Any],
    overrides: dict[str, str],
    waited: set[str],
    raw_pods: RawPods,
    echo_pods: EchoPods,
    proxy_factory: ProxyFactory,
) -> None:
    bad = await raw_pods(handler, "bad")
    good = await echo_pods("good")
    table = explicit_table([bad, good], "bad", ("good",))
    proxy = await proxy_factory(table, admin=True, **overrides)
    for i in range(2):
        status, headers, body = await get(proxy.port, f"k{i}")
        assert status == 200 and headers["x-keyroute-pod"] == "good", body
    # Each request moved on at the pod's failure; only a silent pod made it
    # wait, and then for the response timeout, not for the pod.
    reasons = failover_reasons(await metrics(proxy))
    assert reasons and reasons & WAITED == waited, reasons
    assert total(await metrics(proxy), "keyroute_failovers_total") == 2
    assert bad.accepts >= 2
    assert roles(good) == [("GET", "backup")] * 2
    assert await pod_state(proxy, "k", "bad") == "failing"


async def test_post_is_not_replayed_after_the_pod_got_it(
    raw_pods: RawPods,
    echo_pods: EchoPods,
    proxy_factory: ProxyFactory,
) -> None:
    bad = await raw_pods(close_after_request, "bad")
    good = await echo_pods("good")
    table = explicit_table([bad, good], "bad", ("good",))
    proxy = await proxy_factory(table)
    status, headers, body = await post(proxy.port, "k", b"hello")
    assert status == 502, body
    assert orjson.loads(body)["error"] == "pod_closed"
    assert [r.endswith(b"hello") for r in bad.requests] == [True]  # sent once, to the owner only
    assert good.requests == []
    # The same pod and a GET: that one fails over.
    status, headers, _ = await get(proxy.port, "k")
    assert status == 200 and headers["x-keyroute-pod"] == "good"
    assert roles(good) == [("GET", "backup")]


async def test_post_goes_to_the_backup_when_nothing_was_sent(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    good = await echo_pods("good")
    table = explicit_table([dead_pod("bad"), good], "bad", ("good",))
    proxy = await proxy_factory(table)
    status, headers, body = await post(proxy.port, "k", b"hello")
    assert status == 200 and headers["x-keyroute-pod"] == "good", body
    assert roles(good) == [("POST", "backup")]
    assert good.requests[0]["body_len"] == 5


async def test_failover_none_uses_the_owner_only(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    b = await echo_pods("b")
    c = await echo_pods("c")
    table = explicit_table([dead_pod("a"), b, c], "a", ("b",))
    proxy = await proxy_factory(
        table, admin=True, upstream__failover="none", upstream__eject_after="3", upstream__eject_base="5s"
    )
    for i in range(3):
        status, _, body = await get(proxy.port, f"k{i}")
        assert status == 502, body
        doc = orjson.loads(body)
        assert doc["error"] == "connect_failed" and "pod a" in doc["detail"]
    # Ejected now: refused at once, naming the candidates and their states.
    status, headers, body = await get(proxy.port, "k3")
    assert status == 503, body
    assert 1 <= int(headers["retry-after"]) <= 5
    doc = orjson.loads(body)
    assert doc["error"] == "no_healthy_pod"
    assert doc["candidates"] == [{"pod": "a", "state": "ejected"}]
    assert doc["generation"] == 9
    assert b.requests == [] and c.requests == []
    assert [c["pod"] for c in (await lookup(proxy, "k"))["candidates"]] == ["a"]


async def dead_owner_and_backup(echo_pods: EchoPods) -> tuple[Pod, Pod, core.Assignment]:
    """Pods a (owner) and b (its backup) refuse connections; c and d are up but
    are not candidates for the slice."""
    c = await echo_pods("c")
    d = await echo_pods("d")
    return c, d, explicit_table([dead_pod("a"), dead_pod("b"), c, d], "a", ("b",))


async def test_failover_any_reaches_beyond_the_backups(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    c, d, table = await dead_owner_and_backup(echo_pods)
    beyond = [p.id for p in core.rank(table.pods.values(), 0) if p.id in ("c", "d")]
    proxy = await proxy_factory(table, admin=True, upstream__failover="any", upstream__eject_base="5s")
    for i in range(4):
        status, headers, body = await get(proxy.port, f"k{i}")
        assert status == 200 and headers["x-keyroute-pod"] == beyond[0], body
    first = c if beyond[0] == "c" else d
    assert roles(first) == [("GET", "backup")] * 4
    doc = await lookup(proxy, "k")
    assert [(x["pod"], x["state"]) for x in doc["candidates"]] == [
        ("a", "ejected"),
        ("b", "ejected"),
        (beyond[0], "healthy"),
        (beyond[1], "healthy"),
    ]
    assert doc["panic"] is False


async def test_failover_backups_stops_at_the_backups(echo_pods: EchoPods, proxy_factory: ProxyFactory) -> None:
    c, d, table = await dead_owner_and_backup(echo_pods)
    proxy = await proxy_factory(table, upstream__eject_base="5s")
    for i in range(3):
        status, _, body = await get(proxy.port, f"k{i}")
        assert status == 502 and orjson.loads(body)["error"] == "connect_failed", body
    status, headers, body = await get(proxy.port, "k")
    assert status == 503 and "retry-after" in headers, body
    assert orjson.loads(body)["candidates"] == [{"pod": "a", "state": "ejected"}, {"pod": "b", "state": "ejected"}]
    assert c.requests == [] and d.requests == []


@pytest.mark.timeout(60)
async def test_panic_routes_as_if_all_were_healthy(proc_pods: ProcPods, proxy_factory: ProxyFactory) -> None:
    pods = [await proc_pods(f"pod-{c}") for c in "abcd"]
    table = table_for(pods)
    proxy = await proxy_factory(
        table,
        admin=True,
        upstream__max_ejected_percent="50",
        upstream__eject_after="1",
        upstream__eject_base="5s",
        upstream__eject_max="5s",
        upstream__retries="3",
    )
    owned = keys_by_owner(table)
    survivor, dead = pods[3], pods[:3]
    for p in dead:
        p.kill()
    # One request at a time for the dead pods' keys: each ejects the dead
    # candidates it tries. Panic starts only once more than half (3 of 4) are out.
    ejected = 0.0
    for key in [k for p in dead for k in owned[p.id][:3]]:
        status, headers, _ = await get(proxy.port, key)
        assert status == 200 and headers["x-keyroute-pod"] == survivor.id
        samples = await metrics(proxy)
        ejected = samples["keyroute_pods_ejected"]
        panic = (await lookup(proxy, key))["panic"]
        assert panic is (ejected > 2), (ejected, panic)
        assert (await metrics(proxy))["keyroute_panic"] == (1 if ejected > 2 else 0)
        if ejected == 3:
            break
    assert ejected == 3
    # In panic every candidate is tried in order, ejected or not: the dead
    # ones ahead of the survivor are each tried once more.
    key = owned[dead[0].id][1]
    route = table.lookup(key.encode())
    cands = [route.pod.id, *route.backups]
    ahead = cands.index(survivor.id)
    retries = samples["keyroute_retries_total"]
    status, headers, _ = await get(proxy.port, key)
    assert status == 200 and headers["x-keyroute-pod"] == survivor.id
    assert (await metrics(proxy))["keyroute_retries_total"] - retries == ahead
    # The survivor's own keys are untouched.
    status, headers, _ = await get(proxy.port, owned[survivor.id][0])
    assert status == 200 and headers["x-keyroute-pod"] == survivor.id
    # Restart them: still ejected (5 s), but in panic the owner is tried first
    # and answers at once; each success takes a pod off the ejected list.
    for p in dead:
        await p.restart()
    status, headers, body = await get(proxy.port, owned[dead[0].id][0])
    assert status == 200 and headers["x-keyroute-pod"] == dead[0].id
    assert orjson.loads(body)["role"] == "owner"
    # Two of four ejected again: panic over; the others' keys go to backups until their backoff ends.
    assert (await lookup(proxy, owned[dead[0].id][0]))["panic"] is False
    samples = await metrics(proxy)
    assert samples["keyroute_panic"] == 0 and samples["keyroute_pods_ejected"] == 2
    status, headers, body = await get(proxy.port, owned[dead[1].id][0])
    assert status == 200 and headers["x-keyroute-pod"] != dead[1].id  # up, but ejected and no panic
    assert orjson.loads(body)["role"] == "backup"

    async def all_home() -> bool:
        for p in pods:
            status, headers, _ = await get(proxy.port, owned[p.id][0])
            if status != 200 or headers["x-keyroute-pod"] != p.id:
                return False
        return True

    await wait_for(all_home, 10, "every key back on its owner")
    samples = await metrics(proxy)
    assert samples["keyroute_panic"] == 0 and samples["keyroute_pods_ejected"] == 0


def test_panic_gauge_clears_when_the_last_ejected_pod_recovers() -> None:
    now = [100.0]
    h = Health(eject_after=1, eject_base=5.0, max_ejected_percent=40, clock=lambda: now[0])
    h.failure("a", "connect_failed")
    assert h.panic(["a", "b"], now[0]) is True and h.in_panic
    h.success("a")
    assert h.in_panic is False  # what keyroute_panic reports, before anyone asks again
    assert h.panic(["a", "b"], now[0]) is False
    h.failure("b", "connect_failed")
    assert h.panic(["a", "b"], now[0]) is True
    h.pods.clear()  # however the records went, asking again clears the flag
    assert h.panic(["a", "b"], now[0]) is False and h.in_panic is False


def test_a_failed_probe_restarts_the_count_of_good_ones() -> None:
    now = [100.0]
    h = Health(eject_after=1, eject_base=30.0, clock=lambda: now[0])
    h.probe_result("a", False, 2, "HTTP 500")
    assert h.state("a", now[0]) == "ejected"
    h.probe_result("a", True, 2, "")
    h.probe_result("a", False, 2, "HTTP 500")
    h.probe_result("a", True, 2, "")
    assert h.state("a", now[0]) == "ejected"  # not two good probes in a row
    h.probe_result("a", True, 2, "")
    assert h.state("a", now[0]) == "healthy"


async def test_active_health_checks_eject_and_restore_without_traffic(
    echo_pods: EchoPods, proxy_factory: ProxyFactory
) -> None:
    health = {"status": 500}
    probes: list[str] = []
    answered: list[int] = []  # the status of each probe, in order

    def with_health(app: web.Application) -> None:
        async def check(request: web.Request) -> web.Response:
            probes.append(request.headers.get("User-Agent", ""))
            answered.append(health["status"])
            return web.Response(status=health["status"], text="h")

        app.router.add_get("/health", check)

    sick = await echo_pods("sick", with_health)
    ok = await echo_pods("ok")
    table = explicit_table([sick, ok], "sick", ("ok",))
    proxy = await proxy_factory(
        table,
        admin=True,
        upstream__health_path="/health",
        upstream__health_interval="100ms",
        upstream__healthy_after="2",
        upstream__eject_after="3",
        upstream__eject_base="30s",
    )
    # No client traffic at all: the probes alone eject it.
    await wait_for(lambda: is_state(proxy, "k", "sick", "ejected"), 3, "ejection by health checks")
    assert forwarded(sick) == [] and forwarded(ok) == []  # no client traffic reached the pods
    assert len(probes) >= 3 and set(probes) == {"keyroute-health"}
    status, headers, body = await get(proxy.port, "k")
    assert status == 200 and headers["x-keyroute-pod"] == "ok"
    assert roles(ok) == [("GET", "backup")]
    # Healthy again: back after `healthy_after` good probes, long before the 30 s backoff.
    health["status"] = 200
    good_probes: list[int] = []

    async def recovered() -> bool:
        if not await is_state(proxy, "k", "sick", "healthy"):
            return False
        good_probes.append(answered.count(200))  # at least as many as when it flipped
        return True

    await wait_for(recovered, 3, "recovery by health checks")
    # Back after `healthy_after` good probes, not after the first one.
    assert good_probes[0] >= 2, answered
    status, headers, body = await get(proxy.port, "k")
    assert status == 200 and headers["x-keyroute-pod"] == "sick"
    assert orjson.loads(body)["pod"] == "sick"
    assert roles(sick) == [("GET", "owner")]
