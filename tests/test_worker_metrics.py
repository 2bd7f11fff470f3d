"""Metrics with ``--workers N`` across a worker's death: counters keep what
the dead worker counted, once; gauges (``keyroute_workers``,
``keyroute_generation``) come from the live workers only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from proxy.metrics import RETIRED, Stats

from .conftest import EchoPods, table_for, wait_for
from .test_reload_safety import BOUND, Supervised, ask, metrics, supervised, write_atomic

SERVED = 'keyroute_responses_total{code="2xx",pod="pod-a"}'


async def scrapes(sup: Supervised, n: int = 20) -> list[dict[str, float]]:
    """``n`` scrapes of /metrics, each on a new connection (so they land on
    every worker: the admin port is shared with ``SO_REUSEPORT``)."""
    out = []
    for _ in range(n):
        async with aiohttp.ClientSession() as s:
            out.append(await metrics(s, f"http://127.0.0.1:{sup.admin_port}"))
    return out


async def scraped_until(sup: Supervised, what: str, ok: dict[str, float]) -> None:
    """Wait until a scrape shows every sample in ``ok``."""

    async def check() -> bool:
        (m,) = await scrapes(sup, 1)
        return all(m.get(k) == v for k, v in ok.items())

    await wait_for(check, BOUND, what)


async def test_a_dead_workers_counters_are_kept_once_and_its_gauges_dropped(
    tmp_path: Path, echo_pods: EchoPods
) -> None:
    a = await echo_pods("pod-a")
    path = tmp_path / "assignment.json"
    write_atomic(path, table_for([a], 5).dumps())
    with supervised(path) as sup:
        pids = list(await sup.serving(2))
        served: Counter[int | None] = Counter()

        async def both_served() -> bool:
            owner, _, _ = await ask(sup, f"k-{served.total()}", pids)
            served[owner] += 1
            return all(served[p] >= 10 for p in pids)

        await wait_for(both_served, BOUND, "both workers to serve 10 requests")
        total = served.total()
        await scraped_until(sup, "both workers' counts", {SERVED: total, "keyroute_workers": 2})

        # One worker dies; the supervisor starts another.
        os.kill(pids[0], signal.SIGKILL)
        workers = await sup.serving(3)
        (new,) = set(workers) - set(pids)
        pids = [pids[1], new]

        # Two live workers; the dead one's responses counted once, on every scrape.
        await scraped_until(sup, "two live workers in /metrics", {"keyroute_workers": 2})
        for m in await scrapes(sup):
            assert (m["keyroute_workers"], m[SERVED], m["keyroute_workers_retired_total"]) == (2, total, 1), m

        # Counting goes on from there.
        more: Counter[int | None] = Counter()

        async def both_serve_again() -> bool:
            owner, _, _ = await ask(sup, f"m-{more.total()}", pids)
            more[owner] += 1
            return all(more[p] >= 5 for p in pids)

        await wait_for(both_serve_again, BOUND, "both workers to serve 5 more requests")
        total += more.total()
        await scraped_until(sup, "the new requests counted", {SERVED: total})

        # A reload: the generation shown is the live workers', not the dead one's.
        write_atomic(path, table_for([a], 6).dumps())
        await scraped_until(sup, "generation 6 in /metrics", {"keyroute_generation": 6})
        for m in await scrapes(sup):
            assert (m["keyroute_generation"], m["keyroute_workers"], m[SERVED]) == (6, 2, total), m


FOLDER = """
import json, sys
from proxy.metrics import Shared
shared = Shared(sys.argv[1])
sys.stdin.readline()  # all folders start together
seen = []
while True:
    got = shared.gather()  # folds the dead snapshots it finds
    counters = [got.retired.counters, *got.dead]
    responses = sum(c["by_pod"].get("p", [0, 0])[1] for c in counters)
    seen.append([responses, sum(c["totals"].get("ejections", 0) for c in counters)])
    if not got.dead:
        break
print(json.dumps(seen))
"""


def test_workers_folding_the_same_dead_workers_at_once_count_each_once(tmp_path: Path) -> None:
    # Snapshots of 200 dead workers (pids above pid_max: no process has them),
    # folded by 4 processes at once, each also reading the totals as a scrape
    # does: every read sees each dead worker once, and all are folded once.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead = range(pid_max + 1, pid_max + 201)
    for i, pid in enumerate(dead):
        stats = Stats()
        stats.by_pod["p"] = [0, i + 1, 0, 0, 0]
        counters = stats.snapshot()
        gauges = {"generation": 3, "workers": 1, "ejections": 1}
        (tmp_path / f"{pid}.json").write_bytes(orjson.dumps({"counters": counters, "gauges": gauges}))
    responses = sum(range(1, 201))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FOLDER, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
        seen = orjson.loads(out)
        assert seen and all(s == [responses, 200] for s in seen), [s for s in seen if s != [responses, 200]][:5]
    retired = orjson.loads((tmp_path / RETIRED).read_bytes())
    assert retired["workers"] == 200
    assert retired["counters"]["by_pod"]["p"][1] == responses
    assert retired["counters"]["totals"]["ejections"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", RETIRED]
