"""The data plane: an HTTP/1.1 forwarder on uvloop + httptools.

One ``ClientProtocol`` per client connection parses requests with httptools,
routes each by its key and streams it to the owner pod over a pooled
``UpstreamConnection``; the response streams back the same way. Requests on
one connection are served one at a time, in order; pipelined requests wait,
parsed, while client reading is paused, so buffering stays bounded.

Framing is never passed through blindly: request bodies are re-framed from
what the parser decoded (Content-Length as given, chunked re-chunked, trailers
dropped), and anything ambiguous is answered with 400 and the connection is
closed before a byte reaches a pod.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import httptools
import orjson

from . import wire
from .assignment import Assignment, Pod, Route, rank
from .config import Settings
from .health import Health, probe_loop
from .metrics import METRICS_DIR_ENV, RuntimeCollector, Shared, Stats, exposition
from .offload import Offload
from .upstream import Pool, UpstreamConnection, Upstreams

log = logging.getLogger("keyroute")
access_log = logging.getLogger("keyroute.access")

# Reasons client reading is paused (a bit each).
_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM = 2
_PAUSE_BUFFER = 4

# Request body bytes buffered while no pod connection is ready.
_MAX_PENDING = 256 * 1024

# While draining, an idle keep-alive connection stays open this long for a
# request its client may have sent as the drain began (answered with
# Connection: close), then closes.
_DRAIN_IDLE = 1.0

# What the client connection's single timer is guarding.
_T_IDLE, _T_HEAD, _T_BODY = 1, 2, 3

# Request headers that get special handling (lower-case -> tag).
_H_DROP, _H_CL, _H_TE, _H_CONN, _H_VIA, _H_XFF, _H_HOST, _H_UPGRADE, _H_XF = range(9)
_REQ_SPECIAL = {name: _H_DROP for name in wire.HOP_BY_HOP}
_REQ_SPECIAL.update(
    {
        b"content-length": _H_CL,
        b"transfer-encoding": _H_TE,
        b"connection": _H_CONN,
        b"via": _H_VIA,
        b"x-forwarded-for": _H_XFF,
        b"host": _H_HOST,
        b"upgrade": _H_UPGRADE,
        b"x-forwarded-proto": _H_XF,
        b"x-forwarded-host": _H_XF,
    }
)
_NO_BODY_STATUS = frozenset({204, 304})


class RoutingTable:
    """An ``Assignment`` plus what the wire and failover need, built lazily:
    header bytes per slice (bytes: the garbage collector does not track them),
    candidate pods per owner and backups. Swapped as one reference; exchanges
    keep the one they started with."""

    __slots__ = (
        "assignment",
        "generation",
        "failover",
        "_req_tags",
        "_resp_tags",
        "_candidates",
        "_pods",
        "_any",
        "_fixed",
    )

    def __init__(self, assignment: Assignment, failover: str = "backups") -> None:
        self.assignment = assignment
        self.generation = assignment.generation
        self.failover = failover
        n = assignment.slice_count
        self._req_tags: list[bytes | None] = [None] * n
        self._candidates: dict[tuple[str, tuple[str, ...]], tuple[Pod, ...]] = {}
        self._pods = tuple(assignment.pods.values())
        # failover = "any": per slice, the other active pods in the slice's
        # rendezvous order, as positions in _pods (a tuple of ints, which the
        # garbage collector stops tracking).
        self._any: list[tuple[int, ...] | None] = [None] * n if failover == "any" else []
        self._resp_tags: dict[str, bytes] = {}
        self._fixed: dict[str, Route] = {}

    def request_tag(self, route: Route, pod: Pod) -> bytes:
        """X-Keyroute-* request headers for ``pod`` serving ``route``."""
        i = route.index
        if pod is route.pod and i >= 0:
            tag = self._req_tags[i]
            if tag is None:
                tag = self._req_tags[i] = self._tag(route, pod, b"owner")
            return tag
        return self._tag(route, pod, b"owner" if pod is route.pod else b"backup")

    @staticmethod
    def _tag(route: Route, pod: Pod, role: bytes) -> bytes:
        return b"X-Keyroute-Pod: %s\r\nX-Keyroute-Generation: %d\r\nX-Keyroute-Epoch: %d\r\nX-Keyroute-Role: %s\r\n" % (
            pod.id.encode(),
            route.generation,
            route.epoch,
            role,
        )

    def response_tag(self, pod: Pod) -> bytes:
        tag = self._resp_tags.get(pod.id)
        if tag is None:
            tag = self._resp_tags[pod.id] = b"X-Keyroute-Pod: %s\r\nX-Keyroute-Generation: %d\r\n" % (
                pod.id.encode(),
                self.generation,
            )
        return tag

    def candidates(self, route: Route) -> tuple[Pod, ...]:
        """Pods for a slice in failover order: the owner, its backups, then
        (``failover = "any"``) the other active pods in rendezvous order. The
        same on every proxy replica."""
        i = route.index
        if self._any and i >= 0:
            order = self._with_backups(route)
            rest = self._any[i]
            pods = self._pods
            if rest is None:
                seen = {p.id for p in order}
                where = {p.id: k for k, p in enumerate(pods)}
                ranked = rank(pods, route.start)
                rest = self._any[i] = tuple([where[p.id] for p in ranked if p.id not in seen and p.active])
            return (*order, *[pods[k] for k in rest])
        return self._with_backups(route)

    def _with_backups(self, route: Route) -> tuple[Pod, ...]:
        """The owner, then its backups (``failover = "backups"`` or "any"),
        one tuple per distinct owner and backups: a table has few."""
        key = (route.pod.id, route.backups if self.failover != "none" and route.index >= 0 else ())
        cands = self._candidates.get(key)
        if cands is None:
            pods = self.assignment.pods
            cands = self._candidates[key] = (route.pod, *[pods[b] for b in key[1]])
        return cands

    def fixed_route(self, pod_id: str) -> Route | None:
        """A route to a named pod (``missing_key = "pod:<id>"``)."""
        route = self._fixed.get(pod_id)
        if route is None:
            pod = self.assignment.pods.get(pod_id)
            if pod is None:
                return None
            g = self.generation
            route = self._fixed[pod_id] = Route(-1, 0, 0, pod, g, (), g)
        return route


class Runtime:
    """Shared state of one worker: settings, the table in force, pools, live
    connections. Passed to every protocol instance; no module globals."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        p = settings.proxy
        self.key_header = p.key_header.lower().encode()
        self.via_token = p.via.encode()
        self.via_lower = p.via.lower().encode()
        self.response_headers = p.response_headers
        self.missing_key = p.missing_key
        self.header_timeout = p.header_timeout
        self.body_timeout = p.body_timeout
        self.idle_timeout = p.idle_timeout
        self.send_timeout = p.send_timeout
        self.allow_empty_key = p.allow_empty_key
        self.reject_get_body = p.get_body == "reject"
        self.max_header_bytes = p.max_header_bytes
        self.max_body_bytes = p.max_body_bytes
        # How far ahead a client connection's timer is ever scheduled.
        self.timer_step = min(t for t in (p.header_timeout, p.body_timeout, p.idle_timeout, 3600.0) if t > 0)
        self.table: RoutingTable | None = None
        self.upstreams = Upstreams(loop, settings.upstream)
        self.connections: set[ClientProtocol] = set()
        self.closing = False
        self.stats = Stats()
        u = settings.upstream
        self.health = Health(
            eject_after=u.eject_after,
            eject_base=u.eject_base,
            eject_max=u.eject_max,
            max_ejected_percent=u.max_ejected_percent,
            clock=loop.time,
        )
        self.fail_statuses = u.fail_status_set
        self.retries = u.retries
        # A request and its retries share one deadline: every attempt may use
        # its full response_timeout, and none starts after this much time.
        self.request_budget = u.response_timeout * (u.retries + 1)
        self.access_log = p.access_log
        self.access_log_keys = p.access_log and p.access_log_keys
        self.request_count = 0
        self.id_prefix = f"{os.getpid():x}"
        folder = os.environ.get(METRICS_DIR_ENV)
        self.shared = Shared(folder) if folder else None
        self.collector = RuntimeCollector(self.stats, self.gauges, self.shared)
        self.table_loaded_at: float | None = None  # Unix time
        # The last refused or failed reload: what, when, and whether a later
        # table has applied since ("resolved").
        self.last_reload_error: dict[str, Any] | None = None
        self.admin_port: int | None = None
        # Parses big tables in a helper process (sources, admin PUT) and
        # compares them for the reload log.
        self.offload = Offload()
        self._background: set[asyncio.Task[None]] = set()

    def set_assignment(self, assignment: Assignment) -> None:
        """Publish a new table: one reference assignment. What was kept for
        pods that left the table (health records, pools, per-pod counters)
        goes with them."""
        self.table = RoutingTable(assignment, self.settings.upstream.failover)
        self.table_loaded_at = time.time()
        self.offload.baseline = assignment  # big tables are checked against it as they are parsed
        pods = assignment.pods
        self.health.set_pods(pods)
        self.upstreams.prune({(p.host, p.port) for p in pods.values()})
        by_pod = self.stats.by_pod
        for pod_id in [p for p in by_pod if p not in pods and p != "-"]:
            del by_pod[pod_id]

    def offer(self, assignment: Assignment) -> str:
        """Apply ``assignment`` if its generation is above the one in force.
        Returns "" when applied (or identical to the table in force), else why not."""
        from .sources import judge, verdict_kind

        old = self.table.assignment if self.table is not None else None
        verdict = judge(old, assignment)
        if verdict is None:
            self.set_assignment(assignment)
            self.note_reload("applied", None)
            if old is None:
                self._log_applied(None, assignment, 1.0)
            else:
                # Comparing two 100k-slice tables takes tens of ms: not on the loop.
                task = self.loop.create_task(self._log_moved(old, assignment))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return ""
        if verdict:
            self.note_reload(verdict_kind(verdict), verdict)
        return verdict

    async def _log_moved(self, old: Assignment, new: Assignment) -> None:
        try:
            moved: float | None = await self.offload.moved_share(old, new)
        except Exception as exc:  # only the log line misses it
            log.warning("reload log: moved share not computed: %r", exc)
            moved = None
        self._log_applied(old, new, moved)

    def _log_applied(self, old: Assignment | None, new: Assignment, moved: float | None) -> None:
        log.info(
            "%s",
            orjson.dumps(
                {
                    "event": "reload",
                    "result": "applied",
                    "old_generation": old.generation if old else None,
                    "generation": new.generation,
                    "moved": None if moved is None else round(moved, 6),
                    "source": self.settings.assignment.source,
                }
            ).decode(),
        )

    def note_reload(self, result: str, error: str | None) -> None:
        self.stats.reload(result)
        last = self.last_reload_error
        if result == "applied" and last is not None and not last["resolved"]:
            last["resolved"] = True
            last["resolved_at"] = time.time()
            last["resolved_by_generation"] = self.table.generation if self.table else None
        if error is not None:
            self.last_reload_error = {
                "result": result,
                "error": error,
                "at": time.time(),
                "generation_in_force": self.table.generation if self.table else None,
                "resolved": False,
            }
            log.warning(
                "%s",
                orjson.dumps(
                    {
                        "event": "reload",
                        "result": result,
                        "generation": self.table.generation if self.table else None,
                        "error": error,
                        "source": self.settings.assignment.source,
                    }
                ).decode(),
            )

    def gauges(self) -> dict[str, float]:
        return {
            "generation": self.table.generation if self.table is not None else 0,
            "in_flight": sum(1 for c in self.connections if c.exchange is not None),
            "client_connections": len(self.connections),
            "pool_idle_connections": sum(len(p.idle) for p in self.upstreams.pools.values()),
            "workers": 1,
            "pods_ejected": sum(1 for p in self.health.pods if self.health.ejected(p, self.loop.time())),
            "panic": 1 if self.health.panic_now(self.loop.time()) else 0,
            "ejections": self.health.ejections_total,
            "table_helper_calls": self.offload.calls,
            "table_helper_fallbacks": self.offload.fallbacks,
        }

    def metrics_text(self) -> bytes:
        """Prometheus text exposition (all workers' counters when there are several)."""
        return exposition(self.collector)

    async def publish_metrics(self) -> None:
        """With several workers: share this worker's counters every second."""
        assert self.shared is not None
        while True:
            try:
                self.shared.publish(self.stats.snapshot(), self.gauges())
            except OSError as exc:
                log.warning("cannot publish metrics to %s: %s", self.shared.folder, exc)
            await asyncio.sleep(1.0)

    def pool_for(self, pod: Pod) -> Pool:
        return self.upstreams.pool(pod.id, pod.host, pod.port)


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the reason is on the protocol."""


class Exchange:
    """One request and its response."""

    __slots__ = (
        "client",
        "headers",
        "url",
        "method",
        "http11",
        "keep_alive",
        "upgrade",
        "head_done",
        "req_done",
        "req_chunked",
        "req_length",
        "body_bytes",
        "head",
        "pending",
        "pending_size",
        "conn",
        "sent",
        "route",
        "table",
        "error",
        "resp_started",
        "out_chunked",
        "close_after",
        "retried",
        "started",
        "status",
        "pod",
        "tried",
        "last_error",
        "key",
        "body_left",
    )

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.method = b""
        self.http11 = True
        self.keep_alive = True
        self.upgrade = False
        self.head_done = False
        self.req_done = False
        self.req_chunked = False
        self.req_length = -1
        self.body_bytes = 0
        self.head = b""
        self.pending: list[bytes] | None = None
        self.pending_size = 0
        self.conn: UpstreamConnection | None = None
        self.sent = False
        self.route: Route | None = None
        self.table: RoutingTable | None = None
        self.error: tuple[int, str, str] | None = None
        self.resp_started = False
        self.out_chunked = False
        self.close_after = False
        self.retried = False
        self.started = 0.0
        self.status = 0
        self.pod: Pod | None = None  # the pod serving this attempt
        self.tried: list[str] | None = None  # pods that failed this request
        self.last_error: tuple[int, str, str] | None = None
        self.key: bytes | None = None  # kept for the access log only (proxy.access_log_keys)
        self.body_left = 0  # body bytes of an Upgrade request still to come (see _count_body)

    # -- events from the upstream connection --------------------------------

    def client_write(self, data: bytes) -> None:
        self.client.write(data)

    def client_write_eof(self) -> None:
        self.client.write_eof()

    def upstream_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.http11:
            return  # HTTP/1.0 clients do not get 1xx responses (RFC 9110 §15.2)
        parts = [wire.status_line(status, reason)]
        for name, value in headers:
            lname = name.lower()
            if lname not in wire.HOP_BY_HOP:
                parts.append(name + b": " + value + b"\r\n")
        parts.append(wire.CRLF)
        self.client.write(b"".join(parts))

    def upstream_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        client = self.client
        rt = client.runtime
        pod = self.pod
        assert pod is not None
        if status in rt.fail_statuses:
            rt.health.failure(pod.id, f"HTTP {status}")
            if self.retry_safe(after_send=True) and client.retry(self, f"status_{status}", None):
                # Not relayed: the request goes to the next candidate instead.
                conn.exchange = None
                conn.discard()
                return
        elif pod.id in rt.health.pods:
            rt.health.success(pod.id)
        self.resp_started = True
        self.status = status
        parts = [wire.status_line(status, reason)]
        drop: list[bytes] | None = None
        upgrade_value = None
        codings = b""
        for name, value in headers:
            lname = name.lower()
            if lname in wire.HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    codings = value if not codings else codings + b"," + value
                elif lname == b"connection":
                    tokens = wire.connection_tokens(value)
                    if tokens:
                        drop = tokens if drop is None else drop + tokens
                elif lname == b"upgrade":
                    upgrade_value = value
                continue
            if lname.startswith(b"x-keyroute-"):
                continue
            parts.append(name + b": " + value + b"\r\n")
        if drop:
            # Headers the pod named in Connection are hop-by-hop too.
            parts = wire.drop_named(parts, 1, drop)
        if status == 101:
            parts.append(b"Connection: upgrade\r\n")
            if upgrade_value is not None:
                parts.append(b"Upgrade: " + upgrade_value + b"\r\n")
        else:
            no_body = self.method == b"HEAD" or status in _NO_BODY_STATUS
            if not no_body and conn.resp_length < 0:
                # Chunked or close-delimited from the pod: chunked to an
                # HTTP/1.1 client, close-delimited to an HTTP/1.0 one.
                if self.http11:
                    self.out_chunked = True
                    parts.append(wire.chunked_after(codings))
                else:
                    self.close_after = True
            if self.upgrade or not self.req_done or not self.keep_alive or client.runtime.closing:
                # An early response leaves the request body unread, and a
                # refused upgrade may be followed by non-HTTP bytes: close.
                self.close_after = True
            if self.close_after:
                parts.append(b"Connection: close\r\n")
            elif not self.http11:
                parts.append(b"Connection: keep-alive\r\n")
        if client.runtime.response_headers and self.pod is not None and self.table is not None:
            parts.append(self.table.response_tag(self.pod))
        parts.append(wire.CRLF)
        client.write(b"".join(parts))

    def upstream_body(self, data: bytes) -> None:
        if self.out_chunked:
            self.client.write(wire.chunk(data))
        else:
            self.client.write(data)

    def upstream_done(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """The response ended. ``reusable``: the pod's framing lets the
        connection carry another request."""
        if self.out_chunked:
            self.client.write(wire.CHUNK_END)
        self.conn = None
        client = self.client
        if self.pod is not None:
            elapsed = client.loop.time() - self.started
            client.runtime.stats.response(self.pod.id, self.status, elapsed)
            if client.runtime.access_log:
                client.access(self, self.status, elapsed, None)
        if not conn.closed:
            # After a refused upgrade the pod may still be waiting for the
            # other protocol: never reuse that connection.
            if reusable and self.req_done and not self.upgrade:
                conn.release()
            else:
                conn.exchange = None  # its close is not this exchange's failure
                conn.discard()
        self.client.exchange_done(self)

    def retry_safe(self, *, after_send: bool) -> bool:
        """May this request be sent again? Always before a byte went out; after
        that only if it is idempotent, has no body, and no response byte was
        relayed."""
        if self.resp_started or self.upgrade:
            return False
        if not after_send:
            return True
        return self.req_length <= 0 and not self.req_chunked and self.method in wire.IDEMPOTENT

    def upstream_failed(self, conn: UpstreamConnection, status: int, code: str, detail: str) -> None:
        self.conn = None
        client = self.client
        if client.exchange is not self:
            return
        rt = client.runtime
        if conn.reused and not conn.got_bytes and not self.retried and self.retry_safe(after_send=True):
            # A pooled connection the pod had already closed: resend once on a
            # fresh connection to the same pod; not the pod's fault.
            self.retried = True
            rt.stats.retries += 1
            self.sent = False
            self.pending = []
            assert self.pod is not None
            client.connect(self, rt.pool_for(self.pod))
            return
        if self.pod is not None and not (conn.reused and not conn.got_bytes):
            # A pooled connection closed as the request went out is a race
            # with the pod's keep-alive timeout, not a sign the pod is failing.
            rt.health.failure(self.pod.id, code)
        if self.retry_safe(after_send=True) and client.retry(self, code, (status, code, detail)):
            return
        if self.resp_started:
            rt.stats.error(code)  # send_error counts the others
            client.abort()
        else:
            client.send_error(self, status, code, detail)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        client = self.client
        if self.pod is not None:
            elapsed = client.loop.time() - self.started
            client.runtime.stats.response(self.pod.id, 101, elapsed)
            if client.runtime.access_log:
                client.access(self, 101, elapsed, None)
        client.start_tunnel(conn)
        if rest:
            self.client.write(rest)

    def upstream_tunnel_closed(self) -> None:
        self.client.close()


class ClientProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "runtime",
        "loop",
        "transport",
        "parser",
        "exchange",
        "parsing",
        "queue",
        "paused_mask",
        "write_paused",
        "deadline",
        "timer",
        "timer_kind",
        "head_bytes",
        "reject",
        "final_error",
        "final_refusal",
        "dead",
        "closed",
        "peer",
        "upgrading",
        "tunnel",
        "client_eof",
        "ready",
        "wbuf",
        "held",
        "held_size",
        "send_timer",
        "send_mark",
        "counting",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Not dangerous here: HTTP/1.x with x > 1 is served as 1.1 and 2.0 or
        # later answered 505 (RFC 9110 §2.5), and the chunk-size whitespace
        # RFC 9112 §7.1.1 allows (BWS before ";") is accepted; bodies are
        # re-chunked, so the pod never sees the client's chunk lines.
        self.parser.set_dangerous_leniencies(lenient_version=True, lenient_spaces_after_chunk_size=True)
        self.exchange: Exchange | None = None  # the one being served
        self.parsing: Exchange | None = None  # the one the parser fills
        self.queue: collections.deque[Exchange] = collections.deque()
        self.paused_mask = 0
        self.write_paused = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = _T_IDLE
        self.head_bytes = 0
        self.reject: tuple[int, str, str] | None = None
        self.final_error: bytes | None = None
        self.final_refusal: tuple[Exchange | None, int, str] | None = None
        self.dead = False  # no more requests are parsed
        self.closed = False
        self.peer = b""
        self.upgrading = False
        self.tunnel: UpstreamConnection | None = None
        self.client_eof = False
        self.ready: Exchange | None = None
        self.wbuf: list[bytes] | None = None
        # Bytes after an upgrade request, held until the pod answers 101.
        self.held: list[bytes] = []
        self.held_size = 0
        self.send_timer: asyncio.TimerHandle | None = None
        self.send_mark = 0  # write buffer size when the send timer was armed
        self.counting: Exchange | None = None  # an Upgrade request whose body is read by count

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        wire.set_nodelay(transport)
        self.runtime.connections.add(self)
        self._arm(_T_IDLE, self.runtime.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.runtime.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        self.held = []
        if self.tunnel is not None:
            self.tunnel.write_eof()
            self.tunnel.discard()
            self.tunnel = None
        ex = self.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.exchange = None
            ex.conn.discard()
            ex.conn = None
        self.exchange = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.counting is not None:
            self._count_body(data)
            return
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrading:
            self._hold(data)
            return
        if self.dead:
            return
        if self.timer_kind == _T_BODY:
            self.deadline = self.loop.time() + self.runtime.body_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._begin_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            bad = self.parsing
            reject = self.reject or (400, "bad_request", f"malformed HTTP request: {exc}")
            self._fail_connection(*reject)
            if self.ready is bad:
                self.ready = None
        ready = self.ready
        if ready is not None:
            self.ready = None
            if ready is self.exchange and ready.error is None and not ready.resp_started and not self.closed:
                self._dispatch(ready)
        ex = self.parsing
        if ex is not None and not ex.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > self.runtime.max_header_bytes:
                self._fail_connection(
                    431, "headers_too_large", f"request head exceeds {self.runtime.max_header_bytes} bytes"
                )

    def eof_received(self) -> bool | None:
        if self.upgrading:
            self.client_eof = True  # passed on if the pod switches protocols
            return True
        if self.tunnel is not None:
            # Half-close: pass the client's EOF on; close once both sides are done.
            self.client_eof = True
            if self.tunnel.closed or self.tunnel.eof:
                self.tunnel.discard()
                return None
            self.tunnel.write_eof()
            return True
        ex = self.exchange
        if ex is not None and not ex.req_done:
            return None  # the request was cut short: close
        # The client is done sending; let the response in progress finish.
        self.dead = True
        if ex is None:
            return None
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        conn = self.tunnel or (self.exchange.conn if self.exchange is not None else None)
        if conn is not None:
            conn.pause_reading()
        self._arm_send()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        conn = self.tunnel or (self.exchange.conn if self.exchange is not None else None)
        if conn is not None:
            conn.resume_reading()

    def _arm_send(self) -> None:
        """The client is not reading: close it if its write buffer makes no
        progress for ``send_timeout`` (a client that reads nothing must not
        hold its exchange and a pod connection forever)."""
        seconds = self.runtime.send_timeout
        if seconds > 0 and self.transport is not None and not self.closed:
            self.send_mark = self.transport.get_write_buffer_size()
            self.send_timer = self.loop.call_later(seconds, self._on_send_timer)

    def _on_send_timer(self) -> None:
        self.send_timer = None
        if self.closed or not self.write_paused or self.transport is None:
            return
        if self.transport.get_write_buffer_size() < self.send_mark:
            self._arm_send()  # slow, but reading
            return
        log.info("client %s read nothing for %gs: closing", self.peer.decode(), self.runtime.send_timeout)
        self.runtime.stats.error("send_timeout")
        self.abort()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        ex = Exchange(self)
        self.parsing = ex
        self.head_bytes = 0
        if self.exchange is None:
            self.exchange = ex
            self._arm(_T_HEAD, self.runtime.header_timeout)
        else:
            # Pipelined: hold it parsed until its turn, and read no further.
            self.queue.append(ex)
            self.pause_reading_for(_PAUSE_PIPELINE)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.head_done:
            return  # a trailer of a chunked body: dropped
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        ex.head_done = True
        rt = self.runtime
        size = len(ex.url) + sum(len(n) + len(v) + 4 for n, v in ex.headers)
        if size > rt.max_header_bytes:
            self._reject(431, "headers_too_large", f"request head exceeds {rt.max_header_bytes} bytes")
        parser = self.parser
        ex.method = method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1":
            if version[0] != "1":
                self._reject(505, "version_not_supported", f"HTTP/{version} is not supported; use HTTP/1.1")
            ex.http11 = version != "1.0"  # HTTP/1.x with x > 1 is served as 1.1 (RFC 9110 §2.5)
        ex.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            # Whatever follows this request is not HTTP: its answer ends the connection.
            ex.close_after = True
        if method == b"CONNECT":
            self._reject(405, "method_not_allowed", "CONNECT is not supported by a reverse proxy")
        key_name = rt.key_header
        key: bytes | None = None
        keys = 0
        te = b""
        hosts = 0
        host = b""
        via = b""
        xff = b""
        upgrade = b""
        drop: list[bytes] | None = None
        url = ex.url
        out = [method, b" ", url, b" HTTP/1.1\r\n"]
        special = _REQ_SPECIAL
        for name, value in ex.headers:
            lname = name.lower()
            if lname == key_name:
                keys += 1
                key = value
            tag = special.get(lname)
            if tag is None:
                if lname.startswith(b"x-keyroute-") or (
                    (b"_" in lname or b"--" in lname) and wire.lookalike(lname, key_name)
                ):
                    continue
                out.append(name + b": " + value + b"\r\n")
                continue
            if tag == _H_CL:
                ex.req_length = int(value)
                out.append(b"Content-Length: " + value + b"\r\n")
            elif tag == _H_TE:
                te = value if not te else te + b"," + value
            elif tag == _H_CONN:
                tokens = wire.connection_tokens(value)
                if tokens:
                    drop = tokens if drop is None else drop + tokens
            elif tag == _H_HOST:
                hosts += 1
                host = value
            elif tag == _H_VIA:
                via = value if not via else via + b", " + value
            elif tag == _H_XFF:
                xff = value if not xff else xff + b", " + value
            elif tag == _H_UPGRADE:
                upgrade = value
        if hosts != 1 and (hosts or ex.http11):
            # RFC 9112 §3.2: exactly one Host in HTTP/1.1 (at most one in 1.0).
            self._reject(400, "bad_host", "more than one Host header" if hosts else "HTTP/1.1 request without Host")
        if hosts and not wire.valid_host(host):
            self._reject(400, "bad_host", f"Host is not a valid host[:port]: {host.decode('latin-1')!r}")
        if url[:1] != b"/":
            target = wire.origin_form(method, url)
            if target is None:
                self._reject(
                    400,
                    "bad_request",
                    "request target must be a path (/...), an absolute http URL, or * for OPTIONS",
                )
            elif target[0] != url:
                # Absolute-form: the pod gets origin-form and the authority as Host (RFC 9112 §3.2.2).
                url, host = target
                hosts = 1
                ex.url = out[2] = url
        if te:
            if not ex.http11:
                self._reject(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            codings = wire.request_codings(te)
            if codings is None:
                self._reject(400, "bad_request", "Transfer-Encoding must end in chunked, once")
            te = codings
            ex.req_chunked = True
        if (ex.req_length > 0 or ex.req_chunked) and (method == b"GET" or method == b"HEAD") and rt.reject_get_body:
            # Servers disagree on whether such a body exists: one that ignores
            # it reads it as the next request.
            self._reject(
                400, "bad_request", f'{method.decode()} with a body (set proxy.get_body = "forward" to allow it)'
            )
        if keys > 1:
            self._reject(400, "duplicate_key", f"more than one {rt.settings.proxy.key_header} header")
        if drop:
            drop_set = set(drop) - {b"content-length", b"host", b"transfer-encoding"}
            out = wire.drop_named(out, 4, drop_set)
        if via and rt.via_lower in via.lower() and wire.via_names(via, rt.via_lower):
            self._error(
                ex,
                508,
                "loop_detected",
                f"request already passed through {rt.settings.proxy.via} (Via: {via.decode('latin-1')})",
            )
            return
        if ex.req_length > 0 or ex.req_chunked:
            limit = rt.max_body_bytes
            if limit and ex.req_length > limit:
                self._error(ex, 413, "body_too_large", f"request body of {ex.req_length} bytes exceeds {limit}")
                return
        if key is not None and not key and not rt.allow_empty_key:
            key = None
        if rt.access_log_keys:
            ex.key = key
        table = rt.table
        if table is None:
            self._error(ex, 503, "no_table", "no assignment table is in force yet")
            return
        ex.table = table
        if key is not None:
            route = table.assignment.lookup(key)
        elif rt.missing_key == "reject":
            self._error(ex, 400, "missing_key", f"request has no {rt.settings.proxy.key_header} header")
            return
        elif rt.missing_key == "random":
            route = table.assignment.lookup_position(random.getrandbits(64))
        else:
            fixed = table.fixed_route(rt.missing_key[4:])
            if fixed is None:
                self._error(
                    ex, 503, "no_route", f"missing_key names pod {rt.missing_key[4:]!r}, which is not in the table"
                )
                return
            route = fixed
        ex.route = route
        if not hosts:
            pod = route.pod
            host = b"%s:%d" % (pod.host.encode(), pod.port)
        out.insert(4, b"Host: " + host + b"\r\n")
        if te:
            out.append(b"Transfer-Encoding: " + te + b"\r\n")
        if parser.should_upgrade() and upgrade:
            if ex.req_chunked:
                self._reject(400, "bad_request", "an Upgrade request with a chunked body is not supported")
            if ex.req_length > 0:
                # The parser hands a body of an Upgrade request over as the
                # new protocol's bytes: count it out ourselves, forward the
                # request without the upgrade, and end the connection after.
                ex.body_left = ex.req_length
                ex.close_after = True
            else:
                ex.upgrade = True
                out.append(b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n")
        version_token = b"1.1 " if ex.http11 else b"1.0 "
        out.append(b"Via: " + (via + b", " if via else b"") + version_token + rt.via_token + b"\r\n")
        out.append(b"X-Forwarded-For: " + (xff + b", " if xff else b"") + self.peer + b"\r\n")
        out.append(b"X-Forwarded-Proto: http\r\n")
        if host:
            out.append(b"X-Forwarded-Host: " + host + b"\r\n")
        ex.head = b"".join(out)  # the X-Keyroute-* tag and the blank line follow at dispatch
        ex.pending = []
        ex.started = self.loop.time()
        if ex is self.exchange:
            if ex.req_length > 0 or ex.req_chunked:
                self._arm(_T_BODY, rt.body_timeout)
            else:
                self.deadline = 0.0
            # Dispatched once feed_data returns: the parser may still find
            # this request malformed in the bytes it has not parsed yet.
            self.ready = ex

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.error is not None:
            return
        ex.body_bytes += len(body)
        limit = self.runtime.max_body_bytes
        if limit and ex.body_bytes > limit:
            self._reject(413, "body_too_large", f"request body exceeds {limit} bytes")
        self._body(ex, wire.chunk(body) if ex.req_chunked else body)

    def _body(self, ex: Exchange, data: bytes) -> None:
        """Request body bytes, framed for the pod: sent, or kept until the
        pod connection is ready (reading pauses past a bound)."""
        if ex.sent:
            assert ex.conn is not None
            ex.conn.write(data)
        else:
            assert ex.pending is not None
            ex.pending.append(data)
            ex.pending_size += len(data)
            if ex.pending_size > _MAX_PENDING:
                self.pause_reading_for(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        ex.req_done = True
        if not ex.keep_alive or ex.upgrade:
            self.dead = True
        if ex.body_left:
            ex.req_done = False  # its body comes as "upgrade" bytes: see _count_body
            self.dead = True
        elif ex is self.exchange and self.timer_kind == _T_BODY:
            self.deadline = 0.0
        if ex.error is not None:
            if ex is self.exchange and not ex.resp_started:
                self.send_error(ex, *ex.error)
            return
        if ex.req_chunked:
            if ex.sent:
                assert ex.conn is not None
                ex.conn.write(wire.CHUNK_END)
            else:
                assert ex.pending is not None
                ex.pending.append(wire.CHUNK_END)

    # -- routing and dispatch -------------------------------------------------

    def _dispatch(self, ex: Exchange) -> None:
        pod = self._choose(ex)
        if pod is None:
            self._no_pod(ex)
            return
        ex.pod = pod
        pool = self.runtime.pool_for(pod)
        conn = pool.take()
        if conn is not None:
            self._attach(ex, conn)
        else:
            self.connect(ex, pool)

    def _choose(self, ex: Exchange) -> Pod | None:
        """The first candidate that is not ejected and was not tried yet (in
        panic, ejection is ignored)."""
        route = ex.route
        table = ex.table
        assert route is not None and table is not None
        health = self.runtime.health
        tried = ex.tried
        if not health.pods and tried is None:
            return route.pod  # no pod has failed: the owner, without the candidates
        cands = table.candidates(route)
        now = self.loop.time()
        panic = health.panic_now(now)
        for pod in cands:
            if tried is not None and pod.id in tried:
                continue
            if panic or not health.ejected(pod.id, now):
                return pod
        return None

    def retry(self, ex: Exchange, reason: str, error: tuple[int, str, str] | None) -> bool:
        """Send ``ex`` to its next candidate, if retries and the deadline
        allow and one is left. False: the caller answers."""
        rt = self.runtime
        if error is not None:
            ex.last_error = error
        pod = ex.pod
        assert pod is not None
        if ex.tried is None:
            ex.tried = [pod.id]
        elif pod.id not in ex.tried:
            ex.tried.append(pod.id)
        if len(ex.tried) > rt.retries or self.loop.time() - ex.started > rt.request_budget:
            return False
        if self._choose(ex) is None:
            return False
        rt.stats.retries += 1
        rt.stats.failover(reason)
        ex.conn = None
        ex.sent = False
        if ex.pending is None:
            ex.pending = []
        self._dispatch(ex)
        return True

    def _no_pod(self, ex: Exchange) -> None:
        """No candidate left: 503 with Retry-After, naming the candidates."""
        rt = self.runtime
        if ex.last_error is not None and ex.tried and len(ex.tried) > rt.retries:
            self.send_error(ex, *ex.last_error)
            return
        route, table = ex.route, ex.table
        assert route is not None and table is not None
        now = self.loop.time()
        cands = table.candidates(route)
        states = [
            {"pod": p.id, "state": "failed" if ex.tried and p.id in ex.tried else rt.health.state(p.id, now)}
            for p in cands
        ]
        wait = rt.health.retry_after([p.id for p in cands], now)
        self.send_error(
            ex,
            503,
            "no_healthy_pod",
            "no healthy pod for this key: " + ", ".join(f"{c['pod']} ({c['state']})" for c in states),
            extra=b"Retry-After: %d\r\n" % max(1, round(wait)),
            fields={"candidates": states},
        )

    def connect(self, ex: Exchange, pool: Pool) -> None:
        self.loop.create_task(self._connect(ex, pool))

    async def _connect(self, ex: Exchange, pool: Pool) -> None:
        try:
            conn = await pool.connect()
        except TimeoutError:
            self._connect_failed(
                ex,
                504,
                "connect_timeout",
                f"connecting to pod {pool.pod_id} ({pool.host}:{pool.port}) timed out after {pool.connect_timeout:g}s",
            )
            return
        except OSError as exc:
            self._connect_failed(
                ex,
                502,
                "connect_failed",
                f"cannot connect to pod {pool.pod_id} ({pool.host}:{pool.port}): {exc.strerror or exc}",
            )
            return
        if self.closed or self.exchange is not ex:
            pool.put(conn)
            return
        self._attach(ex, conn)

    def _connect_failed(self, ex: Exchange, status: int, code: str, detail: str) -> None:
        if self.closed or self.exchange is not ex:
            return
        rt = self.runtime
        if ex.pod is not None:
            rt.health.failure(ex.pod.id, code)
        # Nothing was sent: any request may go to the next candidate.
        if ex.retry_safe(after_send=False) and self.retry(ex, code, (status, code, detail)):
            return
        self.send_error(ex, status, code, detail)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        pending = ex.pending
        assert pending is not None and ex.route is not None and ex.table is not None and ex.pod is not None
        ex.pending = None
        ex.sent = True
        head = ex.head + ex.table.request_tag(ex.route, ex.pod) + wire.CRLF
        conn.send(ex, head + b"".join(pending) if pending else head, head_only=ex.method == b"HEAD")
        ex.pending_size = 0
        if ex.pod is not ex.route.pod and ex.tried is None:
            # The owner was skipped without being tried: it is ejected.
            self.runtime.stats.failover("owner_ejected")
        if self.paused_mask & _PAUSE_BUFFER:
            self.resume_reading_for(_PAUSE_BUFFER)
        if self.write_paused:
            conn.pause_reading()

    def _hold(self, data: bytes) -> None:
        """Bytes after an upgrade request, before the pod agreed to switch:
        they may be a second HTTP request, so none reaches the pod before a
        101 (and none at all if the pod refuses). Bounded: reading stops."""
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > _MAX_PENDING:
            self.pause_reading_for(_PAUSE_BUFFER)

    def _count_body(self, data: bytes) -> None:
        """The body of an Upgrade request (see on_headers_complete): the first
        ``body_left`` bytes; whatever follows is never read as a request."""
        ex = self.counting
        assert ex is not None
        if self.timer_kind == _T_BODY:
            self.deadline = self.loop.time() + self.runtime.body_timeout
        part = data[: ex.body_left]
        if part:
            ex.body_left -= len(part)
            ex.body_bytes += len(part)
            self._body(ex, part)
        if not ex.body_left:
            self.counting = None
            ex.req_done = True
            if ex is self.exchange and self.timer_kind == _T_BODY:
                self.deadline = 0.0

    def _begin_upgrade(self, rest: bytes) -> None:
        # The upgrade request is the last one parsed: queued, or being served.
        ex = self.queue[-1] if self.queue else self.exchange
        if ex is not None and ex.error is not None:
            self.dead = True  # refused by the proxy: nothing after it is read
            return
        if ex is not None and ex.body_left:
            self.counting = ex
            self._count_body(rest)
            return
        if ex is None or not ex.upgrade:
            self._fail_connection(400, "bad_request", "unexpected protocol upgrade")
            return
        self.upgrading = True
        if rest:
            self._hold(rest)

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        """The pod answered 101: from now on bytes flow both ways untouched,
        starting with those the client sent after its request."""
        self.tunnel = conn
        self.upgrading = False
        self.deadline = 0.0
        if self.held:
            conn.writelines(self.held)
            self.held = []
            self.held_size = 0
        if self.client_eof:
            conn.write_eof()  # the client half-closed while waiting for the 101
        ex = self.exchange
        if ex is not None:
            ex.conn = None
        self.exchange = None
        # Only what the pod connection says now holds reading back.
        self.resume_reading_for(_PAUSE_BUFFER | _PAUSE_PIPELINE)

    # -- finishing --------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        if self.exchange is not ex:
            return
        # Draining, a response that did not say Connection: close does not
        # end the connection: its client may be sending the next request now,
        # which is served (with Connection: close) rather than lost.
        if ex.close_after or not ex.keep_alive or (self.dead and not self.queue):
            if self.final_error is not None and not ex.close_after:
                # A later pipelined request was refused: say so before closing.
                self._write_final_error()
            self.close()
            return
        self.exchange = None
        self._next()

    def _next(self) -> None:
        if self.queue:
            nxt = self.queue.popleft()
            self.exchange = nxt
            if not self.queue:
                self.resume_reading_for(_PAUSE_PIPELINE)
            if not nxt.head_done:
                self._arm(_T_HEAD, self.runtime.header_timeout)
            elif nxt.error is not None:
                if (nxt.req_done or nxt.close_after) and not nxt.resp_started:
                    self.send_error(nxt, *nxt.error)
            else:
                if not nxt.req_done:
                    self._arm(_T_BODY, self.runtime.body_timeout)
                self._dispatch(nxt)
            return
        if self.final_error is not None:
            self._write_final_error()
            self.close()
            return
        self.resume_reading_for(_PAUSE_PIPELINE)
        self._arm(_T_IDLE, self._idle_time())

    def _idle_time(self) -> float:
        rt = self.runtime
        return min(_DRAIN_IDLE, rt.idle_timeout or _DRAIN_IDLE) if rt.closing else rt.idle_timeout

    def _error(self, ex: Exchange, status: int, code: str, detail: str) -> None:
        """A request that will not be forwarded. Without a body it is answered
        at its end and the connection lives on; with one, it is answered now
        and the connection closes (the body is not read)."""
        ex.error = (status, code, detail)
        if ex.req_length > 0 or ex.req_chunked:
            ex.close_after = True
            self.dead = True
            if ex is self.exchange:
                self.send_error(ex, status, code, detail)

    def send_error(
        self,
        ex: Exchange,
        status: int,
        code: str,
        detail: str,
        *,
        extra: bytes = b"",
        fields: dict[str, Any] | None = None,
    ) -> None:
        rt = self.runtime
        ex.resp_started = True
        close = ex.close_after or not ex.keep_alive or not ex.req_done or rt.closing or ex.upgrade
        generation = ex.table.generation if ex.table is not None else (rt.table.generation if rt.table else None)
        self.write(
            wire.error_response(
                status,
                code,
                detail,
                generation,
                close=close,
                extra=extra,
                fields=fields,
                head=ex.method == b"HEAD",
            )
        )
        rt.stats.error(code)
        elapsed = self.loop.time() - ex.started if ex.started else 0.0
        rt.stats.response(ex.pod.id if ex.pod is not None else "-", status, elapsed)
        if rt.access_log:
            self.access(ex, status, elapsed, code)
        ex.close_after = close
        if ex.conn is not None:
            ex.conn.exchange = None
            ex.conn.discard()
            ex.conn = None
        self.exchange_done(ex)

    def access(self, ex: Exchange | None, status: int, elapsed: float, error: str | None) -> None:
        """One JSON object per line on the ``keyroute.access`` logger. The
        key is logged only with ``proxy.access_log_keys`` (keys can be
        personal data)."""
        rt = self.runtime
        rt.request_count += 1
        route = ex.route if ex is not None else None
        pod = ex.pod if ex is not None else None
        doc: dict[str, Any] = {
            "ts": round(time.time(), 6),
            "id": f"{rt.id_prefix}-{rt.request_count:x}",
            "client": self.peer.decode(),
            "method": ex.method.decode("latin-1") if ex is not None else None,
            "path": ex.url.decode("latin-1") if ex is not None else None,
            "status": status,
            "pod": pod.id if pod is not None else None,
            "role": None if pod is None or route is None else ("owner" if pod is route.pod else "backup"),
            "retries": len(ex.tried) if ex is not None and ex.tried else 0,
            "generation": route.generation if route is not None else None,
            "epoch": route.epoch if route is not None else None,
            "ms": round(elapsed * 1000, 3),
            "error": error,
        }
        if rt.access_log_keys:
            key = ex.key if ex is not None else None
            doc["key"] = key.decode("latin-1") if key is not None else None
        access_log.info("%s", orjson.dumps(doc).decode())

    def _reject(self, status: int, code: str, detail: str) -> NoReturn:
        """From a parser callback: stop parsing, answer, close."""
        self.reject = (status, code, detail)
        raise _Reject(detail)

    def _fail_connection(self, status: int, code: str, detail: str) -> None:
        """The byte stream cannot be trusted past this point: answer and close."""
        self.dead = True
        self.pause_reading_for(_PAUSE_PIPELINE)
        rt = self.runtime
        ex = self.exchange
        bad = self.parsing  # the request being read, if the fault is in one
        body = wire.error_response(
            status,
            code,
            detail,
            rt.table.generation if rt.table else None,
            close=True,
            head=bad is not None and bad.method == b"HEAD",
        )
        rt.stats.error(code)
        if ex is None or (not ex.resp_started and (ex is bad or not ex.req_done)):
            # Nothing was answered on this exchange yet: answer it, and drop
            # the pod side (a request it will never see the end of).
            if ex is not None and ex.conn is not None:
                ex.conn.exchange = None
                ex.conn.discard()
                ex.conn = None
            self._count_refusal(ex or bad, status, code)
            self.write(body)
            self.close()
        elif ex is bad or not ex.req_done:
            # Its response has begun: the only honest signal left is a reset.
            self.abort()
        else:
            # An earlier request is still being answered: answer it first.
            self.queue.clear()
            self.final_error = body
            self.final_refusal = (bad, status, code)

    def _count_refusal(self, ex: Exchange | None, status: int, code: str) -> None:
        """A response the proxy made for a request it refused: counted (and
        logged) like any other response."""
        rt = self.runtime
        elapsed = self.loop.time() - ex.started if ex is not None and ex.started else 0.0
        rt.stats.response("-", status, elapsed)
        if rt.access_log:
            self.access(ex, status, elapsed, code)

    def _write_final_error(self) -> None:
        assert self.final_error is not None
        self.write(self.final_error)
        if self.final_refusal is not None:
            self._count_refusal(*self.final_refusal)
            self.final_refusal = None

    # -- plumbing -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.wbuf is not None:
            self.wbuf.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until ``uncork``: a response head and its body, parsed
        from one read of the pod, leave in one system call."""
        if self.wbuf is None:
            self.wbuf = []

    def uncork(self) -> None:
        buf = self.wbuf
        self.wbuf = None
        if buf and self.transport is not None and not self.closed:
            if len(buf) == 1:
                self.transport.write(buf[0])
            else:
                self.transport.writelines(buf)

    def write_eof(self) -> None:
        """The pod half-closed a tunnel."""
        if self.client_eof:  # the client had half-closed already: both are done
            self.close()
            if self.tunnel is not None:
                self.tunnel.discard()
            return
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.uncork()
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def pause_reading_for(self, reason: int) -> None:
        if not self.paused_mask and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused_mask |= reason

    def resume_reading_for(self, reason: int) -> None:
        if self.paused_mask & reason:
            self.paused_mask &= ~reason
            if not self.paused_mask and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _arm(self, kind: int, seconds: float) -> None:
        """Set the connection's one deadline. The timer is scheduled no further
        than ``header_timeout`` ahead, so the next (usually shorter) deadline
        rarely has to move it: most requests create no timer at all."""
        self.timer_kind = kind
        if seconds <= 0:
            self.deadline = 0.0
            return
        now = self.loop.time()
        self.deadline = now + seconds
        timer = self.timer
        if timer is not None and timer.when() > self.deadline:
            # The new deadline is earlier than the pending timer: move it.
            timer.cancel()
            timer = None
        if timer is None:
            self.timer = self.loop.call_at(min(self.deadline, now + self.runtime.timer_step), self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed or not self.deadline:
            return
        now = self.loop.time()
        if self.paused_mask and self.timer_kind == _T_BODY:
            # We stopped reading, not the client.
            self.deadline = now + self.runtime.body_timeout
        if now < self.deadline:
            self.timer = self.loop.call_at(min(self.deadline, now + self.runtime.timer_step), self._on_timer)
            return
        kind = self.timer_kind
        if kind == _T_IDLE:
            self.close()
        elif kind == _T_HEAD:
            self._fail_connection(
                408, "request_timeout", f"request head not received within {self.runtime.header_timeout:g}s"
            )
        else:
            self._fail_connection(408, "body_timeout", f"request body stalled for {self.runtime.body_timeout:g}s")

    def shutdown(self) -> None:
        """Draining: the exchange in progress, or a request that arrives
        while the connection is idle for ``_DRAIN_IDLE``, is the last one
        (its response says Connection: close)."""
        if self.exchange is None and self.tunnel is None:
            self._arm(_T_IDLE, self._idle_time())


def plain_json_access_log() -> None:
    """Access log lines are bare JSON objects on stderr (no logger prefix), so
    a log shipper can parse each line as it is."""
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False


def check_accelerators() -> None:
    """Refuse to run without uvloop and httptools' C parser."""
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"keyroute run: uvloop is required for the data plane and could not be imported ({exc})"
        ) from None
    try:
        from httptools.parser import parser  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"keyroute run: httptools' C parser is required and could not be imported ({exc})") from None


async def serve(
    settings: Settings,
    assignment: Assignment | None,
    shutdown_trigger: Awaitable[Any],
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[Runtime, list[socket.socket]], None] | None = None,
    with_admin: bool = False,
) -> Runtime:
    """Serve until ``shutdown_trigger`` completes, then shut down in order:
    stop accepting, let in-flight exchanges finish up to
    ``proxy.shutdown_timeout``, abort the rest, close the pools."""
    loop = asyncio.get_running_loop()
    rt = Runtime(settings, loop)
    if assignment is not None:
        rt.set_assignment(assignment)
    if sock is not None:
        server = await loop.create_server(lambda: ClientProtocol(rt), sock=sock, backlog=4096)
    else:
        host, port = settings.listen_address
        server = await loop.create_server(
            lambda: ClientProtocol(rt),
            host,
            port,
            reuse_address=True,
            reuse_port=settings.worker_count > 1,
            backlog=4096,
        )
    admin_runner = None
    if with_admin:
        from . import admin

        host, port = settings.admin_address
        admin_runner = await admin.start(rt, host, port, reuse_port=settings.worker_count > 1)
        rt.admin_port = admin_runner.addresses[0][1]
    publisher = loop.create_task(rt.publish_metrics()) if rt.shared is not None else None
    prober = None
    u = settings.upstream
    if u.health_path:

        def targets() -> list[tuple[str, str, int]]:
            t = rt.table
            return [(p.id, p.host, p.port) for p in t.assignment.pods.values()] if t is not None else []

        prober = loop.create_task(
            probe_loop(
                targets,
                rt.health,
                path=u.health_path,
                interval=u.health_interval,
                timeout=u.connect_timeout,
                healthy_after=u.healthy_after,
            )
        )
    if on_ready is not None:
        on_ready(rt, list(server.sockets))
    try:
        await shutdown_trigger
    finally:
        for task in (publisher, prober):
            if task is not None:
                task.cancel()
        await shutdown(rt, server)
        if admin_runner is not None:
            await admin_runner.cleanup()
    return rt


async def shutdown(rt: Runtime, server: asyncio.base_events.Server) -> None:
    rt.closing = True
    server.close()
    for conn in list(rt.connections):
        conn.shutdown()
    deadline = rt.loop.time() + rt.settings.proxy.shutdown_timeout
    while rt.connections and rt.loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(rt.connections):
        conn.abort()
    rt.upstreams.close()
    rt.offload.close()
    await server.wait_closed()


# -- process entry points ---------------------------------------------------------


def main(settings: Settings) -> int:
    """``keyroute run``: load the table, then serve in this process or in
    ``proxy.workers`` supervised worker processes."""
    from . import sources, workers
    from .assignment import AssignmentError

    check_accelerators()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    plain_json_access_log()
    try:
        # Taken before the read: a change after it is read again by the source.
        known = sources.initial_identity(settings.assignment.source)
        assignment = sources.load_initial(settings.assignment.source)
    except sources.SourceError as exc:
        print(f"keyroute run: {exc}", file=sys.stderr)
        return 2
    except AssignmentError as exc:
        print(f"keyroute run: invalid table: {exc}", file=sys.stderr)
        return 1
    n = settings.worker_count
    if n > 1:
        return workers.supervise(settings, assignment, n, known)
    return run_worker(settings, assignment, known)


def run_worker(settings: Settings, assignment: Assignment | None, known: tuple[int, ...] | None = None) -> int:
    """Serve on uvloop until SIGTERM/SIGINT; a second signal exits at once.
    ``known``: the identity of the table file when ``assignment`` was read
    from it; the file source skips its first read if the file still has it."""
    import uvloop

    from . import reload, sources

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[int] = loop.create_future()
        seen = 0

        def on_signal(signum: int) -> None:
            nonlocal seen
            seen += 1
            if seen == 1:
                log.info("signal %d: draining for up to %gs", signum, settings.proxy.shutdown_timeout)
                if not stop.done():
                    stop.set_result(signum)
            else:
                log.warning("signal %d again: exiting now", signum)
                os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        def ready(rt: Runtime, socks: list[socket.socket]) -> None:
            addrs = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in socks)
            table = rt.table
            gen = table.generation if table is not None else None
            log.info("pid %d serving on %s, admin port %s, generation %s", os.getpid(), addrs, rt.admin_port, gen)

            a = settings.assignment
            source = sources.open_source(
                a.source,
                watch=a.watch,
                poll_interval=a.poll_interval,
                authorization=a.authorization,
                offload=rt.offload,
                known=known,
            )
            watcher.append(reload.follow(rt, source))

        watcher: list[asyncio.Task[None]] = []
        try:
            await serve(settings, assignment, stop, on_ready=ready, with_admin=True)
        finally:
            for task in watcher:
                task.cancel()
        log.info("pid %d stopped", os.getpid())

    # What is loaded by now (modules, the first table) lives as long as the
    # worker: keep it out of full garbage collections, which then walk only
    # what serving creates. Without this, each one walks every object of the
    # process and stops the loop for 10-50 ms.
    gc.collect()
    gc.freeze()
    uvloop.run(_main())
    return 0
