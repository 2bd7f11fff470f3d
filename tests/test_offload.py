"""The helper process that parses big tables: same results as inline parsing,
errors that name the place, and recovery when the helper dies."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy import assignment as core
from proxy.offload import INLINE_BYTES, Offload, _Kept

from .conftest import ProxyFactory, wait_for

PODS = core.make_pods(
    (f"pod-{i}", f"http://127.0.0.1:{9100 + i}", w, s)
    for i, (w, s) in enumerate([(1.0, "active"), (2.0, "active"), (1.0, "draining"), (1.5, "active")])
)
KEYS = [f"key-{i}".encode() for i in range(3000)]


@pytest.fixture
async def offload() -> AsyncIterator[Offload]:
    off = Offload()
    try:
        yield off
    finally:
        off.close()


def big_table(generation: int = 7, slices: int = 3000) -> core.Assignment:
    old = core.generate(generation - 1, PODS, slices)
    return core.evolve(old, PODS, generation, rebalance=True)


def same(a: core.Assignment, b: core.Assignment) -> None:
    assert (a.generation, dict(a.pods), a.generated) == (b.generation, dict(b.pods), b.generated)
    assert a.routes == b.routes
    assert [a.lookup(k) for k in KEYS] == [b.lookup(k) for k in KEYS]


def helper_pid(off: Offload) -> int:
    proc = off._proc
    assert proc is not None and proc.pid is not None
    return proc.pid


async def test_big_table_is_parsed_in_the_helper(offload: Offload) -> None:
    table = big_table()
    data = table.dumps()
    assert len(data) >= INLINE_BYTES
    got = await offload.parse(data)
    same(got, core.parse(data))
    assert offload.calls == 1 and offload.fallbacks == 0
    assert helper_pid(offload) != os.getpid()


async def test_small_table_is_parsed_inline(offload: Offload) -> None:
    data = core.generate(3, dict(list(PODS.items())[:2]), 64).dumps()
    assert len(data) < INLINE_BYTES
    same(await offload.parse(data), core.parse(data))
    assert offload.calls == 0 and offload._proc is None


async def test_big_pods_only_table_is_generated_in_the_helper(offload: Offload) -> None:
    data = orjson.dumps({"version": 1, "generation": 4, "pods": {p.id: {"url": p.url} for p in PODS.values()},
                         "slice_count": 20000})  # fmt: skip
    assert len(data) < INLINE_BYTES
    got = await offload.parse(data)
    assert offload.calls == 1
    same(got, core.parse(data))
    assert got.generated and got.slice_count == 20000


async def test_invalid_big_table_names_the_place(offload: Offload) -> None:
    doc = orjson.loads(big_table().dumps())
    doc["slices"][2345]["pod"] = "nobody"
    with pytest.raises(core.AssignmentError, match=r"slices\[2345\]\.pod: unknown pod 'nobody'"):
        await offload.parse(orjson.dumps(doc))
    with pytest.raises(core.AssignmentError, match="not valid JSON"):
        await offload.parse(big_table().dumps()[:-100])
    assert offload.calls == 2  # the helper answered both with the error


async def test_read_file(offload: Offload, tmp_path: Path) -> None:
    table = big_table()
    path = tmp_path / "assignment.json"
    path.write_bytes(table.dumps())
    same(await offload.read(str(path)), table)
    assert offload.calls == 1
    with pytest.raises(FileNotFoundError):
        await offload.read(str(tmp_path / "missing.json"))


async def test_moved_share_matches_inline(offload: Offload) -> None:
    a = core.generate(5, PODS, 9000)
    b = big_table(6, 9000)
    c = core.generate(7, PODS, 12000)  # other slice boundaries
    for old, new in ((a, b), (b, c), (c, a)):
        assert await offload.moved_share(old, new) == core.moved_share(old, new)
    assert offload.calls == 3
    assert 0 < core.moved_share(a, b) < 1


async def test_dead_helper_is_replaced(offload: Offload) -> None:
    data = big_table().dumps()
    await offload.parse(data)
    first = helper_pid(offload)
    os.kill(first, signal.SIGKILL)
    offload._proc.wait(5)  # type: ignore[union-attr]
    # The call that finds it dead gets a new helper; the table is the same.
    same(await offload.parse(data), core.parse(data))
    assert helper_pid(offload) != first
    assert offload.calls == 2


async def test_closed_offload_stops_the_helper(tmp_path: Path) -> None:
    off = Offload()
    await off.parse(big_table().dumps())
    proc = off._proc
    assert proc is not None and proc.poll() is None
    off.close()
    assert off._proc is None
    assert proc.poll() == -signal.SIGKILL
    with pytest.raises(OSError, match="closed"):
        await off.parse(big_table().dumps())


def test_pickled_table_keeps_its_columns() -> None:
    table = big_table()
    back = pickle.loads(pickle.dumps(table))
    same(back, table)
    assert back.same_slices(table)
    assert len(pickle.dumps(table)) < 40 * table.slice_count


def _die_in_helper(parent: int) -> str:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ran in the proxy's process"


async def test_helper_dying_mid_call_falls_back_to_a_thread(offload: Offload) -> None:
    assert await offload.run(_die_in_helper, os.getpid()) == "ran in the proxy's process"
    assert offload.fallbacks == 1
    # and the next big table gets a new helper
    data = big_table().dumps()
    same(await offload.parse(data), core.parse(data))
    assert offload.calls == 1


async def test_admin_view_of_a_big_table_is_rendered_in_the_helper(proxy_factory: ProxyFactory) -> None:
    first, second = big_table(7, 6000), big_table(9, 5000)
    px = await proxy_factory(first, admin=True, admin__token="s3cret")
    async with aiohttp.ClientSession() as s:
        for table in (first, second):
            for _ in range(2):  # the second GET is served from the one rendering
                async with s.get(px.admin + "/-/assignment") as r:
                    assert r.status == 200
                    doc = await r.json()
                assert doc["generation"] == table.generation and doc["last_error"] is None
                assert doc["shares"] == pytest.approx(table.shares())
                same(core.from_json(doc["table"]), table)
            if table is first:
                # a big PUT is parsed in the helper too
                put = {"Authorization": "Bearer s3cret"}
                async with s.put(px.admin + "/-/assignment", data=second.dumps(), headers=put) as r:
                    assert r.status == 200, await r.text()
    assert px.runtime.offload.calls == 3  # two renderings and the PUT
    async with aiohttp.ClientSession() as s, s.get(px.admin + "/metrics") as r:
        text = await r.text()
    assert "keyroute_table_helper_calls_total 3.0" in text
    assert "keyroute_table_helper_fallbacks_total 0.0" in text


async def test_tables_the_helper_returned_go_back_by_reference(offload: Offload) -> None:
    tables = [big_table(g, 9000 + 100 * g) for g in (3, 5, 7, 9)]  # moved_share in the helper
    got = [await offload.parse(t.dumps()) for t in tables]
    # The last KEEP tables the helper returned are sent back as references,
    # older ones (and tables it never saw) in full; the answers are the same.
    assert [isinstance(offload._ref(g), _Kept) for g in got] == [False, True, True, True]
    assert not isinstance(offload._ref(tables[3]), _Kept)
    for old, new in ((got[2], got[3]), (got[0], got[3]), (tables[1], got[2])):
        assert await offload.moved_share(old, new) == core.moved_share(old, new)
    os.kill(helper_pid(offload), signal.SIGKILL)
    offload._proc.wait(5)  # type: ignore[union-attr]
    assert await offload.moved_share(got[2], got[3]) == core.moved_share(got[2], got[3])
    assert not isinstance(offload._ref(got[3]), _Kept)  # a new helper keeps nothing yet


async def test_idle_helper_exits_and_comes_back() -> None:
    off = Offload(idle_exit=0.3)
    try:
        data = big_table().dumps()
        await off.parse(data)
        proc = off._proc
        assert proc is not None
        # No call for idle_exit seconds: the helper leaves by itself, status 0.
        assert await asyncio.to_thread(proc.wait, 10) == 0
        same(await off.parse(data), core.parse(data))
        assert off._proc is not None and off._proc.pid != proc.pid
        assert (off.calls, off.fallbacks) == (2, 0)
    finally:
        off.close()


async def test_close_during_a_call_fails_it_with_oserror() -> None:
    # Sources and the admin PUT handle OSError (cannot read / 500-free paths);
    # a close at shutdown must not surface as another exception type.
    off = Offload()
    try:
        await off.parse(big_table().dumps())  # the helper is up
        # A stopped helper takes the call and never answers: the call is in
        # flight, for certain, once it has its sequence number.
        os.kill(helper_pid(off), signal.SIGSTOP)
        seq = off._seq
        call = asyncio.ensure_future(off.parse(big_table(9).dumps()))
        await wait_for(lambda: off._seq > seq, what="the call to reach the helper")
        assert not call.done()
        off.close()
        with pytest.raises(OSError, match="closed"):
            await call
    finally:
        off.close()
