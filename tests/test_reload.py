"""Table reloads under load: every response comes from the owner of its key in
the generation stamped on it, and no request fails while tables change."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import assignment as core
from proxy.offload import INLINE_BYTES
from proxy.reload import follow
from proxy.sources.file import FileSource
from proxy.sources.http import HttpSource
from proxy.tableserver import serve_table

from .conftest import Pod, Proxy, header_map, wait_for

Factory = Callable[..., Awaitable[Proxy]]

CLIENTS = 32
KEYS = [f"key-{i}" for i in range(2000)]
WRITES = 60
# Explicit tables of 256 slices are parsed inline; of 4096 slices (~400 kB)
# in the helper process of proxy.offload.
SLICES = [256, 4096]
BOUND = 5.0


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def layouts(pods: list[Pod]) -> list[dict[str, core.Pod]]:
    """Pod sets the tables cycle through: all, one removed, one draining, weighted."""
    a, b, c = pods

    def spec(*entries: tuple[Pod, float, str]) -> dict[str, core.Pod]:
        return core.make_pods((p.id, p.url, w, state) for p, w, state in entries)

    return [
        spec((a, 1, "active"), (b, 1, "active"), (c, 1, "active")),
        spec((a, 1, "active"), (b, 1, "active")),
        spec((a, 1, "active"), (b, 1, "active"), (c, 1, "draining")),
        spec((a, 3, "active"), (b, 1, "active"), (c, 1, "active")),
        spec((a, 1, "active"), (c, 2, "active")),
        spec((b, 1, "active"), (c, 1, "draining")),
    ]


def next_table(prev: core.Assignment, generation: int, pods: dict[str, core.Pod]) -> core.Assignment:
    """Alternate fresh generated tables and minimal-move evolutions (with and
    without rebalancing), so that both owners and epochs change."""
    if generation % 3 == 0:
        return core.generate(generation, pods, prev.slice_count)
    return core.evolve(prev, pods, generation, rebalance=generation % 2 == 0)


class Load:
    """CLIENTS concurrent clients requesting random keys until stopped; each
    response is checked against the table of the generation it names."""

    def __init__(self, base: str, tables: dict[int, core.Assignment]) -> None:
        self.base = base
        self.tables = tables
        self.stop = asyncio.Event()
        self.responses = 0
        self.generations: set[int] = set()
        self.by_generation: dict[int, int] = {}  # responses stamped with each generation
        self.problems: list[str] = []

    def check(self, key: str, status: int, headers: Any, info: Any) -> None:
        if status != 200:
            self.problems.append(f"{key}: status {status}: {info}")
            return
        gen = int(headers["X-Keyroute-Generation"])
        self.generations.add(gen)
        self.by_generation[gen] = self.by_generation.get(gen, 0) + 1
        table = self.tables.get(gen)
        if table is None:
            self.problems.append(f"{key}: generation {gen} was never written")
            return
        route = table.lookup(key.encode())
        seen = header_map(info)
        problems = []
        if info["pod"] != route.pod.id:
            problems.append(f"answered by {info['pod']}, owner is {route.pod.id}")
        if headers.get("X-Keyroute-Pod") != info["pod"]:
            problems.append(f"X-Keyroute-Pod {headers.get('X-Keyroute-Pod')} but body pod {info['pod']}")
        if seen.get("x-keyroute-epoch") != [str(route.epoch)]:
            problems.append(f"pod got epoch {seen.get('x-keyroute-epoch')}, route epoch is {route.epoch}")
        if seen.get("x-keyroute-generation") != [str(gen)]:
            problems.append(f"pod got generation {seen.get('x-keyroute-generation')}, response says {gen}")
        if problems:
            self.problems.append(f"{key} @ generation {gen}: " + "; ".join(problems))

    async def client(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        while not self.stop.is_set():
            key = rng.choice(KEYS)
            try:
                async with session.get(self.base + "/reload", headers={"X-Routing-Key": key}) as r:
                    info = await r.json(content_type=None)
                    self.check(key, r.status, r.headers, info)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                self.problems.append(f"{key}: {exc.__class__.__name__}: {exc}")
            self.responses += 1

    async def run(self, during: Callable[[], Awaitable[None]]) -> None:
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [asyncio.create_task(self.client(session, random.Random(i))) for i in range(CLIENTS)]
            try:
                await during()
            finally:
                self.stop.set()
                await asyncio.gather(*clients)


async def generation_in_force(base: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(base + "/", headers={"X-Routing-Key": "probe"}) as r:
        assert r.status == 200
        return int(r.headers["X-Keyroute-Generation"])


async def reload_under_load(px: Proxy, pods: list[Pod], path: Path, tables: dict[int, core.Assignment]) -> None:
    """Write WRITES newer tables to ``path`` while the load runs, then check."""
    shapes = layouts(pods)
    rng = random.Random(7)
    load = Load(px.base, tables)

    def served(n: int) -> Callable[[], bool]:
        """Whether ``n`` more responses have come since now."""
        target = load.responses + n
        return lambda: load.responses >= target

    async def rewrite() -> None:
        first = min(tables)
        await wait_for(lambda: load.by_generation.get(first, 0) >= CLIENTS, BOUND, "load on the first table")
        prev = tables[max(tables)]
        for i in range(WRITES):
            gen = prev.generation + 1
            table = next_table(prev, gen, shapes[i % len(shapes)])
            tables[gen] = table  # known before anyone can see it
            write_atomic(path, table.dumps())
            prev = table
            if i % 4 == 3:
                # Every fourth table is seen by the traffic before the next write ...
                await wait_for(lambda g=gen: g in load.generations, BOUND, f"traffic on generation {gen}")
            else:
                # ... the others come as soon as some requests ran (a random
                # number of them): the proxy may skip some of those tables.
                await wait_for(served(rng.randint(1, CLIENTS)), BOUND, "traffic between writes")
        final = prev.generation

        async def in_force() -> bool:
            return await generation_in_force(px.base) == final

        await wait_for(in_force, BOUND, f"generation {final} in force")
        await wait_for(lambda: load.by_generation.get(final, 0) >= CLIENTS, BOUND, "traffic on the final table")

    await load.run(rewrite)
    final = max(tables)
    big = tables[final].dumps()
    if len(big) >= INLINE_BYTES:  # these tables went through the helper process
        assert px.runtime.offload.calls > 0, len(big)
    assert not load.problems, f"{len(load.problems)} of {load.responses} responses wrong, first: {load.problems[:5]}"
    assert await generation_in_force(px.base) == final
    assert load.responses > 500
    assert final in load.generations
    assert len(load.generations) >= WRITES // 4, sorted(load.generations)
    # The tables really moved keys around.
    owners = {tables[g].lookup(b"key-1").pod.id for g in tables}
    assert len(owners) >= 2


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.timeout(30)
@pytest.mark.parametrize("slices", SLICES)
async def test_reload_under_load_file_source(
    tmp_path: Path, proxy_factory: Factory, pods: list[Pod], slices: int
) -> None:
    first = core.generate(1, layouts(pods)[0], slices)
    tables = {1: first}
    path = tmp_path / "assignment.json"
    write_atomic(path, first.dumps())
    px = await proxy_factory(first, proxy__shutdown_timeout="2s")
    watcher = follow(px.runtime, FileSource(str(path), watch="auto", offload=px.runtime.offload))
    try:
        await reload_under_load(px, pods, path, tables)
    finally:
        await cancel(watcher)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("slices", SLICES)
async def test_reload_under_load_long_poll(
    tmp_path: Path, proxy_factory: Factory, pods: list[Pod], slices: int
) -> None:
    first = core.generate(1, layouts(pods)[0], slices)
    tables = {1: first}
    path = tmp_path / "assignment.json"
    write_atomic(path, first.dumps())
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    bound: asyncio.Future[int] = loop.create_future()
    server = loop.create_task(serve_table(str(path), "127.0.0.1", 0, stop, ready=bound.set_result))
    watcher: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(BOUND):
            port = await bound
        px = await proxy_factory(None, proxy__shutdown_timeout="2s")
        # poll_interval far above the test's length: only long polls deliver.
        source = HttpSource(f"http://127.0.0.1:{port}/", poll_interval=30.0, offload=px.runtime.offload)
        watcher = follow(px.runtime, source)
        async with aiohttp.ClientSession() as s:

            async def has_table() -> bool:  # 503 no_table until the first fetch
                async with s.get(px.base + "/", headers={"X-Routing-Key": "probe"}) as r:
                    return r.status == 200

            await wait_for(has_table, BOUND, "the first table from the long poll")
        await reload_under_load(px, pods, path, tables)
    finally:
        if watcher is not None:
            await cancel(watcher)
        stop.set_result(None)
        async with asyncio.timeout(BOUND):
            await server
