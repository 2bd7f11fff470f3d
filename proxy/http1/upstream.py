"""Connections to pods: per-pod pools of keep-alive HTTP/1.1 connections.

An ``UpstreamConnection`` parses responses with httptools and hands the events
to the ``Exchange`` it currently serves (see ``server.py``), which writes them
to the client. A connection goes back to its pool only when both the request
and the response ended cleanly; anything odd (bad framing, a timeout, an
unfinished body, an upgrade, bytes after a bodiless response) discards it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import httptools

from . import wire

if TYPE_CHECKING:
    from .exchange import Exchange


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing at a message boundary."""


class UpstreamConnection:
    """One TCP connection to a pod."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "exchange",
        "headers",
        "reason",
        "resp_length",
        "resp_chunked",
        "interim",
        "in_body",
        "reused",
        "idle_since",
        "closed",
        "got_bytes",
        "deadline",
        "timer",
        "tunnel",
        "head_only",
        "loop",
        "paused",
        "eof",
        "write_blocked",
        "head_end",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.resp_length = -1
        self.resp_chunked = False
        self.interim = False
        self.in_body = False
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.got_bytes = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.tunnel = False
        self.head_only = False
        self.paused = False
        self.eof = False
        self.write_blocked = False  # the pod is not reading what we send
        self.head_end = False  # a bodiless response ended at its head

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        wire.set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes from a pod with no request outstanding: the framing is off.
            self.discard()
            return
        if self.tunnel:
            ex.client_write(data)
            return
        self.got_bytes = True
        if self.deadline:
            self.deadline = self.loop.time() + self.pool.response_timeout
        client = ex.client
        client.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0]
            self.tunnel = True
            self._cancel_timer()
            ex.upstream_upgraded(self, data[offset:])
        except httptools.HttpParserError as exc:
            if self.head_end:
                self._end_at_head(ex, data)
            # A callback that raised _StopParsing ended the exchange itself and
            # discarded the connection; anything else is the pod's fault.
            elif self.exchange is ex and not self.closed:
                self.discard()
                ex.upstream_failed(self, 502, "bad_response", f"pod {self.pool.pod_id} sent bad HTTP: {exc}")
        finally:
            client.uncork()

    def _end_at_head(self, ex: Exchange, data: bytes) -> None:
        """A response to HEAD ended with its head, whatever its framing headers
        say. httptools cannot be told that, so parsing stopped there: the
        connection stays usable with a new parser if the head was the last
        thing the pod sent (a pod that sent a body anyway is discarded)."""
        self.head_end = False
        reusable = self.parser.should_keep_alive() and data.endswith(b"\r\n\r\n")
        self.parser = httptools.HttpResponseParser(self)
        self.in_body = False
        if not reusable:
            self.exchange = None
            self.discard()
        ex.upstream_done(self, reusable=reusable)

    def eof_received(self) -> bool | None:
        ex = self.exchange
        if ex is not None and self.tunnel:
            self.eof = True
            ex.client_write_eof()
            return None if self.closed else True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        ex = self.exchange
        self.exchange = None
        if ex is None:
            return
        if self.tunnel:
            ex.upstream_tunnel_closed()
        elif self.in_body and self.resp_length < 0 and not self.resp_chunked:
            # Response delimited by the connection's close: this is its end.
            ex.upstream_done(self, reusable=False)
        else:
            detail = f"pod {self.pool.pod_id} closed the connection"
            if exc is not None:
                detail += f" ({exc.__class__.__name__}: {exc})"
            ex.upstream_failed(self, 502, "pod_closed", detail)

    def pause_writing(self) -> None:
        self.write_blocked = True
        if self.exchange is not None:
            self.exchange.client.pause_reading_for(2)

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.exchange is not None:
            self.exchange.client.resume_reading_for(2)

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.resp_length = -1
        self.resp_chunked = False

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:
            return  # trailers: dropped
        n = len(name)
        lname = name.lower() if n == 14 or n == 17 else b""  # the two framing headers' lengths
        if lname == b"content-length":
            self.resp_length = int(value)
        elif lname == b"transfer-encoding":
            # Chunked only if chunked is the final coding; otherwise the body
            # runs to the connection's close (RFC 9112 §6.3).
            self.resp_chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self.interim = True
            ex.upstream_interim(status, self.reason, self.headers)
            return
        if status == 101 and not ex.upgrade:
            self.exchange = None
            self.discard()
            ex.upstream_failed(
                self, 502, "bad_response", f"pod {self.pool.pod_id} switched protocols on a request that asked for none"
            )
            raise _StopParsing
        self.in_body = True
        ex.upstream_head(self, status, self.reason, self.headers)
        if self.exchange is not ex:
            raise _StopParsing  # the exchange let go of this connection (to retry elsewhere)
        if self.head_only and status != 101:
            # A response to HEAD has no body whatever its headers say: stop
            # here; data_received ends the exchange (see _end_at_head).
            self.head_end = True
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        ex = self.exchange
        self.in_body = False
        if ex is None or self.tunnel or self.parser.should_upgrade():
            return  # after a 101 the tunnel starts; feed_data raises HttpParserUpgrade next
        ex.upstream_done(self, reusable=self.parser.should_keep_alive())

    # -- use by the exchange ----------------------------------------------

    def send(self, ex: Exchange, data: bytes, head_only: bool) -> None:
        """Start serving ``ex``: write its request head (and any buffered body)."""
        self.exchange = ex
        self.head_only = head_only
        self.got_bytes = False
        self.deadline = self.loop.time() + self.pool.response_timeout
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        """More of the request body: the response deadline counts from the
        last byte sent, not from the head."""
        assert self.transport is not None
        self.transport.write(data)
        if self.deadline:
            self.deadline = self.loop.time() + self.pool.response_timeout

    def writelines(self, data: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        """The client reads slowly: stop reading from the pod (and stop its clock)."""
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        """The exchange is over and the connection is clean: back to the pool."""
        self.exchange = None
        self.deadline = 0.0
        self.reused = True
        if self.paused:
            self.resume_reading()
        self.pool.put(self)

    def discard(self) -> None:
        """Close without reuse (abort: a half-sent message must not linger)."""
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            if self.transport is not None:
                self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed or not self.deadline:
            return
        now = self.loop.time()
        ex = self.exchange
        if self.paused or (ex is not None and not ex.req_done and not self.write_blocked):
            # Waiting on the client (to read the response, or to send the rest
            # of its request body), not on the pod.
            self.deadline = now + self.pool.response_timeout
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.exchange = None
        self.discard()
        if ex is not None:
            ex.upstream_failed(
                self,
                504,
                "pod_timeout",
                f"pod {self.pool.pod_id} sent no response within {self.pool.response_timeout:g}s",
            )


class Pool:
    """Idle keep-alive connections to one pod, most recently used first."""

    __slots__ = (
        "loop",
        "pod_id",
        "host",
        "port",
        "idle",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "max_idle",
        "opened",
        "closed",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pod_id: str,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        response_timeout: float,
        idle_timeout: float,
        max_idle: int,
    ) -> None:
        self.loop = loop
        self.pod_id = pod_id
        self.host = host
        self.port = port
        self.idle: list[UpstreamConnection] = []
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.opened = 0
        self.closed = False  # pruned: its pod left the table

    def take(self) -> UpstreamConnection | None:
        """An idle connection, or None if a new one must be opened."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= self.max_idle:
            conn.discard()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    async def connect(self) -> UpstreamConnection:
        """Open a new connection; raises OSError or TimeoutError."""
        # Not an asyncio.Protocol subclass (a compiled class cannot be one),
        # but it has every method the loop calls.
        factory = lambda: cast(asyncio.Protocol, UpstreamConnection(self))  # noqa: E731
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await self.loop.create_connection(factory, self.host, self.port)
        self.opened += 1
        return cast(UpstreamConnection, conn)

    def sweep(self, now: float) -> None:
        """Close idle connections older than ``idle_timeout``."""
        if not self.idle:
            return
        limit = now - self.idle_timeout
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if conn.idle_since < limit:
                conn.discard()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.discard()
        self.idle = []


class Upstreams:
    """All pools, keyed by pod address, shared by every client connection of a
    worker. Pools outlive tables: a pod that keeps its address keeps its
    connections across reloads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Any) -> None:
        self.loop = loop
        self.settings = settings
        self.pools: dict[tuple[str, int], Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def pool(self, pod_id: str, host: str, port: int) -> Pool:
        key = (host, port)
        pool = self.pools.get(key)
        if pool is None:
            s = self.settings
            pool = self.pools[key] = Pool(
                self.loop,
                pod_id,
                host,
                port,
                connect_timeout=s.connect_timeout,
                response_timeout=s.response_timeout,
                idle_timeout=s.idle_timeout,
                max_idle=s.max_idle_per_pod,
            )
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(1.0, self._sweep)
        return pool

    def prune(self, addresses: set[tuple[str, int]]) -> None:
        """Close the pools of addresses no pod of the table in force has.
        Connections serving a request finish it and are then discarded."""
        for key in [k for k in self.pools if k not in addresses]:
            self.pools.pop(key).close()

    def _sweep(self) -> None:
        now = self.loop.time()
        for pool in self.pools.values():
            pool.sweep(now)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self.pools.values():
            pool.close()
