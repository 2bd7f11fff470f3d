"""User-space instructions per proxied request, counted by callgrind: keyroute
on its compiled path, on its pure-Python path, and HAProxy, on the same pods.

Run from the repo root::

    python bench/instructions.py                    # 1,000 and 2,000 requests per proxy, ~3 minutes
    python bench/instructions.py --tree /tmp/old    # keyroute from another checkout (built in place)

Instruction counts do not depend on what else the machine is doing, so two
versions (or a change and its revert) compare exactly where req/s on this
shared machine moves by 30% between runs. They leave out the kernel: the
syscalls (the same four per request for every proxy here) and the wakeups.

How: each proxy runs under ``valgrind --tool=callgrind`` in front of 4 nginx
pods; one client connection sends requests one at a time (a random
X-Routing-Key out of 10,000 each, as bench/peers.lua does); the proxy is
started twice, for N and 2N requests after the same warmup, and the
difference of the two totals divided by N is the cost of one request
(startup, warmup and shutdown cancel out). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import common

WARMUP = 200


def drive(port: int, n: int, rng: random.Random) -> None:
    """n requests on one keep-alive connection, each after the last response."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Routing-Key: %d\r\n\r\n" % rng.randrange(10_000))
            while b"ok\n" not in buf:
                got = s.recv(65536)
                if not got:
                    raise RuntimeError("the proxy closed the connection")
                buf += got
            if not buf.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"not a 200: {buf[:80]!r}")
            buf = buf.split(b"ok\n", 1)[1]


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def count(
    name: str, start: Callable[[list[str], Path], tuple[subprocess.Popen[bytes], int]], tmp: Path, n: int
) -> float:
    totals = {}
    for requests in (n, 2 * n):
        out = tmp / f"{name}.{requests}.callgrind"
        proc, port = start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"], tmp / f"{name}.log")
        rng = random.Random(1)
        drive(port, WARMUP, rng)
        drive(port, requests, rng)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        common.forget(proc)
        totals[requests] = callgrind_total(out)
    return (totals[2 * n] - totals[n]) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="N: runs of N and 2N requests (default 1000)")
    ap.add_argument("--tree", help="measure keyroute from this checkout (its extension built in place)")
    ap.add_argument("--only", default="native,pure,haproxy", help="comma list of: native, pure, haproxy")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (its callgrind files)")
    args = ap.parse_args()
    common.ensure_tools("nginx", "haproxy", "valgrind")
    common.interrupt_on_signals()
    tree = Path(args.tree).resolve() if args.tree else Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-instr-"))
    try:
        pods = common.start_pods(tmp)
        table = tmp / "table.json"
        table.write_text(common.pods_table(pods))

        def keyroute(pure: bool) -> Callable[[list[str], Path], tuple[subprocess.Popen[bytes], int]]:
            def start(prefix: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
                port, admin = common.free_port(), common.free_port()
                env = dict(os.environ, PYTHONPATH=str(tree))
                env.pop("KEYROUTE_NO_EXTENSIONS", None)
                if pure:
                    env["KEYROUTE_NO_EXTENSIONS"] = "1"
                flags = common.keyroute_flags(port, admin, f"file:{table}")
                cmd = [*prefix, sys.executable, "-m", "proxy", "run", *flags]
                with open(log, "ab") as f:
                    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tree)
                common.wait_port(port, p, log, timeout=120)
                return p, port

            return start

        def haproxy(prefix: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
            d = tmp / f"haproxy-{len(list(tmp.glob('haproxy-*')))}"
            servers = "\n".join(f"    server {n} 127.0.0.1:{p}" for n, p in pods.items())
            px = common.start_haproxy(d, "haproxy", servers)
            common.stop(px.proc)
            cfg = d / "haproxy.cfg"
            with open(log, "ab") as f:
                p = subprocess.Popen([*prefix, common.exe("haproxy"), "-db", "-f", str(cfg)], stdout=f, stderr=f)
            common.wait_port(px.port, p, log, timeout=120)
            return p, px.port

        starts = {"native": keyroute(False), "pure": keyroute(True), "haproxy": haproxy}
        rev = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True)
        print(f"machine: {common.machine()}\nkeyroute: {tree} at {rev.stdout.strip() or 'unknown'}; files in {tmp}")
        for name in args.only.split(","):
            per = count(name, starts[name], tmp, args.requests)
            print(f"{name:8} {per:10,.0f} instructions per request (user space)", flush=True)
    finally:
        common.stop_all()
        common.finish(tmp, keep=args.keep)


if __name__ == "__main__":
    main()
