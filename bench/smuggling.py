"""Request-smuggling corpus through keyroute, HAProxy and nginx.

Run from the repo root::

    .venv/bin/python bench/smuggling.py            # all three, ~1 minute
    .venv/bin/python bench/smuggling.py --only keyroute --verbose

Every vector of tests/smuggling/ goes in one write to each proxy, each in
front of the same recording pod (tests/smuggling/harness.py) on 127.0.0.1:
keyroute (``keyroute run``, default settings), HAProxy 2.x (``balance
hdr(X-Routing-Key)``, ``hash-type consistent``, ``option forwardfor``) and
nginx (``hash $http_x_routing_key consistent``, keep-alive upstream, the
X-Forwarded-* headers of bench/peers.py), configured as bench/peers.py does.
After each vector a marker request on a new connection shows when the pod has
everything the vector made the proxy send.

Outcomes per vector: ``rejected`` (answered by the proxy, nothing at the pod),
``partial`` (bytes but no whole request at the pod), ``passed`` (one
well-formed request, the vector was valid), ``normalized`` (one well-formed
request from a vector that was not), ``intact`` (one request that still carries
the ambiguity), ``pipelined`` (a second request at the pod, one the proxy
parsed itself from bytes after the vector's request, as after a refused
Upgrade), ``smuggled`` (a request at the pod that the proxy did not parse, or
bytes left over on the pod connection), ``hung`` (no answer in --timeout).
The table counts them per tier; below it, every vector where a proxy missed
its expectation (a valid vector not passed; a severe or ambiguous one intact
or smuggled).

Only 127.0.0.1 is used; every process started here is stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import common
from peers import NGINX_LOCATION

sys.path.insert(0, str(common.HERE.parent))
from tests.smuggling import harness

GOOD = {"pass": ("passed", "normalized"), "normalize": ("rejected", "passed", "normalized"), "reject": ("rejected",)}
COLUMNS = ["rejected", "partial", "passed", "normalized", "intact", "pipelined", "smuggled", "hung"]


def start_proxies(tmp: Path, pod_port: int, names: list[str]) -> list[common.Proxy]:
    out = []
    for name in names:
        if name == "keyroute":
            d = tmp / "keyroute"
            d.mkdir()
            (d / "table.json").write_text(common.pods_table({"rec": pod_port}))
            port, admin = common.free_port(), common.free_port()
            flags = common.keyroute_flags(port, admin, f"file:{d / 'table.json'}")
            out.append(common.start_keyroute("keyroute", flags, port, admin, d / "stderr.log"))
        elif name == "haproxy":
            out.append(common.start_haproxy(tmp / "haproxy", "haproxy", f"    server rec 127.0.0.1:{pod_port}"))
        else:
            out.append(common.start_nginx_proxy(tmp / "nginx", "nginx", [pod_port], NGINX_LOCATION))
    return out


async def run(names: list[str], timeout: float, verbose: bool) -> int:
    corpus = harness.load_corpus()
    recorder = harness.Recorder()

    async def serve_pod(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled at exit: end quietly
            await recorder.handler(None, r, w)

    server = await asyncio.start_server(serve_pod, "127.0.0.1", 0)
    pod_port = server.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-smuggling-"))
    results: dict[str, list[harness.Observation]] = {}
    try:
        loop = asyncio.get_running_loop()
        proxies = await loop.run_in_executor(None, start_proxies, tmp, pod_port, names)
        for px in proxies:
            print(f"{px.name} on 127.0.0.1:{px.port}, pod on 127.0.0.1:{pod_port}", file=sys.stderr)
            obs = []
            for v in corpus:
                o = await harness.observe(px.port, recorder, v, timeout)
                obs.append(o)
                if o.outcome in ("smuggled", "pipelined", "partial") or not o.marker_arrived:
                    # Leave no out-of-step pod connection to the next vector.
                    recorder.close_all()
                if verbose:
                    print(f"  {px.name} {v.id}: {o.outcome}", file=sys.stderr)
            results[px.name] = obs
            recorder.close_all()
        report(corpus, results)
    finally:
        server.close()
        recorder.close_all()
        common.finish(tmp, keep=False)
    return 0


def report(corpus: list[harness.Vector], results: dict[str, list[harness.Observation]]) -> None:
    sources = {"aws": sum(v.source != "keyroute.yaml" for v in corpus), "keyroute": 0}
    sources["keyroute"] = len(corpus) - sources["aws"]
    print(f"corpus: {len(corpus)} vectors ({sources['aws']} AWS http-desync-guardian, {sources['keyroute']} keyroute)")
    for tier in harness.TIERS:
        vs = [i for i, v in enumerate(corpus) if v.tier == tier]
        print(f"\n{tier} ({len(vs)} vectors)")
        rows = []
        for name, obs in results.items():
            counts = harness.count(obs[i] for i in vs)
            missed = sum(obs[i].outcome not in GOOD[corpus[i].expect] for i in vs)
            rows.append([name, *(str(counts.get(c, 0)) for c in COLUMNS), str(missed)])
        print(common.text_table(["proxy", *COLUMNS, "missed expectation"], rows))
    print("\nvalid vectors (expect pass) not passed:")
    for name, obs in results.items():
        bad = [o for o in obs if o.vector.expect == "pass" and o.outcome not in GOOD["pass"]]
        print(f"  {name}: {len(bad)}")
        for o in bad:
            status = o.response.status if o.response else "-"
            print(f"    {o.vector.id}: {o.outcome} (status {status})")
    print("\nsevere/ambiguous vectors let through intact, pipelined or smuggled:")
    for name, obs in results.items():
        bad = [
            o
            for o in obs
            if o.vector.tier in ("severe", "ambiguous") and o.outcome in ("intact", "pipelined", "smuggled")
        ]
        print(f"  {name}: {len(bad)}")
        for o in bad:
            print(f"    {o.vector.id}: {o.outcome}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma list of proxies (default keyroute,haproxy,nginx)")
    ap.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for an answer or the marker (default 3)"
    )
    ap.add_argument("--verbose", "-v", action="store_true", help="print every vector's outcome")
    args = ap.parse_args(argv)
    names = (args.only or "keyroute,haproxy,nginx").split(",")
    common.ensure_tools(*(n for n in names if n != "keyroute"), "taskset")
    common.interrupt_on_signals()
    return asyncio.run(run(names, args.timeout, args.verbose))


if __name__ == "__main__":
    sys.exit(main())
