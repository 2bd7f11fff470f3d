"""One client connection: parse requests with httptools, rewrite each head
for its pod, route it by its key, and stream it to a pod connection; serve
pipelined requests one at a time, in order; hold the bytes after an Upgrade
until the pod agrees; turn a 101 into a tunnel.

Framing is never passed through blindly: request bodies are re-framed from
what the parser decoded (Content-Length as given, chunked re-chunked,
trailers dropped), and anything ambiguous is answered with 400 and the
connection is closed before a byte reaches a pod.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import TYPE_CHECKING, Any, NoReturn

import httptools
import orjson

from ..assignment import Pod
from . import wire
from .exchange import Exchange
from .rewrite import rewrite_request
from .upstream import Pool, UpstreamConnection

if TYPE_CHECKING:
    from ..runtime import Runtime

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


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the reason is on the protocol."""


class ClientProtocol:
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
            if self.head_bytes > self.runtime.request_policy.max_header_bytes:
                self._fail_connection(
                    431,
                    "headers_too_large",
                    f"request head exceeds {self.runtime.request_policy.max_header_bytes} bytes",
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
        parser = self.parser
        h = rewrite_request(
            parser.get_method(),
            ex.url,
            parser.get_http_version(),
            parser.should_keep_alive(),
            parser.should_upgrade(),
            ex.headers,
            rt.request_policy,
            self.peer,
        )
        ex.method = h.method
        ex.url = h.url
        ex.http11 = h.http11
        ex.keep_alive = h.keep_alive
        ex.close_after = h.close_after
        ex.req_length = h.req_length
        ex.req_chunked = h.chunked
        ex.upgrade = h.upgrade
        ex.body_left = h.body_left
        if h.reject is not None:
            self._reject(*h.reject)
        if h.refuse is not None:
            self._error(ex, *h.refuse)
            return
        key = h.key
        if rt.access_log_keys:
            ex.key = key
        table = rt.table
        if table is None:
            self._error(ex, 503, "no_table", "no assignment table is in force yet")
            return
        ex.table = table
        if key is not None:
            route = table.lookup(key)
        elif rt.missing_key == "reject":
            self._error(ex, 400, "missing_key", f"request has no {rt.settings.proxy.key_header} header")
            return
        elif rt.missing_key == "random":
            route = table.route_at(random.getrandbits(64))
        else:
            fixed = table.fixed_route(rt.missing_key[4:])
            if fixed is None:
                self._error(
                    ex, 503, "no_route", f"missing_key names pod {rt.missing_key[4:]!r}, which is not in the table"
                )
                return
            route = fixed
        ex.route = route
        if h.host_given:
            ex.head = h.head  # the X-Keyroute-* tag and the blank line follow at dispatch
        else:
            pod = route.pod
            ex.head = h.head + b"Host: %s:%d\r\n" % (pod.host.encode(), pod.port)
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
        limit = self.runtime.request_policy.max_body_bytes
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
        # (A slice bound past the data, not data[:body_left]: a body_left
        # beyond 2**63 is no index for the compiled module.)
        part = data if ex.body_left >= len(data) else data[: ex.body_left]
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

    def last_while_draining(self) -> bool:
        """Draining, and no further request of this connection has arrived:
        the response being started says Connection: close. (Requests already
        received, pipelined behind it, are served first.)"""
        return self.runtime.closing and not self.queue and self.parsing is None

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
        close = ex.close_after or not ex.keep_alive or not ex.req_done or self.last_while_draining() or ex.upgrade
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
