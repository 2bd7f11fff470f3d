"""Data-plane benchmark: keyroute vs HAProxy vs nginx, same pods, same load.

Run from the repo root (as root, or with sudo available, if nginx/haproxy/wrk
must be installed)::

    python bench/peers.py                          # full run, ~2.5 minutes
    python bench/peers.py --markdown /tmp/peers.md # also write a markdown section
    python bench/peers.py --quick                  # 1 round, 3 s runs (smoke test)
    python bench/peers.py --only keyroute,keyroute-pure,haproxy,nginx   # + the pure-Python path
    python bench/peers.py --profile /tmp/keyroute.svg   # + py-spy flamegraph of keyroute

What it does:

* installs ``nginx haproxy wrk`` with apt-get if any is missing;
* starts 4 pods: one nginx master (1 worker) with 4 server blocks on
  127.0.0.1, each ``return 200 "ok\\n"`` plus an ``X-Pod`` response header
  naming the pod (used only for the affinity check), access_log off;
* starts three proxies in front of those 4 pods, each pinned to core 0:
  keyroute (``keyroute run``, one worker, pods-only table), HAProxy
  (``balance hdr(X-Routing-Key)``, ``hash-type consistent``, ``http-reuse
  always``, nbthread 1) and nginx (``hash $http_x_routing_key consistent``,
  upstream ``keepalive 256``, HTTP/1.1 with ``Connection ""``,
  worker_processes 1);
* checks each proxy answers 200 and that the same key always reaches the same
  pod (keyroute: ``X-Keyroute-Pod``; all three: the pod's ``X-Pod``);
* runs wrk (pinned to core 1, with the pods) with ``bench/peers.lua``: a random
  X-Routing-Key out of 10,000 per request; interleaved rounds
  (keyroute, haproxy, nginx, keyroute, ...) at 64 and 256 connections, each
  run preceded by a short warmup;
* per proxy and connection count reports req/s, p50, p99 (wrk --latency),
  non-2xx responses, socket errors, and proxy CPU per request: utime+stime
  of the proxy's process tree from /proc/PID/stat around each measured run,
  divided by the requests wrk completed; also the proxy core's busy share.

Only 127.0.0.1 is used. Every process started here is stopped at exit,
including on Ctrl-C; temp files live in one temp dir, removed at exit unless
``--keep``.

Both peers are given the same client-IP header work keyroute does by default
(HAProxy ``option forwardfor``; nginx ``X-Forwarded-For/-Proto/-Host``).
keyroute additionally adds Via and X-Keyroute-* headers (its normal job).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
from common import HZ, LOAD_CORE, PROXY_CORE, Proxy, Run

KEYS = 10_000
NO_EXTENSIONS = "KEYROUTE_NO_EXTENSIONS"

# nginx's share of the client-IP header work keyroute does by default (HAProxy: option forwardfor).
NGINX_LOCATION = """\
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
"""

# ---------------------------------------------------------------- setup


def start_keyroute(tmp: Path, pods: dict[str, int], name: str = "keyroute") -> Proxy:
    d = tmp / name
    d.mkdir()
    (d / "table.json").write_text(common.pods_table(pods))
    port, admin = common.free_port(), common.free_port()
    flags = common.keyroute_flags(port, admin, f"file:{d / 'table.json'}")
    return common.start_keyroute(name, flags, port, admin, d / "stderr.log")


def start_keyroute_pure(tmp: Path, pods: dict[str, int]) -> Proxy:
    """keyroute on its pure-Python path (KEYROUTE_NO_EXTENSIONS=1), for comparison."""
    os.environ[NO_EXTENSIONS] = "1"
    try:
        return start_keyroute(tmp, pods, "keyroute-pure")
    finally:
        del os.environ[NO_EXTENSIONS]


def start_haproxy(tmp: Path, pods: dict[str, int]) -> Proxy:
    servers = "\n".join(f"    server {n} 127.0.0.1:{p}" for n, p in pods.items())
    return common.start_haproxy(tmp / "haproxy", "haproxy", servers)


def start_nginx_proxy(tmp: Path, pods: dict[str, int]) -> Proxy:
    return common.start_nginx_proxy(tmp / "nginx-proxy", "nginx", pods.values(), NGINX_LOCATION)


# ---------------------------------------------------------------- checks


def check_routing(px: Proxy) -> str:
    """Same key -> same pod (5 tries each, 40 keys); keys spread over >1 pod."""
    seen: dict[str, str] = {}
    for i in range(40):
        key = f"key-{i * 251 + 1}"
        pods = set()
        for _ in range(5):
            status, h, body = common.get(px.port, "/", {"X-Routing-Key": key})
            if status != 200 or body != b"ok\n":
                raise RuntimeError(f"{px.name}: key {key}: status {status} body {body[:200]!r}")
            pods.add(h.get("x-pod", "?"))
            if px.name.startswith("keyroute") and h.get("x-keyroute-pod") != h.get("x-pod"):
                raise RuntimeError(f"{px.name}: X-Keyroute-Pod {h.get('x-keyroute-pod')} != X-Pod {h.get('x-pod')}")
        if len(pods) != 1:
            raise RuntimeError(f"{px.name}: key {key} reached several pods: {sorted(pods)}")
        seen[key] = pods.pop()
    spread = sorted(set(seen.values()))
    if len(spread) < 2:
        raise RuntimeError(f"{px.name}: 40 keys all went to {spread}")
    return f"{px.name}: 40 keys x 5 requests, each key always on one pod; keys spread over {','.join(spread)}"


# ---------------------------------------------------------------- wrk


def measure(px: Proxy, conns: int, rnd: int, threads: int, seconds: float, warmup: float) -> Run:
    r = Run(px.name, conns, rnd)
    if px.proc.poll() is not None:
        r.alive = False
        return r
    if warmup > 0:
        common.run_wrk(px.port, conns, warmup, threads=threads)
    pids = px.pids()
    pod_pids = common.pod_pids()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0, c0, t0, k0 = common.core_times(), common.cpu_ticks(pids), time.monotonic(), common.cpu_ticks(pod_pids)
    y0 = common.cpu_ticks(pids, "sys")
    out = common.run_wrk(px.port, conns, seconds, threads=threads)
    c1, t1, s1, k1 = common.cpu_ticks(pids), time.monotonic(), common.core_times(), common.cpu_ticks(pod_pids)
    y1 = common.cpu_ticks(pids, "sys")
    r.sys_s = (y1 - y0) / HZ
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r.core0, r.core1 = common.core_busy(s0, s1, PROXY_CORE), common.core_busy(s0, s1, LOAD_CORE)
    wrk_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ours = (c1 - c0 + k1 - k0) / HZ + wrk_s
    r.foreign = max(0.0, ((common.task_jiffies(s1) - common.task_jiffies(s0)) / HZ - ours) / (t1 - t0))
    r.raw = out
    r.cpu_s = (c1 - c0) / HZ
    r.wall_s = t1 - t0
    common.parse_wrk(out, r)
    r.alive = px.proc.poll() is None
    return r


# ---------------------------------------------------------------- report


@dataclass
class Agg:
    proxy: str
    conns: int
    runs: list[Run]

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def rps(self) -> float:
        return statistics.mean(r.rps for r in self.runs)

    @property
    def p50(self) -> float:
        return statistics.median(r.p50 for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99 for r in self.runs)

    @property
    def us(self) -> float:
        req = self.requests
        return sum(r.cpu_s for r in self.runs) / req * 1e6 if req else float("nan")

    @property
    def busy(self) -> float:
        wall = sum(r.wall_s for r in self.runs)
        return sum(r.cpu_s for r in self.runs) / wall if wall else float("nan")

    @property
    def sys_share(self) -> float:
        cpu = sum(r.cpu_s for r in self.runs)
        return sum(r.sys_s for r in self.runs) / cpu if cpu else float("nan")

    @property
    def core0(self) -> float:
        return statistics.mean(r.core0 for r in self.runs)

    @property
    def core1(self) -> float:
        return statistics.mean(r.core1 for r in self.runs)

    @property
    def other(self) -> float:
        return max(r.foreign for r in self.runs)

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx for r in self.runs)

    @property
    def sockerr(self) -> int:
        return sum(sum(r.sock.values()) for r in self.runs)

    @property
    def sockerr_detail(self) -> str:
        tot = {k: sum(r.sock[k] for r in self.runs) for k in ("connect", "read", "write", "timeout")}
        return ", ".join(f"{k} {v}" for k, v in tot.items() if v) or "0"

    @property
    def rps_range(self) -> str:
        return "/".join(f"{r.rps:,.0f}" for r in self.runs)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table_rows(aggs: dict[tuple[str, int], Agg], conns_list: list[int]) -> list[list[str]]:
    rows = []
    for c in conns_list:
        for name in ("keyroute", "keyroute-pure", "haproxy", "nginx"):
            a = aggs.get((name, c))
            if not a:
                continue
            rows.append(
                [
                    name,
                    str(c),
                    f"{a.rps:,.0f}",
                    a.rps_range,
                    f"{a.p50:.2f}",
                    f"{a.p99:.2f}",
                    f"{a.us:.1f}",
                    f"{a.sys_share * 100:.0f}%",
                    f"{a.busy * 100:.0f}%",
                    f"{a.core0 * 100:.0f}%",
                    f"{a.core1 * 100:.0f}%",
                    f"{a.other:.2f}",
                    str(a.non2xx),
                    a.sockerr_detail,
                    "yes" if all(r.alive for r in a.runs) else "NO",
                ]
            )
    return rows


HEAD = [
    "proxy",
    "conns",
    "req/s (mean)",
    "req/s per round",
    "p50 ms",
    "p99 ms",
    "proxy CPU µs/req",
    "of which kernel",
    "proxy CPU/wall",
    "core 0 busy",
    "core 1 busy",
    "other load (max)",
    "non-2xx",
    "socket errors",
    "alive",
]


def ratio_rows(aggs: dict[tuple[str, int], Agg], conns_list: list[int]) -> list[list[str]]:
    rows = []
    for c in conns_list:
        for ours, peer in [(o, p) for o in ("keyroute", "keyroute-pure") for p in ("haproxy", "nginx")]:
            k, p = aggs.get((ours, c)), aggs.get((peer, c))
            if not (k and p):
                continue
            rows.append(
                [
                    f"{ours}/{peer}",
                    str(c),
                    ratio(k.rps, p.rps),
                    ratio(k.p50, p.p50),
                    ratio(k.p99, p.p99),
                    ratio(k.us, p.us),
                ]
            )
    return rows


RHEAD = ["ratio", "conns", "req/s", "p50", "p99", "CPU µs/req"]


# ---------------------------------------------------------------- profile


def profile_keyroute(kr: Proxy, conns: int, threads: int, seconds: float, svg: str) -> None:
    """py-spy record (with --native) keyroute during two load runs: a flamegraph SVG, then raw
    collapsed stacks (written next to it as .txt) from which the top frames by own time are printed.
    py-spy runs on the load core, so the profiled runs' throughput is not comparable to the table."""
    spy = common.py_spy()
    if spy is None:
        return
    raw = str(Path(svg).with_suffix(".txt"))
    for fmt, out_path in (("flamegraph", svg), ("raw", raw)):
        cmd = [
            "taskset",
            "-c",
            LOAD_CORE,
            "nice",
            "-n",
            "-10",
            spy,
            "record",
            "--pid",
            str(kr.proc.pid),
            "--native",
            "--rate",
            "250",
            "--duration",
            f"{int(seconds)}",
            "--format",
            fmt,
            "--output",
            out_path,
        ]
        prof = common.start_piped(cmd)
        time.sleep(0.5)
        r = measure(kr, conns, 0, threads, seconds, 0)
        out, _ = prof.communicate(timeout=seconds + 60)
        print(f"\nprofiled run ({fmt}) c={conns}: {r.rps:,.0f} req/s, non-2xx {r.non2xx}, "
              f"py-spy: {out.strip().splitlines()[-1] if out.strip() else ''}", file=sys.stderr)  # fmt: skip
    print(f"flamegraph: {svg}\nraw stacks: {raw}\n\ntop frames by own time (keyroute, c={conns}):")
    try:
        for frame, n, share in common.self_time(Path(raw)):
            print(f"  {share * 100:5.1f}%  {n:6d}  {frame}")
    except OSError as exc:
        print(f"  (no raw profile: {exc})")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of warmup before each run (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--conns", default="64,256", help="connection counts (default 64,256)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1, all on core 1)")
    ap.add_argument(
        "--only",
        help="comma list of proxies (default keyroute,haproxy,nginx; also keyroute-pure: the pure-Python path)",
    )
    ap.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 1 s warmup")
    ap.add_argument("--markdown", metavar="PATH", help="also write the result as a markdown section ('-': stdout)")
    ap.add_argument(
        "--profile",
        metavar="SVG",
        help="after the runs, py-spy record keyroute during one "
        "--duration run at the first --conns count and write a flamegraph here",
    )
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.10,
        help="redo a run when processes outside the bench used more than this many cores during it (default 0.10)",
    )
    ap.add_argument("--retries", type=int, default=4, help="at most this many redone runs in all (default 4)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print wrk output of every run")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 1
    conns_list = [int(c) for c in args.conns.split(",")]
    names = (args.only or "keyroute,haproxy,nginx").split(",")
    if (os.cpu_count() or 1) < 2:
        print("need at least 2 CPUs (proxy on core 0, load on core 1)", file=sys.stderr)
        return 2

    common.ensure_tools("nginx", "haproxy", "wrk", "taskset")
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-peers-"))
    common.interrupt_on_signals()
    failures: list[str] = []
    checks: list[str] = []
    try:
        pods = common.start_pods(tmp)
        starters: dict[str, Callable[[Path, dict[str, int]], Proxy]] = {
            "keyroute": start_keyroute,
            "keyroute-pure": start_keyroute_pure,
            "haproxy": start_haproxy,
            "nginx": start_nginx_proxy,
        }
        proxies = [starters[n](tmp, pods) for n in names]
        print(f"pods (nginx, core {LOAD_CORE}): {pods}", file=sys.stderr)
        for px in proxies:
            print(f"{px.name} on 127.0.0.1:{px.port} (core {PROXY_CORE}, pid {px.proc.pid})", file=sys.stderr)
            checks.append(check_routing(px))
            print("  check: " + checks[-1], file=sys.stderr)

        est = len(proxies) * len(conns_list) * args.rounds * (args.duration + args.warmup)
        print(
            f"running {args.rounds} round(s) x {len(conns_list)} conn counts x {len(proxies)} proxies, "
            f"{args.duration:g}s + {args.warmup:g}s warmup each: ~{est:.0f}s",
            file=sys.stderr,
        )
        runs: list[Run] = []
        retries_left, redone = args.retries, 0
        for rnd in range(1, args.rounds + 1):
            for c in conns_list:
                for px in proxies:
                    while True:
                        r = measure(px, c, rnd, args.threads, args.duration, args.warmup)
                        msg = (
                            f"round {rnd} c={c:<4} {px.name:<8} {r.rps:>10,.0f} req/s  p50 {r.p50:.2f} ms  "
                            f"p99 {r.p99:.2f} ms  {r.us_per_req:.1f} µs/req  non-2xx {r.non2xx}  "
                            f"sock {sum(r.sock.values())}  core0 {r.core0:.0%} core1 {r.core1:.0%}  "
                            f"other load {r.foreign:.2f} cores"
                        )
                        print(msg, file=sys.stderr)
                        if r.foreign <= args.max_other or retries_left <= 0 or not r.alive:
                            break
                        retries_left -= 1
                        redone += 1
                        print(
                            f"  other processes used {r.foreign:.2f} cores during this run: redoing it "
                            f"({retries_left} retries left)",
                            file=sys.stderr,
                        )
                    runs.append(r)
                    if args.verbose:
                        print(r.raw, file=sys.stderr)
                    if r.non2xx or any(r.sock.values()) or not r.alive or not r.requests:
                        failures.append(
                            f"{px.name} c={c} round {rnd}: non-2xx {r.non2xx}, socket errors "
                            f"{r.sock}, alive {r.alive}\n--- wrk:\n{r.raw}\n--- {px.name} log tail:\n"
                            f"{common.tail(px.log)}"
                        )

        aggs: dict[tuple[str, int], Agg] = {}
        for r in runs:
            aggs.setdefault((r.proxy, r.conns), Agg(r.proxy, r.conns, [])).runs.append(r)
        rows, rrows = table_rows(aggs, conns_list), ratio_rows(aggs, conns_list)
        print()
        print(common.text_table(HEAD, rows))
        print()
        print(common.text_table(RHEAD, rrows))
        print("\n(ratios: keyroute value / peer value; >1 is better for req/s, worse for latency and CPU)")
        for f in failures:
            print(f"\nERRORS: {f}")

        if args.markdown:
            cmd = common.command("peers.py", argv)
            md = [
                "## Data plane vs HAProxy and nginx",
                "",
                f"- date: {common.timestamp()}",
                f"- machine: {common.machine()}",
                f"- software: {common.versions()}",
                "- routing check before the load (same key -> same pod, via the pod's own X-Pod header; "
                "keyroute's X-Keyroute-Pod must match it): " + "; ".join(checks),
                f"- command: `{cmd}`",
                f"- setup: each proxy alone on core 0 (`taskset -c 0`, 1 worker/thread); wrk -t{args.threads} "
                f'and 4 nginx pods (1 worker, `return 200 "ok\\n"`) share core 1; random X-Routing-Key out of '
                f"{KEYS:,} per request (`bench/peers.lua`); {args.rounds} interleaved round(s) of "
                f"{args.duration:g} s after {args.warmup:g} s warmup, per proxy and connection count.",
                "- req/s is the mean over rounds; p50/p99 the median over rounds; CPU µs/req is the proxy "
                "process tree's utime+stime (/proc/PID/stat) over the measured runs divided by requests "
                '("of which kernel": its stime share); '
                '"proxy CPU/wall" is that CPU time over wall time (100% = the proxy used all of core 0); '
                '"core 0/1 busy" are the whole cores\' non-idle shares from /proc/stat (core 1 near 100% '
                'means the load side, wrk + pods, was the limit, not the proxy); "other load" is CPU (in cores) used '
                "during a run by processes outside the bench (the machine is shared); a run with more than "
                f"{args.max_other:g} was redone (at most {args.retries} redos in all; {redone} redone in this run).",
                "",
                common.md_table(HEAD, rows),
                "",
                common.md_table(RHEAD, rrows),
                "",
                "Ratios are keyroute / peer: above 1 is better for req/s, worse for p50, p99 and CPU per request.",
            ]
            if failures:
                md += ["", "Errors during the runs:", ""] + [f"- {f.splitlines()[0]}" for f in failures]
            text = "\n".join(md) + "\n"
            if args.markdown == "-":
                print("\n" + text)
            else:
                Path(args.markdown).write_text(text)
                print(f"\nmarkdown written to {args.markdown}", file=sys.stderr)

        if args.profile:
            kr = next((p for p in proxies if p.name == "keyroute"), None)
            if kr is None:
                print("--profile: needs keyroute in --only", file=sys.stderr)
            else:
                profile_keyroute(kr, conns_list[0], args.threads, args.duration, args.profile)
        return 1 if failures else 0
    except KeyboardInterrupt:
        print("\ninterrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        common.finish(tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
