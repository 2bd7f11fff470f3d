# cython: language_level=3
"""Compiled twin of ``heads.rewrite_request``: the same head in, the same
bytes and facts out (tests/test_heads.py holds the two to that), with the
per-header loop in C. ``heads.py`` stays the reference and the fallback
(``KEYROUTE_NO_EXTENSIONS=1``)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

from . import heads, wire

# The reference's tables, so the two cannot drift apart.
cdef dict _SPECIAL = heads._SPECIAL
cdef frozenset _NEVER_DROPPED = heads._NEVER_DROPPED
cdef int _H_CL = heads._H_CL, _H_TE = heads._H_TE, _H_CONN = heads._H_CONN, _H_VIA = heads._H_VIA
cdef int _H_XFF = heads._H_XFF, _H_HOST = heads._H_HOST, _H_UPGRADE = heads._H_UPGRADE
cdef bytes _CRLF = b"\r\n"


cdef class RequestHead:
    """``heads.RequestHead`` as a C type (see _cheads.pxd): the client
    protocol reads its fields as C struct members."""

    __slots__ = heads.RequestHead.__slots__

    def __init__(self, bytes method, bytes url):
        self.method = method
        self.url = url
        self.http11 = True
        self.keep_alive = True
        self.close_after = False
        self.key = None
        self.req_length = -1
        self.chunked = False
        self.upgrade = False
        self.body_left = 0
        self.host_given = False
        self.head = b""
        self.reject = None
        self.refuse = None

    def facts(self):
        """Everything it found, for comparing two rewriters."""
        return tuple(getattr(self, name) for name in heads.RequestHead.__slots__)


cdef inline bint _maybe_lookalike(bytes lname) noexcept:
    """``b"_" in lname or b"--" in lname``, as a C scan."""
    cdef const char* s = PyBytes_AS_STRING(lname)
    cdef Py_ssize_t n = len(lname)
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] == b"_" or (s[i] == b"-" and i + 1 < n and s[i + 1] == b"-"):
            return True
    return False


cdef inline bytes _line(bytes name, bytes value):
    """``name + b": " + value + b"\\r\\n"`` in one allocation."""
    cdef Py_ssize_t n = len(name)
    cdef Py_ssize_t m = len(value)
    cdef bytes line = PyBytes_FromStringAndSize(NULL, n + m + 4)
    cdef char* p = PyBytes_AS_STRING(line)
    memcpy(p, PyBytes_AS_STRING(name), n)
    p[n] = b":"
    p[n + 1] = b" "
    memcpy(p + n + 2, PyBytes_AS_STRING(value), m)
    p[n + m + 2] = b"\r"
    p[n + m + 3] = b"\n"
    return line


cdef inline bint _reg_name_char(unsigned char c) noexcept:
    # RFC 3986 reg-name: unreserved / pct-encoded / sub-delims (wire._HOST).
    return (
        (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        or c == b"." or c == b"_" or c == b"~" or c == b"-" or c == b"%"
        or c == b"!" or c == b"$" or c == b"&" or c == b"'" or c == b"(" or c == b")"
        or c == b"*" or c == b"+" or c == b"," or c == b";" or c == b"="
    )


cdef inline bint _ip_literal_char(unsigned char c) noexcept:
    return (
        (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        or c == b":" or c == b"." or c == b"%" or c == b"~" or c == b"_" or c == b"-"
    )


cdef bint valid_host(bytes value) noexcept:
    """``wire.valid_host`` without the regular expression: ``uri-host[:port]``
    (an IP literal in brackets, or a reg-name, possibly empty)."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = len(value)
    cdef Py_ssize_t i = 0
    if n and s[0] == b"[":
        i = 1
        while i < n and _ip_literal_char(s[i]):
            i += 1
        if i == 1 or i >= n or s[i] != b"]":
            return False
        i += 1
    else:
        while i < n and _reg_name_char(s[i]):
            i += 1
    if i < n:
        if s[i] != b":":
            return False
        i += 1
        while i < n and 48 <= s[i] <= 57:
            i += 1
    return i == n


def host_is_valid(bytes value):
    """``valid_host``, for the tests that hold it to ``wire.valid_host``."""
    return valid_host(value)


def rewrite_request(
    bytes method,
    bytes url,
    str version,
    bint keep_alive,
    bint upgrading,
    list headers,
    object policy,
    bytes peer,
):
    """See ``heads.rewrite_request``."""
    cdef RequestHead h = RequestHead(method, url)
    cdef Py_ssize_t size = len(url)
    cdef tuple pair
    cdef bytes name, value, lname
    for pair in headers:
        size += len(<bytes>pair[0]) + len(<bytes>pair[1]) + 4
    cdef Py_ssize_t max_head = policy.max_header_bytes
    if size > max_head:
        h.reject = (431, "headers_too_large", f"request head exceeds {max_head} bytes")
        return h
    cdef bint http11 = True
    if version != "1.1":
        if version[0] != "1":
            h.reject = (505, "version_not_supported", f"HTTP/{version} is not supported; use HTTP/1.1")
            return h
        http11 = version != "1.0"
        h.http11 = http11
    h.keep_alive = keep_alive
    h.close_after = upgrading
    if method == b"CONNECT":
        h.reject = (405, "method_not_allowed", "CONNECT is not supported by a reverse proxy")
        return h
    cdef bytes key_name = policy.key_name
    cdef object key = None
    cdef int keys = 0
    cdef bytes te = b""
    cdef int hosts = 0
    cdef bytes host = b""
    cdef bytes via = b""
    cdef bytes xff = b""
    cdef bytes upgrade = b""
    cdef object drop = None
    cdef object req_length = -1  # a Python int: llhttp allows up to 2**64 - 1
    cdef bint chunked = False
    cdef list out = [method, b" ", url, b" HTTP/1.1\r\n"]
    cdef dict special = _SPECIAL
    cdef object tag_obj
    cdef int tag
    for pair in headers:
        name = <bytes>pair[0]
        value = <bytes>pair[1]
        lname = name.lower()
        if lname == key_name:
            keys += 1
            key = value
        tag_obj = special.get(lname)
        if tag_obj is None:
            if lname.startswith(b"x-keyroute-"):
                continue
            if _maybe_lookalike(lname) and wire.lookalike(lname, key_name):
                continue
            out.append(_line(name, value))
            continue
        tag = <int>tag_obj
        if tag == _H_CL:
            value = value.strip(b" \t")
            if not value.isdigit():
                h.reject = (400, "bad_request", "Content-Length is not a number")
                return h
            req_length = int(value)
            out.append(b"Content-Length: " + value + _CRLF)
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
    h.req_length = req_length
    if hosts != 1 and (hosts or http11):
        h.reject = (400, "bad_host", "more than one Host header" if hosts else "HTTP/1.1 request without Host")
        return h
    if hosts and not valid_host(host):
        h.reject = (400, "bad_host", f"Host is not a valid host[:port]: {host.decode('latin-1')!r}")
        return h
    if url[:1] != b"/":
        target = wire.origin_form(method, url)
        if target is None:
            h.reject = (400, "bad_request", "request target must be a path, an absolute http URL, or * for OPTIONS")
            return h
        if target[0] != url:
            url, host = target
            hosts = 1
            h.url = url
            out[2] = url
    if te:
        if not http11:
            h.reject = (400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            return h
        codings = wire.request_codings(te)
        if codings is None:
            h.reject = (400, "bad_request", "Transfer-Encoding must end in chunked, once")
            return h
        te = codings
        chunked = True
        h.chunked = True
    if (req_length > 0 or chunked) and (method == b"GET" or method == b"HEAD") and policy.reject_get_body:
        h.reject = (400, "bad_request", f'{method.decode()} with a body (set proxy.get_body = "forward" to allow it)')
        return h
    if keys > 1:
        h.reject = (400, "duplicate_key", f"more than one {policy.key_label} header")
        return h
    cdef bint upgrade_on = False
    if upgrading and upgrade:
        if chunked:
            h.reject = (400, "bad_request", "an Upgrade request with a chunked body is not supported")
            return h
        if req_length > 0:
            h.body_left = req_length
        else:
            upgrade_on = True
            h.upgrade = True
    if drop:
        out = wire.drop_named(out, 4, set(drop) - _NEVER_DROPPED)
    cdef bytes via_lower = policy.via_lower
    if via and via_lower in via.lower() and wire.via_names(via, via_lower):
        h.refuse = (
            508,
            "loop_detected",
            f"request already passed through {policy.via_label} (Via: {via.decode('latin-1')})",
        )
        return h
    cdef object limit = policy.max_body_bytes
    if limit and req_length > limit:
        h.refuse = (413, "body_too_large", f"request body of {req_length} bytes exceeds {limit}")
        return h
    if key is not None and not key and not policy.allow_empty_key:
        key = None
    h.key = key
    if hosts:
        h.host_given = True
        out.insert(4, b"Host: " + host + _CRLF)
    if te:
        out.append(b"Transfer-Encoding: " + te + _CRLF)
    if upgrade_on:
        out.append(b"Connection: upgrade\r\nUpgrade: " + upgrade + _CRLF)
    cdef bytes received = (b"1.1 " if http11 else b"1.0 ") + <bytes>policy.via_token
    out.append(b"Via: " + (via + b", " if via else b"") + received + _CRLF)
    out.append(b"X-Forwarded-For: " + (xff + b", " if xff else b"") + peer + _CRLF)
    out.append(b"X-Forwarded-Proto: http\r\n")
    if hosts:
        out.append(b"X-Forwarded-Host: " + host + _CRLF)
    h.head = b"".join(out)
    return h


# -- the response head ---------------------------------------------------------

# What rewrite_response does with a header, by its name.
cdef enum:
    _KEEP = 0
    _DROP = 1  # hop-by-hop (wire.HOP_BY_HOP), or the proxy's own X-Keyroute-*
    _TE = 2
    _CONN = 3
    _UPGRADE = 4


cdef inline bint _named(const unsigned char* s, Py_ssize_t n, const char* lower, Py_ssize_t m) noexcept:
    """``s[:n].lower() == lower`` (ASCII, as bytes.lower())."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = s[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lower[i]:
            return False
    return True


cdef inline int _kind(bytes name) noexcept:
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = len(name)
    if n >= 11 and _named(s, 11, b"x-keyroute-", 11):
        return _DROP
    if n == 2:
        return _DROP if _named(s, n, b"te", 2) else _KEEP
    if n == 7:
        if _named(s, n, b"upgrade", 7):
            return _UPGRADE
        return _DROP if _named(s, n, b"trailer", 7) else _KEEP
    if n == 10:
        if _named(s, n, b"connection", 10):
            return _CONN
        return _DROP if _named(s, n, b"keep-alive", 10) else _KEEP
    if n == 16:
        return _DROP if _named(s, n, b"proxy-connection", 16) else _KEEP
    if n == 17:
        return _TE if _named(s, n, b"transfer-encoding", 17) else _KEEP
    return _KEEP


cdef inline bint _plain_connection(bytes value) noexcept:
    """A Connection value that names no header (wire.connection_tokens gives [])."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = len(value)
    return _named(s, n, b"keep-alive", 10) or _named(s, n, b"close", 5) or _named(s, n, b"upgrade", 7)


def rewrite_response(list headers):
    """See ``heads.rewrite_response``: the kept lines are copied into one
    bytes object sized in a first pass."""
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t n
    cdef tuple pair
    cdef bytes name, value
    cdef int kind
    cdef bytes codings = b""
    cdef object upgrade = None
    for pair in headers:
        name = <bytes>pair[0]
        value = <bytes>pair[1]
        kind = _kind(name)
        if kind == _KEEP:
            size += len(name) + len(value) + 4
        elif kind == _TE:
            codings = value if not codings else codings + b"," + value
        elif kind == _CONN:
            if not _plain_connection(value) and wire.connection_tokens(value):
                return heads.rewrite_response(headers)  # headers named in Connection: rare
        elif kind == _UPGRADE:
            upgrade = value
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    for pair in headers:
        name = <bytes>pair[0]
        if _kind(name) != _KEEP:
            continue
        value = <bytes>pair[1]
        n = len(name)
        memcpy(p, PyBytes_AS_STRING(name), n)
        p += n
        p[0] = b":"
        p[1] = b" "
        p += 2
        n = len(value)
        memcpy(p, PyBytes_AS_STRING(value), n)
        p += n
        p[0] = b"\r"
        p[1] = b"\n"
        p += 2
    return out, codings, upgrade
