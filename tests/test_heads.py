"""The request-head rewrite on its own (proxy/http1/heads.py): hypothesis
heads of every header-name class, through llhttp as the proxy parses them,
then the invariants of what reaches the pod, checked by parsing the output
with llhttp again."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import import_module
from typing import Any

import httptools
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.http1 import heads as heads_module
from proxy.http1 import wire
from proxy.http1.heads import RequestHead, RequestPolicy, rewrite_request

POLICY = RequestPolicy()
CONTROLLED = {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"via"}


class _Collect:
    """httptools callbacks: what ClientProtocol keeps of a request head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def parse_head(raw: bytes) -> tuple[Any, _Collect] | None:
    """Parse a request head as the proxy does (same leniencies); None if llhttp refuses it."""
    got = _Collect()
    parser = httptools.HttpRequestParser(got)
    parser.set_dangerous_leniencies(lenient_version=True, lenient_spaces_after_chunk_size=True)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return (parser, got) if got.done else None


def rewrite(
    raw: bytes, policy: RequestPolicy = POLICY, rewriter: Callable[..., RequestHead] = rewrite_request
) -> RequestHead | None:
    """``raw`` through llhttp, then the rewrite as ClientProtocol calls it; None if llhttp refuses it."""
    parsed = parse_head(raw)
    if parsed is None:
        return None
    parser, got = parsed
    return rewriter(
        parser.get_method(),
        got.url,
        parser.get_http_version(),
        parser.should_keep_alive(),
        parser.should_upgrade(),
        got.headers,
        policy,
        b"127.0.0.1",
    )


def casing(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if u else c.lower() for c, u in zip(name, ups, strict=True))
    )


NAMES = st.one_of(
    st.sampled_from(
        [
            "Content-Length",
            "Transfer-Encoding",
            "Host",
            "Connection",
            "Upgrade",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Proxy-Connection",
            "Via",
            "X-Forwarded-For",
            "X-Forwarded-Host",
            "X-Forwarded-Proto",
            "X-Keyroute-Epoch",
            "X-Keyroute-Role",
            "X-Routing-Key",
            "Transfer_Encoding",
            "Content__Length",
            "X_Routing_Key",
            "X-Custom",
            "Accept",
        ]
    ).flatmap(casing),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,12}", fullmatch=True),
)
VALUES = st.one_of(
    st.sampled_from(
        ["0", "5", "chunked", "gzip, chunked", "close", "keep-alive, x-custom", "upgrade", "websocket", "t", "a:80", ""]
    ),
    st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0xFF), max_size=8),
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=12)
LINES = st.tuples(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE"]),
    st.sampled_from(["/", "/a?b=c", "*", "http://h.example/x", "HTTP://h:8/", "x"]),
    st.sampled_from(["1.1", "1.1", "1.0", "1.2", "2.0"]),
)


def build(line: tuple[str, str, str], headers: list[tuple[str, str]]) -> bytes:
    method, target, version = line
    head = f"{method} {target} HTTP/{version}\r\n".encode()
    for name, value in headers:
        head += name.encode() + b": " + value.encode("latin-1") + b"\r\n"
    return head + b"\r\n"


@settings(max_examples=400, deadline=None)
@given(LINES, HEADERS)
def test_what_reaches_the_pod_is_one_unambiguous_request(
    line: tuple[str, str, str], headers: list[tuple[str, str]]
) -> None:
    raw = build(line, headers)
    h = rewrite(raw)
    assume(h is not None)
    assert h is not None
    if h.reject is not None or h.refuse is not None:
        status = (h.reject or h.refuse or (0,))[0]
        assert 400 <= status < 600
        return
    out = h.head + (b"" if h.host_given else b"Host: 10.0.0.1:80\r\n") + b"X-Keyroute-Pod: p\r\n\r\n"
    parsed = parse_head(out)
    assert parsed is not None, out  # llhttp reads it back
    parser, got = parsed
    assert parser.get_http_version() == "1.1" and parser.get_method() == h.method
    assert got.url == h.url and (got.url[:1] == b"/" or got.url == b"*")
    names = [n.lower() for n, _ in got.headers]
    assert names.count(b"host") == 1
    assert names.count(b"content-length") <= 1
    assert not (b"content-length" in names and b"transfer-encoding" in names)
    for hop in wire.HOP_BY_HOP - {b"transfer-encoding", b"connection", b"upgrade"}:
        assert hop not in names
    if h.chunked:
        (te,) = [v for n, v in got.headers if n.lower() == b"transfer-encoding"]
        assert te.split(b", ")[-1] == b"chunked" and te.count(b"chunked") == 1
    else:
        assert b"transfer-encoding" not in names
    assert [n for n in names if n.startswith(b"x-keyroute-")] == [b"x-keyroute-pod"]
    assert not [n for n in names if (b"_" in n or b"--" in n) and wire.lookalike(n, POLICY.key_name)]
    assert names.count(b"x-routing-key") <= 1
    via = [v for n, v in got.headers if n.lower() == b"via"]
    assert len(via) == 1 and via[0].endswith(b" keyroute")
    assert (b"upgrade" in names) == h.upgrade
    # The key is the client's, unchanged (or absent).
    sent_keys = [v.encode("latin-1") for n, v in headers if n.lower() == "x-routing-key"]
    if h.key is not None:
        assert sent_keys == [h.key]


@given(LINES, HEADERS)
def test_rewrite_is_a_function_of_its_input(line: tuple[str, str, str], headers: list[tuple[str, str]]) -> None:
    raw = build(line, headers)
    first, second = rewrite(raw), rewrite(raw)
    assume(first is not None)
    assert first is not None and second is not None
    assert first.facts() == second.facts()


def test_examples() -> None:
    h = rewrite(b"GET http://a.example:8/p?q HTTP/1.1\r\nHost: other\r\nX-Routing-Key: k\r\n\r\n")
    assert h is not None and h.reject is None and h.host_given and h.key == b"k"
    assert h.head.startswith(b"GET /p?q HTTP/1.1\r\nHost: a.example:8\r\n")
    h = rewrite(b"GET / HTTP/1.0\r\nX-Routing-Key: k\r\n\r\n")
    assert h is not None and not h.host_given and b"Host:" not in h.head and not h.http11
    h = rewrite(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert h is not None and h.chunked and b"Transfer-Encoding: gzip, chunked\r\n" in h.head
    h = rewrite(b"GET / HTTP/1.1\r\nHost: t\r\nVia: 1.1 keyroute\r\n\r\n")
    assert h is not None and h.refuse is not None and h.refuse[1] == "loop_detected"
    h = rewrite(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    assert h is not None and h.reject is not None and h.reject[0] == 505


POLICIES = st.builds(
    RequestPolicy,
    get_body=st.sampled_from(["reject", "forward"]),
    allow_empty_key=st.booleans(),
    max_header_bytes=st.sampled_from([1024, 65536]),
    max_body_bytes=st.sampled_from([0, 3, 100]),
    via=st.sampled_from(["keyroute", "edge"]),
    key_header=st.sampled_from(["X-Routing-Key", "X-Tenant"]),
)


@settings(max_examples=500, deadline=None)
@given(LINES, HEADERS, POLICIES)
def test_compiled_twin_gives_identical_bytes_and_facts(
    line: tuple[str, str, str], headers: list[tuple[str, str]], policy: RequestPolicy
) -> None:
    # The compiled twin is built by `pip install -e .` (CI builds it); a
    # missing build fails here rather than passing unnoticed.
    from proxy.http1 import _cheads, heads

    raw = build(line, headers)
    compiled = rewrite(raw, policy, _cheads.rewrite_request)
    assume(compiled is not None)
    pure = rewrite(raw, policy, heads.rewrite_request)
    assert compiled is not None and pure is not None
    assert compiled.facts() == pure.facts()


def test_native_path_is_the_one_in_use_unless_turned_off() -> None:
    from proxy import native
    from proxy.http1 import rewrite

    if os.environ.get(native.NO_EXTENSIONS_ENV):
        assert native.ACTIVE is False and rewrite.rewrite_request is heads_module.rewrite_request
        assert native.NO_EXTENSIONS_ENV in native.WHY_NOT
        assert all(str(import_module(m).__file__).endswith(".py") for m in native.COMPILED)
    else:
        assert native.ACTIVE is True and native.WHY_NOT == ""
        assert rewrite.rewrite_request.__module__ == "proxy.http1._cheads"
        # Every compiled module is the extension, not its source.
        assert not any(str(import_module(m).__file__).endswith(".py") for m in native.COMPILED)


# -- the response head ----------------------------------------------------------

RESPONSE_NAMES = st.sampled_from(
    [
        *sorted(n.decode() for n in wire.HOP_BY_HOP),
        "content-length",
        "content-type",
        "x-keyroute-pod",
        "x-keyroute-generation",
        "x-keyroute",
        "x-pod",
        "te-x",
        "trailers",
        "set-cookie",
        "server",
        "date",
    ]
)


def _odd_case(draw: st.DrawFn, name: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in name)


@st.composite
def response_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Response headers as llhttp hands them over: any order, duplicates,
    odd casing, Connection values that name other headers or none."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(RESPONSE_NAMES)
        if name == "connection":
            value = draw(
                st.sampled_from(
                    ["keep-alive", "Close", "UPGRADE", "x-pod", "keep-alive, Set-Cookie", "te, trailer", ""]
                )
            )
        else:
            value = draw(st.text(alphabet="abc ,;=/\t0123456789", max_size=30)).strip()
        out.append((_odd_case(draw, name).encode(), value.encode()))
    return out


@settings(max_examples=1000, deadline=None)
@given(response_headers())
def test_compiled_response_rewrite_is_identical(headers: list[tuple[bytes, bytes]]) -> None:
    from proxy.http1 import _cheads, heads

    assert _cheads.rewrite_response(headers) == heads.rewrite_response(headers)


@given(response_headers())
def test_response_rewrite_keeps_only_end_to_end_headers(headers: list[tuple[bytes, bytes]]) -> None:
    lines, codings, upgrade = heads_module.rewrite_response(headers)
    kept = [line.split(b": ", 1)[0].lower() for line in lines.split(b"\r\n") if line]
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",") if t.strip()}
    for name in kept:
        assert name not in wire.HOP_BY_HOP and not name.startswith(b"x-keyroute-") and name not in named
    expected = [n.lower() for n, _ in headers]
    expected = [n for n in expected if n not in wire.HOP_BY_HOP and not n.startswith(b"x-keyroute-") and n not in named]
    assert kept == expected
    sent = [c for n, v in headers if n.lower() == b"transfer-encoding" for c in v.split(b",") if c]
    assert [c for c in codings.split(b",") if c] == sent
    ups = [v for n, v in headers if n.lower() == b"upgrade"]
    assert upgrade == (ups[-1] if ups else None)


HOST_TEXT = st.text(alphabet="ab9.-_~%!$&'()*+,;=:[]@/ \t\x00\xff", max_size=16)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(HOST_TEXT, HOST_TEXT.map(lambda t: "[" + t), HOST_TEXT.map(lambda t: "[" + t + "]:8")))
def test_compiled_host_check_is_the_regular_expression(text: str) -> None:
    from proxy.http1 import _cheads

    value = text.encode("latin-1")
    assert _cheads.host_is_valid(value) is wire.valid_host(value)


def test_host_check_examples() -> None:
    from proxy.http1 import _cheads

    for value, ok in [
        (b"", True),
        (b"a.example:8080", True),
        (b"[::1]:80", True),
        (b"[::1]", True),
        (b"[]", False),
        (b"[::1", False),
        (b"a b", False),
        (b"a:8x", False),
        (b"a@b", False),
        (b":", True),
    ]:
        assert wire.valid_host(value) is ok and _cheads.host_is_valid(value) is ok
