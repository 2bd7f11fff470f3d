"""Table and reload safety: epochs never go back, bounded tables, keys listed
twice, and same-size rewrites of a watched file within one clock tick.

The pure core is checked with plain calls and hypothesis; the refusals over
the admin listener and the file source with a real proxy on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import assignment as core
from proxy.offload import Offload
from proxy.reload import follow
from proxy.sources import Failure, judge, verdict_kind
from proxy.sources import file as file_source
from proxy.sources.file import FileSource

from .conftest import Pod, Proxy, parse_metrics, table_for, wait_for

Factory = Callable[..., Awaitable[Proxy]]
KEY_SPACE = core.KEY_SPACE
BOUND = 10.0  # turns a hang into a failure; nothing depends on how long a wait takes
TOKEN = "s3cret"
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
URLS = {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2", "c": "http://127.0.0.1:3", "d": "http://127.0.0.1:4"}


def doc_of(generation: int, rows: list[tuple[int, str, int]], pods: dict[str, str] | None = None) -> dict[str, Any]:
    """An explicit table: rows of (start, owner, epoch)."""
    pods = pods if pods is not None else {p: URLS[p] for p in "abc"}
    return {
        "version": 1,
        "generation": generation,
        "pods": {p: {"url": u} for p, u in pods.items()},
        "slices": [{"start": f"0x{s:016x}", "pod": o, "epoch": e} for s, o, e in rows],
    }


def table_of(generation: int, rows: list[tuple[int, str, int]], pods: dict[str, str] | None = None) -> core.Assignment:
    return core.from_json(doc_of(generation, rows, pods))


# -- 11. epochs never go back: pure core --------------------------------------------

HALF = 1 << 63


def test_epoch_regression_names_the_slice_and_position() -> None:
    old = table_of(10, [(0, "a", 4), (HALF, "b", 9)])
    lower = table_of(11, [(0, "a", 4), (HALF, "b", 8)])
    verdict = core.epoch_regression(old, lower)
    assert verdict is not None
    assert verdict.startswith(f"slices[1] (0x{HALF:016x}): at position 0x{HALF:016x}, epoch 8 is below 9")
    moved = table_of(11, [(0, "a", 4), (HALF, "c", 9)])
    verdict = core.epoch_regression(old, moved)
    assert verdict is not None and "owner changes from 'b' to 'c' but epoch 9 is not above 9" in verdict
    # Split slices: the position named is inside the old slice whose epoch went down.
    split = table_of(11, [(0, "a", 4), (HALF, "b", 11), (HALF + 5, "b", 3)])
    verdict = core.epoch_regression(old, split)
    assert verdict is not None and verdict.startswith(f"slices[2] (0x{HALF + 5:016x}): at position 0x{HALF + 5:016x}")
    # Moving a slice with the new generation as its epoch, keeping the others: fine.
    assert core.epoch_regression(old, table_of(11, [(0, "a", 4), (HALF, "c", 11)])) is None
    # A generated successor: every epoch is its generation.
    assert core.epoch_regression(old, table_for(list(URLS.items()), 11)) is None


def test_judge_refuses_epoch_regression_with_its_own_label() -> None:
    old = table_of(10, [(0, "a", 4), (HALF, "b", 9)])
    verdict = judge(old, table_of(11, [(0, "a", 4), (HALF, "c", 9)]))
    assert verdict is not None and verdict.startswith("epoch regression: slices[1]")
    assert verdict_kind(verdict) == "epoch_regression"
    stale = judge(old, table_of(9, [(0, "a", 4)]))
    assert stale is not None and verdict_kind(stale) == "stale"
    conflict = judge(old, table_of(10, [(0, "a", 4)]))
    assert conflict is not None and verdict_kind(conflict) == "conflict"


def rows_strategy(generation: int, owners: str) -> st.SearchStrategy[list[tuple[int, str, int]]]:
    """Rows of a table: starts from a few points (so that two tables share
    some), owners, epochs from a small range (so that they tie often)."""
    points = st.sampled_from([1, 7, HALF - 1, HALF, HALF + 1, KEY_SPACE - 1]) | st.integers(1, KEY_SPACE - 1)
    return st.lists(points, unique=True, max_size=6).flatmap(
        lambda starts: st.tuples(
            *[
                st.tuples(st.just(s), st.sampled_from(owners), st.integers(max(1, generation - 3), generation))
                for s in [0, *sorted(starts)]
            ]
        ).map(list)
    )


@st.composite
def table_pairs(draw: st.DrawFn) -> tuple[core.Assignment, core.Assignment]:
    old_rows = draw(rows_strategy(10, "abc"))
    generation = draw(st.integers(11, 13))
    # The new table lists its pods in another order, and has one more.
    new_pods = draw(st.permutations("abcd"))
    pods = {p: URLS[p] for p in new_pods}
    if draw(st.booleans()):  # same starts: the column-by-column path
        new_rows = [(s, draw(st.sampled_from("abcd")), draw(st.integers(7, generation))) for s, _, _ in old_rows]
    else:
        new_rows = draw(rows_strategy(generation, "abcd"))
    return table_of(10, old_rows), table_of(generation, new_rows, pods)


@QUICK
@given(table_pairs())
def test_epoch_regression_matches_a_per_position_oracle(pair: tuple[core.Assignment, core.Assignment]) -> None:
    old, new = pair
    # Both tables are constant between consecutive starts of either: checking
    # every start of both checks every position.
    bad = []
    for pos in sorted({*old.starts, *new.starts}):
        was, now = old.lookup_position(pos), new.lookup_position(pos)
        if now.epoch < was.epoch or (now.pod.id != was.pod.id and now.epoch <= was.epoch):
            bad.append((pos, now.index))
    verdict = core.epoch_regression(old, new)
    if not bad:
        assert verdict is None
        assert judge(old, new) is None
        return
    assert verdict is not None
    pos, index = bad[0]
    assert f"slices[{index}] (0x{new.starts[index]:016x}): at position 0x{pos:016x}," in verdict
    refused = judge(old, new)
    assert refused is not None and verdict_kind(refused) == "epoch_regression"


@st.composite
def evolutions(draw: st.DrawFn) -> tuple[core.Assignment, dict[str, core.Pod], bool]:
    if draw(st.booleans()):
        old = table_of(10, draw(rows_strategy(10, "abc")))
    else:
        old = table_for([(p, URLS[p]) for p in "abc"], 10, slice_count=draw(st.integers(1, 32)))
    kept = draw(st.lists(st.sampled_from("abc"), unique=True))
    states = {p: draw(st.sampled_from(core.STATES)) for p in kept}
    if draw(st.booleans()) or not any(s == "active" for s in states.values()):
        states["d"] = "active"
    pods = core.make_pods((p, URLS[p], 1.0, s) for p, s in states.items())
    return old, pods, draw(st.booleans())


@QUICK
@given(evolutions())
def test_gen_from_never_makes_an_epoch_regression(case: tuple[core.Assignment, dict[str, core.Pod], bool]) -> None:
    old, pods, rebalance = case
    new = core.evolve(old, pods, old.generation + 1, rebalance=rebalance)
    assert core.epoch_regression(old, new) is None
    assert judge(old, new) is None


async def test_big_tables_are_checked_against_the_baseline_in_the_helper(
    pods: list[Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper process compares a big table with the table in force as it
    parses it; ``judge`` on the event loop then takes its verdict."""
    ids = [p.id for p in pods]
    rows = [(s, ids[i % 3], 10) for i, s in enumerate(core.slice_starts(800))]
    old = table_of(10, rows, pods_doc(pods))
    bad = list(rows)
    bad[123] = (bad[123][0], ids[(123 + 1) % 3], 10)  # another owner, same epoch
    good = [(s, o, e) for s, o, e in rows]
    good[123] = (good[123][0], ids[(123 + 1) % 3], 11)
    offload = Offload()
    try:
        offload.baseline = await offload.parse(orjson.dumps(doc_of(10, rows, pods_doc(pods))))
        assert offload.calls == 1
        refused = await offload.parse(orjson.dumps(doc_of(11, bad, pods_doc(pods))))
        applied = await offload.parse(orjson.dumps(doc_of(11, good, pods_doc(pods))))
        assert offload.calls == 3 and offload.fallbacks == 0

        def not_here(old: core.Assignment, new: core.Assignment) -> str | None:
            raise AssertionError("epoch_regression computed in the proxy's process")

        monkeypatch.setattr(core, "_epoch_regression", not_here)
        verdict = judge(offload.baseline, refused)
        assert verdict is not None and verdict.startswith(f"epoch regression: slices[123] (0x{rows[123][0]:016x})")
        assert judge(offload.baseline, applied) is None
        # Against another table than the one it was checked against: checked
        # again (here, in this process).
        with pytest.raises(AssertionError, match="in the proxy's process"):
            judge(old, refused)
    finally:
        offload.close()


# -- 12. bounds: pure core -----------------------------------------------------------


def test_bounds_are_refused_naming_the_limit() -> None:
    pods = {f"p{i}": {"url": f"http://10.0.{i // 250}.{i % 250 + 1}:80"} for i in range(core.MAX_PODS + 1)}
    with pytest.raises(core.AssignmentError, match=rf"^pods: {core.MAX_PODS + 1} pods .* limit of {core.MAX_PODS}"):
        core.parse(orjson.dumps({"version": 1, "generation": 1, "pods": pods}))
    # The example: 50 KB of JSON asking for 1,000 pods x 2**20 slices.
    del pods["p0"]
    doc = {"version": 1, "generation": 1, "pods": pods, "slice_count": core.MAX_SLICE_COUNT}
    with pytest.raises(core.AssignmentError, match=r"^slice_count: .*MAX_GENERATED"):
        core.parse(orjson.dumps(doc))
    with pytest.raises(core.AssignmentError, match="MAX_GENERATED"):
        core.generate(1, core.make_pods((p, s["url"], 1.0, "active") for p, s in pods.items()), 4096)
    one = {"start": 0, "pod": "a"}
    doc = {"version": 1, "generation": 1, "pods": {"a": {"url": URLS["a"]}}, "slices": [one] * (core.MAX_SLICES + 1)}
    with pytest.raises(core.AssignmentError, match=rf"^slices: {core.MAX_SLICES + 1} slices .*MAX_SLICES"):
        core.from_json(doc)
    with pytest.raises(core.AssignmentError, match=r"^table: \d+ bytes is above the limit .*MAX_TABLE_BYTES"):
        core.parse(b" " * (core.MAX_TABLE_BYTES + 1))


# -- 13. keys listed twice: pure core ------------------------------------------------


class Obj(list[tuple[str, Any]]):
    """A JSON object as written: its pairs in order, keys possibly repeated."""


def dump(v: Any, escape: bool) -> str:
    """JSON text; with ``escape``, every ':' in a string is written \\u003a."""
    if isinstance(v, Obj):
        return "{" + ", ".join(f"{dump(k, escape)}: {dump(x, escape)}" for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x, escape) for x in v) + "]"
    if isinstance(v, str):
        text = orjson.dumps(v).decode()
        return text.replace(":", "\\u003a") if escape else text
    return orjson.dumps(v).decode()


def as_obj(v: Any) -> Any:
    if isinstance(v, dict):
        return Obj((k, as_obj(x)) for k, x in v.items())
    if isinstance(v, list):
        return [as_obj(x) for x in v]
    return v


@st.composite
def written_tables(draw: st.DrawFn) -> tuple[Obj, list[tuple[str, Obj]]]:
    """A valid table as pairs (pod ids with colons too), and every object in
    it with its place as an error names it."""
    ids = draw(st.lists(st.sampled_from(["a", "b:1", "c", "d:2:3"]), min_size=1, unique=True))
    pods = {p: {"url": f"http://127.0.0.{k + 1}:{8000 + k}"} for k, p in enumerate(ids)}
    if draw(st.booleans()):
        doc: dict[str, Any] = {"version": 1, "generation": 9, "pods": pods, "slice_count": 8}
    else:
        starts = sorted(draw(st.sets(st.integers(1, KEY_SPACE - 1), max_size=4)))
        slices = []
        for s in [0, *starts]:
            row: dict[str, Any] = {"start": f"0x{s:x}", "pod": draw(st.sampled_from(ids)), "epoch": 9}
            others = [p for p in ids if p != row["pod"]]
            if others and draw(st.booleans()):
                row["backups"] = others[:1]
            slices.append(row)
        doc = {"version": 1, "generation": 9, "pods": pods, "slices": slices}
    top = as_obj(doc)
    places: list[tuple[str, Obj]] = [("", top)]
    top_map = dict(top)
    places.append(("pods.", top_map["pods"]))
    places += [(f"pods.{p}.", spec) for p, spec in top_map["pods"]]
    places += [(f"slices[{i}].", s) for i, s in enumerate(top_map.get("slices", []))]
    return top, places


@QUICK
@given(written_tables(), st.data())
def test_a_key_listed_twice_is_refused_where_it_is(
    case: tuple[Obj, list[tuple[str, Obj]]], data: st.DataObject
) -> None:
    top, places = case
    escape = data.draw(st.booleans())
    text = dump(top, escape)
    # Valid as written, escaped colons or not: parsed as orjson reads it.
    expected = core.from_json(orjson.loads(text))
    for raw in (text, text.encode()):
        got = core.parse(raw)
        assert got.pods == expected.pods and got.same_slices(expected)
    where, obj = data.draw(st.sampled_from(places))
    key, value = data.draw(st.sampled_from(list(obj)))
    obj.insert(data.draw(st.integers(0, len(obj))), (key, value))  # the same value again: still refused
    with pytest.raises(core.AssignmentError) as exc:
        core.parse(dump(top, escape).encode())
    assert str(exc.value) == f"{where}{key}: listed twice (a key may appear once in a JSON object)"


def test_a_key_twice_in_a_dropped_value_is_refused() -> None:
    text = (
        '{"version": 1, "generation": 3, "pods": {"a": {"url": "http://h:1"}}, '
        '"slice_count": {"x": 1, "x": 2}, "slice_count": 4}'
    )
    with pytest.raises(core.AssignmentError, match="listed twice"):
        core.parse(text)


# -- 18. same-size rewrites of a watched file ---------------------------------------


def table_bytes(generation: int) -> bytes:
    """A small generated table; generations of equal digit count give equal sizes."""
    return table_for(list(URLS.items())[:3], generation, slice_count=8).dumps(explicit=False)


@contextlib.asynccontextmanager
async def updates_of(source: FileSource) -> AsyncIterator[Callable[[], Awaitable[core.Assignment | Failure]]]:
    gen = source.updates()

    async def next_item() -> core.Assignment | Failure:
        async with asyncio.timeout(BOUND):
            return await anext(gen)

    try:
        yield next_item
    finally:
        await gen.aclose()


@pytest.mark.parametrize("watch", ["auto", "poll"])
async def test_same_size_rewrite_with_the_same_mtime_is_seen(tmp_path: Path, watch: str) -> None:
    path = tmp_path / "assignment.json"
    path.write_bytes(table_bytes(1000))
    async with updates_of(FileSource(str(path), watch=watch, poll_interval=0.05)) as next_item:
        first = await next_item()
        assert isinstance(first, core.Assignment) and first.generation == 1000
        st = os.stat(path)
        data = table_bytes(1001)
        assert len(data) == st.st_size
        with open(path, "r+b") as fh:  # in place: same inode
            fh.write(data)
        # As a filesystem whose clock did not tick between the two writes.
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns
        second = await next_item()
        assert isinstance(second, core.Assignment) and second.generation == 1001


async def test_same_size_rewrite_within_one_coarse_tick_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem whose mtime and ctime both stay in one tick across two
    writes (coarse clocks, FAT, NFS): the content hash decides."""
    real = file_source.identity
    tick = os.stat(tmp_path).st_mtime_ns  # now, as the filesystem tells it

    def coarse(path: str) -> tuple[int, int, int, int, int] | None:
        ident = real(path)
        return None if ident is None else (*ident[:3], tick, tick)

    monkeypatch.setattr(file_source, "identity", coarse)
    path = tmp_path / "assignment.json"
    path.write_bytes(table_bytes(1000))
    async with updates_of(FileSource(str(path), watch="poll", poll_interval=0.02)) as next_item:
        first = await next_item()
        assert isinstance(first, core.Assignment) and first.generation == 1000
        with open(path, "r+b") as fh:
            fh.write(table_bytes(1001))
        second = await next_item()
        assert isinstance(second, core.Assignment) and second.generation == 1001


# -- over real sockets: the admin listener and the file source --------------------


async def metric(s: aiohttp.ClientSession, px: Proxy, name: str) -> float:
    async with s.get(px.admin + "/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text()).get(name, 0.0)


async def put(s: aiohttp.ClientSession, px: Proxy, body: bytes) -> tuple[int, dict[str, Any]]:
    async with s.put(px.admin + "/-/assignment", data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


async def routed_generation(s: aiohttp.ClientSession, px: Proxy) -> int:
    async with s.get(px.base + "/", headers={"X-Routing-Key": "user-1"}) as r:
        assert r.status == 200
        return int(r.headers["X-Keyroute-Generation"])


def pods_doc(pods: list[Pod]) -> dict[str, str]:
    return {p.id: p.url for p in pods}


async def test_admin_put_refuses_epoch_regression(proxy_factory: Factory, pods: list[Pod]) -> None:
    ids = [p.id for p in pods]
    first = table_of(10, [(0, ids[0], 4), (HALF, ids[1], 9)], pods_doc(pods))
    px = await proxy_factory(first, admin=True, admin__token=TOKEN)
    label = 'keyroute_reloads_total{result="epoch_regression"}'
    async with aiohttp.ClientSession() as s:
        moved = doc_of(11, [(0, ids[0], 4), (HALF, ids[2], 9)], pods_doc(pods))
        status, doc = await put(s, px, orjson.dumps(moved))
        assert status == 409, doc
        assert doc["detail"].startswith(f"epoch regression: slices[1] (0x{HALF:016x}): at position 0x{HALF:016x}")
        assert "owner changes" in doc["detail"]
        lower = doc_of(11, [(0, ids[0], 3), (HALF, ids[1], 9)], pods_doc(pods))
        status, doc = await put(s, px, orjson.dumps(lower))
        assert status == 409 and "epoch 3 is below 4" in doc["detail"], doc
        assert await metric(s, px, label) == 2
        assert await routed_generation(s, px) == 10
        async with s.get(px.admin + "/-/assignment") as r:
            assert "epoch regression" in (await r.json())["last_error"]["error"]
        # The same move with the new generation as the slice's epoch: applied.
        good = doc_of(11, [(0, ids[0], 4), (HALF, ids[2], 11)], pods_doc(pods))
        status, doc = await put(s, px, orjson.dumps(good))
        assert status == 200, doc
        assert await routed_generation(s, px) == 11


def big_rows(pods: list[Pod], generation: int, count: int = 800) -> list[tuple[int, str, int]]:
    """Enough slices for more than 32 KiB of JSON: parsed in the helper process."""
    return [(s, pods[i % len(pods)].id, generation) for i, s in enumerate(core.slice_starts(count))]


async def test_file_source_refuses_epoch_regression_checked_in_the_helper(
    tmp_path: Path, proxy_factory: Factory, pods: list[Pod]
) -> None:
    px = await proxy_factory(None, admin=True)
    rt = px.runtime
    path = tmp_path / "assignment.json"
    rows = big_rows(pods, 10)
    path.write_bytes(orjson.dumps(doc_of(10, rows, pods_doc(pods))))
    assert path.stat().st_size > 32 * 1024
    task = follow(rt, FileSource(str(path), offload=rt.offload, poll_interval=0.05))
    label = 'keyroute_reloads_total{result="epoch_regression"}'
    try:
        async with aiohttp.ClientSession() as s:
            await wait_for(lambda: rt.table is not None and rt.table.generation == 10, BOUND, "the first table")
            assert rt.offload.calls >= 1  # parsed in the helper
            # Slice 500 changes owner but keeps its epoch.
            bad = list(rows)
            start, owner, epoch = bad[500]
            other = next(p.id for p in pods if p.id != owner)
            bad[500] = (start, other, epoch)
            path.write_bytes(orjson.dumps(doc_of(11, bad, pods_doc(pods))))

            async def refused() -> bool:
                return await metric(s, px, label) >= 1

            await wait_for(refused, BOUND, "the epoch regression to be counted")
            assert rt.last_reload_error is not None
            assert f"slices[500] (0x{start:016x})" in rt.last_reload_error["error"]
            assert rt.table.generation == 10
            assert await routed_generation(s, px) == 10
            # Moved with a new epoch: applied.
            bad[500] = (start, other, 11)
            path.write_bytes(orjson.dumps(doc_of(11, bad, pods_doc(pods))))
            await wait_for(lambda: rt.table is not None and rt.table.generation == 11, BOUND, "the good table")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def huge_generated(pods: int) -> bytes:
    """A pods-only table asking for ``pods`` x 2**20 slices."""
    return orjson.dumps(
        {
            "version": 1,
            "generation": 99,
            "pods": {f"p{i}": {"url": f"http://10.0.{i // 250}.{i % 250 + 1}:80"} for i in range(pods)},
            "slice_count": core.MAX_SLICE_COUNT,
        }
    )


async def test_admin_put_refuses_a_huge_generated_table_before_any_parse(
    proxy_factory: Factory, pods: list[Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    px = await proxy_factory(table_for(pods), admin=True, admin__token=TOKEN)
    offload = px.runtime.offload
    async with aiohttp.ClientSession() as s:
        # Small enough to decode in the proxy's process: refused there at
        # once, never sent to the helper to generate.
        body = huge_generated(300)
        assert len(body) < 32 * 1024
        status, doc = await put(s, px, body)
        assert status == 400, doc
        assert doc["detail"].startswith("slice_count: 1048576 slices x 300 pods is above the limit")
        assert "MAX_GENERATED" in doc["detail"]
        assert offload.calls == 0 and offload.fallbacks == 0
        # The example, 50 KB: for the helper. With a helper that
        # dies at once, the call falls back to a thread of the proxy's
        # process, where the bound refuses it before any generating.
        monkeypatch.setattr(sys, "executable", "/bin/false")
        body = huge_generated(core.MAX_PODS)
        assert 32 * 1024 < len(body) < 64 * 1024
        status, doc = await put(s, px, body)
        assert status == 400, doc
        assert doc["detail"].startswith("slice_count: 1048576 slices x 1000 pods is above the limit")
        assert offload.fallbacks == 1
    assert px.runtime.table is not None and px.runtime.table.generation == 7


async def test_file_source_refuses_a_file_above_the_byte_limit_unread(
    tmp_path: Path, proxy_factory: Factory, pods: list[Pod]
) -> None:
    px = await proxy_factory(table_for(pods), admin=True)
    rt = px.runtime
    path = tmp_path / "assignment.json"
    path.write_bytes(table_for(pods).dumps())
    task = follow(rt, FileSource(str(path), offload=rt.offload, poll_interval=0.05))
    try:
        async with aiohttp.ClientSession() as s:
            with open(path, "r+b") as fh:
                fh.truncate(core.MAX_TABLE_BYTES + 1)  # sparse: no disk, no time

            async def refused() -> bool:
                return await metric(s, px, 'keyroute_reloads_total{result="invalid"}') >= 1

            await wait_for(refused, BOUND, "the big file to be refused")
            assert rt.last_reload_error is not None
            error = rt.last_reload_error["error"]
            assert re.search(rf"{re.escape(str(path))}: table: {core.MAX_TABLE_BYTES + 1} bytes", error)
            assert "MAX_TABLE_BYTES" in error
            assert rt.offload.calls == 0 and rt.offload.fallbacks == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_keys_listed_twice_are_refused_over_admin_and_file(
    tmp_path: Path, proxy_factory: Factory, pods: list[Pod]
) -> None:
    px = await proxy_factory(table_for(pods), admin=True, admin__token=TOKEN)
    rt = px.runtime
    a, b = pods[0], pods[1]
    small = (
        f'{{"version": 1, "generation": 8, "pods": {{"{a.id}": {{"url": "{a.url}"}}, '
        f'"{b.id}": {{"url": "{b.url}"}}, "{a.id}": {{"url": "{b.url}"}}}}}}'
    ).encode()
    async with aiohttp.ClientSession() as s:
        status, doc = await put(s, px, small)
        assert status == 400, doc
        assert doc["detail"] == f"pods.{a.id}: listed twice (a key may appear once in a JSON object)"
        # A big table (parsed in the helper) with a field twice in one slice.
        path = tmp_path / "assignment.json"
        path.write_bytes(table_for(pods).dumps())
        task = follow(rt, FileSource(str(path), offload=rt.offload, poll_interval=0.05))
        try:
            text = orjson.dumps(doc_of(8, big_rows(pods, 8), pods_doc(pods)))
            needle = b'"epoch":8}'
            at = [m.start() for m in re.finditer(re.escape(needle), text)][300]
            text = text[:at] + b'"epoch":8,"epoch":8}' + text[at + len(needle) :]
            path.write_bytes(text)

            async def refused() -> bool:
                return await metric(s, px, 'keyroute_reloads_total{result="invalid"}') >= 2

            await wait_for(refused, BOUND, "the big table to be refused")
            assert (
                rt.last_reload_error["error"]
                == f"{path}: slices[300].epoch: listed twice (a key may appear once in a JSON object)"
            )
            assert rt.offload.calls >= 1
            assert rt.table is not None and rt.table.generation == 7
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
