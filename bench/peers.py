"""Data-plane benchmark: keyroute vs HAProxy vs nginx, same pods, same load.

Run from the repo root (as root, or with sudo available, if nginx/haproxy/wrk
must be installed)::

    python bench/peers.py                          # full run, ~2.5 minutes
    python bench/peers.py --markdown /tmp/peers.md # also write a markdown section
    python bench/peers.py --quick                  # 1 round, 3 s runs (smoke test)
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
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "peers.lua"
PROXY_CORE = "0"
LOAD_CORE = "1"
HZ = os.sysconf("SC_CLK_TCK")
KEYS = 10_000

# ---------------------------------------------------------------- templates

NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
"""

NGINX_HTTP_COMMON = """\
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""

POD_SERVER = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            add_header X-Pod {name} always;
            return 200 "ok\\n";
        }}
    }}
"""

NGINX_PROXY_HTTP = """\
    upstream pods {{
        hash $http_x_routing_key consistent;
{servers}
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://pods;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
    pidfile {dir}/haproxy.pid

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    option forwardfor

frontend fe
    bind 127.0.0.1:{port} backlog 4096
    default_backend pods

backend pods
    balance hdr(X-Routing-Key)
    hash-type consistent
    http-reuse always
{servers}
"""

# ---------------------------------------------------------------- processes

_procs: list[subprocess.Popen] = []
_pods_proc: list[subprocess.Popen] = []


def start(cmd: list[str], log: Path, core: str) -> subprocess.Popen:
    """Start cmd pinned to core, in its own process group, stdout+stderr to log."""
    with open(log, "ab") as f:
        p = subprocess.Popen(
            ["taskset", "-c", core, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _procs.append(p)
    return p


def stop_all() -> None:
    """Stop every process group started by start(): SIGTERM, then SIGKILL."""
    for p in _procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for p in _procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in _procs:
        # the group may outlive its leader (e.g. nginx workers): kill the group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(2)
    _procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {port}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s:\n{tail(log)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pids: list[int], which: str = "both") -> int:
    """Sum of utime+stime (all threads) over pids, in clock ticks (which: both, user or sys)."""
    total = 0
    for pid in pids:
        try:
            st = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        f = st[st.rindex(")") + 2 :].split()
        utime, stime = int(f[11]), int(f[12])  # fields 14, 15
        total += {"both": utime + stime, "user": utime, "sys": stime}[which]
    return total


def core_times() -> dict[str, tuple[int, int, int]]:
    """/proc/stat per core: (busy, total) jiffies, busy = everything but idle and iowait."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = list(map(int, vals[:8]))
            # (busy, total, user+nice+system: time charged to tasks, not irq/softirq/steal)
            out[name[3:]] = (sum(v) - v[3] - v[4], sum(v), v[0] + v[1] + v[2])
    return out


def task_jiffies(t: dict[str, tuple[int, int, int]]) -> int:
    return sum(v[2] for v in t.values())


def core_busy(a: dict[str, tuple[int, int, int]], b: dict[str, tuple[int, int, int]], core: str) -> float:
    busy, total = b[core][0] - a[core][0], b[core][1] - a[core][1]
    return busy / total if total else float("nan")


# ---------------------------------------------------------------- setup


def ensure_tools() -> None:
    need = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
    missing = sorted({pkg for exe, pkg in need.items() if not (shutil.which(exe) or Path(f"/usr/sbin/{exe}").exists())})
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", *missing], check=True, env=env)


def exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def keyroute_exe() -> list[str]:
    venv_bin = Path(sys.executable).parent / "keyroute"
    if venv_bin.exists():
        return [str(venv_bin)]
    if shutil.which("keyroute"):
        return [shutil.which("keyroute")]  # type: ignore[list-item]
    return [sys.executable, "-m", "proxy"]


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)


def nginx_dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def start_nginx(d: Path, conf_text: str, core: str) -> subprocess.Popen:
    conf = d / "nginx.conf"
    conf.write_text(conf_text)
    log = d / "stderr.log"
    return start([exe("nginx"), "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], log, core)


def start_pods(tmp: Path, n: int = 4) -> dict[str, int]:
    d = nginx_dir(tmp, "pods")
    ports = {f"p{i}": free_port() for i in range(n)}
    servers = "".join(POD_SERVER.format(port=port, name=name) for name, port in ports.items())
    text = NGINX_COMMON.format(dir=d) + "http {\n" + NGINX_HTTP_COMMON.format(dir=d) + servers + "}\n"
    p = start_nginx(d, text, LOAD_CORE)
    _pods_proc.append(p)
    for port in ports.values():
        wait_port(port, p, d / "stderr.log")
    return ports


def start_keyroute(tmp: Path, pods: dict[str, int]) -> Proxy:
    d = tmp / "keyroute"
    d.mkdir()
    table = {"version": 1, "generation": 1, "pods": {n: {"url": f"http://127.0.0.1:{p}"} for n, p in pods.items()}}
    (d / "table.json").write_text(json.dumps(table))
    port, admin = free_port(), free_port()
    log = d / "stderr.log"
    cmd = [
        *keyroute_exe(),
        "run",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--assignment",
        f"file:{d / 'table.json'}",
    ]
    p = start(cmd, log, PROXY_CORE)
    wait_port(port, p, log)
    # ready once a table is in force
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if get(admin, "/-/readyz", {})[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    return Proxy("keyroute", port, p, log)


def start_haproxy(tmp: Path, pods: dict[str, int]) -> Proxy:
    d = tmp / "haproxy"
    d.mkdir()
    port = free_port()
    servers = "\n".join(f"    server {n} 127.0.0.1:{p}" for n, p in pods.items())
    cfg = d / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(dir=d, port=port, servers=servers))
    log = d / "stderr.log"
    chk = subprocess.run([exe("haproxy"), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy config check failed:\n{chk.stdout}{chk.stderr}")
    p = start([exe("haproxy"), "-db", "-f", str(cfg)], log, PROXY_CORE)
    wait_port(port, p, log)
    return Proxy("haproxy", port, p, log)


def start_nginx_proxy(tmp: Path, pods: dict[str, int]) -> Proxy:
    d = nginx_dir(tmp, "nginx-proxy")
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in pods.values())
    text = (
        NGINX_COMMON.format(dir=d)
        + "http {\n"
        + NGINX_HTTP_COMMON.format(dir=d)
        + NGINX_PROXY_HTTP.format(servers=servers, port=port)
        + "}\n"
    )
    p = start_nginx(d, text, PROXY_CORE)
    wait_port(port, p, d / "stderr.log")
    return Proxy("nginx", port, p, d / "stderr.log")


# ---------------------------------------------------------------- checks


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def check_routing(px: Proxy) -> str:
    """Same key -> same pod (5 tries each, 40 keys); keys spread over >1 pod."""
    seen: dict[str, str] = {}
    for i in range(40):
        key = f"key-{i * 251 + 1}"
        pods = set()
        for _ in range(5):
            status, h, body = get(px.port, "/", {"X-Routing-Key": key})
            if status != 200 or body != b"ok\n":
                raise RuntimeError(f"{px.name}: key {key}: status {status} body {body[:200]!r}")
            pods.add(h.get("x-pod", "?"))
            if px.name == "keyroute" and h.get("x-keyroute-pod") != h.get("x-pod"):
                raise RuntimeError(f"keyroute: X-Keyroute-Pod {h.get('x-keyroute-pod')} != X-Pod {h.get('x-pod')}")
        if len(pods) != 1:
            raise RuntimeError(f"{px.name}: key {key} reached several pods: {sorted(pods)}")
        seen[key] = pods.pop()
    spread = sorted(set(seen.values()))
    if len(spread) < 2:
        raise RuntimeError(f"{px.name}: 40 keys all went to {spread}")
    return f"{px.name}: 40 keys x 5 requests, each key always on one pod; keys spread over {','.join(spread)}"


# ---------------------------------------------------------------- wrk


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Run:
    proxy: str
    conns: int
    rnd: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    non2xx: int = 0
    sock: dict[str, int] = field(default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    cpu_s: float = 0.0
    sys_s: float = 0.0
    wall_s: float = 0.0
    core0: float = 0.0  # whole core 0 busy share (proxy + anything else)
    core1: float = 0.0  # whole core 1 busy share (wrk + pods + anything else)
    foreign: float = 0.0  # CPU (in cores) used during the run by processes not part of the bench
    alive: bool = True
    raw: str = ""

    @property
    def us_per_req(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


def parse_wrk(out: str, r: Run) -> None:
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2)) / 1e3
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r.rps = float(m.group(1)) if m else 0.0
    for pct, attr in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)", out, re.M)
        setattr(r, attr, _ms(m.group(1)) if m else float("nan"))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r.non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.sock = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))


def wrk(port: int, conns: int, threads: int, seconds: float) -> str:
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        exe("wrk"),
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    return p.stdout + p.stderr


def measure(px: Proxy, conns: int, rnd: int, threads: int, seconds: float, warmup: float) -> Run:
    r = Run(px.name, conns, rnd)
    if px.proc.poll() is not None:
        r.alive = False
        return r
    if warmup > 0:
        wrk(px.port, conns, threads, warmup)
    pids = px.pids()
    pod_pids = [q for p in _pods_proc for q in tree_pids(p.pid)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0, c0, t0, k0 = core_times(), cpu_ticks(pids), time.monotonic(), cpu_ticks(pod_pids)
    y0 = cpu_ticks(pids, "sys")
    out = wrk(px.port, conns, threads, seconds)
    c1, t1, s1, k1 = cpu_ticks(pids), time.monotonic(), core_times(), cpu_ticks(pod_pids)
    y1 = cpu_ticks(pids, "sys")
    r.sys_s = (y1 - y0) / HZ
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r.core0, r.core1 = core_busy(s0, s1, PROXY_CORE), core_busy(s0, s1, LOAD_CORE)
    wrk_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ours = (c1 - c0 + k1 - k0) / HZ + wrk_s
    r.foreign = max(0.0, ((task_jiffies(s1) - task_jiffies(s0)) / HZ - ours) / (t1 - t0))
    r.raw = out
    r.cpu_s = (c1 - c0) / HZ
    r.wall_s = t1 - t0
    parse_wrk(out, r)
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
        for name in ("keyroute", "haproxy", "nginx"):
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
        k = aggs.get(("keyroute", c))
        for peer in ("haproxy", "nginx"):
            p = aggs.get((peer, c))
            if not (k and p):
                continue
            rows.append(
                [
                    f"keyroute/{peer}",
                    str(c),
                    ratio(k.rps, p.rps),
                    ratio(k.p50, p.p50),
                    ratio(k.p99, p.p99),
                    ratio(k.us, p.us),
                ]
            )
    return rows


RHEAD = ["ratio", "conns", "req/s", "p50", "p99", "CPU µs/req"]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w]), *map(line, rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, CPU {model}, Linux {platform.release()}"


def versions() -> str:
    def first(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception:
            return "?"

    py = f"Python {platform.python_version()}"
    try:
        import httptools
        import uvloop

        py += f", uvloop {uvloop.__version__}, httptools {httptools.__version__}"
    except Exception:
        pass
    tools = [first([exe("haproxy"), "-v"]), first([exe("nginx"), "-v"]), first([exe("wrk"), "-v"])]
    return "; ".join(x for x in (keyroute_rev(), py, *tools) if x)


def keyroute_rev() -> str:
    """The keyroute code under test: git commit, plus uncommitted changes to proxy/ if any."""
    root = HERE.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "proxy"], capture_output=True, text=True
        )
    except OSError:
        return ""
    if rev.returncode != 0:
        return ""
    files = [line[3:] for line in dirty.stdout.splitlines()]
    return f"keyroute at {rev.stdout.strip()}" + (f" + uncommitted changes to {', '.join(files)}" if files else "")


# ---------------------------------------------------------------- profile


def self_time(collapsed: Path, top: int = 15) -> list[tuple[str, int, float]]:
    """Top frames by own (self) samples from py-spy's raw collapsed stacks."""
    counts: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])  # per function, not per line
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(f, n, n / total if total else 0.0) for f, n in ranked]


def profile_keyroute(kr: Proxy, conns: int, threads: int, seconds: float, svg: str) -> None:
    """py-spy record (with --native) keyroute during two load runs: a flamegraph SVG, then raw
    collapsed stacks (written next to it as .txt) from which the top frames by own time are printed.
    py-spy runs on the load core, so the profiled runs' throughput is not comparable to the table."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
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
        prof = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        _procs.append(prof)
        time.sleep(0.5)
        r = measure(kr, conns, 0, threads, seconds, 0)
        out, _ = prof.communicate(timeout=seconds + 60)
        print(f"\nprofiled run ({fmt}) c={conns}: {r.rps:,.0f} req/s, non-2xx {r.non2xx}, "
              f"py-spy: {out.strip().splitlines()[-1] if out.strip() else ''}", file=sys.stderr)  # fmt: skip
    print(f"flamegraph: {svg}\nraw stacks: {raw}\n\ntop frames by own time (keyroute, c={conns}):")
    try:
        for frame, n, share in self_time(Path(raw)):
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
    ap.add_argument("--only", help="comma list of proxies (default keyroute,haproxy,nginx)")
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

    ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-peers-"))

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C must reach us even if started with SIGINT ignored (e.g. `cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    failures: list[str] = []
    checks: list[str] = []
    try:
        pods = start_pods(tmp)
        starters: dict[str, Callable[[Path, dict[str, int]], Proxy]] = {
            "keyroute": start_keyroute,
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
                            f"{tail(px.log)}"
                        )

        aggs: dict[tuple[str, int], Agg] = {}
        for r in runs:
            aggs.setdefault((r.proxy, r.conns), Agg(r.proxy, r.conns, [])).runs.append(r)
        rows, rrows = table_rows(aggs, conns_list), ratio_rows(aggs, conns_list)
        print()
        print(text_table(HEAD, rows))
        print()
        print(text_table(RHEAD, rrows))
        print("\n(ratios: keyroute value / peer value; >1 is better for req/s, worse for latency and CPU)")
        for f in failures:
            print(f"\nERRORS: {f}")

        if args.markdown:
            cmd = "python bench/peers.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
            md = [
                "## Data plane vs HAProxy and nginx",
                "",
                f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
                f"- machine: {machine()}",
                f"- software: {versions()}",
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
                md_table(HEAD, rows),
                "",
                md_table(RHEAD, rrows),
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
        stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
