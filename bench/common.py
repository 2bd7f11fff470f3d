"""Helpers shared by the benchmark scripts (peers, failover, reload, fleet).

Processes: every process started with ``start()`` runs in its own process
group, optionally pinned to a core with ``taskset``, and is remembered so that
``stop_all()`` (called from each script's ``finally``) leaves nothing behind,
including on Ctrl-C. CPU accounting reads /proc. Only 127.0.0.1 is used.

``bench/pod.py`` and ``bench/locustfile.py`` do not import this module: the pod
is shipped alone (a Kubernetes ConfigMap holds just that file) and locust
loads its file on its own.
"""

from __future__ import annotations

import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LUA = HERE / "peers.lua"  # wrk script: a random X-Routing-Key out of 10,000 per request
PROXY_CORE = "0"
LOAD_CORE = "1"
HZ = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------- processes

_procs: list[subprocess.Popen[Any]] = []
_pod_procs: list[subprocess.Popen[Any]] = []


def start(cmd: list[str], log: Path, core: str) -> subprocess.Popen[bytes]:
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


def start_piped(cmd: list[str]) -> subprocess.Popen[str]:
    """Start cmd in its own process group, stdout+stderr as text through a pipe."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _procs.append(p)
    return p


def forget(p: subprocess.Popen[Any]) -> None:
    """Leave p out of stop_all() (it has been stopped or has ended)."""
    if p in _procs:
        _procs.remove(p)


def _kill_group(p: subprocess.Popen[Any], sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop one process group started here: SIGTERM, up to grace seconds, then
    SIGKILL (the group may outlive its leader, e.g. nginx workers)."""
    if p.poll() is None:
        _kill_group(p, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(p, signal.SIGKILL)
    if p.poll() is None:
        p.wait(5)
    forget(p)


def stop_all() -> None:
    """Stop every process group started here: SIGTERM, then SIGKILL."""
    for p in _procs:
        if p.poll() is None:
            _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in _procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in _procs:
        _kill_group(p, signal.SIGKILL)
        if p.poll() is None:
            p.wait(2)
    _procs.clear()
    _pod_procs.clear()


def interrupt_on_signals(*extra: signal.Signals) -> None:
    """Turn SIGINT, SIGTERM, SIGHUP (and extra) into KeyboardInterrupt, so the
    scripts' ``finally`` stops everything. SIGINT gets Python's default handler
    back even if the script was started with it ignored (``cmd &`` in a script)."""

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, *extra):
        signal.signal(sig, on_signal)


def finish(tmp: Path, keep: bool) -> None:
    """At exit: stop everything started here, then remove tmp unless keep."""
    stop_all()
    if keep:
        print(f"kept {tmp}", file=sys.stderr, flush=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- ports and HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def wait_port(port: int, proc: subprocess.Popen[Any], log: Path, timeout: float = 15) -> None:
    """Until 127.0.0.1:port accepts a connection; raises (with log's tail) if
    proc exits first or timeout seconds pass."""
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


def wait_until(pred: Callable[[], bool], timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    """Poll pred every 50 ms (OSError counts as not yet) until it holds; False
    after timeout seconds, or as soon as proc has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """GET 127.0.0.1:port path on a new connection: status, headers (lower-case names), body."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------- CPU accounting


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


# ---------------------------------------------------------------- tools


def ensure_tools(*names: str) -> None:
    """Install the missing ones of these executables with apt-get."""
    package = {"taskset": "util-linux"}
    missing = sorted({package.get(n, n) for n in names if not (shutil.which(n) or Path(f"/usr/sbin/{n}").exists())})
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


def py_spy() -> str | None:
    """The py-spy executable (on PATH or next to this Python), or None after saying it is missing."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    return spy


# ---------------------------------------------------------------- nginx pods

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


def nginx_dir(d: Path) -> Path:
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def nginx_conf(d: Path, http: str) -> str:
    """A whole nginx.conf (1 worker, files under d) around the http block's content."""
    return NGINX_COMMON.format(dir=d) + "http {\n" + NGINX_HTTP_COMMON.format(dir=d) + http + "}\n"


def start_nginx(d: Path, conf_text: str, core: str) -> subprocess.Popen[bytes]:
    conf = d / "nginx.conf"
    conf.write_text(conf_text)
    log = d / "stderr.log"
    return start([exe("nginx"), "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], log, core)


def start_pods(tmp: Path, n: int = 4) -> dict[str, int]:
    """n pods p0.. on LOAD_CORE: one nginx (1 worker), each pod a server block
    answering ``200 ok`` with an ``X-Pod`` header naming it; name -> port."""
    d = nginx_dir(tmp / "pods")
    ports = {f"p{i}": free_port() for i in range(n)}
    servers = "".join(POD_SERVER.format(port=port, name=name) for name, port in ports.items())
    p = start_nginx(d, nginx_conf(d, servers), LOAD_CORE)
    _pod_procs.append(p)
    for port in ports.values():
        wait_port(port, p, d / "stderr.log")
    return ports


def pod_pids() -> list[int]:
    """The processes of the pods started by start_pods()."""
    return [q for p in _pod_procs for q in tree_pids(p.pid)]


# ---------------------------------------------------------------- proxies

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
    pidfile {dir}/haproxy.pid

defaults
    mode http
    timeout connect {connect}
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
{backend}
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
{location}        }}
    }}
"""


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)


def pods_table(ports: dict[str, int]) -> str:
    """A pods-only table (generation 1) of pods on 127.0.0.1, as JSON."""
    return json.dumps(
        {"version": 1, "generation": 1, "pods": {n: {"url": f"http://127.0.0.1:{p}"} for n, p in ports.items()}}
    )


def keyroute_flags(port: int, admin: int, source: str) -> list[str]:
    """``keyroute run`` arguments: proxy on port, admin on admin, table from source."""
    return ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--assignment", source]


def keyroute_toml(port: int, admin: int, source: str) -> str:
    """A keyroute config file: proxy on port, admin on admin, table from source
    (the ``[assignment]`` section comes last: more of its keys can be appended)."""
    return (
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[assignment]\nsource = "{source}"\n'
    )


def start_keyroute(
    name: str, run_args: list[str], port: int, admin: int, log: Path, core: str = PROXY_CORE, timeout: float = 10
) -> Proxy:
    """``keyroute run *run_args`` pinned to core; returns once it listens on
    port and its admin ``/-/readyz`` (on admin) says a table is in force."""
    p = start([*keyroute_exe(), "run", *run_args], log, core)
    wait_port(port, p, log)
    if not wait_until(lambda: get(admin, "/-/readyz", {})[0] == 200, timeout, p):
        raise RuntimeError(f"{name} not ready after {timeout:g} s:\n{tail(log)}")
    return Proxy(name, port, p, log)


def start_haproxy(d: Path, name: str, backend: str, connect: str = "5s") -> Proxy:
    """HAProxy (1 thread, on PROXY_CORE, files in d) hashing X-Routing-Key over
    the backend lines (servers and options) given; the config is checked first."""
    d.mkdir()
    port = free_port()
    cfg = d / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(dir=d, port=port, connect=connect, backend=backend))
    log = d / "stderr.log"
    chk = subprocess.run([exe("haproxy"), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy config check failed:\n{chk.stdout}{chk.stderr}")
    p = start([exe("haproxy"), "-db", "-f", str(cfg)], log, PROXY_CORE)
    wait_port(port, p, log)
    return Proxy(name, port, p, log)


def start_nginx_proxy(d: Path, name: str, ports: Iterable[int], location: str) -> Proxy:
    """nginx (1 worker, on PROXY_CORE, files in d) hashing X-Routing-Key over
    pods on 127.0.0.1 ports, keep-alive to them; location: more directives of
    the proxying ``location /``."""
    nginx_dir(d)
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    p = start_nginx(
        d, nginx_conf(d, NGINX_PROXY_HTTP.format(servers=servers, port=port, location=location)), PROXY_CORE
    )
    wait_port(port, p, d / "stderr.log")
    return Proxy(name, port, p, d / "stderr.log")


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_ms(text: str) -> float:
    """A wrk duration (``850.00us``, ``1.20ms``, ``2s``) in ms."""
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
    """Fill r's requests, seconds, req/s, p50, p99 (ms), non-2xx and socket errors from wrk --latency output."""
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = wrk_ms(m.group(2)) / 1e3
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r.rps = float(m.group(1)) if m else 0.0
    for pct, attr in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)", out, re.M)
        setattr(r, attr, wrk_ms(m.group(1)) if m else float("nan"))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r.non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.sock = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))


def wrk_max(out: str) -> float:
    """The max latency (ms) of wrk's Latency line."""
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    return wrk_ms(m.group(1)) if m else float("nan")


def wrk_cmd(port: int, conns: int, seconds: float, lua: Path = LUA, threads: int = 1) -> list[str]:
    """wrk on LOAD_CORE against 127.0.0.1:port with --latency and the lua script."""
    return [
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
        str(lua),
        f"http://127.0.0.1:{port}/",
    ]


def run_wrk(port: int, conns: int, seconds: float, lua: Path = LUA, threads: int = 1) -> str:
    """Run wrk (see wrk_cmd) to the end; its stdout and stderr."""
    cmd = wrk_cmd(port, conns, seconds, lua, threads)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    return p.stdout + p.stderr


# ---------------------------------------------------------------- report


def nearest_rank(xs: Iterable[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of xs by nearest rank; nan if xs is empty."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)] if s else float("nan")


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))

    return "\n".join([line(head), line(["-" * x for x in w]), *map(line, rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def timestamp() -> str:
    """The local date and time for a results section."""
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command(script: str, argv: list[str] | None) -> str:
    """How the script was run (argv None: this process's arguments), for a results section."""
    return f"python bench/{script}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


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
    """keyroute's revision, Python (uvloop, httptools) and the HAProxy, nginx and wrk versions."""

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
