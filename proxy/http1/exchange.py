"""One request and its response: the events the pod connection reports
(head, body, end, failure, upgrade) turned into bytes for the client, and
the decision to retry on the next candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..assignment import Pod, Route
from . import wire
from .rewrite import rewrite_response

if TYPE_CHECKING:
    from ..routing import RoutingTable
    from .client import ClientProtocol
    from .upstream import UpstreamConnection

_NO_BODY_STATUS = frozenset({204, 304})


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
        lines, codings, upgrade_value = rewrite_response(headers)
        parts = [wire.status_line(status, reason), lines]
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
            if self.upgrade or not self.req_done or not self.keep_alive or client.last_while_draining():
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

    def upstream_done(self, conn: UpstreamConnection, reusable: bool) -> None:
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

    def retry_safe(self, after_send: bool) -> bool:
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
