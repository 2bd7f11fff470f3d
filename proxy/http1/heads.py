"""Head rewriting, with no I/O: a parsed request head in, the bytes for the
pod and the facts routing needs out. The client protocol calls it once per
request; tests call it directly (and compare it with any faster twin).

What it guarantees about the bytes it returns (design.md, "What travels on
the wire"): one request line in origin-form and HTTP/1.1; exactly one Host;
framing the pod cannot read two ways (Content-Length as given, or
``Transfer-Encoding`` normalized to a list ending in ``chunked``); no
hop-by-hop header, no header named in Connection, no client-sent
``X-Keyroute-*`` and no look-alike of a header the proxy controls; Via and
X-Forwarded-* appended. Anything it cannot make unambiguous is refused.
"""

from __future__ import annotations

from . import wire

# Request headers that get special handling (lower-case name -> tag).
_H_DROP, _H_CL, _H_TE, _H_CONN, _H_VIA, _H_XFF, _H_HOST, _H_UPGRADE, _H_XF = range(9)
_SPECIAL = {name: _H_DROP for name in wire.HOP_BY_HOP}
_SPECIAL.update(
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
_NEVER_DROPPED = frozenset({b"content-length", b"host", b"transfer-encoding"})

Error = tuple[int, str, str]


class RequestPolicy:
    """The settings head rewriting depends on, computed once per worker."""

    __slots__ = (
        "key_name",
        "key_label",
        "via_token",
        "via_lower",
        "via_label",
        "reject_get_body",
        "allow_empty_key",
        "max_header_bytes",
        "max_body_bytes",
    )

    def __init__(
        self,
        *,
        key_header: str = "X-Routing-Key",
        via: str = "keyroute",
        get_body: str = "reject",
        allow_empty_key: bool = False,
        max_header_bytes: int = 65536,
        max_body_bytes: int = 0,
    ) -> None:
        self.key_name = key_header.lower().encode()
        self.key_label = key_header
        self.via_token = via.encode()
        self.via_lower = via.lower().encode()
        self.via_label = via
        self.reject_get_body = get_body == "reject"
        self.allow_empty_key = allow_empty_key
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes


class RequestHead:
    """What ``rewrite_request`` found. ``reject``: refuse and close (the byte
    stream cannot be trusted); ``refuse``: answer with this error (the
    connection may live on if the request has no body). Otherwise ``head`` is
    the request line and headers for the pod, without the X-Keyroute-* tag
    and the blank line, and without Host when ``host_given`` is false (an
    HTTP/1.0 request without one: the caller adds the pod's address)."""

    __slots__ = (
        "method",
        "url",
        "http11",
        "keep_alive",
        "close_after",
        "key",
        "req_length",
        "chunked",
        "upgrade",
        "body_left",
        "host_given",
        "head",
        "reject",
        "refuse",
    )

    def __init__(self, method: bytes, url: bytes) -> None:
        self.method = method
        self.url = url
        self.http11 = True
        self.keep_alive = True
        self.close_after = False
        self.key: bytes | None = None
        self.req_length = -1
        self.chunked = False
        self.upgrade = False
        self.body_left = 0  # body bytes of an Upgrade request, read by count
        self.host_given = False
        self.head = b""
        self.reject: Error | None = None
        self.refuse: Error | None = None

    def facts(self) -> tuple[object, ...]:
        """Everything it found, for comparing two rewriters."""
        return tuple(getattr(self, name) for name in self.__slots__)


def rewrite_request(
    method: bytes,
    url: bytes,
    version: str,
    keep_alive: bool,
    upgrading: bool,
    headers: list[tuple[bytes, bytes]],
    policy: RequestPolicy,
    peer: bytes,
) -> RequestHead:
    """Rewrite one request head for the pod. ``version`` is the parser's
    ("1.1"), ``keep_alive`` and ``upgrading`` its verdicts; ``peer`` the
    client's address for X-Forwarded-For."""
    h = RequestHead(method, url)
    size = len(url) + sum(len(n) + len(v) + 4 for n, v in headers)
    if size > policy.max_header_bytes:
        h.reject = (431, "headers_too_large", f"request head exceeds {policy.max_header_bytes} bytes")
        return h
    if version != "1.1":
        if version[0] != "1":
            h.reject = (505, "version_not_supported", f"HTTP/{version} is not supported; use HTTP/1.1")
            return h
        h.http11 = version != "1.0"  # HTTP/1.x with x > 1 is served as 1.1 (RFC 9110 §2.5)
    h.keep_alive = keep_alive
    # Whatever follows an Upgrade request is not HTTP: its answer ends the connection.
    h.close_after = upgrading
    if method == b"CONNECT":
        h.reject = (405, "method_not_allowed", "CONNECT is not supported by a reverse proxy")
        return h
    key_name = policy.key_name
    key: bytes | None = None
    keys = 0
    te = b""
    hosts = 0
    host = b""
    via = b""
    xff = b""
    upgrade = b""
    drop: list[bytes] | None = None
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    special = _SPECIAL
    for name, value in headers:
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
            value = value.strip(b" \t")  # trailing whitespace is the field's, not the number's
            if not value.isdigit():  # llhttp checks this too; the function does not rely on it
                h.reject = (400, "bad_request", "Content-Length is not a number")
                return h
            h.req_length = int(value)
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
    if hosts != 1 and (hosts or h.http11):
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1 (at most one in 1.0).
        h.reject = (400, "bad_host", "more than one Host header" if hosts else "HTTP/1.1 request without Host")
        return h
    if hosts and not wire.valid_host(host):
        h.reject = (400, "bad_host", f"Host is not a valid host[:port]: {host.decode('latin-1')!r}")
        return h
    if url[:1] != b"/":
        target = wire.origin_form(method, url)
        if target is None:
            h.reject = (
                400,
                "bad_request",
                "request target must be a path, an absolute http URL, or * for OPTIONS",
            )
            return h
        if target[0] != url:
            # Absolute-form: the pod gets origin-form and the authority as Host (RFC 9112 §3.2.2).
            url, host = target
            hosts = 1
            h.url = out[2] = url
    if te:
        if not h.http11:
            h.reject = (400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            return h
        codings = wire.request_codings(te)
        if codings is None:
            h.reject = (400, "bad_request", "Transfer-Encoding must end in chunked, once")
            return h
        te = codings
        h.chunked = True
    has_body = h.req_length > 0 or h.chunked
    if has_body and (method == b"GET" or method == b"HEAD") and policy.reject_get_body:
        # Servers disagree on whether such a body exists: one that ignores
        # it reads it as the next request.
        h.reject = (400, "bad_request", f'{method.decode()} with a body (set proxy.get_body = "forward" to allow it)')
        return h
    if keys > 1:
        h.reject = (400, "duplicate_key", f"more than one {policy.key_label} header")
        return h
    if upgrading and upgrade:
        if h.chunked:
            h.reject = (400, "bad_request", "an Upgrade request with a chunked body is not supported")
            return h
        if h.req_length > 0:
            # The parser hands a body of an Upgrade request over as the new
            # protocol's bytes: it is counted out by the caller, the request
            # goes on without the upgrade, and the connection ends after.
            h.body_left = h.req_length
        else:
            h.upgrade = True
    if drop:
        out = wire.drop_named(out, 4, set(drop) - _NEVER_DROPPED)
    if via and policy.via_lower in via.lower() and wire.via_names(via, policy.via_lower):
        h.refuse = (
            508,
            "loop_detected",
            f"request already passed through {policy.via_label} (Via: {via.decode('latin-1')})",
        )
        return h
    limit = policy.max_body_bytes
    if limit and h.req_length > limit:
        h.refuse = (413, "body_too_large", f"request body of {h.req_length} bytes exceeds {limit}")
        return h
    if key is not None and not key and not policy.allow_empty_key:
        key = None
    h.key = key
    if hosts:
        h.host_given = True
        out.insert(4, b"Host: " + host + b"\r\n")
    if te:
        out.append(b"Transfer-Encoding: " + te + b"\r\n")
    if h.upgrade:
        out.append(b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n")
    out.append(
        b"Via: " + (via + b", " if via else b"") + (b"1.1 " if h.http11 else b"1.0 ") + policy.via_token + b"\r\n"
    )
    out.append(b"X-Forwarded-For: " + (xff + b", " if xff else b"") + peer + b"\r\n")
    out.append(b"X-Forwarded-Proto: http\r\n")
    if hosts:
        out.append(b"X-Forwarded-Host: " + host + b"\r\n")
    h.head = b"".join(out)
    return h


def rewrite_response(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes | None]:
    """A pod's response headers as the client gets them: every "Name: value"
    line except hop-by-hop headers, the headers a Connection header names
    (RFC 9110 §7.6.1) and ``X-Keyroute-*`` (the proxy's own), in their order.
    Also returns what the framing needs: the Transfer-Encoding codings, joined
    with "," (b"" if none), and the last Upgrade value (None if none). The
    status line, framing lines and the proxy's tag are the caller's."""
    lines: list[bytes] = []
    drop: list[bytes] | None = None
    upgrade = None
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
                upgrade = value
            continue
        if lname.startswith(b"x-keyroute-"):
            continue
        lines.append(name + b": " + value + b"\r\n")
    if drop:
        lines = wire.drop_named(lines, 0, drop)
    return b"".join(lines), codings, upgrade
