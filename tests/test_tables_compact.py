"""The compact form of a table: per-pod lists of slice numbers over a grid of
equal slices, epochs and backups grouped. Both forms parse to equal tables
(hypothesis over random tables), errors name their place in the compact form,
bounds hold before any work, and every reader takes it: the helper process,
the file source, admin PUT, ``keyroute serve-table``, ``check`` and ``lookup``
(real processes and sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
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
from proxy.sources import judge
from proxy.sources.file import FileSource

from .conftest import Pod, Proxy, free_port, table_for

KEY_SPACE = core.KEY_SPACE
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BOUND = 20.0  # turns a hang into a failure; nothing depends on how long a wait takes
TOKEN = "s3cret"
ROOT = Path(__file__).resolve().parent.parent
DNS = "http://{}.app.default.svc.cluster.local:8080"
# The ConfigMap budget the compact form is for: kubectl's last-applied-configuration
# annotation holds 256 KiB; a table of 4096 slices x 8 pods must take at most a quarter.
BUDGET = 64 * 1024


def pods_of(n: int, url: str = "http://10.0.0.{}:8080") -> dict[str, core.Pod]:
    """``n`` active pods ``app-i``; ``url`` gets the pod id, or its number
    from 1 for the default IP address."""
    fill = (lambda i: f"app-{i}") if url == DNS else (lambda i: str(i + 1))
    return core.make_pods((f"app-{i}", url.format(fill(i)), 1.0, "active") for i in range(n))


def compact(t: core.Assignment) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(t.dumps(compact=True))
    return doc


def explicit(t: core.Assignment) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(t.dumps(compact=False))
    return doc


# -- both forms describe the same table ------------------------------------------------


@st.composite
def tables(draw: st.DrawFn) -> core.Assignment:
    """Random explicit tables: starts on a grid or anywhere, any owners,
    epochs and backups (rendezvous-derived or not), some pods draining."""
    n_pods = draw(st.integers(1, 6))
    ids = [f"p{i}" for i in range(n_pods)]
    draining = draw(st.sets(st.sampled_from(ids), max_size=n_pods - 1))
    weights = draw(st.lists(st.sampled_from([1.0, 2.0, 0.5, 3.0]), min_size=n_pods, max_size=n_pods))
    pods = core.make_pods(
        (pid, f"http://10.0.0.{i + 1}:80", w, "draining" if pid in draining else "active")
        for i, (pid, w) in enumerate(zip(ids, weights, strict=True))
    )
    generation = draw(st.integers(1, 2**64 - 1))
    shape = draw(st.sampled_from(["grid", "split", "random"]))
    count = draw(st.integers(1, 40))
    if shape == "random":
        starts = sorted({0, *draw(st.lists(st.integers(1, KEY_SPACE - 1), max_size=30))})
    else:
        starts = core.slice_starts(count)
        if shape == "split":
            extra = draw(st.lists(st.integers(1, KEY_SPACE - 1), max_size=5))
            dropped = set(draw(st.lists(st.sampled_from(starts[1:]), max_size=3))) if count > 1 else set()
            starts = sorted({*starts, *extra} - dropped)
    if draw(st.booleans()):  # backups as evolve and generate choose them
        specs = []
        for s in starts:
            owner = draw(st.sampled_from(ids))
            order = [p.id for p in core.rank(pods.values(), s) if p.id != owner]
            specs.append(core.SliceSpec(s, owner, draw(st.integers(1, generation)), tuple(order[:3])))
    else:
        specs = []
        for s in starts:
            owner = draw(st.sampled_from(ids))
            others = [p for p in ids if p != owner]
            backups = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others))) if others else []
            epoch = draw(st.one_of(st.just(generation), st.integers(1, generation)))
            specs.append(core.SliceSpec(s, owner, epoch, tuple(backups)))
    return core.build(generation, pods, specs)


@given(tables())
@QUICK
def test_compact_and_explicit_forms_parse_to_equal_tables(t: core.Assignment) -> None:
    exp, com = t.dumps(compact=False), t.dumps(compact=True)
    assert "slices" in orjson.loads(exp) and "owners" in orjson.loads(com)
    a, b = core.parse(exp), core.parse(com)
    assert a == b == t
    assert a.routes == b.routes == t.routes
    # dumps -> parse -> dumps is the identity, in either form; a table keeps its form.
    assert b.dumps() == com and a.dumps() == exp
    assert core.parse(b.dumps(compact=False)) == t and b.dumps(compact=False) == exp
    assert core.parse(a.dumps(compact=True)).dumps() == com


@given(st.integers(1, 9), st.sampled_from([1, 2, 7, 64, 1000, 4096]), st.integers(0, 3))
@QUICK
def test_generated_and_evolved_tables_write_rendezvous_backups(n_pods: int, count: int, drained: int) -> None:
    pods = pods_of(n_pods)
    t = core.generate(100, pods, count)
    doc = compact(t)
    assert doc["slice_count"] == count and "splits" not in doc and "merges" not in doc
    if n_pods > 1:
        assert doc["backups"] == core.RENDEZVOUS
    assert core.parse(orjson.dumps(doc)) == t
    if n_pods > drained > 0:
        specs = [(p.id, p.url, p.weight, "draining" if i < drained else "active") for i, p in enumerate(pods.values())]
        new = core.evolve(t, core.make_pods(specs), 101, rebalance=True)
        doc = compact(new)
        assert doc["backups"] == core.RENDEZVOUS
        assert core.parse(orjson.dumps(doc)) == new


def test_equality_is_routing_not_identity() -> None:
    t = core.generate(5, pods_of(3), 64)
    assert t == core.parse(t.dumps(compact=False)) and hash(t) == hash(core.parse(t.dumps(compact=True)))
    assert t != core.generate(6, pods_of(3), 64)
    assert t != core.generate(5, pods_of(4), 64)
    moved = explicit(t)
    moved["slices"][3]["epoch"] = 4
    assert t != core.parse(orjson.dumps(moved))
    assert t != "table"


def test_example_compact_table() -> None:
    """The README example, exactly as documented."""
    doc = {
        "version": 1,
        "generation": 1764650000000,
        "pods": {
            "app-0": {"url": "http://app-0.app:8080"},
            "app-1": {"url": "http://app-1.app:8080"},
            "app-2": {"url": "http://app-2.app:8080", "state": "draining"},
        },
        "slice_count": 8,
        "splits": ["0xd000000000000000"],
        "merges": ["0x2000000000000000"],
        "owners": {"app-0": "0,2,4-6", "app-1": "1,3,7"},
        "epoch": 1764640000000,
        "epochs": {"1764650000000": "3,7"},
        "backups": {"app-2": "0", "app-0,app-2": "1,3,7", "app-1,app-2": "2,4-6"},
    }
    t = core.parse(orjson.dumps(doc))
    e = 1 << 61
    assert list(t.starts) == [0, 2 * e, 3 * e, 4 * e, 5 * e, 6 * e, 0xD000000000000000, 7 * e]
    assert t.owner_ids() == ["app-0", "app-1", "app-0", "app-1", "app-0", "app-0", "app-0", "app-1"]
    assert [r.epoch for r in t.routes] == [1764640000000] * 3 + [1764650000000] + [1764640000000] * 3 + [1764650000000]
    assert t.route(7).backups == ("app-0", "app-2") and t.route(0).backups == ("app-2",)
    assert t.dumps() == orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"  # written back as read


# -- sizes: what a ConfigMap holds -------------------------------------------------------


def test_4096_slices_of_8_pods_fit_in_64_kib_after_rounds_of_changes() -> None:
    """The size the compact form exists for: every epoch differs by slice after
    drains, undrains, added and removed pods (``evolve``, as ``gen --from``)."""
    pods = core.make_pods((f"app-{i}", DNS.format(f"app-{i}"), 1.0, "active") for i in range(8))
    t = core.generate(1_764_650_000_000, pods, 4096)
    sizes = [len(t.dumps(compact=True))]
    ids = list(pods)
    for step in range(8):
        drained = ids[step % len(ids)]
        specs = [(p.id, p.url, p.weight, "draining" if p.id == drained else "active") for p in t.pods.values()]
        t = core.evolve(t, core.make_pods(specs), t.generation + 1)
        specs = [(p.id, p.url, p.weight, "active") for p in t.pods.values()]
        if step == 3:
            specs.append(("app-8", DNS.format("app-8"), 1.0, "active"))
        if step == 5:
            specs = [s for s in specs if s[0] != "app-8"]
        t = core.evolve(t, core.make_pods(specs), t.generation + 1, rebalance=True)
        data = t.dumps(compact=True)
        sizes.append(len(data))
        assert core.parse(data) == t
    assert len({r.epoch for r in t.routes}) > 8
    assert max(sizes) <= BUDGET, sizes
    assert len(t.dumps(compact=False)) > 10 * BUDGET  # what it replaces


# -- errors name their place in the compact form ------------------------------------------


def base_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "generation": 50,
        "pods": {
            "a": {"url": "http://10.0.0.1:80"},
            "b": {"url": "http://10.0.0.2:80"},
            "c": {"url": "http://10.0.0.3:80"},
        },
        "slice_count": 8,
        "owners": {"a": "0-3", "b": "4,5", "c": "6,7"},
        "epoch": 20,
        "epochs": {"30": "4-5", "50": "7"},
        "backups": {"b,c": "0-2", "a": "4,5"},
    }


def edit(path: str, value: Any) -> dict[str, Any]:
    doc = base_doc()
    *parents, last = path.split("/")
    node = doc
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
ERRORS = [
    (edit("owners/x", "7"), "owners.x: unknown pod 'x'"),
    (edit("owners/c", "5-7"), "owners.c: slice 5 is also listed under owners.b"),
    (edit("owners/c", "7"), "owners: slice 6 (0xc000000000000000) has no owner"),
    (edit("owners/c", "6-8"), "owners.c: slice 8 is beyond the table's 8 slices (numbered 0 to 7)"),
    (edit("owners/c", "6, 7"), "owners.c: item 2, ' 7', is not a slice number or a range like 4-9"),
    (edit("owners/c", "7-6"), "owners.c: range 7-6 runs backwards"),
    (edit("owners/c", [6, 7]), 'owners.c: expected a string of slice numbers like "0-3,7,9", got an array'),
    (edit("owners", ["a"]), "owners: expected an object of pod id -> slices"),
    (edit("owners", DELETE), "owners: missing (backups is a field of the compact form"),
    (edit("epochs/51", "0"), "epochs.51: epoch 51 is above the table's generation 50"),
    (edit("epochs/030", "0"), "epochs.030: '030' is not an epoch"),
    (edit("epochs/40", "1-4"), "epochs.40: slice 4 is listed under another epoch too"),
    (edit("epoch", 51), "epoch: 51 is above the table's generation 50"),
    (edit("epoch", 0), "epoch: 0 is out of range"),
    (edit("epochs", "7"), "epochs: expected an object of epoch -> slices"),
    (edit("backups/a,x", "6"), "backups.a,x: unknown pod 'x' (backup 2 of the list)"),
    (edit("backups/b,b", "6"), "backups.b,b: 'b' is listed twice"),
    (edit("backups/c", "6"), "backups.c: slice 6 is owned by 'c', which cannot be its own backup"),
    (edit("backups/b,a", "3"), "backups.b,a: slice 3 is owned by 'a'"),
    (edit("backups/c,a", "4"), "backups.c,a: slice 4 is listed under other backups too"),
    (edit("backups", "random"), 'backups: expected "rendezvous" or an object'),
    (edit("slice_count", core.MAX_SLICES + 1), "slice_count: 262145 slices is above the limit of 262144 (MAX_SLICES)"),
    (edit("slice_count", 0), "slice_count: 0 is out of range"),
    (edit("merges", ["0x1000000000000000"]), "merges[0]: 0x1000000000000000 is not a start of the 8 equal slices"),
    (edit("merges", ["0x0"]), "merges[0]: 0x0 cannot be merged away"),
    (edit("merges", "0x0"), "merges: expected an array of slice starts, got a string"),
    (edit("splits", ["0x4000000000000000"]), "splits[0]: 0x4000000000000000 is a start of the 8 equal slices already"),
    (edit("splits", ["0x3", "0x2"]), "splits[1]: 0x2 is not above the previous one, 0x3"),
    (edit("splits", ["0x3", "0x3"]), "splits[1]: 0x3 is not above the previous one"),
    (edit("splits", ["zz"]), "splits[0]: 'zz' is not a 0x hex string or a decimal integer"),
    (edit("splits", [str(KEY_SPACE)]), "splits[0]: '18446744073709551616' is outside the key space"),
    (edit("slices", []), "slice_count: only allowed in tables without slices"),
    (
        {k: v for k, v in edit("slices", []).items() if k != "slice_count"},
        "backups: a field of the compact form, which lists slices in owners instead of slices",
    ),
]


@pytest.mark.parametrize(("doc", "message"), ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(ERRORS)])
def test_compact_errors_name_their_place(doc: dict[str, Any], message: str) -> None:
    core.parse(orjson.dumps(base_doc()))  # the base is valid
    with pytest.raises(core.AssignmentError) as exc:
        core.parse(orjson.dumps(doc))
    assert str(exc.value).startswith(message), str(exc.value)


def test_slice_count_defaults_to_4096() -> None:
    doc = base_doc()
    del doc["slice_count"]
    with pytest.raises(core.AssignmentError, match=r"owners: slice 8 \(0x0080000000000000\) has no owner"):
        core.parse(orjson.dumps(doc))
    doc["owners"] = {"a": "0-4095"}
    doc["backups"] = core.RENDEZVOUS
    t = core.parse(orjson.dumps(doc))
    assert t.slice_count == 4096 and list(t.starts) == core.slice_starts(4096)
    assert all(sorted(r.backups) == ["b", "c"] for r in t.routes)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("owners", '"owners": {"a": "0-3", "b": "4,5", "c": "6,7", "a": "0-3"}'),
        ("epochs", '"epochs": {"30": "4-5", "30": "4-5"}'),
    ],
)
def test_keys_listed_twice_in_compact_groups(field: str, text: str) -> None:
    doc = base_doc()
    del doc[field]
    raw = orjson.dumps(doc).decode()[:-1] + "," + text + "}"
    with pytest.raises(core.AssignmentError, match=rf"^{field}\.(a|30): listed twice"):
        core.parse(raw)


def test_bounds_are_checked_before_the_work() -> None:
    pods = {f"p{i}": {"url": f"http://10.0.0.1:{i + 1}"} for i in range(20)}
    doc = {"version": 1, "generation": 1, "pods": pods, "slice_count": core.MAX_SLICES,
           "owners": {"p0": f"0-{core.MAX_SLICES - 1}"}, "backups": core.RENDEZVOUS}  # fmt: skip
    with pytest.raises(core.AssignmentError, match=r"^backups: \"rendezvous\" over 262144 slices x 20 pods"):
        core.parse(orjson.dumps(doc))
    doc = {"version": 1, "generation": 1, "pods": pods, "slice_count": core.MAX_SLICES,
           "splits": ["0x1"], "owners": {}}  # fmt: skip
    with pytest.raises(core.AssignmentError, match=r"^splits: 262144 slices \(slice_count\) \+ 1 splits - 0 merges"):
        core.parse(orjson.dumps(doc))


def test_epoch_regression_names_the_slice_as_the_compact_form_lists_it() -> None:
    old = core.parse(orjson.dumps(base_doc()))
    doc = base_doc()
    doc["generation"] = 60
    doc["epochs"] = {"30": "4"}  # slice 5 drops from 30 to 20
    verdict = judge(old, core.parse(orjson.dumps(doc)))
    assert verdict is not None
    assert verdict.startswith(
        "epoch regression: slice 5 (0xa000000000000000, owners.b): at position 0xa000000000000000"
    ), verdict
    assert "epoch 20 is below 30" in verdict
    doc = base_doc()
    doc["generation"] = 60
    doc["owners"] = {"a": "0-2", "b": "3-5", "c": "6,7"}  # slice 3 moves from a to b, epoch 20 kept
    doc["backups"] = {"b,c": "0-2", "a": "3-5"}
    verdict = judge(old, core.parse(orjson.dumps(doc)))
    assert verdict is not None and verdict.startswith("epoch regression: slice 3 (0x6000000000000000, owners.b)"), (
        verdict
    )
    assert "the owner changes from 'a' to 'b'" in verdict


# -- every reader takes it: helper process, file source, admin PUT, serve-table, CLI -------


def big_compact(generation: int = 7) -> tuple[core.Assignment, bytes]:
    """A table of 65536 slices whose compact form is small (below the inline
    parse threshold) but whose expansion belongs in the helper process."""
    t = core.generate(generation, pods_of(8), 65536)
    return t, t.dumps(compact=True)


async def test_offload_expands_a_small_compact_table_in_the_helper() -> None:
    t, data = big_compact()
    assert len(data) < 1_000_000
    off = Offload(low_priority=False)
    try:
        small = core.generate(3, pods_of(3), 16).dumps(compact=True)
        assert await off.parse(small) == core.parse(small)
        assert off.calls == 0  # small: parsed inline
        got = await off.parse(data)
        assert got == t and got.compact
        assert off.calls == 1 and off.fallbacks == 0  # in the helper
        # Few bytes, many slices: 16384 slices of one pod, in the helper.
        doc = {"version": 1, "generation": 8, "pods": {"a": {"url": "http://x:1"}},
               "slice_count": 16384, "owners": {"a": "0-16383"}}  # fmt: skip
        got = await off.parse(orjson.dumps(doc))
        assert got.slice_count == 16384 and off.calls == 2
        # A compact table with a huge grid in a few bytes: in the helper too.
        doc = {"version": 1, "generation": 9, "pods": {"a": {"url": "http://x:1"}},
               "slice_count": core.MAX_SLICES, "owners": {"a": f"0-{core.MAX_SLICES - 1}"}}  # fmt: skip
        raw = orjson.dumps(doc)
        assert len(raw) < 200
        got = await off.parse(raw)
        assert got.slice_count == core.MAX_SLICES and off.calls == 3
    finally:
        off.close()


async def next_table(updates: AsyncIterator[Any]) -> core.Assignment:
    async with asyncio.timeout(BOUND):
        item = await anext(updates)
    assert isinstance(item, core.Assignment), item
    return item


async def test_file_source_reads_compact_tables(tmp_path: Path) -> None:
    path = tmp_path / "assignment.json"
    first = core.generate(10, pods_of(3), 4096)
    path.write_bytes(first.dumps(compact=True))
    src = FileSource(str(path), watch="poll", poll_interval=0.02)
    updates = src.updates()
    try:
        assert await next_table(updates) == first
        t, data = big_compact(11)
        tmp = tmp_path / ".next"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        assert await next_table(updates) == t
    finally:
        await updates.aclose()  # type: ignore[attr-defined]


async def put(s: aiohttp.ClientSession, px: Proxy, body: bytes) -> tuple[int, Any]:
    async with s.put(px.admin + "/-/assignment", data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


async def test_admin_put_takes_compact_tables_and_refuses_bad_ones_by_place(
    proxy_factory: Callable[..., Awaitable[Proxy]], pods: list[Pod]
) -> None:
    first = table_for(pods, 10)
    px = await proxy_factory(first, admin=True, admin__token=TOKEN)
    specs = [(p.id, p.url, 1.0, "draining" if i == 0 else "active") for i, p in enumerate(pods)]
    drained = core.evolve(first, core.make_pods(specs), 11)
    async with aiohttp.ClientSession() as s:
        doc = compact(drained)
        doc["owners"][pods[1].id] += ",99999"
        status, body = await put(s, px, orjson.dumps(doc))
        assert status in (400, 422), body
        assert f"owners.{pods[1].id}: slice 99999 is beyond the table's {first.slice_count} slices" in body["detail"]
        status, body = await put(s, px, drained.dumps(compact=True))
        assert status == 200, body
        for i in range(50):
            key = f"user-{i}"
            async with s.get(px.base + "/", headers={"X-Routing-Key": key}) as r:
                assert r.status == 200
                assert r.headers["X-Keyroute-Generation"] == "11"
                assert r.headers["X-Keyroute-Pod"] == drained.lookup(key.encode()).pod.id != pods[0].id
        async with s.get(px.admin + "/-/lookup?key=user-1") as r:
            assert (await r.json())["epoch"] == drained.lookup(b"user-1").epoch


def keyroute(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROUTE_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_and_lookup_read_compact_tables(tmp_path: Path) -> None:
    t = core.generate(12, pods_of(4), 4096)
    (tmp_path / "t.json").write_bytes(t.dumps(compact=True))
    r = keyroute("check", "t.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "slices: 4096 (explicit)" in r.stdout and "generation: 12" in r.stdout
    r = keyroute("lookup", "t.json", "user-1", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = orjson.loads(r.stdout)
    route = t.lookup(b"user-1")
    assert (row["owner"], row["epoch"], row["backups"]) == (route.pod.id, route.epoch, list(route.backups))
    doc = compact(t)
    doc["epochs"] = {"13": "5"}
    (tmp_path / "bad.json").write_text(orjson.dumps(doc).decode())
    r = keyroute("check", "bad.json", cwd=tmp_path)
    assert r.returncode == 1
    assert "invalid table: epochs.13: epoch 13 is above the table's generation 12 (in bad.json)" in r.stderr


@contextlib.asynccontextmanager
async def serve_table(path: Path) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve-table", str(path), "--listen", f"127.0.0.1:{port}",
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(BOUND):
            while b" serving " not in (line := await proc.stderr.readline()):
                assert line, "serve-table exited"
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        await proc.wait()


async def test_serve_table_serves_a_compact_table_compact(tmp_path: Path) -> None:
    t = core.generate(20, pods_of(8, DNS), 4096)
    path = tmp_path / "assignment.json"
    path.write_bytes(t.dumps(compact=True))
    async with serve_table(path) as url, aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        body = await r.read()
    assert "owners" in orjson.loads(body) and len(body) <= BUDGET
    assert core.parse(body) == t


def test_big_tables_list_their_backups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past RENDEZVOUS_WRITE_LIMIT slices x pods, deriving backups would cost
    the parser more than reading them: they are written out, same table."""
    t = core.generate(5, pods_of(4), 256)
    assert compact(t)["backups"] == core.RENDEZVOUS
    monkeypatch.setattr(core, "RENDEZVOUS_WRITE_LIMIT", 256 * 4 - 1)
    doc = compact(t)
    assert isinstance(doc["backups"], dict) and core.parse(orjson.dumps(doc)) == t
