"""Convert the AWS http-desync-guardian test cases into ``aws.yaml``.

    git --git-dir=<clone>/.git archive HEAD tests | tar -x -C /tmp/hdg
    python tests/smuggling/import_aws.py /tmp/hdg/tests > tests/smuggling/aws.yaml

Each case becomes one request built the way the upstream harness builds its
raw request (``src/request_analyzer.rs``, ``run_test_case``: ``"{method} {uri}
{version}\\r\\n"``, then ``"{name}: {value}\\r\\n"`` per header, values
unescaped by its ``unescape_value``, all UTF-8), with three additions a routing
proxy needs: ``Host`` (unless the case has one) and ``X-Routing-Key`` after
the case's headers (before them when a case's field holds a CR or LF), and a
body that fits the framing the case declares (see ``body``). The tier is
upstream's; ``expect`` follows from it (Compliant: pass,
Ambiguous: normalize, Severe: reject) except for the Acceptable cases, each
decided in ``ACCEPTABLE`` with the RFC 9110/9112 rule behind it, and the
few in ``OVERRIDE`` where upstream's tier contradicts RFC 9112.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

FILES = [  # single-case.yaml only repeats a case of ambiguous.yaml (upstream's debugging slot)
    "rfc-compliant.yaml",
    "more-compliant-tests.yaml",
    "acceptable.yaml",
    "ambiguous.yaml",
    "severe.yaml",
    "bad-header-characters.yaml",
    "edge-cases.yaml",
    "uri-specific-test-cases.yaml",
    "real-life-test-cases.yaml",
]
EXPECT = {"Compliant": "pass", "Ambiguous": "normalize", "Severe": "reject"}
# Acceptable (harmless deviations upstream lets through): what RFC 9110/9112 say.
_WS_COLON = "whitespace before the colon: RFC 9112 §5.1 MUST 400"
ACCEPTABLE = {
    "No TE/CL headers, some others are non-compliant": ("reject", _WS_COLON),
    "TE and some others are non-compliant": ("reject", _WS_COLON),
    "CL and some others are non-compliant": ("reject", _WS_COLON),
    "A non-essential header with a non-printable character (x01)": ("normalize", "not a token: reject or drop"),
    "Get with a body and Content-Length:0": ("pass", "Content-Length: 0 frames no body"),
    "Non-RFC, but OK HTTP/0.9": ("reject", "HTTP/0.9 has no version or headers: 400 or 505"),
    "Empty version, which means HTTP/0.9": ("reject", "not a request-line (RFC 9112 §3)"),
    "Unknown but OK HTTP/1.2": ("pass", "HTTP/1.x, x > 1, is served as HTTP/1.1 (RFC 9110 §2.5)"),
    "Some-Header\\x01": ("normalize", "not a token: reject or drop"),
    "\\x01Some-Header": ("normalize", "not a token: reject or drop"),
    "Some-Header: \\x01value": ("normalize", "CTL in a field value (RFC 9110 §5.5): reject or clean"),
    "Some-Header: value\\x01": ("normalize", "CTL in a field value (RFC 9110 §5.5): reject or clean"),
    "Extra spaces in version": ("normalize", "RFC 9112 §3 allows parsing on whitespace boundaries; or 400"),
    "[space] in URI": ("reject", "invalid request-line: 400 (RFC 9112 §3.2)"),
}

LLHTTP_REFUSES = "valid, but llhttp refuses it (a known false positive of the framing validator)"

# Upstream tiers that RFC 9112 contradicts, and valid cases keyroute refuses.
OVERRIDE = {
    "Empty URI": ("reject", "upstream: Compliant; 'GET  HTTP/1.1' has no request-target (RFC 9112 §3, §3.2: 400)"),
    # Valid, but refused by llhttp, keyroute's framing validator, with no safe
    # leniency to accept them: known false positives (400, nothing forwarded).
    "Transfer-Encoding with a param: chunked;custom_param": ("reject", LLHTTP_REFUSES),
    "TE with custom parameters OK": ("reject", LLHTTP_REFUSES),
    "International in URI": ("reject", "raw UTF-8 in the target: " + LLHTTP_REFUSES),
}


def unescape_value(s: str) -> str:
    """Upstream's second unescaping of every YAML string (``\\xNN``, ``\\r``...)."""
    out, i = [], 0
    simple = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
    while i < len(s):
        ch = s[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = s[i + 1]
        if nxt == "x":
            out.append(chr(int(s[i + 2 : i + 4], 16)))
            i += 4
            continue
        out.append(simple.get(nxt, nxt))
        i += 2
    return "".join(out)


def text(v: Any) -> str:
    return unescape_value(v if isinstance(v, str) else str(v))


LEADING = re.compile(r"[ \t]*\d+")


def framing_name(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def body(headers: list[tuple[str, str]]) -> str:
    """A body fitting the framing the case means, read leniently (names with
    stray characters count): chunked if a Transfer-Encoding mentions chunked,
    else Content-Length's count of bytes (its leading digits: ``1000,1000``
    and ``1000\\x01`` get 1000, so a proxy that reads them so does not wait). With both, the chunked body is padded
    to exactly Content-Length bytes where it can be, so that both readings end
    at the same byte: these cases test the proxy's policy, not a payload."""
    chunked = any(framing_name(n) == "transferencoding" and "chunked" in v.lower() for n, v in headers)
    lengths = [int(m.group()) for n, v in headers if framing_name(n) == "contentlength" and (m := LEADING.match(v))]
    length = lengths[0] if lengths and lengths[0] <= 5_000_000 else None
    if chunked:
        if length is not None:
            for digits in range(1, 8):
                k = length - 9 - digits
                if k >= 1 and len(f"{k:x}") == digits:
                    return f"{k:x}\r\n{{x*{k}}}\r\n0\r\n\r\n"
            return "0\r\n\r\n"
        return "5\r\nhello\r\n0\r\n\r\n"
    if length:
        return f"{{x*{length}}}"
    return ""


def escape(s: str, prose: bool = False) -> str:
    """s as a YAML double-quoted scalar, every control and non-ASCII character
    escaped (prose: printable non-ASCII kept, e.g. "§")."""
    named = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\0": "\\0", '"': '\\"', "\\": "\\\\"}
    out = []
    for ch in s:
        o = ord(ch)
        if ch in named:
            out.append(named[ch])
        elif 0x20 <= o < 0x7F or (prose and o > 0xA0 and ch.isprintable()):
            out.append(ch)
        elif o <= 0xFF:
            out.append(f"\\x{o:02X}")
        else:
            out.append(f"\\u{o:04X}")
    return '"' + "".join(out) + '"'


def slug(s: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", s.lower())).strip("-")


def convert(folder: Path) -> str:
    out = [
        "# AWS http-desync-guardian test cases (Apache-2.0), converted by tests/smuggling/import_aws.py;",
        "# see README.md here for the source, the licence and what the conversion adds.",
    ]
    seen: dict[str, str] = {}  # id -> method
    for fname in FILES:
        for case in yaml.safe_load((folder / fname).read_text(encoding="utf-8")):
            name, tier = case["name"], case["expected"]["tier"]
            headers = [(text(h["name"]), text(h["value"])) for h in case.get("headers") or []]
            method, uri, version = text(case["method"]), text(case["uri"]), text(case["version"])
            ours = [] if any(n.lower() == "host" for n, _ in headers) else [("Host", "example.test")]
            ours.append(("X-Routing-Key", "aws"))
            # Ours go last, so a case's first line keeps its place after the
            # request-line (obs-fold cases), unless a case's field breaks lines.
            broken = any(c in n + v for n, v in headers for c in "\r\n")
            fields = ours + headers if broken else headers + ours
            head = f"{method} {uri} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
            vid = f"aws-{slug(Path(fname).stem)}-{slug(name)}"
            if vid in seen:
                vid += "-" + (slug(method) if seen[vid] != method else str(sum(k.startswith(vid) for k in seen) + 1))
            seen[vid] = method
            source = f"{fname}: {name} ({case['expected']['reason']})"
            if tier == "Acceptable":
                expect, note = ACCEPTABLE[name]
            elif name in OVERRIDE:
                expect, note = OVERRIDE[name]
            else:
                expect, note = EXPECT[tier], ""
            out += [
                f"- id: {vid}",
                f"  tier: {tier.lower()}",
                f"  expect: {expect}",
                f"  source: {escape(source)}",
            ]
            if note:
                out.append(f"  note: {escape(note, prose=True)}")
            out.append(f"  request: {escape(head + body(headers))}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(convert(Path(sys.argv[1])))
