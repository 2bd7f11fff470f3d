"""Micro-benchmark of the routing core (not a test).

Measures, on one core, in this process:

* parse + validate of an explicit table's JSON bytes (``assignment.parse``);
* ``Assignment.lookup``: key hash + binary search, over pre-made random keys;
* ``assignment.generate`` of a pods-only table (default 4096 slices);
* what a big reload costs the proxy's own process: unpickling the table the
  helper process parsed (``proxy.offload``), and the table's memory
  (``tracemalloc``, routes not built yet; building one costs ~100 bytes);
* the compact form (``owners``): bytes and parse time of a table of
  ``--cm-slices`` slices (default 4096) over ``--cm-pods`` pods (default 8)
  with full DNS URLs, as generated and after each of ``--cm-rounds`` rounds
  of ``gen --from`` changes (drain a pod; undrain it with --rebalance; every
  third round add a pod, the next remove it), explicit against compact; and
  the parse of a compact table of 2**17 slices (an evolved grid, 8 pods).

Run from the repo root::

    python bench/micro.py                 # 100k slices
    python bench/micro.py --slices 250000     # up to MAX_SLICES (262,144)
    python bench/micro.py --cm-rounds 12      # more rounds of table changes

Targets: under 1 µs per lookup, under 300 ms to parse + validate 100k slices.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import orjson

from proxy import assignment as core

GENERATION = 1_732_780_800_000


def make_table(slices: int, pods: int, rng: random.Random) -> bytes:
    """JSON bytes of an explicit table: random sorted starts, random owners,
    two backups and an epoch per slice."""
    ids = [f"pod-{i}" for i in range(pods)]
    starts = {0}
    while len(starts) < slices:
        starts.add(rng.getrandbits(64))
    rows = []
    for start in sorted(starts):
        owner, *backups = rng.sample(ids, 3)
        rows.append(
            {
                "start": f"0x{start:016x}",
                "pod": owner,
                "epoch": GENERATION - rng.randrange(1_000_000),
                "backups": backups,
            }
        )
    doc = {
        "version": 1,
        "generation": GENERATION,
        "pods": {pid: {"url": f"http://10.0.0.{i + 1}:8080", "weight": 1 + i % 3} for i, pid in enumerate(ids)},
        "slices": rows,
    }
    return orjson.dumps(doc)


DNS = "http://{}.app.default.svc.cluster.local:8080"


def change_rounds(slices: int, pods: int, rounds: int) -> list[tuple[str, core.Assignment]]:
    """A generated table, then ``rounds`` rounds of changes as ``gen --from``
    makes them (``evolve``): drain a pod, then undrain it with rebalancing;
    every third round also adds a pod, and the round after removes it."""
    specs = [(f"app-{i}", DNS.format(f"app-{i}"), 1.0, "active") for i in range(pods)]
    t = core.generate(GENERATION, core.make_pods(specs), slices)
    out = [("generated", t)]
    for r in range(rounds):
        pid = f"app-{r % pods}"
        specs = [(p.id, p.url, p.weight, "draining" if p.id == pid else p.state) for p in t.pods.values()]
        t = core.evolve(t, core.make_pods(specs), t.generation + 1)
        specs = [(p.id, p.url, p.weight, "active") for p in t.pods.values()]
        note = f"drain+undrain {pid}"
        if r % 3 == 2:
            specs.append(("app-extra", DNS.format("app-extra"), 1.0, "active"))
            note += ", add app-extra"
        elif r % 3 == 0 and "app-extra" in t.pods:
            specs = [s for s in specs if s[0] != "app-extra"]
            note += ", remove app-extra"
        t = core.evolve(t, core.make_pods(specs), t.generation + 1, rebalance=True)
        out.append((f"round {r + 1}: {note}", t))
    return out


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall-clock seconds of ``runs`` calls, with the GC collected before each
    and disabled during it (the proxy parses off the hot path; GC pauses are
    noise here, not signal)."""
    out = []
    for _ in range(runs):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100_000, help="slices in the explicit table (default 100000)")
    ap.add_argument("--pods", type=int, default=8, help="pods (default 8)")
    ap.add_argument("--keys", type=int, default=200_000, help="random keys per lookup run (default 200000)")
    ap.add_argument(
        "--runs", type=int, default=7, help="runs per measurement; median and best are reported (default 7)"
    )
    ap.add_argument("--gen-slices", type=int, default=core.DEFAULT_SLICE_COUNT, help="slices for generate()")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cm-slices", type=int, default=core.DEFAULT_SLICE_COUNT, help="compact form: slices")
    ap.add_argument("--cm-pods", type=int, default=8, help="compact form: pods (default 8)")
    ap.add_argument("--cm-rounds", type=int, default=8, help="compact form: rounds of changes (default 8)")
    args = ap.parse_args(argv)
    if args.slices < 1 or args.pods < 3 or args.keys < 1 or args.runs < 1:
        ap.error("--slices, --keys and --runs must be positive and --pods at least 3")

    rng = random.Random(args.seed)
    data = make_table(args.slices, args.pods, rng)
    table = core.parse(data)
    assert table.slice_count == args.slices

    # Keys are made before the parse runs below churn the heap, so that they
    # sit together in memory as fresh request bytes would be in cache.
    keys = [f"user-{rng.getrandbits(48)}".encode() for _ in range(args.keys)]
    lookup = table.lookup

    def run_lookups() -> None:
        for k in keys:
            lookup(k)

    def run_empty() -> None:
        for _k in keys:
            pass

    lookup_t = [t / len(keys) for t in timed(run_lookups, args.runs)]
    loop_t = [t / len(keys) for t in timed(run_empty, args.runs)]
    parse_t = timed(lambda: core.parse(data), args.runs)
    pods = core.make_pods((f"pod-{i}", f"http://10.0.0.{i + 1}:8080", 1.0, "active") for i in range(args.pods))
    gen_t = timed(lambda: core.generate(GENERATION, pods, args.gen_slices), args.runs)
    pickled = pickle.dumps(core.parse(data), protocol=pickle.HIGHEST_PROTOCOL)
    unpickle_t = timed(lambda: pickle.loads(pickled), args.runs)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fresh = core.parse(data)
    table_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del fresh

    def row(name: str, times: list[float], fmt: Callable[[float], str]) -> tuple[str, str, str]:
        return name, fmt(statistics.median(times)), fmt(min(times))

    rows = [
        ("", "median", "best"),
        row(
            f"parse+validate {args.slices} slices ({len(data) / 1e6:.1f} MB JSON)",
            parse_t,
            lambda t: f"{t * 1e3:.1f} ms",
        ),
        row(f"lookup (hash + bisect), {args.slices} slices", lookup_t, lambda t: f"{t * 1e9:.0f} ns"),
        ("  same, as a rate", f"{1 / statistics.median(lookup_t) / 1e6:.2f} M/s", f"{1 / min(lookup_t) / 1e6:.2f} M/s"),
        row("  of which the bare Python for-loop", loop_t, lambda t: f"{t * 1e9:.0f} ns"),
        row(f"generate() {args.gen_slices} slices, {args.pods} pods", gen_t, lambda t: f"{t * 1e3:.1f} ms"),
        row(f"unpickle the parsed table ({len(pickled) / 1e6:.1f} MB)", unpickle_t, lambda t: f"{t * 1e3:.2f} ms"),
        (f"memory of the parsed table ({args.slices} slices)", f"{table_bytes / 1e6:.1f} MB", ""),
    ]
    big = change_rounds(1 << 17, 8, 3)[-1][1]
    big_data = big.dumps(compact=True)
    big_t = timed(lambda: core.parse(big_data), args.runs)
    rows.append(
        row(
            f"parse+validate compact, {big.slice_count} slices ({len(big_data) / 1e6:.2f} MB JSON)",
            big_t,
            lambda t: f"{t * 1e3:.1f} ms",
        )
    )
    width = max(len(r[0]) for r in rows)
    print(f"python {sys.version.split()[0]}, {args.runs} runs each, {args.keys} keys per lookup run")
    for name, median, best in rows:
        print(f"{name:<{width}}  {median:>10}  {best:>10}")

    print()
    print(f"table sizes, {args.cm_slices} slices x {args.cm_pods} pods, URLs like {DNS.format('app-0')}")
    print(f"{'':<46}  {'explicit':>10}  {'compact':>10}  {'epochs':>6}  {'parse compact (median)':>22}")
    for note, t in change_rounds(args.cm_slices, args.cm_pods, args.cm_rounds):
        data = t.dumps(compact=True)
        assert core.parse(data) == t
        parse_c = statistics.median(timed(lambda data=data: core.parse(data), args.runs))
        epochs = len({r.epoch for r in t.routes})
        print(
            f"{note:<46}  {len(t.dumps(compact=False)):>10,}  {len(data):>10,}  {epochs:>6}  {parse_c * 1e3:>19.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
