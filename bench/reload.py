"""Hot-reload benchmark: how fast a new table is in force, and what reloads cost under load.

Run from the repo root with the venv's Python (as root, or with sudo
available, if nginx/wrk must be installed)::

    python bench/reload.py                          # full run, ~3 minutes
    python bench/reload.py --markdown /tmp/reload.md  # also write a markdown section
    python bench/reload.py --quick                  # 20 changes, 1 round of 4 s runs (smoke test)
    python bench/reload.py --only load --reloads 10 # only part 2, 1 reload per second

What it does (keyroute pinned to core 0 with ``taskset``; the nginx pods, wrk,
``keyroute serve-table`` and this script on core 1):

1. Propagation. 3 pods (one nginx, ``return 200``, as in ``bench/peers.py``),
   a pods-only table (4096 generated slices). ``--changes`` times (default
   100): write the next table (generation + 1, pod weights changed so the
   slices move) to a temp file in the watched folder, ``os.replace()`` it over
   the table, and from just before the rename send GETs in a tight loop
   (``--gap`` ms apart, default 0) on one keep-alive connection
   (``http.client``) until a response carries the new
   ``X-Keyroute-Generation``; that delay is the sample. 20 more requests then
   must all carry it (no flapping back). A random 50-150 ms pause separates
   changes. Two sources, each with its own keyroute:

   * ``file:PATH`` (inotify watch);
   * ``http://`` long-poll: ``keyroute serve-table FILE`` watches FILE, keyroute
     long-polls it. The delay runs from the rename of FILE. A thread of this
     script long-polls serve-table at the same time (``GET /?after=<old>``,
     the proxy's own protocol), which splits the delay into "serve-table has
     the table" (its own file watch) and "serve-table -> proxy routes by it".

   Reported: p50 / p99 (nearest rank) / max. Targets: p99 < 100 ms (file),
   < 50 ms (long-poll).

2. Reload under load. 4 pods, explicit tables of ``--slices`` (default
   100,000) equal slices: table A (slice i on pod i mod 4, the next pod as its
   backup) and table B (every 4th slice moved to the next pod, 25% of the key
   space), no per-slice epochs (so every epoch is the table's generation);
   ~6 MB of compact JSON each. keyroute starts on A (``file:`` source).

   * one reload at a time on the idle proxy (``--idle-reloads``, default 10):
     rename -> first response with the new generation, and the slowest
     request of a client loop from the rename to 0.5 s after that (how long
     one reload stalls the event loop);
   * capacity: wrk (``-t1``, ``bench/peers.lua``: random key out of 10,000)
     at 64 connections, the best of three 3 s runs (one run alone moved by
     up to a third between minutes on a shared VM, and set the load too low);
   * wrk has no rate limit and wrk2 is not in Debian, so the load is set by
     the connection count, each connection pacing itself: ``bench/peers.lua``
     plus a wrk ``delay()`` of ``--pace`` ms (default 1) after each response,
     so one connection gives ~1/(1 ms + latency) req/s and the count can be
     tuned finely. Short runs (from 8 connections, re-estimated up to 3 times)
     find the count closest to 70% of capacity. ``--pace 0`` drops the delay
     and walks up 1, 2, 3, 4, 6, ... connections instead (coarse: on a
     2-core VM 2 connections gave ~45% and 3 ~90% of capacity);
   * ``--rounds`` (default 3) interleaved pairs of ``--duration`` (10 s) wrk
     runs at that count, each after a 2 s warmup: "steady" (no reload) and
     "reload" (``--reloads`` = 100 renames of A/B alternately, generations
     +1 each, spaced evenly over the run). In steady runs the same files are
     written at the same pace into a folder keyroute does not watch, so the
     load side does the same work in both. From the last rename on, the
     script polls ``GET /-/readyz`` every 10 ms until the last generation is
     in force ("last rename -> in force"); after the run it
     checks ``GET /-/assignment`` (generation, no ``last_error``) and that 200
     keys are answered by the owner the last table gives them.

   Reported per run: req/s, p50, p99, max (wrk ``--latency``), non-2xx, socket
   errors, reloads applied by keyroute (``keyroute_reloads_total`` from
   ``/metrics``), core busy. Targets: 0 non-2xx, p99 with reloads <= 1.5x p99
   without. wrk is closed-loop: a stall of the proxy delays only the requests
   in flight, so its p99 understates stalls (coordinated omission); the max
   and the req/s drop show them.

Only 127.0.0.1 is used. Every wait is bounded, and the whole run is stopped
after ``--timeout`` seconds (default 900). Every process started here is
stopped at exit, including on Ctrl-C; temp files (the table files in /dev/shm
if there is one) live in one temp dir, removed at exit unless ``--keep``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import orjson
from common import HZ, LOAD_CORE, PROXY_CORE, Proxy, Run, nearest_rank

from proxy import assignment as core

# ---------------------------------------------------------------- helpers


def summary(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    return (
        f"p50 {statistics.median(xs):.1f} ms, p99 {nearest_rank(xs, 0.99):.1f} ms, max {max(xs):.1f} ms, "
        f"min {min(xs):.1f} ms (n={len(xs)})"
    )


def replace_atomically(path: Path, data: bytes | list[bytes]) -> float:
    """Write data to a temp file next to path, rename it over path; the
    monotonic time just before the rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        for chunk in [data] if isinstance(data, bytes) else data:
            fh.write(chunk)
    t = time.monotonic()
    os.replace(tmp, path)
    return t


def start_keyroute(d: Path, source: str, name: str) -> tuple[Proxy, int]:
    """keyroute run on core 0; returns it and its admin port once ready."""
    port, admin = common.free_port(), common.free_port()
    flags = common.keyroute_flags(port, admin, source)
    return common.start_keyroute(name, flags, port, admin, d / f"{name}.log", timeout=15), admin


def wait_idle(px: Proxy, timeout: float = 15.0) -> None:
    """Until keyroute's process tree used no CPU for 0.3 s (startup work such
    as re-reading a big table is over), at most timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = common.cpu_ticks(px.pids())
        time.sleep(0.3)
        if common.cpu_ticks(px.pids()) - c0 <= 1:
            return


def generation_in_force(admin: int) -> int | None:
    status, _, body = common.get(admin, "/-/readyz", {})
    return orjson.loads(body).get("generation") if status == 200 else None


def wait_generation(admin: int, want: int, since: float, timeout: float, out: dict[str, Any]) -> None:
    """Poll GET /-/readyz every 10 ms until generation want is in force; out["ms"]:
    milliseconds from since (monotonic) to the answer that showed it."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        g: int | str | None
        try:
            g = generation_in_force(admin)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            g = f"{exc.__class__.__name__}: {exc}"
        out["last"] = g
        if g == want:
            out["ms"] = (time.monotonic() - since) * 1e3
            return
        time.sleep(0.01)


def reloads(admin: int) -> dict[str, int]:
    """keyroute_reloads_total by result, from /metrics."""
    _, _, body = common.get(admin, "/metrics", {})
    return {
        m.group(1).decode(): int(float(m.group(2)))
        for m in re.finditer(rb'^keyroute_reloads_total\{result="([^"]+)"\} (\S+)', body, re.M)
    }


def problems_in_log(log: Path) -> list[str]:
    """Lines of a keyroute log that are not its normal start/stop/applied-reload lines."""
    out = []
    for line in common.tail(log, 100000).splitlines():
        if '"result":"applied"' in line or '"result": "applied"' in line:
            continue
        if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Error|exception", line):
            out.append(line)
    return out


# ---------------------------------------------------------------- 1. propagation


def pods_table(generation: int, pods: dict[str, int], weights: dict[str, int]) -> bytes:
    doc = {
        "version": 1,
        "generation": generation,
        "pods": {n: {"url": f"http://127.0.0.1:{p}", "weight": weights[n]} for n, p in pods.items()},
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


@dataclass
class Sample:
    total: float  # rename -> first response with the new generation, ms
    requests: int  # requests sent until then
    upstream: float | None = None  # rename -> serve-table answers our long-poll with it, ms


@dataclass
class Propagation:
    source: str
    samples: list[Sample] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # changes never seen, or flapping
    log_problems: list[str] = field(default_factory=list)
    parse_ms: float = 0.0  # assignment.parse of one such table in this script (core 1), median


class Client:
    """One keep-alive connection to the proxy; reconnects if it breaks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.errors: list[str] = []
        self.n = 0

    def generation(self, key: str) -> int | None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            self.conn.request("GET", "/", headers={"X-Routing-Key": key})
            r = self.conn.getresponse()
            r.read()
        except (OSError, http.client.HTTPException) as exc:
            self.errors.append(f"{exc.__class__.__name__}: {exc}")
            self.conn.close()
            self.conn = None
            return None
        self.n += 1
        if r.status != 200:
            self.errors.append(f"HTTP {r.status}")
            return None
        g = r.getheader("X-Keyroute-Generation")
        return int(g) if g else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def upstream_watch(port: int, after: int, out: dict[str, float], ready: threading.Event) -> None:
    """Long-poll serve-table like the proxy does; record when the new table comes."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", f"/?after={after}&wait=5")
        ready.set()
        r = c.getresponse()
        t = time.monotonic()
        r.read()
        if r.status == 200:
            out["t"] = t
    except (OSError, http.client.HTTPException):
        pass
    finally:
        ready.set()
        c.close()


def propagation(
    tmp: Path, pods: dict[str, int], kind: str, changes: int, rng: random.Random, deadline: float, gap: float
) -> Propagation:
    d = tmp / f"prop-{kind}"
    d.mkdir()
    path = d / "table.json"
    gen = int(time.time() * 1000)
    names = list(pods)
    weights = dict.fromkeys(names, 1)
    data = pods_table(gen, pods, weights)
    path.write_bytes(data)
    st_port = st = None
    if kind == "file":
        source = f"file:{path}"
    else:
        st_port = common.free_port()
        st_log = d / "serve-table.log"
        st = common.start(
            [*common.keyroute_exe(), "serve-table", str(path), "--listen", f"127.0.0.1:{st_port}"], st_log, LOAD_CORE
        )
        common.wait_port(st_port, st, st_log)
        source = f"http://127.0.0.1:{st_port}/"
    px, _ = start_keyroute(d, source, f"keyroute-{kind}")
    wait_idle(px)
    res = Propagation(source.replace(str(tmp), "$TMP"))
    client = Client(px.port)
    key = "user-1"
    try:
        # warm the connection and the route
        for _ in range(200):
            client.generation(key)
        if client.errors:
            raise RuntimeError(f"{kind}: errors before the first change: {client.errors[:5]}")
        for i in range(changes):
            if time.monotonic() > deadline:
                res.missed.append(f"stopped after {i} changes: --timeout")
                break
            gen += 1
            weights[names[i % len(names)]] = 1 + (weights[names[i % len(names)]] % 3)
            data = pods_table(gen, pods, weights)
            up: dict[str, float] = {}
            th = None
            if st_port is not None:
                ready = threading.Event()
                th = threading.Thread(target=upstream_watch, args=(st_port, gen - 1, up, ready), daemon=True)
                th.start()
                ready.wait(2)
                time.sleep(0.005)  # let serve-table park the request
            n0 = client.n
            t0 = replace_atomically(path, data)
            seen = None
            limit = t0 + 5
            while time.monotonic() < limit:
                if gap:
                    time.sleep(gap)
                g = client.generation(key)
                if g == gen:
                    seen = time.monotonic()
                    break
                if g is not None and g > gen:
                    res.missed.append(f"change {i}: generation {g} above the one written, {gen}")
                    break
            if seen is None:
                res.missed.append(f"change {i} (generation {gen}): not seen within 5 s; errors {client.errors[-3:]}")
            else:
                after = [client.generation(key) for _ in range(20)]
                if any(g != gen for g in after):
                    res.missed.append(f"change {i}: after generation {gen} was seen, got {after}")
                if th is not None:
                    th.join(6)
                res.samples.append(
                    Sample((seen - t0) * 1e3, client.n - n0, (up["t"] - t0) * 1e3 if "t" in up else None)
                )
            time.sleep(rng.uniform(0.05, 0.15))
        if client.errors:
            res.missed.append(f"client errors: {client.errors[:5]} ({len(client.errors)} in all)")
        times = []
        for _ in range(11):
            t = time.perf_counter()
            core.parse(data)
            times.append((time.perf_counter() - t) * 1e3)
        res.parse_ms = statistics.median(times)
        if px.proc.poll() is not None:
            res.missed.append(f"keyroute exited with {px.proc.returncode}")
    finally:
        client.close()
        common.stop(px.proc, 10)
        if st is not None:
            common.stop(st, 10)
        res.log_problems = problems_in_log(px.log)
        if st_port is not None:
            res.log_problems += ["serve-table: " + x for x in problems_in_log(d / "serve-table.log")]
    return res


# ---------------------------------------------------------------- 2. reload under load


def explicit_tables(pods: dict[str, int], slices: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Generation-less bodies of tables A and B: (head, rest) pairs; a table
    is head % generation + rest."""
    names = list(pods)
    n = len(names)
    pod_doc = {k: {"url": f"http://127.0.0.1:{p}"} for k, p in pods.items()}
    starts = core.slice_starts(slices)

    def body(moved: bool) -> tuple[bytes, bytes]:
        sl = []
        for i, s in enumerate(starts):
            o = i % n
            if moved and i % 4 == 0:
                o = (o + 1) % n
            sl.append({"start": f"0x{s:016x}", "pod": names[o], "backups": [names[(o + 1) % n]]})
        rest = orjson.dumps({"pods": pod_doc, "slices": sl})
        return b'{"version":1,"generation":%d,', rest[1:]

    ha, ra = body(False)
    hb, rb = body(True)
    return ha, ra, hb, rb


@dataclass
class LoadRun:
    kind: str  # steady | reload
    rnd: int
    run: Run
    renames: int = 0
    last_generation: int = 0
    applied: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    settle_ms: float | None = None  # last rename -> last generation in force
    rename_lag_ms: float = 0.0  # worst lateness of a rename against its schedule
    maxlat: float = 0.0
    checks: list[str] = field(default_factory=list)


def paced_lua(tmp: Path, pace_ms: int) -> Path:
    """bench/peers.lua plus a ``delay()`` of pace_ms: each connection waits that
    long after a response before its next request (0: no delay, plain peers.lua)."""
    if pace_ms <= 0:
        return common.LUA
    lua = tmp / f"paced-{pace_ms}ms.lua"
    lua.write_text(common.LUA.read_text() + f"\nfunction delay()\n   return {pace_ms}\nend\n")
    return lua


def quick_wrk(port: int, conns: int, seconds: float, lua: Path = common.LUA) -> Run:
    r = Run("keyroute", conns, 0)
    out = common.run_wrk(port, conns, seconds, lua)
    common.parse_wrk(out, r)
    r.raw = out
    return r


class Reloader:
    """Alternates tables A and B at increasing generations on a schedule."""

    def __init__(self, path: Path, bodies: tuple[bytes, bytes, bytes, bytes], generation: int) -> None:
        self.path = path
        self.bodies = bodies
        self.generation = generation
        self.flip = False

    def next(self) -> tuple[int, list[bytes], bool]:
        self.generation += 1
        self.flip = not self.flip
        ha, ra, hb, rb = self.bodies
        head, rest = (hb, rb) if self.flip else (ha, ra)
        return self.generation, [head % self.generation, rest], self.flip

    def run(self, path: Path, count: int, start: float, interval: float) -> tuple[int, float, float]:
        """Write count tables to path, the i-th at start + i * interval;
        (renames, worst lateness s, time of the last rename)."""
        late, t_last = 0.0, 0.0
        for i in range(count):
            due = start + i * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            _, chunks, _ = self.next()
            t_last = replace_atomically(path, chunks)
            late = max(late, t_last - due)
        return count, late, t_last


def load_run(
    kind: str,
    rnd: int,
    px: Proxy,
    admin: int,
    conns: int,
    args: argparse.Namespace,
    reloader: Reloader,
    watched: Path,
    unwatched: Path,
    expect: dict[bool, core.Assignment],
    lua: Path,
) -> LoadRun:
    if args.warmup > 0:
        common.run_wrk(px.port, conns, args.warmup, lua)
    before = reloads(admin)
    pids = px.pids()
    s0, c0, t0 = common.core_times(), common.cpu_ticks(pids), time.monotonic()
    spy = None
    if args.profile and kind == "reload" and rnd == 1:
        spy = start_profile(px, args.duration, Path(args.profile))
    p = common.start_piped(common.wrk_cmd(px.port, conns, args.duration, lua))
    start = time.monotonic() + 0.2
    interval = (args.duration - 0.7) / args.reloads
    saved = reloader.generation, reloader.flip
    n, late, t_last = reloader.run(watched if kind == "reload" else unwatched, args.reloads, start, interval)
    if kind != "reload":  # nothing reached keyroute: reuse the generations
        reloader.generation, reloader.flip = saved
    settled: dict[str, Any] = {}
    watcher = None
    if kind == "reload":
        # from now on, while wrk still runs: when is the last generation in force?
        watcher = threading.Thread(
            target=wait_generation, args=(admin, reloader.generation, t_last, 30.0, settled), daemon=True
        )
        watcher.start()
    try:
        out, _ = p.communicate(timeout=args.duration + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        out += "\n(wrk killed: did not finish in time)"
    common.forget(p)
    c1, t1, s1 = common.cpu_ticks(pids), time.monotonic(), common.core_times()
    if spy is not None:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            common.stop(spy, 10)
    r = Run("keyroute", conns, rnd)
    r.raw = out
    r.cpu_s, r.wall_s = (c1 - c0) / HZ, t1 - t0
    r.core0, r.core1 = common.core_busy(s0, s1, PROXY_CORE), common.core_busy(s0, s1, LOAD_CORE)
    common.parse_wrk(out, r)
    r.alive = px.proc.poll() is None
    lr = LoadRun(
        kind, rnd, r, renames=n if kind == "reload" else 0, rename_lag_ms=late * 1e3, maxlat=common.wrk_max(out)
    )
    if kind == "reload" and r.alive:
        want = reloader.generation
        lr.last_generation = want
        assert watcher is not None
        watcher.join(35)
        if "ms" in settled:
            lr.settle_ms = settled["ms"]
        else:
            lr.checks.append(
                f"generation in force {settled.get('last')} != last written {want} 30 s after the last rename"
            )
        _, _, body = common.get(admin, "/-/assignment", {})
        doc = orjson.loads(body)
        if doc.get("generation") != want:
            lr.checks.append(f"GET /-/assignment: generation {doc.get('generation')}, want {want}")
        if doc.get("last_error"):
            lr.checks.append(f"GET /-/assignment: last_error {doc['last_error']!r}")
        table = expect[reloader.flip]
        wrong = []
        for i in range(200):
            key = f"key-{i * 37 + 1}"
            st, h, _ = common.get(px.port, "/", {"X-Routing-Key": key})
            owner = table.lookup(key.encode()).pod_id
            if st != 200 or h.get("x-keyroute-pod") != owner or h.get("x-keyroute-generation") != str(want):
                wrong.append(f"{key}: {st} {h.get('x-keyroute-pod')} gen {h.get('x-keyroute-generation')}, "
                             f"want {owner} gen {want}")  # fmt: skip
        if wrong:
            lr.checks.append(f"{len(wrong)}/200 keys not routed by the last table: {wrong[:3]}")
        else:
            lr.checks.append(f"ok: generation {want} in force (readyz and /-/assignment), "
                             f"200/200 keys on the owner table {'B' if reloader.flip else 'A'} gives")  # fmt: skip
    after = reloads(admin)
    lr.applied = after.get("applied", 0) - before.get("applied", 0)
    lr.refused = {k: v - before.get(k, 0) for k, v in after.items() if k != "applied" and v - before.get(k, 0)}
    return lr


def start_profile(px: Proxy, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record (--gil: only the thread holding the GIL is sampled) of
    keyroute for one run, raw collapsed stacks per thread to out."""
    spy = common.py_spy()
    if spy is None:
        return None
    cmd = [spy, "record", "--pid", str(px.proc.pid), "--gil", "--threads", "--rate", "250",
           "--duration", f"{int(seconds)}", "--format", "raw", "--output", str(out)]  # fmt: skip
    return common.start(cmd, out.with_suffix(".log"), LOAD_CORE)


def profile_summary(raw: Path, top: int = 12) -> list[str]:
    """Share of GIL-holding samples per thread, and the top frames by own time."""
    threads: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        th = stack.split(";")[0]
        threads[th] = threads.get(th, 0) + int(n)
        total += int(n)
    out = [f"{n / total:.0%} {th}" for th, n in sorted(threads.items(), key=lambda kv: -kv[1])] if total else []
    out += [f"{share:.1%} {frame}" for frame, _, share in common.self_time(raw, top)]
    return out


def idle_reloads(px: Proxy, reloader: Reloader, count: int) -> tuple[list[float], list[float], list[str]]:
    """One reload at a time on an otherwise idle keyroute, a client loop
    running: (rename -> first response with it, slowest request from the
    rename to 0.5 s after that) in ms per reload, and problems."""
    client = Client(px.port)
    seen_ms: list[float] = []
    worst_ms: list[float] = []
    problems: list[str] = []
    try:
        for _ in range(200):
            client.generation("key-1")
        for _ in range(count):
            gen, chunks, _ = reloader.next()
            t0 = replace_atomically(reloader.path, chunks)
            seen, worst, end = None, 0.0, t0 + 5
            while time.monotonic() < end:
                t = time.monotonic()
                g = client.generation("key-1")
                now = time.monotonic()
                worst = max(worst, now - t)
                if g == gen and seen is None:
                    seen = now - t0
                    end = now + 0.5
            if seen is None:
                problems.append(f"idle reload to generation {gen}: not seen within 5 s")
            else:
                seen_ms.append(seen * 1e3)
                worst_ms.append(worst * 1e3)
        if client.errors:
            problems.append(f"idle reloads: client errors {client.errors[:5]}")
    finally:
        client.close()
    return seen_ms, worst_ms, problems


def find_conns(port: int, target: float, seconds: float, lua: Path, paced: bool) -> tuple[int, list[tuple[int, float]]]:
    """The wrk connection count whose req/s is closest to target. Unpaced: walk
    up 1, 2, 3, 4, 6, ... connections. Paced: each connection gives about the
    same req/s, so estimate the count from a probe at 8 and refine twice."""
    probes: list[tuple[int, float]] = []

    def probe(c: int) -> float:
        r = quick_wrk(port, c, seconds, lua)
        probes.append((c, r.rps))
        print(f"  probe c={c:<4} {r.rps:>9,.0f} req/s  p99 {r.p99:.2f} ms  non-2xx {r.non2xx}", file=sys.stderr)
        return r.rps

    if paced:
        c = 8
        for _ in range(4):
            rps = probe(c)
            nxt = max(1, min(1024, round(target / max(rps / c, 1.0))))
            if any(nxt == pc for pc, _ in probes):
                break
            c = nxt
    else:
        for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            if probe(c) >= target:
                break
    best = min(probes, key=lambda cr: abs(cr[1] - target))
    return best[0], probes


# ---------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=100, help="table changes per propagation source (default 100)")
    ap.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="ms of sleep between the propagation client's requests (default 0: a tight loop)",
    )
    ap.add_argument("--slices", type=int, default=100_000, help="slices of the tables reloaded under load")
    ap.add_argument(
        "--idle-reloads", type=int, default=10, help="single reloads timed on the idle proxy first (default 10)"
    )
    ap.add_argument("--reloads", type=int, default=100, help="reloads during each reload run (default 100)")
    ap.add_argument("--duration", type=float, default=10, help="seconds per load run (default 10)")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of warmup before each load run (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved steady/reload pairs (default 3)")
    ap.add_argument("--load", type=float, default=0.7, help="share of capacity to run at (default 0.7)")
    ap.add_argument(
        "--pace",
        type=int,
        default=1,
        help="ms each wrk connection waits after a response (wrk delay(); 0: none, load set by connections only)",
    )
    ap.add_argument("--conns", type=int, help="skip the search: wrk connections for the load runs")
    ap.add_argument("--only", default="propagation,load", help="parts to run (default propagation,load)")
    ap.add_argument("--quick", action="store_true", help="20 changes, 1 round of 4 s runs, 1 s warmup")
    ap.add_argument("--timeout", type=float, default=900, help="stop everything after this many seconds")
    ap.add_argument("--markdown", metavar="PATH", help="also write the result as a markdown section ('-': stdout)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (tables, logs)")
    ap.add_argument(
        "--profile",
        metavar="RAW",
        help="py-spy record keyroute (--gil --threads, raw stacks to RAW) during the first reload run; "
        "py-spy runs on core 1, so that run's numbers are not comparable",
    )
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.changes, args.rounds, args.duration, args.warmup, args.idle_reloads = 20, 1, 4, 1, 3
    parts = set(args.only.split(","))
    if (os.cpu_count() or 1) < 2:
        print("need at least 2 CPUs (proxy on core 0, load on core 1)", file=sys.stderr)
        return 2
    common.ensure_tools("nginx", "wrk")

    shm = Path("/dev/shm")
    tmp = Path(
        tempfile.mkdtemp(prefix="keyroute-reload-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    )
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script is load side too
    rng = random.Random(args.seed)
    t_begin = time.monotonic()
    deadline = t_begin + args.timeout

    common.interrupt_on_signals(signal.SIGALRM)
    signal.alarm(int(args.timeout) + 60)  # hard stop if a step hangs past its own bounds
    failures: list[str] = []
    md: list[str] = []
    try:
        started = common.timestamp()
        props: list[Propagation] = []
        if "propagation" in parts:
            pods3 = common.start_pods(tmp, 3)
            print(f"pods (nginx, core {LOAD_CORE}): {pods3}", file=sys.stderr)
            for kind in ("file", "long-poll"):
                print(f"propagation via {kind}: {args.changes} changes", file=sys.stderr)
                pr = propagation(tmp, pods3, kind, args.changes, rng, deadline, args.gap / 1e3)
                props.append(pr)
                print(f"  rename -> first response with it: {summary([s.total for s in pr.samples])}", file=sys.stderr)
                if kind == "long-poll":
                    up = [s.upstream for s in pr.samples if s.upstream is not None]
                    down = [s.total - s.upstream for s in pr.samples if s.upstream is not None]
                    print(f"  rename -> serve-table has it: {summary(up)}", file=sys.stderr)
                    print(f"  serve-table has it -> proxy routes by it: {summary(down)}", file=sys.stderr)
                for m in pr.missed + pr.log_problems:
                    print(f"  PROBLEM: {m}", file=sys.stderr)
                    failures.append(f"propagation {kind}: {m}")
            common.stop_all()

        runs: list[LoadRun] = []
        idle: tuple[list[float], list[float], list[str]] = ([], [], [])
        cap = None
        caps: list[Run] = []
        conns = args.conns
        probes: list[tuple[int, float]] = []
        if "load" in parts:
            d = tmp / "load"
            (d / "watched").mkdir(parents=True)
            (d / "unwatched").mkdir()
            pods4 = common.start_pods(d, 4)
            t = time.monotonic()
            bodies = explicit_tables(pods4, args.slices)
            gen0 = int(time.time() * 1000)
            ha, ra, hb, rb = bodies
            expect = {False: core.parse(ha % gen0 + ra), True: core.parse(hb % gen0 + rb)}
            size = len(ha % gen0 + ra)
            print(f"tables A/B: {args.slices:,} slices, {size / 1e6:.1f} MB each, built in "
                  f"{time.monotonic() - t:.1f} s; moved A->B: {core.moved_share(expect[False], expect[True]):.0%}",
                  file=sys.stderr)  # fmt: skip
            watched = d / "watched" / "table.json"
            unwatched = d / "unwatched" / "table.json"
            watched.write_bytes(ha % gen0 + ra)
            reloader = Reloader(watched, bodies, gen0)
            px, admin = start_keyroute(d, f"file:{watched}", "keyroute-load")
            wait_idle(px)
            print(f"keyroute on 127.0.0.1:{px.port} (core {PROXY_CORE}, pid {px.proc.pid}), table A", file=sys.stderr)
            idle = idle_reloads(px, reloader, args.idle_reloads)
            print(f"idle reloads, rename -> in force: {summary(idle[0])}", file=sys.stderr)
            print(f"idle reloads, slowest request: {summary(idle[1])}", file=sys.stderr)
            failures += [f"load: {x}" for x in idle[2]]
            lua = paced_lua(tmp, args.pace)
            common.run_wrk(px.port, 64, 1)
            caps = [quick_wrk(px.port, 64, 3) for _ in range(3)]
            capr = max(caps, key=lambda r: r.rps)
            cap = capr.rps
            print(f"capacity: wrk -c64, best of 3 x 3 s: {cap:,.0f} req/s (runs: "
                  f"{', '.join(f'{r.rps:,.0f}' for r in caps)}; p99 {capr.p99:.2f} ms, non-2xx {capr.non2xx})",
                  file=sys.stderr)  # fmt: skip
            if conns is None:
                conns, probes = find_conns(px.port, args.load * cap, 3, lua, args.pace > 0)
            print(f"load runs at {conns} connection(s)", file=sys.stderr)
            for rnd in range(1, args.rounds + 1):
                for kind in ("steady", "reload"):
                    if time.monotonic() > deadline:
                        failures.append("load: stopped early, --timeout")
                        break
                    lr = load_run(kind, rnd, px, admin, conns, args, reloader, watched, unwatched, expect, lua)
                    runs.append(lr)
                    r = lr.run
                    print(
                        f"round {rnd} {kind:<6} {r.rps:>9,.0f} req/s  p50 {r.p50:.2f} ms  p99 {r.p99:.2f} ms  "
                        f"max {lr.maxlat:.1f} ms  non-2xx {r.non2xx}  sock {sum(r.sock.values())}  "
                        f"applied {lr.applied}/{lr.renames}  settle {lr.settle_ms or 0:.0f} ms  "
                        f"core0 {r.core0:.0%} core1 {r.core1:.0%}",
                        file=sys.stderr,
                    )
                    for c in lr.checks:
                        print(f"  {c}", file=sys.stderr)
                    bad = [c for c in lr.checks if not c.startswith("ok")]
                    if r.non2xx or any(r.sock.values()) or not r.alive or not r.requests or bad or lr.refused:
                        failures.append(
                            f"load round {rnd} {kind}: non-2xx {r.non2xx}, socket errors {r.sock}, alive {r.alive}, "
                            f"refused reloads {lr.refused}, checks {bad}\n--- wrk:\n{r.raw}\n--- keyroute log tail:\n"
                            f"{common.tail(px.log)}"
                        )
            lp = problems_in_log(px.log)
            if lp:
                failures.append(f"load: keyroute log: {lp[:10]}")
            if px.proc.poll() is not None:
                failures.append(f"load: keyroute exited with {px.proc.returncode}:\n{common.tail(px.log)}")

        # ------------------------------------------------------------ report
        cmd = common.command("reload.py", argv)
        md = [
            "## Hot reload",
            "",
            f"- date: {started}",
            f"- machine: {common.machine()}",
            f"- software: {common.keyroute_rev()}; Python {sys.version.split()[0]}; "
            f"{subprocess.run([common.exe('wrk'), '-v'], capture_output=True, text=True).stdout.splitlines()[0]}",
            f"- command: `{cmd}`",
            f"- setup: keyroute (`keyroute run`, 1 worker) alone on core 0 (`taskset -c 0`); nginx pods, wrk, "
            f"`keyroute serve-table` and the script share core 1; table files in "
            f"{'/dev/shm (tmpfs)' if str(tmp).startswith('/dev/shm') else tempfile.gettempdir()}.",
        ]
        if props:
            md += [
                "",
                f"### Propagation: rename -> first response with the new `X-Keyroute-Generation` "
                f"({args.changes} changes, pods-only table, 3 pods)",
                "",
                "| source | path measured | p50 ms | p99 ms | max ms | min ms | n | target | met |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for pr in props:
                tot = [s.total for s in pr.samples]
                target = 100.0 if pr.source.startswith("file:") else 50.0
                met = bool(tot) and nearest_rank(tot, 0.99) < target and not pr.missed
                rows = [("rename -> proxy answers with it", tot, f"p99 < {target:g} ms", "yes" if met else "**no**")]
                if not pr.source.startswith("file:"):
                    up = [s.upstream for s in pr.samples if s.upstream is not None]
                    rows.append(("rename -> serve-table answers a long-poll with it", up, "", ""))
                    rows.append(
                        ("serve-table has it -> proxy answers with it",
                         [s.total - s.upstream for s in pr.samples if s.upstream is not None], "", "")
                    )  # fmt: skip
                name = "file (inotify)" if pr.source.startswith("file:") else "http long-poll via serve-table"
                for label, xs, tg, ok in rows:
                    if not xs:
                        md.append(f"| {name} | {label} | - | - | - | - | 0 | {tg} | {ok} |")
                        continue
                    md.append(
                        f"| {name} | {label} | {statistics.median(xs):.1f} | {nearest_rank(xs, 0.99):.1f} | "
                        f"{max(xs):.1f} | {min(xs):.1f} | {len(xs)} | {tg} | {ok} |"
                    )
                reqs = [s.requests for s in pr.samples]
                if reqs:
                    md.append(f"|  | requests sent per change (median) | {statistics.median(reqs):.0f} | | | | | | |")
            md += [
                "",
                "p99 is the nearest rank (of 100 samples: the 2nd worst). For scale: `assignment.parse` of one such "
                "table (pods-only, so it includes `generate()` of 4096 slices) takes "
                + ", ".join(f"{pr.parse_ms:.1f} ms" for pr in props)
                + " (median of 11, in this script on core 1, per source in order).",
            ]
            for pr in props:
                for m in pr.missed + pr.log_problems:
                    md.append(f"- problem ({pr.source}): {m}")
        if runs:
            st = [r for r in runs if r.kind == "steady"]
            rl = [r for r in runs if r.kind == "reload"]
            p99s, p99r = statistics.median(r.run.p99 for r in st), statistics.median(r.run.p99 for r in rl)
            non2xx = sum(r.run.non2xx for r in runs)
            sock = sum(sum(r.run.sock.values()) for r in runs)
            ratio = p99r / p99s if p99s else float("nan")
            probe_txt = ", ".join(f"c={c}: {rps:,.0f}" for c, rps in probes) or "(given with --conns)"
            md += [
                "",
                f"### Reload under load ({args.slices:,}-slice explicit tables, 4 pods)",
                "",
                f"- one reload at a time, idle proxy ({len(idle[0])} reloads, a client loop on one keep-alive "
                f"connection): rename -> first response with the new generation: {summary(idle[0])}; slowest "
                f"request from the rename to 0.5 s after that: {summary(idle[1])}.",
                f"- capacity: wrk -t1 -c64 with `bench/peers.lua`, best of three 3 s runs "
                f"({', '.join(f'{r.rps:,.0f}' for r in caps)}): {cap:,.0f} req/s; target load "
                f"{args.load:.0%} = {args.load * cap:,.0f} req/s. wrk2 is not in Debian and wrk has no rate limit, "
                "so the rate is set by the connection count"
                + (
                    f", each connection pacing itself with a {args.pace} ms wrk `delay()` after every response "
                    "(`bench/peers.lua` + `function delay() return "
                    f"{args.pace} end`)"
                    if args.pace > 0
                    else " (`bench/peers.lua`, no delay)"
                )
                + f". Probes (3 s each, req/s): {probe_txt}; used **{conns} connection(s)**.",
                f"- {args.rounds} interleaved round(s) of {args.duration:g} s runs after {args.warmup:g} s warmup; "
                f"reload runs rename {args.reloads} tables (A/B alternately, generation +1 each) over the watched "
                f"file every {(args.duration - 0.7) / args.reloads * 1e3:.0f} ms; steady runs write the same files "
                "at the same pace into an unwatched folder.",
                "",
                "| round | run | req/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | renames | "
                "applied by keyroute | last rename -> in force ms | core 0 busy | core 1 busy | keyroute CPU/wall |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for lr in runs:
                x = lr.run
                md.append(
                    f"| {lr.rnd} | {lr.kind} | {x.rps:,.0f} | {x.p50:.2f} | {x.p99:.2f} | {lr.maxlat:.1f} | "
                    f"{x.non2xx} | {sum(x.sock.values())} | {lr.renames or '-'} | "
                    f"{lr.applied if lr.kind == 'reload' else '-'} | "
                    f"{f'{lr.settle_ms:.0f}' if lr.settle_ms is not None else '-'} | {pct(x.core0)} | {pct(x.core1)} | "
                    f"{pct(x.cpu_s / x.wall_s) if x.wall_s else '-'} |"
                )
            checks = [c for r in rl for c in r.checks]
            md += [
                "",
                f"- p99 with reloads / p99 without (medians over rounds): {p99r:.2f} / {p99s:.2f} ms = "
                f"**{ratio:.2f}x** (target <= 1.5x: {'met' if ratio <= 1.5 else '**not met**'}); per round: "
                + ", ".join(f"{b.run.p99 / a.run.p99:.2f}x" for a, b in zip(st, rl, strict=False) if a.run.p99),
                f"- non-2xx over all load runs: {non2xx}, socket errors: {sock} (target 0: "
                f"{'met' if non2xx == 0 and sock == 0 else '**not met**'})",
                "- last table in force after each reload run (admin API): " + "; ".join(checks),
            ]
        if args.profile and Path(args.profile).exists():
            prof = profile_summary(Path(args.profile))
            print("profile of keyroute during reload run 1 (GIL holder samples):\n  " + "\n  ".join(prof),
                  file=sys.stderr)  # fmt: skip
            md += [
                "",
                "- profile of keyroute during reload run 1 (`py-spy record --gil --threads`, so only the thread "
                "holding the GIL is sampled; py-spy on core 1 perturbs that run): " + "; ".join(prof),
            ]
        if failures:
            md += ["", "Problems during the run:", ""] + [f"- {f.splitlines()[0]}" for f in failures]
        text = "\n".join(md) + "\n"
        print("\n" + text)
        for f in failures:
            print(f"\nPROBLEM: {f}", file=sys.stderr)
        if args.markdown and args.markdown != "-":
            Path(args.markdown).write_text(text)
            print(f"markdown written to {args.markdown}", file=sys.stderr)
        print(f"total {time.monotonic() - t_begin:.0f} s", file=sys.stderr)
        return 1 if failures else 0
    except KeyboardInterrupt:
        print("\ninterrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        common.finish(tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
