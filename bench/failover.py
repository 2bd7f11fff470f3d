"""Failover benchmark: how long after a pod is SIGKILLed do requests for one of
its keys succeed again, served by another pod? keyroute vs HAProxy vs nginx.

Run from the repo root with the venv's Python (as root, or with sudo
available, if nginx/haproxy must be installed)::

    python bench/failover.py                        # 20 kills per proxy setup, ~9 minutes
    python bench/failover.py --kills 5 --only keyroute,nginx
    python bench/failover.py --markdown /tmp/failover.md

What it does:

* starts 4 pods, each its own Python process (``POD`` below; HTTP/1.1
  keep-alive, ``200 ok`` with an ``X-Pod`` header naming the pod, ``/health``
  answers 200 too), pinned with the client to core 1;
* for each proxy setup in turn (alone, pinned to core 0, in front of the same
  4 pods; started fresh and stopped after its kills):

  - ``keyroute``: ``keyroute run`` with a pods-only table (generated slices,
    3 backups each) and default settings;
  - ``keyroute+hc``: the same with active health checks
    (``health_path = "/health"``, ``health_interval = "1s"``);
  - ``haproxy``: ``balance hdr(X-Routing-Key)``, ``hash-type consistent``,
    ``option redispatch``, ``retries 2``, ``retry-on conn-failure
    empty-response response-timeout``, no health checks;
  - ``haproxy+hc``: the same plus ``option httpchk GET /health`` and
    ``check inter 1s`` on every server (defaults ``rise 2 fall 3``);
  - ``nginx``: ``hash $http_x_routing_key consistent``, ``proxy_next_upstream
    error timeout http_502 http_503`` (default ``max_fails=1
    fail_timeout=10s``);

* does ``--kills`` kill cycles per setup. One cycle: a client thread runs a
  tight loop of GETs for one key on one keep-alive connection (a new key per
  cycle, so the victims vary); once it has 50 answers from the key's owner,
  plus a random 0-20 ms, the owner pod gets SIGKILL. It stays dead for
  ``--dead`` seconds (default 2), is restarted on the same port, and the cycle
  ends when the key is served by it again.

Reported per setup (from the client's side; times from just before
``kill()``):

* failover time: to the first 200 from a different pod (p50, p99, min). In a
  tight loop there is nearly always a request in flight at the kill, so this
  is mostly how fast that request is retried elsewhere;
* "sent after kill": the same for the first request sent after the kill,
  i.e. how long a new request for the key takes to succeed;
* client-visible errors (non-200 answers, broken connections) from the kill
  to the first failover, and over the whole outage (until the key is back);
* while the pod is dead: 200s per second for the key, and the p50 / max
  latency of those requests;
* back: from the restarted pod listening to the key's first 200 from it.

p99 is the nearest rank (with 20 kills, the worst of 20). Only 127.0.0.1 is
used; every wait is bounded (a cycle that does not fail over within 15 s, or
come back within 30 s, is recorded as such and the run goes on); every process
started here is stopped at exit, including on Ctrl-C; temp files live in one
temp dir, removed at exit unless ``--keep``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import LOAD_CORE, PROXY_CORE, Proxy, nearest_rank

FAILOVER_WAIT = 15.0  # seconds: a cycle with no failover by then is recorded as "none"
BACK_WAIT = 30.0  # seconds: a key that does not come back by then is recorded as such
WARM_ANSWERS = 50

POD = r"""
import asyncio, sys

pod_id, port = sys.argv[1], int(sys.argv[2])
OK = b"HTTP/1.1 200 OK\r\nX-Pod: %s\r\nContent-Length: 3\r\n\r\nok\n" % pod_id.encode()

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and int(value):
                    await reader.readexactly(int(value))
            writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True, backlog=1024)
    await server.serve_forever()

asyncio.run(main())
"""

# A dead server is retried on the next one; haproxy+hc adds active checks.
HAPROXY_BACKEND = """\
    option redispatch
    retries 2
    retry-on conn-failure empty-response response-timeout
"""
NGINX_LOCATION = """\
            proxy_next_upstream error timeout http_502 http_503;
"""

# ---------------------------------------------------------------- pods


@dataclass
class PodProc:
    name: str
    port: int
    script: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for _ in range(100):
            self.proc = common.start([sys.executable, str(self.script), self.name, str(self.port)], self.log, LOAD_CORE)
            try:
                common.wait_port(self.port, self.proc, self.log, timeout=10)
                return
            except RuntimeError:
                if self.proc.poll() is None:
                    raise
                time.sleep(0.05)  # could not bind yet: again
        raise RuntimeError(f"pod {self.name} cannot listen on {self.port}:\n{common.tail(self.log)}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # taskset execs: this is the pod itself
        self.proc.wait(5)
        self.proc = None


def start_pods(tmp: Path, n: int = 4) -> dict[str, PodProc]:
    script = tmp / "pod.py"
    script.write_text(POD)
    pods = {}
    for i in range(n):
        pod = PodProc(f"p{i}", common.free_port(), script, tmp / f"pod-p{i}.log")
        pod.start()
        pods[pod.name] = pod
    return pods


# ---------------------------------------------------------------- proxies


def start_keyroute(tmp: Path, pods: dict[str, PodProc], name: str, health: bool) -> Proxy:
    d = tmp / name
    d.mkdir()
    (d / "table.json").write_text(common.pods_table({n: p.port for n, p in pods.items()}))
    port, admin = common.free_port(), common.free_port()
    config = d / "keyroute.toml"
    toml = common.keyroute_toml(port, admin, f"file:{d / 'table.json'}")
    if health:
        toml += '[upstream]\nhealth_path = "/health"\nhealth_interval = "1s"\n'
    config.write_text(toml)
    return common.start_keyroute(name, ["--config", str(config)], port, admin, d / "stderr.log")


def start_haproxy(tmp: Path, pods: dict[str, PodProc], name: str, health: bool) -> Proxy:
    suffix = " check inter 1s" if health else ""
    servers = "\n".join(f"    server {n} 127.0.0.1:{p.port}{suffix}" for n, p in pods.items())
    check = "    option httpchk GET /health\n" if health else ""
    return common.start_haproxy(tmp / name, name, HAPROXY_BACKEND + check + servers, connect="2s")


def start_nginx(tmp: Path, pods: dict[str, PodProc], name: str, health: bool) -> Proxy:
    return common.start_nginx_proxy(tmp / name, name, (p.port for p in pods.values()), NGINX_LOCATION)


SETUPS: dict[str, tuple[Callable[[Path, dict[str, PodProc], str, bool], Proxy], bool]] = {
    "keyroute": (start_keyroute, False),
    "keyroute+hc": (start_keyroute, True),
    "haproxy": (start_haproxy, False),
    "haproxy+hc": (start_haproxy, True),
    "nginx": (start_nginx, False),
}


# ---------------------------------------------------------------- the client


@dataclass
class Event:
    sent: float
    done: float
    status: int  # 0: no answer (connection error)
    pod: str | None
    error: str | None = None


class Client(threading.Thread):
    """Tight loop of GETs for one key on one keep-alive connection."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.key = key
        self.events: list[Event] = []
        self.halt = threading.Event()

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"X-Routing-Key": self.key}
        while not self.halt.is_set():
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers=headers)
                r = conn.getresponse()
                r.read()
                self.events.append(Event(sent, time.monotonic(), r.status, r.getheader("X-Pod")))
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.events.append(Event(sent, time.monotonic(), 0, None, exc.__class__.__name__))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.001)
        if conn is not None:
            conn.close()

    def wait(self, pred: Callable[[Event], bool], start: int, timeout: float) -> tuple[Event | None, int]:
        """The first event from index ``start`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            evs = self.events
            while i < len(evs):
                if pred(evs[i]):
                    return evs[i], i
                i += 1
            if time.monotonic() > deadline or not self.is_alive():
                return None, i
            time.sleep(0.0005)


# ---------------------------------------------------------------- one cycle


@dataclass
class Cycle:
    key: str
    victim: str
    failover_ms: float | None  # kill -> first 200 from another pod
    fresh_ms: float | None  # kill -> first 200 from another pod for a request sent after the kill
    backup: str | None
    errors_window: int  # client-visible errors from the kill to that first 200
    errors_outage: int  # ... until the key was back on its owner
    back_ms: float | None  # pod listening again -> first 200 from it
    error_kinds: dict[str, int] = field(default_factory=dict)
    dead_rps: float = 0.0  # 200s per second for requests sent while the pod was dead
    dead_p50_ms: float | None = None  # their latency
    dead_max_ms: float | None = None


def cycle(px: Proxy, pods: dict[str, PodProc], key: str, dead: float, log: Callable[[str], None]) -> Cycle:
    client = Client(px.port, key)
    client.start()
    try:
        first, _ = client.wait(lambda e: e.status == 200 and e.pod is not None, 0, 10)
        if first is None:
            raise RuntimeError(f"{px.name}: no answer for key {key}:\n{common.tail(px.log)}")
        victim = first.pod
        assert victim is not None
        # WARM_ANSWERS answers from the owner, then a random moment.
        deadline = time.monotonic() + 10
        while sum(1 for e in client.events if e.pod == victim) < WARM_ANSWERS and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(random.uniform(0, 0.02))
        start = len(client.events)
        t_kill = time.monotonic()
        pods[victim].kill()
        # Everything completed before the kill is not part of the outage.
        while start > 0 and client.events[start - 1].done > t_kill:
            start -= 1
        hit, i_hit = client.wait(
            lambda e: e.done > t_kill and e.status == 200 and e.pod is not None and e.pod != victim,
            start,
            FAILOVER_WAIT,
        )
        time.sleep(max(0.0, t_kill + dead - time.monotonic()))
        t_restart = time.monotonic()
        pods[victim].start()
        t_up = time.monotonic()
        back, i_back = client.wait(lambda e: e.sent > t_up and e.status == 200 and e.pod == victim, i_hit, BACK_WAIT)
    finally:
        client.halt.set()
        client.join(15)
    evs = client.events
    window = [e for e in evs[start:i_hit] if e.done > t_kill]
    outage = [e for e in evs[start:i_back] if e.done > t_kill]
    # Requests sent while the pod was dead (answered at any time).
    dead_reqs = [e for e in evs[start:] if t_kill < e.sent < t_restart]
    kinds: dict[str, int] = {}
    for e in outage:
        if e.status != 200:
            k = e.error or str(e.status)
            kinds[k] = kinds.get(k, 0) + 1
    lat = sorted((e.done - e.sent) * 1000 for e in dead_reqs if e.status == 200)
    c = Cycle(
        key,
        victim,
        (hit.done - t_kill) * 1000 if hit is not None else None,
        next(((e.done - t_kill) * 1000 for e in dead_reqs if e.status == 200 and e.pod != victim), None),
        hit.pod if hit is not None else None,
        sum(1 for e in window if e.status != 200),
        sum(1 for e in outage if e.status != 200),
        (back.done - t_up) * 1000 if back is not None else None,
        kinds,
        len(lat) / (t_restart - t_kill),
        statistics.median(lat) if lat else None,
        lat[-1] if lat else None,
    )
    fo = f"{c.failover_ms:8.1f} ms" if c.failover_ms is not None else "    none   "
    fr = f"{c.fresh_ms:.1f} ms" if c.fresh_ms is not None else "none"
    bk = f"{c.back_ms:7.0f} ms" if c.back_ms is not None else "  never"
    log(
        f"  {px.name:<12} key {key:<8} killed {victim} -> {c.backup or '-':<3} failover {fo} (sent after: {fr})  "
        f"errors {c.errors_window}/{c.errors_outage} {kinds or ''}  while dead: {c.dead_rps:,.0f} req/s, "
        f"p50 {c.dead_p50_ms or 0:.1f} ms, max {c.dead_max_ms or 0:.1f} ms  back after restart {bk}"
    )
    return c


# ---------------------------------------------------------------- report


def summary(name: str, cycles: list[Cycle]) -> list[str]:
    fo = [c.failover_ms for c in cycles if c.failover_ms is not None]
    back = [c.back_ms for c in cycles if c.back_ms is not None]
    none = sum(1 for c in cycles if c.failover_ms is None)
    fresh = [c.fresh_ms for c in cycles if c.fresh_ms is not None]
    d50 = [c.dead_p50_ms for c in cycles if c.dead_p50_ms is not None]
    dmax = [c.dead_max_ms for c in cycles if c.dead_max_ms is not None]
    kinds: dict[str, int] = {}
    for c in cycles:
        for k, n in c.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + n

    def ms(v: float) -> str:
        return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"

    return [
        name,
        str(len(cycles)),
        ms(statistics.median(fo)) if fo else "-",
        ms(nearest_rank(fo, 0.99)) if fo else "-",
        ms(min(fo)) if fo else "-",
        ms(statistics.median(fresh)) if fresh else "-",
        ms(nearest_rank(fresh, 0.99)) if fresh else "-",
        str(none),
        str(sum(c.errors_window for c in cycles)),
        str(sum(c.errors_outage for c in cycles)),
        ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "-",
        f"{statistics.median(c.dead_rps for c in cycles):,.0f}",
        ms(statistics.median(d50)) if d50 else "-",
        ms(max(dmax)) if dmax else "-",
        ms(statistics.median(back)) if back else "-",
        ms(max(back)) if back else "-",
        str(sum(1 for c in cycles if c.back_ms is None)),
    ]


HEAD = [
    "setup",
    "kills",
    "failover p50 ms",
    "p99 ms",
    "min ms",
    "sent after kill: p50 ms",
    "p99 ms",
    "no failover",
    "errors kill→failover",
    "errors whole outage",
    "error kinds",
    "while dead: req/s",
    "latency p50 ms",
    "latency max ms",
    "back p50 ms",
    "back max ms",
    "never back",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill cycles per setup (default 20)")
    ap.add_argument("--only", help=f"comma list of setups (default {','.join(SETUPS)})")
    ap.add_argument("--markdown", metavar="PATH", help="also write the result as a markdown section ('-': stdout)")
    ap.add_argument(
        "--dead", type=float, default=2.0, help="seconds a killed pod stays dead before its restart (default 2)"
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the random kill moments (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    names = (args.only or ",".join(SETUPS)).split(",")
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        print(f"unknown setup(s): {', '.join(unknown)} (known: {', '.join(SETUPS)})", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("need at least 2 CPUs (proxy on core 0, pods and client on core 1)", file=sys.stderr)
        return 2
    random.seed(args.seed)
    common.ensure_tools("nginx", "haproxy", "wrk", "taskset")
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-failover-"))
    common.interrupt_on_signals()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, list[Cycle]] = {}
    started = time.monotonic()
    try:
        pods = start_pods(tmp)
        log(f"pods (Python processes, core {LOAD_CORE}): { ({n: p.port for n, p in pods.items()}) }")
        for name in names:
            starter, health = SETUPS[name]
            px = starter(tmp, pods, name, health)
            log(f"{name} on 127.0.0.1:{px.port} (core {PROXY_CORE}, pid {px.proc.pid})")
            try:
                if health:
                    time.sleep(2.5)  # let the checks see every pod up first
                results[name] = [cycle(px, pods, f"key-{i}", args.dead, log) for i in range(args.kills)]
            finally:
                common.stop(px.proc)
        rows = [summary(n, results[n]) for n in names]
        print()
        print(common.text_table(HEAD, rows))
        log(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.markdown:
            cmd = common.command("failover.py", argv)
            md = [
                "## Failover",
                "",
                f"- date: {common.timestamp()}",
                f"- machine: {common.machine()}",
                f"- software: {common.versions()}",
                f"- command: `{cmd}`",
                "",
                common.md_table(HEAD, rows),
            ]
            text = "\n".join(md) + "\n"
            if args.markdown == "-":
                print("\n" + text)
            else:
                Path(args.markdown).write_text(text)
                log(f"markdown written to {args.markdown}")
        return 0
    except KeyboardInterrupt:
        log("\ninterrupted, stopping everything")
        return 130
    finally:
        common.finish(tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
