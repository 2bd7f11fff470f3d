"""HTTP/1.1 wire constants and small builders shared by both sides of the proxy.

Everything here is computed once at import; the hot path only looks things up.
"""

from __future__ import annotations

import asyncio
import re
import socket
from http import HTTPStatus
from typing import Any

import orjson

# RFC 9110 §7.6.1 hop-by-hop headers, plus the legacy ones proxies still see.
# Lower-case names; the client's and the pod's copies never cross the proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

CRLF = b"\r\n"
CHUNK_END = b"0\r\n\r\n"
# Methods a failed reused connection may safely be retried with (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[508] = b"Loop Detected"
_REASONS[431] = b"Request Header Fields Too Large"

STATUS_LINE = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}


def status_line(code: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINE.get(code)
    if line is not None and (not reason or reason == _REASONS[code]):
        return line
    return b"HTTP/1.1 %d %s\r\n" % (code, reason or _REASONS.get(code, b"Unknown"))


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small heads and bodies must leave at once, not wait for Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def drop_named(lines: list[bytes], start: int, names: set[bytes] | list[bytes]) -> list[bytes]:
    """``lines[start:]`` are "Name: value" header lines: leave out those whose
    name a Connection header listed (they are hop-by-hop too)."""
    return lines[:start] + [line for line in lines[start:] if line.split(b":", 1)[0].lower() not in names]


_TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"


def chunked_after(codings: bytes) -> bytes:
    """The Transfer-Encoding line for a body relayed chunked: the pod's other
    transfer codings (e.g. gzip), if any, then chunked."""
    if not codings:
        return _TE_CHUNKED
    kept = [c for c in (c.strip() for c in codings.split(b",")) if c and c.lower() != b"chunked"]
    if not kept:
        return _TE_CHUNKED
    return b"Transfer-Encoding: " + b", ".join(kept) + b", chunked\r\n"


# RFC 9110 §7.2 / RFC 3986 §3.2.2: uri-host [":" port].
_HOST = re.compile(rb"(?:\[[0-9A-Za-z:.%~_-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)([^#]*)")


def valid_host(value: bytes) -> bool:
    """A Host value is ``uri-host[:port]`` (empty is allowed)."""
    return _HOST.fullmatch(value) is not None


def origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes] | None:
    """A request target that is not a path: ``*`` (OPTIONS only) comes back
    as is with no authority; an absolute http(s) URL as (origin-form path,
    authority) (RFC 9112 §3.2); anything else is None (refuse it)."""
    if target == b"*":
        return (target, b"") if method == b"OPTIONS" else None
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        return None
    authority, rest = m.groups()
    if not authority or b"@" in authority or not valid_host(authority):
        return None  # userinfo in a request target is refused (RFC 9110 §4.2.4)
    if not rest:
        rest = b"*" if method == b"OPTIONS" else b"/"
    elif rest[:1] == b"?":
        rest = b"/" + rest
    return rest, authority


def request_codings(codings: bytes) -> bytes | None:
    """A request's Transfer-Encoding (all its headers joined), normalized for
    the pod: the coding names lower-cased and comma-joined, parameters and
    ``identity`` left out, ``chunked`` once and last. None if it is not that
    (refuse the request)."""
    if codings.lower() == b"chunked":
        return b"chunked"
    names = [c.partition(b";")[0].strip().lower() for c in codings.split(b",")]
    kept = [n for n in names if n and n != b"identity"]  # empty list elements: RFC 9110 §5.6.1
    if not kept or kept[-1] != b"chunked" or kept.count(b"chunked") != 1:
        return None
    return b", ".join(kept)


# Header names some servers fold together (CGI maps "-" and "_" alike): a
# look-alike of one the proxy controls is dropped, not passed on.
_LOOKALIKE = re.compile(rb"[-_]+")
_CONTROLLED = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}


def lookalike(lname: bytes, key_name: bytes) -> bool:
    """``Transfer_Encoding``, ``X_Routing_Key``: a lower-case header name with
    ``_`` or repeated ``-`` that folds onto a header the proxy controls or the
    routing key's (but is not that header itself)."""
    if lname == key_name:
        return False
    folded = _LOOKALIKE.sub(b"-", lname)
    return folded in _CONTROLLED or folded.startswith(b"x-keyroute-") or folded == _LOOKALIKE.sub(b"-", key_name)


def via_names(via: bytes, token: bytes) -> bool:
    """True if one of the Via entries was received by ``token`` (lower-case):
    a whole received-by field, not a substring (``keyroute-edge`` is not
    ``keyroute``)."""
    for entry in via.split(b","):
        fields = entry.split()
        if len(fields) >= 2 and fields[1].lower() == token:
            return True
    return False


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive", b"upgrade"})


def connection_tokens(value: bytes) -> list[bytes]:
    """Header names listed in a Connection header, lower-case, leaving out the
    ones that are hop-by-hop anyway (the common "keep-alive", "close")."""
    if value.lower() in _PLAIN_CONNECTION:
        return []
    tokens = (t.strip().lower() for t in value.split(b","))
    return [t for t in tokens if t and t not in HOP_BY_HOP and t not in _PLAIN_CONNECTION]


def error_response(
    status: int,
    error: str,
    detail: str,
    generation: int | None,
    *,
    close: bool,
    extra: bytes = b"",
    fields: dict[str, Any] | None = None,
    head: bool = False,
) -> bytes:
    """A whole JSON error response made by the proxy itself (without its body
    when it answers a HEAD request)."""
    doc: dict[str, Any] = {"error": error, "detail": detail, "generation": generation}
    if fields:
        doc.update(fields)
    body = orjson.dumps(doc) + b"\n"
    head_lines = [
        status_line(status),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if close:
        head_lines.append(b"Connection: close\r\n")
    head_lines.append(extra)
    head_lines.append(CRLF)
    if not head:
        head_lines.append(body)
    return b"".join(head_lines)
