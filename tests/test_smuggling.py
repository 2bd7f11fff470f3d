"""The request-smuggling corpus (tests/smuggling/) through the real proxy.

Every vector goes in one write to a fresh proxy in front of one recording pod
(tests/smuggling/harness.py). Then a marker request goes on a new connection;
once its bytes reach the pod, everything the vector made the proxy send has
arrived, and the pod's framing of those bytes decides:

* ``reject``: a JSON error from the proxy (with the vector's status if it
  names one) and not one byte at the pod;
* ``normalize``: rejected like that, or exactly one request at the pod, one the
  proxy parsed, that is well-formed with unambiguous framing and nothing left over;
* ``pass``: exactly that one well-formed request, answered by the pod, with the
  client's method, target and body (and the target and Host the vector names).

Never a second request at the pod, never bytes of the vector parsed by the pod
as a request the proxy did not see.
"""

from __future__ import annotations

import pytest

from .conftest import ProxyFactory, RawPods, error_doc, table_for
from .smuggling import harness
from .smuggling.harness import Observation, Vector

CORPUS = harness.load_corpus()


async def run(proxy_factory: ProxyFactory, raw_pods: RawPods, v: Vector) -> Observation:
    recorder = harness.Recorder()
    pod = await raw_pods(recorder.handler, "rec")
    proxy = await proxy_factory(
        table_for([pod]),
        proxy__header_timeout="3s",
        proxy__body_timeout="3s",
        upstream__response_timeout="3s",
    )
    try:
        return await harness.observe(proxy.port, recorder, v)
    finally:
        recorder.close_all()


def check_rejected(obs: Observation) -> None:
    v = obs.vector
    assert obs.outcome == "rejected", obs.explain()
    assert obs.response is not None, obs.explain()
    if v.status is not None:
        assert obs.response.status == v.status, obs.explain()
    else:
        assert 400 <= obs.response.status < 600, obs.explain()
    if v.request.startswith(b"HEAD "):
        # A response to HEAD has no body (RFC 9110 §9.3.2), errors included.
        assert obs.response.headers["content-type"] == "application/json", obs.explain()
    else:
        error_doc(obs.response.headers, obs.response.body)


def check_passed(obs: Observation) -> None:
    v = obs.vector
    assert obs.outcome in ("passed", "normalized"), obs.explain()
    (got,) = obs.requests
    assert obs.response is not None and obs.response.status == 200, obs.explain()
    assert obs.response.headers.get("x-recorder") == "1", obs.explain()
    sent = harness.client_view(v)
    assert sent is not None
    assert got.method == sent.method, obs.explain()
    assert got.body == sent.body, obs.explain()
    target = v.pod.get("target", sent.path)
    assert got.path == target, obs.explain()
    if "host" in v.pod:
        assert got.all(b"host") == [v.pod["host"].encode()], obs.explain()


@pytest.mark.parametrize("v", CORPUS, ids=[v.id for v in CORPUS])
async def test_vector(proxy_factory: ProxyFactory, raw_pods: RawPods, v: Vector) -> None:
    obs = await run(proxy_factory, raw_pods, v)
    assert obs.marker_arrived, obs.explain()
    assert len(obs.requests) <= 1, obs.explain()
    assert all(r.stamped for r in obs.requests), obs.explain()
    if v.expect == "reject":
        check_rejected(obs)
    elif v.expect == "normalize":
        if obs.outcome == "rejected":
            check_rejected(obs)
        else:
            assert obs.outcome in ("passed", "normalized"), obs.explain()
    else:
        check_passed(obs)


def test_corpus_covers_every_tier_and_source() -> None:
    tiers = {v.tier for v in CORPUS}
    assert tiers == set(harness.TIERS)
    assert sum(v.source != "keyroute.yaml" for v in CORPUS) >= 150  # the AWS cases
    assert {v.expect for v in CORPUS if v.tier == "compliant" and v.source != "keyroute.yaml"} <= {"pass", "reject"}
    assert all(v.expect == "reject" for v in CORPUS if v.tier == "severe" and v.source != "keyroute.yaml")


@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        (b"GET /a HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n", "passed"),
        (b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n", "smuggled"),  # not stamped by a proxy
        (
            b"POST /a HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 4\r\n\r\n0\r\n\r\nGET /s HTTP/1.1\r\nHost: t\r\n\r\n",
            "smuggled",
        ),
        (b"GET /a HTTP/1.1\r\nHost: t\r\nHost: u\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n", "intact"),
        (b"POST /a HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\nContent-Length: 9\r\n\r\nab", "partial"),
        (b"", "rejected"),
        (
            b"GET /a HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n",
            "pipelined",
        ),
    ],
    ids=["clean", "unstamped", "te-cl-desync", "two-hosts", "partial", "nothing", "two-stamped"],
)
def test_outcome_rules(data: bytes, outcome: str) -> None:
    """The judge itself: what the pod received decides the outcome."""
    v = Vector("x", "compliant", "pass", b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n", "test")
    raw = [data] if data else []
    obs = Observation(v, None, False, True, [harness.parse_stream(b) for b in raw], raw)
    assert obs.outcome == outcome, obs.explain()
