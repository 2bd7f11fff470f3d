"""The request-smuggling corpus and what a pod behind a proxy makes of it.

Shared by ``tests/test_smuggling.py`` (keyroute only, in process) and
``bench/smuggling.py`` (keyroute, HAProxy and nginx as processes). No pytest
and no keyroute imports here: only the corpus, a recording pod and the rules
that turn what the pod received into an outcome.

The pod parses its byte stream the way a lenient origin server would
(``Transfer-Encoding`` ending in ``chunked`` wins over ``Content-Length``,
header names trimmed, chunk sizes read as their leading hex digits), answers
every request it finds with ``200 ok`` and keeps the connection, so that any
disagreement between the proxy's framing and the pod's shows up as a second
request or as bytes left over. Separately, every request the pod received is
checked against RFC 9110/9112 (``problems``): a request with no problems is
well-formed with unambiguous framing.

A request the proxy itself parsed carries the proxy's ``X-Forwarded-For``
(keyroute, HAProxy ``option forwardfor`` and the nginx bench config all add
one ending in the client address 127.0.0.1); a request without it reached the
pod without the proxy seeing it: smuggled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TIERS = ("compliant", "acceptable", "ambiguous", "severe")
EXPECTS = ("pass", "normalize", "reject")

# ---------------------------------------------------------------- the corpus

_FILL = re.compile(r"\{x\*(\d+)\}")


@dataclass(frozen=True)
class Vector:
    """One corpus entry. ``request`` is sent in one write."""

    id: str
    tier: str
    expect: str  # pass | normalize | reject
    request: bytes
    source: str
    status: int | None = None  # the exact status a rejection must have
    pod: dict[str, str] = field(default_factory=dict)  # pass: target / host the pod must see
    note: str = ""


def expand(text: str) -> bytes:
    """A corpus request string as bytes: ``{x*N}`` is N bytes of ``x``, the
    rest is UTF-8 (as in the AWS harness: ``\\xA0`` is the bytes C2 A0)."""
    return _FILL.sub(lambda m: "x" * int(m.group(1)), text).encode("utf-8")


def load_corpus(folder: Path = HERE) -> list[Vector]:
    """Every vector of every ``*.yaml`` file in folder, in file order; ids are unique."""
    out: list[Vector] = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load(path.read_text(encoding="utf-8"))):
            where = f"{path.name}[{i}]"
            vid = doc["id"]
            if vid in seen:
                raise ValueError(f"{where}: duplicate id {vid!r}")
            seen.add(vid)
            if doc["tier"] not in TIERS or doc["expect"] not in EXPECTS:
                raise ValueError(f"{where} ({vid}): tier {doc['tier']!r} / expect {doc['expect']!r}")
            out.append(
                Vector(
                    id=vid,
                    tier=doc["tier"],
                    expect=doc["expect"],
                    request=expand(doc["request"]),
                    source=doc.get("source", path.name),
                    status=doc.get("status"),
                    pod=dict(doc.get("pod") or {}),
                    note=doc.get("note", ""),
                )
            )
    return out


# ---------------------------------------------------------------- parsing

TCHAR = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
FIELD_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]([\x20\x21-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?\Z")
TARGET = re.compile(rb"/[\x21-\x7e\x80-\xff]*\Z")  # raw UTF-8 paths pass (AWS: Compliant)
ABSOLUTE = re.compile(rb"(?i)https?://([^/?#]*)([^#]*)\Z")
VERSION = re.compile(rb"HTTP/1\.[01]\Z")
HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?\Z")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF, with BWS around ";" and "=".
_EXT = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]{1,16}(?:" + _EXT + rb")*\r\n\Z")
HEX = re.compile(rb"[0-9A-Fa-f]+")
FRAMING = {b"content-length", b"transfer-encoding"}


class Incomplete(Exception):
    """The bytes end before the request does."""


class Garbage(Exception):
    """The pod cannot frame these bytes (it would answer 400 and close)."""


@dataclass
class Request:
    """One request as a lenient origin server framed it."""

    raw: bytes
    method: bytes = b""
    target: bytes = b""
    version: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    chunk_lines: list[bytes] = field(default_factory=list)  # each with its line end
    chunk_data_ends: list[bytes] = field(default_factory=list)  # what followed each chunk's data
    trailers: list[bytes] = field(default_factory=list)
    line_ends: list[bytes] = field(default_factory=list)  # head lines, each with its line end
    folded: bool = False

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.strip(b" \t").lower() == name]

    @property
    def path(self) -> str:
        return self.target.decode("latin-1")

    @property
    def stamped(self) -> bool:
        """Parsed by the proxy: it added its X-Forwarded-For."""
        return any(v.strip().endswith(b"127.0.0.1") for v in self.all(b"x-forwarded-for"))


def _line(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The line at pos with its terminator, and the position after it."""
    nl = buf.find(b"\n", pos)
    if nl < 0:
        raise Incomplete
    return buf[pos : nl + 1], nl + 1


def parse_one(buf: bytes, pos: int = 0) -> tuple[Request, int]:
    """Frame one request starting at pos (empty lines before it are skipped);
    returns it and the position after it."""
    start = pos
    line, pos = _line(buf, pos)
    while line in (b"\r\n", b"\n"):
        line, pos = _line(buf, pos)
    req = Request(raw=b"")
    req.line_ends.append(line)
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) == 3:
        req.method, req.target, req.version = parts
    else:
        req.method = parts[0]
        req.target = b" ".join(parts[1:-1]) if len(parts) > 2 else (parts[1] if len(parts) > 1 else b"")
        req.version = parts[-1] if len(parts) > 2 else b""
    while True:
        line, pos = _line(buf, pos)
        if line in (b"\r\n", b"\n"):
            break
        req.line_ends.append(line)
        text = line.rstrip(b"\r\n")
        if text[:1] in (b" ", b"\t") and req.headers:
            req.folded = True
            name, value = req.headers[-1]
            req.headers[-1] = (name, value + b" " + text.strip(b" \t"))
            continue
        name, colon, value = text.partition(b":")
        req.headers.append((name if colon else text, value.strip(b" \t") if colon else b""))
    te = req.all(b"transfer-encoding")
    cl = req.all(b"content-length")
    if te:
        codings = [c.strip().lower() for c in b",".join(te).split(b",") if c.strip()]
        if not codings or codings[-1].split(b";")[0].strip() != b"chunked":
            raise Garbage("Transfer-Encoding without a final chunked")
        req.chunked = True
        pos = _chunked(buf, pos, req)
    elif cl:
        value = cl[0].strip()
        if not value.isdigit():
            raise Garbage(f"Content-Length {value!r}")
        n = int(value)
        if len(buf) < pos + n:
            raise Incomplete
        req.body = buf[pos : pos + n]
        pos += n
    req.raw = buf[start:pos]
    return req, pos


def _chunked(buf: bytes, pos: int, req: Request) -> int:
    body = []
    while True:
        line, pos = _line(buf, pos)
        req.chunk_lines.append(line)
        m = HEX.match(line.strip(b" \t\r\n").split(b";")[0].strip(b" \t"))
        if m is None:
            raise Garbage(f"chunk size line {line!r}")
        size = int(m.group(), 16)
        if size == 0:
            break
        if len(buf) < pos + size + 1:
            raise Incomplete
        body.append(buf[pos : pos + size])
        pos += size
        if buf[pos : pos + 2] == b"\r\n":
            req.chunk_data_ends.append(b"\r\n")
            pos += 2
        elif buf[pos : pos + 1] == b"\n":
            req.chunk_data_ends.append(b"\n")
            pos += 1
        elif len(buf) < pos + 2:
            raise Incomplete
        else:
            raise Garbage(f"no line end after chunk data: {buf[pos : pos + 8]!r}")
    while True:
        line, pos = _line(buf, pos)
        if line in (b"\r\n", b"\n"):
            break
        req.trailers.append(line)
    req.body = b"".join(body)
    return pos


@dataclass
class Stream:
    """What one connection delivered, framed: requests, then the bytes after
    the last complete one (``rest``), and why framing stopped if it did."""

    requests: list[Request]
    rest: bytes
    garbage: str | None


def parse_stream(buf: bytes) -> Stream:
    requests: list[Request] = []
    pos = 0
    while pos < len(buf):
        try:
            req, pos = parse_one(buf, pos)
        except Incomplete:
            break
        except Garbage as exc:
            return Stream(requests, buf[pos:], str(exc))
        requests.append(req)
    rest = buf[pos:]
    return Stream(requests, b"" if rest.strip(b"\r\n") == b"" else rest, None)


def problems(req: Request) -> list[str]:
    """Everything about req that RFC 9110/9112 forbids or that leaves its
    framing open to a second reading; empty for a well-formed request."""
    out: list[str] = []
    for line in req.line_ends:
        if not line.endswith(b"\r\n"):
            out.append(f"bare LF after {line[:40]!r}")
        if b"\r" in line[:-2]:
            out.append(f"bare CR in {line[:40]!r}")
    if req.folded:
        out.append("obs-fold")
    if not TCHAR.match(req.method):
        out.append(f"method {req.method!r}")
    if not VERSION.match(req.version):
        out.append(f"version {req.version!r}")
    if ABSOLUTE.match(req.target):
        out.append(f"absolute-form target {req.target!r}")
    elif not (TARGET.match(req.target) or (req.target == b"*" and req.method == b"OPTIONS")):
        out.append(f"request-target {req.target!r}")
    for name, value in req.headers:
        if not TCHAR.match(name):
            out.append(f"field name {name!r}")
        elif name.lower() not in FRAMING and re.sub(rb"[^a-z]", b"", name.lower()) in {
            b"contentlength",
            b"transferencoding",
        }:
            out.append(f"framing look-alike field {name!r}")
        if value and not FIELD_VALUE.match(value):
            out.append(f"field value {name!r}: {value!r}")
    te = [v for n, v in req.headers if n.lower() == b"transfer-encoding"]
    cl = [v for n, v in req.headers if n.lower() == b"content-length"]
    if te and cl:
        out.append("both Transfer-Encoding and Content-Length")
    if len(cl) > 1:
        out.append(f"{len(cl)} Content-Length fields")
    if cl and not (cl[0].isdigit() and len(cl[0]) <= 18):
        out.append(f"Content-Length {cl[0]!r}")
    if len(te) > 1:
        out.append(f"{len(te)} Transfer-Encoding fields")
    if te:
        codings = [c.strip(b" \t") for c in te[0].split(b",")]
        if codings[-1].lower() != b"chunked" or [c.lower() for c in codings].count(b"chunked") != 1 or b"" in codings:
            out.append(f"Transfer-Encoding {te[0]!r}")
        if req.version == b"HTTP/1.0":
            out.append("Transfer-Encoding on HTTP/1.0")
    if req.method in (b"GET", b"HEAD") and (te or (cl and cl[0] not in (b"0",))):
        out.append(f"{req.method.decode()} with a body")
    hosts = [v for n, v in req.headers if n.lower() == b"host"]
    if len(hosts) > 1:
        out.append(f"{len(hosts)} Host fields")
    elif not hosts and req.version == b"HTTP/1.1":
        out.append("no Host")
    for h in hosts:
        if not HOST.match(h):
            out.append(f"Host {h!r}")
    for line in req.chunk_lines:
        if not CHUNK_LINE.match(line):
            out.append(f"chunk line {line!r}")
    for end in req.chunk_data_ends:
        if end != b"\r\n":
            out.append(f"chunk data ended by {end!r}")
    for line in req.trailers:
        if not line.endswith(b"\r\n"):
            out.append(f"bare LF in trailer {line!r}")
        if line.split(b":")[0].strip().lower() in FRAMING | {b"host"}:
            out.append(f"trailer {line!r}")
    return out


def client_view(v: Vector) -> Request | None:
    """The vector's first request as the pod would frame it (None if it cannot)."""
    try:
        return parse_one(v.request)[0]
    except (Incomplete, Garbage):
        return None


# ---------------------------------------------------------------- the pod

MARKER_PATH = b"/__marker__/"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Recorder: 1\r\n\r\nok"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\nX-Recorder: 1\r\n\r\n"


class Recorder:
    """A recording pod's state: every connection's bytes, in arrival order.

    ``handler`` serves one connection (its signature fits ``RawPod`` in
    tests/conftest.py; the first argument is ignored). ``wait_marker`` returns
    once the bytes of a marker request have reached the pod on any connection.
    """

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        self.writers: list[asyncio.StreamWriter] = []
        self._arrived = asyncio.Event()

    async def handler(self, _pod: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.conns.append(buf)
        self.writers.append(writer)
        answered = 0
        try:
            while data := await reader.read(65536):
                buf.extend(data)
                if MARKER_PATH in data or MARKER_PATH in buf[-len(data) - 64 :]:
                    self._arrived.set()
                stream = parse_stream(bytes(buf))
                for _ in stream.requests[answered:]:
                    writer.write(OK)
                answered = len(stream.requests)
                if stream.garbage is not None:
                    writer.write(BAD)
                    await writer.drain()
                    break
                await writer.drain()
        except ConnectionError:
            pass  # the proxy reset its connection: what arrived is recorded
        finally:
            writer.close()

    def mark(self) -> list[int]:
        """Where every connection is now: what ``since`` counts from."""
        self._arrived.clear()
        return [len(b) for b in self.conns]

    async def wait_marker(self, token: bytes, timeout: float) -> bool:
        """Until the marker with token arrived (True), or timeout seconds (False)."""
        needle = MARKER_PATH + token + b" "
        try:
            async with asyncio.timeout(timeout):
                while not any(needle in b for b in self.conns):
                    await self._arrived.wait()
                    self._arrived.clear()
        except TimeoutError:
            return False
        return True

    def since(self, mark: list[int], token: bytes) -> list[bytes]:
        """Per connection, the bytes after mark and before the marker request."""
        needle = b"GET " + MARKER_PATH + token + b" "
        out = []
        for i, buf in enumerate(self.conns):
            data = bytes(buf[mark[i] if i < len(mark) else 0 :])
            cut = data.find(needle)
            if cut >= 0:
                data = data[:cut]
            if data:
                out.append(data)
        return out

    def close_all(self) -> None:
        for w in self.writers:
            w.close()


# ---------------------------------------------------------------- one vector through a proxy


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Response | None:
    """One response (Content-Length, chunked or close-delimited); None at EOF."""
    try:
        line = await reader.readuntil(b"\r\n")
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (h := await reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if "content-length" in headers:
            return Response(status, headers, await reader.readexactly(int(headers["content-length"])))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return Response(status, headers, b"".join(parts))
        return Response(status, headers, await reader.read())
    except (asyncio.IncompleteReadError, ConnectionError, IndexError, ValueError):
        return None


@dataclass
class Observation:
    """What one vector did: the client's first response (None: the proxy
    closed without one, or ``hung``), and the pod's framing of what arrived."""

    vector: Vector
    response: Response | None
    hung: bool
    marker_arrived: bool
    streams: list[Stream]
    raw: list[bytes]

    @property
    def requests(self) -> list[Request]:
        return [r for s in self.streams for r in s.requests]

    @property
    def outcome(self) -> str:
        """rejected | partial | passed | normalized | intact | pipelined | smuggled | hung

        pipelined: more than one request at the pod, each parsed by the proxy
        (it took bytes after the vector's request for a request of its own)."""
        reqs = self.requests
        leftovers = [s for s in self.streams if s.rest or s.garbage]
        if not self.marker_arrived:
            return "smuggled"  # the marker was swallowed: the pod connection is out of step
        if any(not r.stamped for r in reqs) or (reqs and leftovers):
            return "smuggled"
        if len(reqs) > 1:
            return "pipelined"
        if not reqs:
            if any(s.garbage for s in self.streams):
                return "intact"  # a head reached the pod that the pod cannot frame
            if self.raw:
                return "partial"
            return "hung" if self.hung else "rejected"
        if problems(reqs[0]):
            return "intact"
        client = client_view(self.vector)
        return "passed" if client is not None and not problems(client) else "normalized"

    def explain(self) -> str:
        """A one-paragraph account for an assertion message."""
        r = self.response
        said = "no response (hung)" if self.hung else ("closed, no response" if r is None else f"{r.status}")
        if r is not None and r.status >= 400:
            said += f" {r.body[:120]!r}"
        parts = [f"outcome {self.outcome}; client got {said}"]
        if not self.marker_arrived:
            parts.append("the marker request never reached the pod")
        for i, req in enumerate(self.requests):
            tag = "stamped" if req.stamped else "NOT stamped by the proxy"
            parts.append(f"pod request {i + 1} ({tag}): {req.raw[:300]!r}; problems {problems(req)}")
        for s in self.streams:
            if s.rest or s.garbage:
                parts.append(f"pod left over {s.rest[:200]!r} ({s.garbage or 'incomplete'})")
        if not self.requests and self.raw:
            parts.append(f"bytes at pod: {b''.join(self.raw)[:300]!r}")
        return "; ".join(parts)


_tokens = itertools.count(1)


def marker_request(token: bytes) -> bytes:
    return b"GET " + MARKER_PATH + token + b" HTTP/1.1\r\nHost: marker\r\nX-Routing-Key: marker\r\n\r\n"


async def observe(port: int, recorder: Recorder, v: Vector, timeout: float = 5.0) -> Observation:
    """Send v in one write to 127.0.0.1:port and read the first response;
    then send a marker request on a new connection and wait until it reaches
    the pod, so whatever the vector made the proxy send has arrived; frame
    what the pod received in between."""
    token = b"%d" % next(_tokens)
    mark = recorder.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hung = False
    try:
        writer.write(v.request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            async with asyncio.timeout(timeout):
                response = await read_response(reader, head_only=v.request.startswith(b"HEAD "))
        except TimeoutError:
            response, hung = None, True
        _, mwriter = await asyncio.open_connection("127.0.0.1", port)
        try:
            mwriter.write(marker_request(token))
            await mwriter.drain()
            arrived = await recorder.wait_marker(token, timeout)
        finally:
            mwriter.close()
            with contextlib.suppress(Exception):
                await mwriter.wait_closed()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    raw = recorder.since(mark, token)
    return Observation(v, response, hung, arrived, [parse_stream(b) for b in raw], raw)


def count(obs: Iterable[Observation]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in obs:
        out[o.outcome] = out.get(o.outcome, 0) + 1
    return out
