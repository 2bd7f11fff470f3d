"""Fleet benchmark: reference pods + keyroute + locust, steady and while the table changes.

Run from the repo root with the venv's Python, locust installed
(``pip install -e '.[bench]'``)::

    python bench/fleet.py                    # 3 phases x 30 s, 4 pods, 32 users; appends to bench/RESULTS.md
    python bench/fleet.py --duration 10 --results -    # shorter, print the section instead of appending

What it does, once per phase (everything started fresh for each):

* writes a pods-only table (``--slices`` slices) for ``--pods`` pods into its
  own folder, and starts that many reference pods (``bench/pod.py``), each
  its own process, sharing one SQLite store and following the table file;
* starts ``keyroute run`` (1 worker, default settings) on the same file and
  waits for ``/-/readyz`` (two of them in ``skew``);
* runs ``locust -f bench/locustfile.py --headless`` for ``--duration``
  seconds with ``--users`` users (each: one request at a time, no wait;
  Zipf s=1.1 over 100,000 keys; 20% writes);

  - ``steady``: the table does not change;
  - ``changes``: locust rewrites the table every ``--rewrite-every`` seconds
    (drain a pod, bring it back with a rebalance, next pod; each write moves a
    share of the key space and gives the moved slices new epochs);
  - ``skew``: the same in front of two keyroute replicas, users split between
    them, the second watching the file by polling every ``--lag`` seconds: for
    up to that long after each change the replicas route moved keys to
    different pods, the old owner with the old epoch, the new one with the
    new epoch. This is what fencing is for;

* collects: req/s, p50 and p99 (locust, all requests), the affinity (share of
  answers served by their owner under the generation keyroute stamped on
  them), fenced writes (pods' ``/stats`` ``writes_refused``), foreign-key
  requests (pods' ``foreign_keys``), unverified answers, failovers
  (keyroute's ``/metrics`` ``keyroute_failovers_total``) and table reloads
  applied.

Prints a table and appends a "## Fleet (locust)" section to ``--results``
(default bench/RESULTS.md; ``-`` prints it instead). Nothing is pinned to a
core: proxy, pods and locust share the machine. Only 127.0.0.1 is used; every
process started here is stopped at exit, including on Ctrl-C; temp files live
in one temp dir, removed at exit unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

from proxy import assignment as core

HERE = Path(__file__).resolve().parent
ALL_CORES = f"0-{(os.cpu_count() or 1) - 1}"
# name -> (table rewrites during the run, keyroute replicas)
PHASES = {"steady": (False, 1), "changes": (True, 1), "skew": (True, 2)}


@dataclass
class Phase:
    name: str
    seconds: float
    rewrite_every: float
    proxies: int = 1
    locust_rc: int = 0
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    affinity: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    failovers: float = 0.0
    reloads_applied: float = 0.0
    proxy_errors: float = 0.0
    notes: list[str] = field(default_factory=list)

    def pod_sum(self, counter: str) -> int:
        return sum(int(s.get(counter, 0)) for s in self.pods.values())


def locust_exe() -> list[str]:
    venv_bin = Path(sys.executable).parent / "locust"
    if venv_bin.exists():
        return [str(venv_bin)]
    return [sys.executable, "-m", "locust"]


def metrics(admin: int) -> dict[str, float]:
    status, _, body = common.get(admin, "/metrics", {})
    if status != 200:
        raise RuntimeError(f"keyroute /metrics answered {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def summed(samples: dict[str, float], family: str) -> float:
    return sum(v for k, v in samples.items() if k == family or k.startswith(family + "{"))


def pod_stats(port: int) -> dict[str, Any]:
    status, _, body = common.get(port, "/stats", {})
    if status != 200:
        raise RuntimeError(f"pod on {port}: /stats answered {status}")
    return dict(json.loads(body))


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 15.0) -> None:
    if not common.wait_until(pred, timeout):
        raise RuntimeError(f"timed out waiting for {what}")


def run_phase(tmp: Path, phase: Phase, args: argparse.Namespace, log: Any) -> Phase:
    d = tmp / phase.name
    (d / "table").mkdir(parents=True)  # its own folder: store writes do not wake the table watchers
    (d / "store").mkdir()
    table_path = d / "table" / "table.json"
    ports = {f"pod-{chr(ord('a') + i)}": common.free_port() for i in range(args.pods)}
    specs = [(pid, f"http://127.0.0.1:{port}", 1.0, "active") for pid, port in ports.items()]
    table = core.generate(int(time.time() * 1000), core.make_pods(specs), args.slices)
    table_path.write_bytes(table.dumps(explicit=False))

    for pid, port in ports.items():
        plog = d / f"{pid}.log"
        cmd = [sys.executable, str(HERE / "pod.py"), "--id", pid, "--listen", f"127.0.0.1:{port}",
               "--store", str(d / "store" / "fleet.sqlite"), "--table", f"file:{table_path}"]  # fmt: skip
        p = common.start(cmd, plog, ALL_CORES)
        common.wait_port(port, p, plog)
    for pid, port in ports.items():
        wait_until(f"{pid} to read the table", lambda p=port: pod_stats(p)["generation_latest"] == table.generation)

    proxies: list[tuple[int, int, subprocess.Popen[bytes], Path]] = []
    for i in range(phase.proxies):
        port, admin = common.free_port(), common.free_port()
        config = d / f"keyroute-{i}.toml"
        text = common.keyroute_toml(port, admin, f"file:{table_path}")
        if i:
            # A replica that learns of a change up to 1 s late, as replicas whose
            # ConfigMap volumes are refreshed at different moments do.
            text += f'watch = "poll"\npoll_interval = "{args.lag:g}s"\n'
        config.write_text(text)
        klog = d / f"keyroute-{i}.log"
        kr = common.start_keyroute(f"keyroute-{i}", ["--config", str(config)], port, admin, klog, ALL_CORES, 15)
        proxies.append((port, admin, kr.proc, klog))
    where = ", ".join(f"127.0.0.1:{p} (admin {a})" for p, a, _, _ in proxies)
    log(f"{phase.name}: {args.pods} pods {ports}, keyroute on {where}")

    summary = d / "affinity.json"
    cmd = [*locust_exe(), "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(args.users),
           "-r", str(args.users), "-t", f"{phase.seconds:g}s", "--host", f"http://127.0.0.1:{proxies[0][0]}",
           "--proxies", ",".join(f"http://127.0.0.1:{p}" for p, _, _, _ in proxies),
           "--table", str(table_path), "--csv", str(d / "locust"), "--fleet-summary", str(summary),
           "--only-summary", "--stop-timeout", "5"]  # fmt: skip
    if phase.rewrite_every:
        cmd += ["--rewrite-every", f"{phase.rewrite_every:g}"]
    llog = d / "locust.log"
    with open(llog, "wb") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=phase.seconds + 90)
    phase.locust_rc = r.returncode

    with open(d / "locust_stats.csv", newline="") as fh:
        agg = next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")
    phase.requests = int(agg["Request Count"])
    phase.failures = int(agg["Failure Count"])
    phase.rps = float(agg["Requests/s"])
    phase.p50 = float(agg["50%"])
    phase.p99 = float(agg["99%"])
    if summary.exists():
        phase.affinity = json.loads(summary.read_text())
    else:
        phase.notes.append(f"locust wrote no affinity summary:\n{common.tail(llog)}")
    for pid, pport in ports.items():
        phase.pods[pid] = pod_stats(pport)
    if phase.affinity and phase.affinity.get("fenced") != phase.pod_sum("writes_refused"):
        phase.notes.append(
            f"locust saw {phase.affinity.get('fenced')} fenced writes (409), the pods counted "
            f"{phase.pod_sum('writes_refused')}"
        )
    for _, admin, kp, klog in proxies:
        m = metrics(admin)
        phase.failovers += summed(m, "keyroute_failovers_total")
        phase.reloads_applied += m.get('keyroute_reloads_total{result="applied"}', 0.0)
        phase.proxy_errors += summed(m, "keyroute_proxy_errors_total")
        if kp.poll() is not None:
            phase.notes.append(f"keyroute exited with {kp.returncode}:\n{common.tail(klog)}")
    if phase.locust_rc not in (0, 1):
        phase.notes.append(f"locust exited with {phase.locust_rc}:\n{common.tail(llog)}")
    failures_csv = d / "locust_failures.csv"
    if failures_csv.exists():
        rows = list(csv.DictReader(failures_csv.open(newline="")))
        phase.notes += [f"locust failure x{row['Occurrences']}: {row['Method']} {row['Name']}: {row['Error']}"
                        for row in rows[:10]]  # fmt: skip
    common.stop_all()
    return phase


HEAD = [
    "phase",
    "keyroutes",
    "seconds",
    "table writes",
    "req/s",
    "p50 ms",
    "p99 ms",
    "requests",
    "failures",
    "affinity",
    "unverified",
    "fencing refusals",
    "foreign-key requests",
    "failovers",
    "reloads applied",
]


def row(p: Phase) -> list[str]:
    a = p.affinity
    share = a.get("affinity")
    return [
        p.name,
        str(p.proxies),
        f"{p.seconds:g}",
        str(a.get("table_writes", 0)),
        f"{p.rps:,.0f}",
        f"{p.p50:g}",
        f"{p.p99:g}",
        f"{p.requests:,}",
        f"{p.failures:,}",
        "n/a" if share is None else f"{100 * share:.3f}%",
        f"{a.get('unverified', 0):,}",
        f"{p.pod_sum('writes_refused'):,}",
        f"{p.pod_sum('foreign_keys'):,}",
        f"{p.failovers:g}",
        f"{p.reloads_applied:g}",
    ]


def locust_version() -> str:
    try:
        out = subprocess.run([*locust_exe(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "locust ?"
    return " ".join(out.split()[:2])


def markdown(phases: list[Phase], args: argparse.Namespace, argv: list[str], started: str) -> str:
    cmd = common.command("fleet.py", argv)
    lines = [
        "## Fleet (locust)",
        "",
        f"- date: {started}",
        f"- machine: {common.machine()}",
        f"- software: {common.keyroute_rev()}; Python {sys.version.split()[0]}; {locust_version()}",
        f"- command: `{cmd}`",
        f"- setup: {args.pods} reference pods (`bench/pod.py`, aiohttp, one process each, one shared SQLite "
        f"store), `keyroute run` (1 worker, default settings) and locust (1 process, {args.users} "
        f"`FastHttpUser`s, no wait: a closed loop at full speed) on the same machine, nothing pinned; "
        f"pods-only table of {args.slices} slices; keys Zipf s=1.1 over 100,000, 20% writes (`PUT`), "
        f"80% reads (`GET`). Each phase starts everything fresh. `changes`: locust rewrites the table "
        f"every {args.rewrite_every:g} s (atomic rename; drain a pod, then bring it back with a rebalance). "
        f"`skew`: the same with two keyroute replicas, users split between them; the second watches the "
        f'file with `watch = "poll"`, `poll_interval = "{args.lag:g}s"`, so it applies each change up to '
        f"{args.lag:g} s after the first (as replicas whose ConfigMap volumes refresh at different moments).",
        "- columns: req/s, p50, p99 and failures from locust (all requests); affinity = answers served by the "
        "key's owner in the table of the generation keyroute stamped on them / answers checked; unverified = "
        "answers whose generation locust did not know; fencing refusals = writes the pods refused because the "
        "store held a higher epoch for the key (`/stats` `writes_refused`, 409 to the client); foreign-key "
        "requests = requests a pod received for a key another pod owns under the stamped generation "
        "(`/stats` `foreign_keys`); failovers = `keyroute_failovers_total`; reloads = "
        '`keyroute_reloads_total{result="applied"}` (the first table is not a reload).',
        "",
        common.md_table(HEAD, [row(p) for p in phases]),
    ]
    for p in phases:
        if p.notes:
            lines += ["", f"Problems in phase {p.name}:", ""] + [f"- {n}" for n in p.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30, help="seconds of load per phase (default 30)")
    ap.add_argument("--pods", type=int, default=4, help="reference pods (default 4)")
    ap.add_argument("--users", type=int, default=32, help="locust users (default 32)")
    ap.add_argument("--slices", type=int, default=1024, help="slices of the table (default 1024)")
    ap.add_argument("--rewrite-every", type=float, default=3, help="seconds between table rewrites (default 3)")
    ap.add_argument(
        "--lag", type=float, default=1.0, help="skew: the second replica's poll interval in seconds (default 1)"
    )
    ap.add_argument("--only", default=",".join(PHASES), help=f"phases to run (default {','.join(PHASES)})")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="append the section here ('-': print it)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (tables, logs, locust CSVs)")
    args = ap.parse_args(argv)
    names = args.only.split(",")
    if any(n not in PHASES for n in names):
        print(f"--only: phases are {', '.join(PHASES)}", file=sys.stderr)
        return 2
    if not Path(locust_exe()[0]).exists() and subprocess.run([*locust_exe(), "--version"]).returncode != 0:
        print("locust is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-fleet-"))
    common.interrupt_on_signals()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = common.timestamp()
    phases: list[Phase] = []
    try:
        for name in names:
            rewrite, proxies = PHASES[name]
            phase = Phase(name, args.duration, args.rewrite_every if rewrite else 0.0, proxies)
            phases.append(run_phase(tmp, phase, args, log))
            log(common.text_table(HEAD, [row(phase)]))
            for n in phase.notes:
                log(f"  {n}")
        print()
        print(common.text_table(HEAD, [row(p) for p in phases]))
        text = markdown(phases, args, argv if argv is not None else sys.argv[1:], started)
        if args.results == "-":
            print("\n" + text)
        else:
            path = Path(args.results)
            current = path.read_text() if path.exists() else ""  # re-read right before appending
            sep = "" if not current or current.endswith("\n\n") else ("\n" if current.endswith("\n") else "\n\n")
            with open(path, "a") as fh:
                fh.write(sep + text)
            log(f"appended to {path}")
        return 0 if all(not p.notes for p in phases) else 1
    except KeyboardInterrupt:
        log("\ninterrupted, stopping everything")
        return 130
    finally:
        common.finish(tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
