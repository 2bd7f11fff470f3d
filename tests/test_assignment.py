"""The routing core: hashing, table parsing and validation, lookup, generation
and evolution. Plain calls, no I/O; hypothesis for the invariants."""

from __future__ import annotations

import copy
import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import assignment as core
from proxy.assignment import KEY_SPACE, AssignmentError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "assignment.json"
HALF = 1 << 63

# Modest example counts: the whole suite should stay fast.
QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- hashing -------------------------------------------------------------------

VECTORS = [
    (b"user-1", 7038226039998199158, 0x61ACCD4B12FF3576),
    (b"user-2", 7117674071722160687, 0x62C70EDB7001F22F),
    (b"tenant/42", 17509279960656205544, 0xF2FD755B27C756E8),
    (b"", 0, 0x0),
    ("ключ".encode(), 17753313917685924547, 0xF66070F271AB02C3),
]


@pytest.mark.parametrize(("key", "decimal", "hexa"), VECTORS)
def test_position_vectors(key: bytes, decimal: int, hexa: int) -> None:
    assert decimal == hexa
    assert core.position(key) == decimal


@given(st.binary(max_size=64))
@QUICK
def test_position_range_and_lookup_agree(key: bytes) -> None:
    table = core.parse(EXAMPLE.read_bytes())
    pos = core.position(key)
    assert 0 <= pos < KEY_SPACE
    # lookup() inlines position(): both paths must agree.
    assert table.lookup(key) == table.lookup_position(pos)


# -- the example table -----------------------------------------------------------


def test_example_table_parses() -> None:
    t = core.parse(EXAMPLE.read_bytes())
    assert t.generation == 1732780800000
    assert not t.generated
    assert list(t.pods) == ["pod-a", "pod-b", "pod-c"]
    a, b, c = t.pods.values()
    assert (a.host, a.port, a.weight, a.state) == ("127.0.0.1", 9001, 1.0, "active")
    assert b.weight == 2.0 and b.active
    assert c.state == "draining" and not c.active
    assert t.slice_count == 3
    assert [r.start for r in t.routes] == [0, 0x5555555555555555, 0xAAAAAAAAAAAAAAAA]
    assert [r.end for r in t.routes] == [0x5555555555555555, 0xAAAAAAAAAAAAAAAA, KEY_SPACE]
    assert [r.pod_id for r in t.routes] == ["pod-a", "pod-b", "pod-c"]
    assert [r.epoch for r in t.routes] == [1732780000000, 1732780800000, 1732780000000]
    assert [r.backups for r in t.routes] == [("pod-b",), ("pod-a",), ("pod-b", "pod-a")]
    assert all(r.generation == t.generation for r in t.routes)
    assert math.isclose(sum(t.shares().values()), 1.0)
    assert t.lookup(b"user-1").pod_id == "pod-b"
    assert t.lookup(b"tenant/42").pod_id == "pod-c"
    assert t.lookup(b"").pod_id == "pod-a"
    assert t.lookup(b"").url == "http://127.0.0.1:9001"


def test_parse_accepts_str_and_bytes() -> None:
    text = EXAMPLE.read_text()
    assert core.parse(text).slice_specs() == core.parse(text.encode()).slice_specs()


def test_lookup_boundaries() -> None:
    t = core.parse(EXAMPLE.read_bytes())
    for r in t.routes:
        assert t.lookup_position(r.start) == r
        assert t.lookup_position(r.end - 1) == r
    assert t.lookup_position(KEY_SPACE - 1).index == 2


def test_defaults_for_epoch_and_backups() -> None:
    t = core.from_json(doc(slices=[{"start": 0, "pod": "a"}]))
    (r,) = t.routes
    assert r.epoch == t.generation == 100
    assert r.backups == ()
    assert (r.start, r.end, r.share) == (0, KEY_SPACE, 1.0)


@pytest.mark.parametrize(
    "start",
    ["0x8000000000000000", "0X8000000000000000", "0x00008000000000000000",
     "9223372036854775808", "09223372036854775808", HALF],
)  # fmt: skip
def test_start_forms(start: Any) -> None:
    t = core.from_json(doc(slices=[{"start": "0x0", "pod": "a"}, {"start": start, "pod": "b"}]))
    assert t.routes[1].start == HALF


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://10.0.0.5:8080", "10.0.0.5", 8080),
        ("http://pod-a.svc.cluster.local:80/", "pod-a.svc.cluster.local", 80),
        ("http://example", "example", 80),
        ("http://[::1]:9000", "::1", 9000),
    ],
)
def test_pod_urls(url: str, host: str, port: int) -> None:
    t = core.from_json(doc(pods={"a": {"url": url}}, slices=[{"start": 0, "pod": "a"}]))
    p = t.pods["a"]
    assert (p.host, p.port, p.url) == (host, port, url.rstrip("/"))


# -- located errors ----------------------------------------------------------------


def doc(**changes: Any) -> dict[str, Any]:
    """A valid table; keyword arguments replace top-level fields (None drops one)."""
    d: dict[str, Any] = {
        "version": 1,
        "generation": 100,
        "pods": {
            "a": {"url": "http://10.0.0.1:8080"},
            "b": {"url": "http://10.0.0.2:8080", "weight": 2},
            "c": {"url": "http://10.0.0.3:8080", "state": "draining"},
        },
        "slices": [
            {"start": "0x0", "pod": "a", "epoch": 50, "backups": ["b"]},
            {"start": "0x8000000000000000", "pod": "b", "epoch": 100, "backups": ["a", "c"]},
        ],
    }
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def with_pod(pid: str, **fields: Any) -> dict[str, Any]:
    d = doc()
    d["pods"][pid] = {k: v for k, v in {**d["pods"].get(pid, {}), **fields}.items() if v is not None}
    return d


def with_slice(i: int, **fields: Any) -> dict[str, Any]:
    d = doc()
    s = d["slices"][i]
    for k, v in fields.items():
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    return d


def no_slices(**changes: Any) -> dict[str, Any]:
    return doc(slices=None, **changes)


BAD_TABLES: list[tuple[str, Any]] = [
    ("table:", []),
    ("table:", "x"),
    ("bogus:", doc(bogus=1)),
    ("version:", doc(version=None)),
    ("version:", doc(version=2)),
    ("version:", doc(version=True)),
    ("version:", doc(version="1")),
    ("version:", doc(version=1.0)),
    ("generation:", doc(generation=None)),
    ("generation:", doc(generation=0)),
    ("generation:", doc(generation=-5)),
    ("generation:", doc(generation=1.5)),
    ("generation:", doc(generation=True)),
    ("generation:", doc(generation="100")),
    ("pods:", doc(pods=None)),
    ("pods:", doc(pods=[])),
    ("pods:", doc(pods={})),
    ("pods.'bad id':", doc(pods={"bad id": {"url": "http://x:1"}})),
    ("pods.'-a':", doc(pods={"-a": {"url": "http://x:1"}})),
    ("pods.a:", doc(pods={"a": "http://x:1"})),
    ("pods.a.port:", with_pod("a", port=80)),
    ("pods.a.url:", with_pod("a", url=None)),
    ("pods.a.url:", with_pod("a", url=5)),
    ("pods.a.url:", with_pod("a", url="https://x:1")),
    ("pods.a.url:", with_pod("a", url="ftp://x:1")),
    ("pods.a.url:", with_pod("a", url="http://x:1/path")),
    ("pods.a.url:", with_pod("a", url="http://x:1?q=1")),
    ("pods.a.url:", with_pod("a", url="http://user@x:1")),
    ("pods.a.url:", with_pod("a", url="http://x:0")),
    ("pods.a.url:", with_pod("a", url="http://x:65536")),
    ("pods.a.url:", with_pod("a", url="http://x:abc")),
    ("pods.a.url:", with_pod("a", url="http://x:²")),
    ("pods.a.url:", with_pod("a", url="http://x:" + "1" * 5000)),
    ("pods.a.url:", with_pod("a", url="http://:80")),
    ("pods.a.url:", with_pod("a", url="http://[::1")),
    ("pods.a.url:", with_pod("a", url="http://bad_host:80")),
    ("pods.b.weight:", with_pod("b", weight=0)),
    ("pods.b.weight:", with_pod("b", weight=-1)),
    ("pods.b.weight:", with_pod("b", weight="2")),
    ("pods.b.weight:", with_pod("b", weight=True)),
    ("pods.b.weight:", with_pod("b", weight=1e7)),
    ("pods.b.weight:", with_pod("b", weight=[])),
    ("pods.c.state:", with_pod("c", state="dead")),
    ("pods.c.state:", with_pod("c", state="Active")),
    ("pods.c.state:", with_pod("c", state=["active"])),
    ("slices:", doc(slices={})),
    ("slices:", doc(slices=[])),
    ("slices[1]:", doc(slices=[{"start": 0, "pod": "a"}, ["0x1", "a"]])),
    ("slices[1].owner:", with_slice(1, owner="b")),
    ("slices[1].start:", with_slice(1, start=None)),
    ("slices[0].start:", with_slice(0, start="0x1")),
    ("slices[0].start:", doc(slices=[{"start": 1, "pod": "a"}, {"start": 5, "pod": "a"}])),
    ("slices[1].start:", with_slice(1, start="0x0")),
    ("slices[2].start:", doc(slices=[{"start": 0, "pod": "a"}, {"start": 10, "pod": "a"}, {"start": 5, "pod": "b"}])),
    ("slices[2].start:", doc(slices=[{"start": 0, "pod": "a"}, {"start": 10, "pod": "a"}, {"start": 10, "pod": "b"}])),
    ("slices[1].start:", with_slice(1, start="0x10000000000000000")),
    ("slices[1].start:", with_slice(1, start="18446744073709551616")),
    ("slices[1].start:", with_slice(1, start=-1)),
    ("slices[1].start:", with_slice(1, start="-1")),
    ("slices[1].start:", with_slice(1, start="+5")),
    ("slices[1].start:", with_slice(1, start=" 5")),
    ("slices[1].start:", with_slice(1, start="5 ")),
    ("slices[1].start:", with_slice(1, start="\t5")),
    ("slices[1].start:", with_slice(1, start="0x")),
    ("slices[1].start:", with_slice(1, start="0x_5")),
    ("slices[1].start:", with_slice(1, start="1_000")),
    ("slices[1].start:", with_slice(1, start="٣")),
    ("slices[1].start:", with_slice(1, start="0b101")),
    ("slices[1].start:", with_slice(1, start="0o17")),
    ("slices[1].start:", with_slice(1, start="1e5")),
    ("slices[1].start:", with_slice(1, start="")),
    ("slices[1].start:", with_slice(1, start="9" * 5000)),
    ("slices[1].start:", with_slice(1, start=1.5)),
    ("slices[1].start:", with_slice(1, start=True)),
    ("slices[1].start:", with_slice(1, start=[5])),
    ("slices[1].pod:", with_slice(1, pod="pod-x")),
    ("slices[1].pod:", with_slice(1, pod=None)),
    ("slices[1].pod:", with_slice(1, pod=5)),
    ("slices[1].pod:", with_slice(1, pod=["b"])),
    ("slices[1].epoch:", with_slice(1, epoch=0)),
    ("slices[1].epoch:", with_slice(1, epoch=-1)),
    ("slices[1].epoch:", with_slice(1, epoch="5")),
    ("slices[1].epoch:", with_slice(1, epoch=True)),
    ("slices[1].epoch:", with_slice(1, epoch=1.5)),
    ("slices[1].epoch:", doc() | {"slices": [{"start": 0, "pod": "a"}, {"start": 9, "pod": "b", "epoch": None}]}),
    ("slices[1].epoch:", with_slice(1, epoch=101)),
    ("slices[0].backups:", with_slice(0, backups="b")),
    ("slices[0].backups:", with_slice(0, backups=[5])),
    ("slices[0].backups:", with_slice(0, backups=[["b"]])),
    ("slices[0].backups:", with_slice(0, backups={"b": 1})),
    ("slices[0].backups[0]:", with_slice(0, backups=["zz"])),
    ("slices[0].backups[1]:", with_slice(0, backups=["b", "zz"])),
    ("slices[0].backups[1]:", with_slice(0, backups=["b", "b"])),
    ("slices[0].backups[0]:", with_slice(0, backups=["a"])),
    ("slices[1].backups[2]:", with_slice(1, backups=["a", "c", "b"])),
    ("slice_count:", doc(slice_count=16)),
    ("slice_count:", no_slices(slice_count=0)),
    ("slice_count:", no_slices(slice_count=-1)),
    ("slice_count:", no_slices(slice_count="16")),
    ("slice_count:", no_slices(slice_count=True)),
    ("slice_count:", no_slices(slice_count=2.5)),
    ("slice_count:", no_slices(slice_count=core.MAX_SLICE_COUNT + 1)),
    ("pods:", no_slices(pods={"a": {"url": "http://x:1", "state": "draining"}})),
]


@pytest.mark.parametrize(("place", "table"), BAD_TABLES)
def test_located_errors(place: str, table: Any) -> None:
    with pytest.raises(AssignmentError) as exc:
        core.parse(orjson.dumps(table))
    assert str(exc.value).startswith(place), str(exc.value)


@pytest.mark.parametrize("data", [b"", b"{", b"[1,]", b"\xff\xfe", b"{'version': 1}", b"NaN", b"1 2"])
def test_invalid_json(data: bytes) -> None:
    with pytest.raises(AssignmentError, match=r"^not valid JSON"):
        core.parse(data)


def test_big_integers_are_refused_not_crashed() -> None:
    # orjson reads integers above 2**64 - 1 as floats.
    with pytest.raises(AssignmentError, match=r"^generation:"):
        core.parse(b'{"version": 1, "generation": 18446744073709551616, "pods": {"a": {"url": "http://x:1"}}}')


def test_slice_count() -> None:
    t = core.from_json(no_slices(slice_count=16))
    assert t.generated and t.slice_count == 16
    assert core.from_json(no_slices()).slice_count == core.DEFAULT_SLICE_COUNT


# Errors deep in a big table, after the fast path has seen many good slices
# with the same owner/backups combinations.

POD_IDS = ["a", "b", "c", "d"]


def big_doc(n: int = 40) -> dict[str, Any]:
    pods = {p: {"url": f"http://10.0.0.{i + 1}:80"} for i, p in enumerate(POD_IDS)}
    slices = []
    for i in range(n):
        owner = POD_IDS[i % 4]
        s: dict[str, Any] = {"start": hex(i * (KEY_SPACE // n)), "pod": owner}
        if i % 3:
            s["epoch"] = 10 + i
        if i % 5:
            s["backups"] = [POD_IDS[(i + 1) % 4], POD_IDS[(i + 2) % 4]][: 1 + i % 2]
        slices.append(s)
    return {"version": 1, "generation": 1000, "pods": pods, "slices": slices}


CORRUPTIONS: list[tuple[str, Any]] = [
    (".start", lambda s, prev: s.update(start=prev["start"])),
    (".start", lambda s, prev: s.update(start=-1)),
    (".start", lambda s, prev: s.update(start=" 0x5")),
    (".start", lambda s, prev: s.pop("start")),
    (".pod", lambda s, prev: s.update(pod="zz")),
    (".pod", lambda s, prev: s.update(pod=None)),
    (".pod", lambda s, prev: s.update(pod={"a": 1})),
    (".epoch", lambda s, prev: s.update(epoch=1001)),
    (".epoch", lambda s, prev: s.update(epoch=False)),
    (".epoch", lambda s, prev: s.update(epoch=0)),
    (".backups", lambda s, prev: s.update(backups=None)),
    (".backups", lambda s, prev: s.update(backups=[{"x": 1}])),
    (".backups", lambda s, prev: s.update(backups=[s["pod"]])),
    (".backups", lambda s, prev: s.update(backups=["b", "b"] if s["pod"] != "b" else ["a", "a"])),
    (".backups", lambda s, prev: s.update(backups=["zz"])),
    (".extra", lambda s, prev: s.update(extra=1)),
]


@given(st.integers(1, 39), st.sampled_from(CORRUPTIONS))
@QUICK
def test_errors_located_in_big_tables(i: int, corruption: tuple[str, Any]) -> None:
    d = big_doc()
    field, corrupt = corruption
    corrupt(d["slices"][i], d["slices"][i - 1])
    with pytest.raises(AssignmentError) as exc:
        core.parse(orjson.dumps(d))
    assert str(exc.value).startswith(f"slices[{i}]{field}"), str(exc.value)


def test_big_table_matches_reference_build() -> None:
    d = big_doc()
    t = core.parse(orjson.dumps(d))
    pods = core._parse_pods(d["pods"])
    specs = [core._slice_spec(s, f"slices[{i}]") for i, s in enumerate(d["slices"])]
    ref = core.build(d["generation"], pods, specs)
    assert t.routes == ref.routes


# -- hypothesis: explicit tables --------------------------------------------------


@st.composite
def explicit_docs(draw: st.DrawFn, max_slices: int = 20) -> dict[str, Any]:
    n_pods = draw(st.integers(1, 5))
    ids = [f"p{i}" for i in range(n_pods)]
    generation = draw(st.integers(1, 2**40))
    inner = draw(st.lists(st.integers(1, KEY_SPACE - 1), unique=True, max_size=max_slices - 1))
    starts = [0, *sorted(inner)]
    slices = []
    for start in starts:
        owner = draw(st.sampled_from(ids))
        others = [p for p in ids if p != owner]
        s: dict[str, Any] = {"pod": owner}
        s["start"] = draw(st.sampled_from([start, str(start), hex(start), f"0x{start:016X}"]))
        if draw(st.booleans()):
            s["epoch"] = draw(st.integers(1, generation))
        if others and draw(st.booleans()):
            s["backups"] = draw(st.permutations(others))[: draw(st.integers(0, len(others)))]
        slices.append(s)
    pods = {p: {"url": f"http://10.0.0.{i + 1}:8080", "weight": 1 + i} for i, p in enumerate(ids)}
    return {"version": 1, "generation": generation, "pods": pods, "slices": slices}


def brute_index(starts: list[int], pos: int) -> int:
    """Index of the slice holding ``pos``, by a linear scan."""
    found = [i for i, s in enumerate(starts) if s <= pos]
    return found[-1]


@given(explicit_docs(), st.lists(st.integers(0, KEY_SPACE - 1), max_size=20))
@QUICK
def test_every_position_in_exactly_one_slice(d: dict[str, Any], positions: list[int]) -> None:
    t = core.parse(orjson.dumps(d))
    starts = [r.start for r in t.routes]
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(a.end == b.start for a, b in pairwise(t.routes))
    assert t.routes[-1].end == KEY_SPACE
    assert sum(r.end - r.start for r in t.routes) == KEY_SPACE
    probes = set(positions) | {0, KEY_SPACE - 1}
    for s in starts:
        probes |= {s, max(s - 1, 0), min(s + 1, KEY_SPACE - 1)}
    for pos in probes:
        r = t.lookup_position(pos)
        holders = [x for x in t.routes if x.start <= pos < x.end]
        assert holders == [r]
        assert r.index == brute_index(starts, pos)


edge_points = st.builds(
    lambda k, d: min(max((k << 58) + d, 1), KEY_SPACE - 1), st.integers(0, 63), st.sampled_from([-1, 0, 1, 2**57])
)


@given(st.lists(edge_points, unique=True, max_size=40))
@QUICK
def test_lookup_index_at_bucket_edges(inner: list[int]) -> None:
    # Starts on and around the edges of the lookup index's buckets (multiples
    # of 2**58 and finer), and many starts in one bucket.
    starts = [0, *sorted(inner)]
    pods = {"a": core.make_pods([("a", "http://x:1", 1.0, "active")])["a"]}
    t = core.build(1, pods, [core.SliceSpec(s, "a") for s in starts])
    probes = {KEY_SPACE - 1} | {min(max(s + d, 0), KEY_SPACE - 1) for s in starts for d in (-1, 0, 1)}
    probes |= {min(max((k << 58) + d, 0), KEY_SPACE - 1) for k in range(64) for d in (-1, 0)}
    for pos in probes:
        assert t.lookup_position(pos).index == brute_index(starts, pos)


@given(explicit_docs())
@QUICK
def test_parse_matches_reference_build_and_round_trips(d: dict[str, Any]) -> None:
    t = core.parse(orjson.dumps(d))
    pods = core._parse_pods(d["pods"])
    specs = [core._slice_spec(s, f"slices[{i}]") for i, s in enumerate(d["slices"])]
    assert t.routes == core.build(d["generation"], pods, specs).routes
    again = core.parse(t.dumps())
    assert again.routes == t.routes
    assert dict(again.pods) == dict(t.pods)


def brute_moved(old: core.Assignment, new: core.Assignment) -> float:
    cuts = sorted({r.start for r in old.routes} | {r.start for r in new.routes} | {KEY_SPACE})
    moved = 0
    for lo, hi in pairwise(cuts):
        if old.lookup_position(lo).pod_id != new.lookup_position(lo).pod_id:
            moved += hi - lo
    return moved / KEY_SPACE


@given(explicit_docs(), explicit_docs())
@QUICK
def test_moved_share_matches_brute_force(a: dict[str, Any], b: dict[str, Any]) -> None:
    old, new = core.parse(orjson.dumps(a)), core.parse(orjson.dumps(b))
    assert core.moved_share(old, new) == brute_moved(old, new)
    assert core.moved_share(old, old) == 0.0


# -- hypothesis: generated tables ---------------------------------------------------

SLICES = 512
pod_ids = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True), min_size=2, max_size=8, unique=True)


def pods_of(ids: list[str], weights: dict[str, float] | None = None, draining: frozenset[str] = frozenset()) -> dict:
    w = weights or {}
    return core.make_pods(
        (p, f"http://10.0.{i // 250}.{i % 250 + 1}:80", w.get(p, 1.0), "draining" if p in draining else "active")
        for i, p in enumerate(ids)
    )


def tolerance(p: float, slices: int = SLICES) -> float:
    """Five standard deviations of a binomial share, plus one slice."""
    return 5 * math.sqrt(p * (1 - p) / slices) + 1 / slices


def test_generate_shape() -> None:
    pods = pods_of(["a", "b", "c", "d", "e"], draining=frozenset({"e"}))
    t = core.generate(9, pods, 256)
    assert t.generated and t.slice_count == 256 and t.generation == 9
    assert [r.start for r in t.routes] == core.slice_starts(256)
    for r in t.routes:
        assert r.pod.active and r.epoch == 9
        assert len(r.backups) == core.GENERATED_BACKUPS
        assert r.pod_id not in r.backups and len(set(r.backups)) == len(r.backups)
    assert t.shares()["e"] == 0.0
    # Deterministic, and the short form round-trips.
    assert core.generate(9, pods, 256).slice_specs() == t.slice_specs()
    short = core.parse(t.dumps(explicit=False))
    assert short.generated and short.slice_specs() == t.slice_specs()
    assert orjson.loads(t.dumps(explicit=False))["slice_count"] == 256


def test_generate_draining_pods_are_last_resort_backups() -> None:
    pods = pods_of(["a", "b", "c"], draining=frozenset({"c"}))
    t = core.generate(1, pods, 64)
    for r in t.routes:
        assert r.backups[-1] == "c"


def test_generate_needs_an_active_pod() -> None:
    with pytest.raises(AssignmentError, match=r"^pods:"):
        core.generate(1, pods_of(["a"], draining=frozenset({"a"})), 8)


@given(pod_ids, st.from_regex(r"new-[a-z0-9]{1,8}", fullmatch=True))
@SLOW
def test_adding_a_pod_moves_about_one_nth_to_it(ids: list[str], newcomer: str) -> None:
    old = core.generate(1, pods_of(ids), SLICES)
    new = core.generate(2, pods_of([*ids, newcomer]), SLICES)
    n = len(ids) + 1
    moved = core.moved_share(old, new)
    assert abs(moved - 1 / n) <= tolerance(1 / n)
    for a, b in zip(old.routes, new.routes, strict=True):
        if a.pod_id != b.pod_id:
            assert b.pod_id == newcomer  # nothing moves between two survivors
    assert math.isclose(moved, new.shares()[newcomer])


@given(pod_ids.filter(lambda ids: len(ids) >= 3), st.data())
@SLOW
def test_removing_a_pod_moves_only_its_slices(ids: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(ids))
    old = core.generate(1, pods_of(ids), SLICES)
    new = core.generate(2, pods_of([p for p in ids if p != gone]), SLICES)
    n = len(ids)
    moved = core.moved_share(old, new)
    assert moved == old.shares()[gone]
    assert abs(moved - 1 / n) <= tolerance(1 / n)
    for a, b in zip(old.routes, new.routes, strict=True):
        assert (a.pod_id != b.pod_id) == (a.pod_id == gone)


@given(pod_ids, st.lists(st.integers(1, 4), min_size=8, max_size=8))
@SLOW
def test_weighted_shares(ids: list[str], ws: list[int]) -> None:
    weights = {p: float(w) for p, w in zip(ids, ws, strict=False)}
    total = sum(weights.values())
    shares = core.generate(1, pods_of(ids, weights), SLICES).shares()
    for p in ids:
        fair = weights[p] / total
        assert abs(shares[p] - fair) <= tolerance(fair)


# -- hypothesis: evolve (``keyroute gen --from``) ------------------------------------


@st.composite
def evolutions(draw: st.DrawFn) -> tuple[core.Assignment, dict[str, core.Pod]]:
    """An old table (generated, or an evolved/explicit one) and a changed pod set."""
    ids = draw(pod_ids)
    old_weights = {p: float(draw(st.integers(1, 3))) for p in ids}
    old = core.generate(10, pods_of(ids, old_weights), draw(st.sampled_from([64, 256, SLICES])))
    if draw(st.booleans()):
        # Start from an explicit table with uneven slices instead.
        old = core.parse(orjson.dumps(draw(explicit_docs(max_slices=60))))
        ids = list(old.pods)
    keep = [p for p in ids if draw(st.booleans())] or ids[:1]
    added = draw(st.lists(st.from_regex(r"n[0-9]{1,3}", fullmatch=True), max_size=3, unique=True))
    new_ids = keep + [p for p in added if p not in keep]
    draining = frozenset(p for p in new_ids[1:] if draw(st.integers(0, 4)) == 0)
    weights = {p: float(draw(st.integers(1, 3))) for p in new_ids}
    return old, pods_of(new_ids, weights, draining)


@given(evolutions(), st.integers(1, 1000))
@QUICK
def test_evolve_keeps_active_owners(case: tuple[core.Assignment, dict[str, core.Pod]], step: int) -> None:
    old, pods = case
    generation = old.generation + step
    new = core.evolve(old, pods, generation)
    assert not new.generated and new.generation == generation
    assert [r.start for r in new.routes] == [r.start for r in old.routes]
    moved = 0
    for a, b in zip(old.routes, new.routes, strict=True):
        assert b.pod.active
        assert b.pod_id not in b.backups and set(b.backups) <= set(pods)
        stays = a.pod_id in pods and pods[a.pod_id].active
        if stays:
            assert (b.pod_id, b.epoch) == (a.pod_id, a.epoch)
        else:
            assert b.pod_id != a.pod_id and b.epoch == generation
            moved += a.end - a.start
    assert core.moved_share(old, new) == moved / KEY_SPACE
    # The new table is a valid table in its own right.
    assert core.parse(new.dumps()).routes == new.routes


@given(evolutions())
@QUICK
def test_evolve_with_rebalance(case: tuple[core.Assignment, dict[str, core.Pod]]) -> None:
    old, pods = case
    generation = old.generation + 1
    new = core.evolve(old, pods, generation, rebalance=True)
    for a, b in zip(old.routes, new.routes, strict=True):
        if b.pod_id == a.pod_id:
            assert b.epoch == a.epoch
        else:
            assert b.epoch == generation and b.pod.active
    if not old.generated:
        return  # uneven slices: no share bound to check
    active = {p.id: p.weight for p in pods.values() if p.active}
    total = sum(active.values())
    shares = new.shares()
    width = 1 / old.slice_count
    for pid, w in active.items():
        assert abs(shares[pid] - w / total) <= len(active) * width, (pid, shares, active)


def test_evolve_moves_drained_slices_to_their_backups() -> None:
    old = core.generate(1, pods_of(["a", "b", "c", "d"]), 256)
    new = core.evolve(old, pods_of(["a", "b", "c", "d"], draining=frozenset({"b"})), 2)
    assert new.shares()["b"] == 0.0
    for a, r in zip(old.routes, new.routes, strict=True):
        if a.pod_id == "b":
            assert r.pod_id == a.backups[0]


def test_evolve_rebalance_feeds_a_new_pod() -> None:
    old = core.generate(1, pods_of(["a", "b", "c"]), 1024)
    plain = core.evolve(old, pods_of(["a", "b", "c", "d"]), 2)
    assert core.moved_share(old, plain) == 0.0 and plain.shares()["d"] == 0.0
    balanced = core.evolve(old, pods_of(["a", "b", "c", "d"]), 2, rebalance=True)
    assert abs(balanced.shares()["d"] - 0.25) <= 4 / 1024
    assert abs(core.moved_share(old, balanced) - 0.25) <= 4 / 1024


def test_evolve_refuses_old_generation_and_no_active_pod() -> None:
    old = core.generate(5, pods_of(["a", "b"]), 16)
    with pytest.raises(AssignmentError, match=r"^generation:"):
        core.evolve(old, pods_of(["a", "b"]), 5)
    with pytest.raises(AssignmentError, match=r"^pods:"):
        core.evolve(old, pods_of(["a"], draining=frozenset({"a"})), 6)


def test_make_pods_validates() -> None:
    with pytest.raises(AssignmentError, match=r"^pods\.a:"):
        core.make_pods([("a", "http://x:1", 1.0, "active"), ("a", "http://y:1", 1.0, "active")])
    with pytest.raises(AssignmentError, match=r"^pods\.a\.weight:"):
        core.make_pods([("a", "http://x:1", math.nan, "active")])
    with pytest.raises(AssignmentError, match=r"^pods\.a\.url:"):
        core.make_pods([("a", "x:1", 1.0, "active")])


# -- fuzzing: parse() raises AssignmentError or returns a table ----------------------


def parse_or_refuse(data: bytes) -> None:
    try:
        t = core.parse(data)
    except AssignmentError:
        return
    # Whatever is accepted honours the invariants.
    assert t.routes[0].start == 0 and t.routes[-1].end == KEY_SPACE
    assert all(1 <= r.epoch <= t.generation for r in t.routes)


@given(st.binary(max_size=300))
@QUICK
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_refuse(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _dumps(v: Any) -> bytes:
    # orjson refuses integers outside 64 bits; the stdlib writes them.
    return json.dumps(v).encode()


@given(json_values)
@QUICK
def test_fuzz_random_json(v: Any) -> None:
    parse_or_refuse(_dumps(v))


@given(st.dictionaries(st.sampled_from(["version", "generation", "pods", "slices", "slice_count"]), json_values))
@QUICK
def test_fuzz_random_top_level(v: dict[str, Any]) -> None:
    parse_or_refuse(_dumps(v))


def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


@given(st.data())
@QUICK
def test_fuzz_mutated_tables(data: st.DataObject) -> None:
    d = copy.deepcopy(data.draw(st.sampled_from([doc(), big_doc(12), no_slices(slice_count=8)])))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
        else:
            parent.insert(path[-1], data.draw(json_values))
    parse_or_refuse(_dumps(d))


@given(st.data())
@QUICK
def test_fuzz_mutated_bytes(data: st.DataObject) -> None:
    raw = bytearray(EXAMPLE.read_bytes() if data.draw(st.booleans()) else orjson.dumps(big_doc(12)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del raw[i]
    parse_or_refuse(bytes(raw))


def test_shared_backups_are_not_mixed_up_between_owners() -> None:
    # Slices repeat owner/backups combinations; the parser shares one checked
    # tuple per combination. Same backups under another owner are checked anew.
    d = doc(slices=[{"start": 0, "pod": "a", "backups": ["b"]}, {"start": 5, "pod": "b", "backups": ["b"]}])
    with pytest.raises(AssignmentError, match=r"^slices\[1\]\.backups\[0\]:"):
        core.from_json(d)
    t = core.parse(orjson.dumps(big_doc(40)))
    for r, s in zip(t.routes, big_doc(40)["slices"], strict=True):
        assert r.backups == tuple(s.get("backups", ()))
        assert r.pod_id not in r.backups
