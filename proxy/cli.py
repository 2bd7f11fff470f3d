"""Command line: ``keyroute check|lookup|gen|run|demo``."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from . import assignment as core
from . import sources
from .config import FLAG_KEYS, ConfigError, Settings
from .config import load as load_settings


class UsageError(Exception):
    """A bad argument; printed without a traceback, exit code 2."""


def _table(path: str) -> core.Assignment:
    """``sources.read_file``, worded for the command line: what is wrong comes
    right after "invalid table:" (as for tables built from flags), then the file."""
    try:
        return sources.read_file(path)
    except core.AssignmentError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        raise core.AssignmentError(f"{detail} (in {path})") from None


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _describe(table: core.Assignment, out: TextIO) -> None:
    kind = "generated" if table.generated else "explicit"
    print(f"generation: {table.generation}", file=out)
    print(f"slices: {table.slice_count} ({kind})", file=out)
    print(f"pods: {len(table.pods)}", file=out)
    shares = table.shares()
    width = max(len(p) for p in table.pods)
    for pod in table.pods.values():
        extra = [f"weight {pod.weight:g}"] if pod.weight != 1.0 else []
        if not pod.active:
            extra.append(pod.state)
        tail = f"  ({', '.join(extra)})" if extra else ""
        print(f"  {pod.id:<{width}}  {pod.url:<28} {_pct(shares[pod.id]):>8}{tail}", file=out)


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    if args.config:
        # The environment too, as `run` reads it: a bad KEYROUTE_* variable fails here, not at startup.
        settings = load_settings(args.config)
        print(f"config {args.config}: ok", file=out)
        src = settings.assignment.source
        if args.file is None and src.startswith("file:"):
            args.file = src[len("file:") :]  # relative to the working directory
    if args.file is None:
        if args.config:
            return 0
        raise UsageError("check: give a table FILE, or --config FILE")
    table = _table(args.file)
    print(f"table {args.file}: ok", file=out)
    _describe(table, out)
    return 0


def cmd_lookup(args: argparse.Namespace, out: TextIO) -> int:
    table = _table(args.file)
    rows = []
    for key in args.keys:
        raw = key.encode("utf-8", "surrogateescape")
        pos = core.position(raw)
        r = table.lookup_position(pos)
        rows.append(
            {
                "key": key,
                "position": pos,
                "position_hex": f"0x{pos:016x}",
                "slice": r.index,
                "slice_start": f"0x{r.start:016x}",
                "owner": r.pod.id,
                "url": r.pod.url,
                "epoch": r.epoch,
                "backups": list(r.backups),
                "generation": table.generation,
            }
        )
    if args.json:
        out.write(orjson.dumps(rows if len(rows) != 1 else rows[0], option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for row in rows:
        backups = ",".join(row["backups"]) or "-"
        print(
            f"{row['key']}\tposition={row['position']} ({row['position_hex']})\towner={row['owner']}"
            f"\tepoch={row['epoch']}\tbackups={backups}\tslice={row['slice']}",
            file=out,
        )
    return 0


def _parse_pod_arg(text: str) -> tuple[str, str, float, str]:
    """``id=url[,weight=N][,state=draining]``."""
    head, *opts = text.split(",")
    pid, sep, url = head.partition("=")
    if not sep or not pid or not url:
        raise UsageError(f"--pod {text!r}: expected id=http://host:port[,weight=N]")
    weight, state = 1.0, "active"
    for opt in opts:
        k, _, v = opt.partition("=")
        if k == "weight":
            try:
                weight = float(v)
            except ValueError:
                raise UsageError(f"--pod {text!r}: weight {v!r} is not a number") from None
        elif k == "state":
            state = v
        else:
            raise UsageError(f"--pod {text!r}: unknown option {k!r} (weight, state)")
    return pid, url, weight, state


# ``gen --from`` refuses a change that moves more of the key space than this
# unless ``--force``: a slip such as a pod list typed short must not reshuffle
# every key.
MAX_MOVED_SHARE = 0.5


def _gen_pods(args: argparse.Namespace, old: core.Assignment | None) -> list[tuple[str, str, float, str]]:
    """The new table's pods: ``--pod`` alone, or OLD's pods with ``--pod``
    added or updated and ``--remove``/``--drain``/``--undrain`` applied."""
    given = [_parse_pod_arg(p) for p in args.pod]
    if old is None:
        for flag, ids in (("--remove", args.remove), ("--undrain", args.undrain)):
            if ids:
                raise UsageError(f"{flag} {ids[0]!r}: needs --from OLD (a new table has only the pods given)")
        if not given:
            raise UsageError("gen: give at least one --pod id=url, or --from OLD")
        specs = given
    else:
        pods = {p.id: (p.id, p.url, p.weight, p.state) for p in old.pods.values()}
        for spec in given:
            pods[spec[0]] = spec  # added, or updated in place (url, weight, state)
        for pid in args.remove:
            if pid not in pods:
                raise UsageError(f"--remove {pid!r}: no such pod (pods: {', '.join(pods)})")
            if any(pid == spec[0] for spec in given):
                raise UsageError(f"--remove {pid!r}: also given with --pod; remove it or keep it")
            del pods[pid]
        specs = list(pods.values())
    for flag, ids, state in (("--drain", args.drain, "draining"), ("--undrain", args.undrain, "active")):
        for pid in ids:
            for i, s in enumerate(specs):
                if s[0] == pid:
                    specs[i] = (s[0], s[1], s[2], state)
                    break
            else:
                raise UsageError(f"{flag} {pid!r}: no such pod (pods: {', '.join(s[0] for s in specs)})")
    return specs


def _pod_changes(old: core.Assignment, new: core.Assignment) -> list[str]:
    """One line per pod added, removed, drained, undrained or changed."""
    lines = []
    for pid, pod in new.pods.items():
        was = old.pods.get(pid)
        if was is None:
            extra = f", weight {pod.weight:g}" if pod.weight != 1.0 else ""
            lines.append(f"added: {pid} ({pod.url}{extra}{', draining' if not pod.active else ''})")
            continue
        if was.active != pod.active:
            lines.append(f"{'undrained' if pod.active else 'drained'}: {pid}")
        if was.url != pod.url:
            lines.append(f"changed: {pid} url {was.url} -> {pod.url}")
        if was.weight != pod.weight:
            lines.append(f"changed: {pid} weight {was.weight:g} -> {pod.weight:g}")
    lines.extend(f"removed: {pid} ({pod.url})" for pid, pod in old.pods.items() if pid not in new.pods)
    return lines


def cmd_gen(args: argparse.Namespace, out: TextIO) -> int:
    if args.slices is not None and not 1 <= args.slices <= core.MAX_SLICE_COUNT:
        raise UsageError(f"--slices {args.slices}: expected 1 to {core.MAX_SLICE_COUNT}")
    if args.generation is not None and not 1 <= args.generation <= core.MAX_POSITION:
        raise UsageError(f"--generation {args.generation}: expected a positive integer (Unix ms work well)")
    if args.from_ and args.slices is not None:
        raise UsageError("gen: --slices cannot be combined with --from (slices are kept from OLD)")
    old = _table(args.from_) if args.from_ else None
    pods = core.make_pods(_gen_pods(args, old))
    now_ms = int(time.time() * 1000)
    if old is None:
        generation = args.generation or now_ms
        new = core.generate(generation, pods, args.slices or core.DEFAULT_SLICE_COUNT)
        moved = None
    else:
        generation = args.generation or max(now_ms, old.generation + 1)
        new = core.evolve(old, pods, generation, rebalance=args.rebalance)
        moved = core.moved_share(old, new)
        if moved > MAX_MOVED_SHARE and not args.force:
            changes = "; ".join(_pod_changes(old, new)) or "no pod changed"
            raise UsageError(
                f"this change would move {_pct(moved)} of the key space, more than half ({changes}); "
                f"nothing written. Check the pods, or add --force to move that much"
            )
    data = new.dumps(explicit=True, compact=not args.explicit)
    if args.out:
        _atomic_write(args.out, data)
    else:
        sys.stdout.buffer.write(data) if out is sys.stdout else out.write(data.decode())
    report = sys.stderr if not args.out else out
    print(f"generation {new.generation}, {new.slice_count} slices, {len(pods)} pods", file=report)
    if old is not None and moved is not None:
        for line in _pod_changes(old, new):
            print(line, file=report)
        print(f"moved: {_pct(moved)} of the key space", file=report)
    for pid, share in new.shares().items():
        print(f"  {pid}: {_pct(share)}", file=report)
    return 0


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename over ``path``, so a
    watcher never sees a half-written table."""
    folder = os.path.dirname(os.path.abspath(path))
    # mkstemp makes the file 0600; keep the mode of the file we replace (or
    # 0644) so a proxy running as another user can still read the table.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=".keyroute-", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {FLAG_KEYS[k]: getattr(args, k) for k in FLAG_KEYS}
    return load_settings(args.config, overrides=overrides)


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    settings = settings_from_args(args)
    from . import server

    return server.main(settings)


def cmd_serve_table(args: argparse.Namespace, out: TextIO) -> int:
    import asyncio
    import logging
    import signal

    from .config import parse_address
    from .tableserver import serve_table

    host, port = parse_address(args.listen, "--listen")
    _table(args.file)  # a bad file stops here, with the located error
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None if stop.done() else stop.set_result(None))
        await serve_table(args.file, host, port, stop)

    asyncio.run(run())
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from . import demo

    return demo.main(args.listen, args.admin, out)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keyroute")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keyroute", description="Key-affinity HTTP routing proxy.")
    p.add_argument("--version", action="version", version=f"keyroute {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="validate a table (or a config with --config)")
    c.add_argument("file", nargs="?", help="assignment table (JSON)")
    c.add_argument("--config", help="validate this keyroute.toml too (and its table if file:)")
    c.set_defaults(func=cmd_check)

    lk = sub.add_parser("lookup", help="where keys go under a table")
    lk.add_argument("file", help="assignment table (JSON)")
    lk.add_argument("keys", nargs="+", metavar="KEY")
    lk.add_argument("--json", action="store_true", help="machine-readable output")
    lk.set_defaults(func=cmd_lookup)

    g = sub.add_parser("gen", help="write a table (new, or the next one from OLD)")
    g.add_argument(
        "--pod",
        action="append",
        default=[],
        metavar="ID=URL[,weight=N][,state=draining]",
        help="a pod; with --from, added to OLD's pods or updating the one of that id",
    )
    g.add_argument("--from", dest="from_", metavar="OLD", help="evolve OLD, moving as little as possible")
    g.add_argument("--remove", action="append", default=[], metavar="ID", help="with --from: remove a pod")
    g.add_argument("--drain", action="append", default=[], metavar="ID", help="mark a pod draining")
    g.add_argument("--undrain", action="append", default=[], metavar="ID", help="with --from: mark a pod active")
    g.add_argument("--rebalance", action="store_true", help="with --from: also move slices to reach fair shares")
    g.add_argument("--force", action="store_true", help="with --from: allow moving more than half of the key space")
    g.add_argument("--slices", type=int, help=f"slice count (default {core.DEFAULT_SLICE_COUNT})")
    g.add_argument("--generation", type=int, help="generation (default: now in ms, above OLD's)")
    g.add_argument("--explicit", action="store_true", help="write one object per slice (default: the compact form)")
    g.add_argument("--out", "-o", help="write here atomically (default: stdout)")
    g.set_defaults(func=cmd_gen)

    r = sub.add_parser("run", help="run the proxy")
    r.add_argument("--config", help="keyroute.toml (default: built-in defaults)")
    r.add_argument("--listen", help="proxy address host:port")
    r.add_argument("--admin", help="admin address host:port")
    r.add_argument("--assignment", help="table source: file:PATH or http(s)://URL")
    r.add_argument("--workers", help="worker processes (N or auto)")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("serve-table", help="serve a table file to proxies (long-poll protocol)")
    st.add_argument("file", help="assignment table (JSON), watched")
    st.add_argument("--listen", default="127.0.0.1:9902", help="address (default 127.0.0.1:9902)")
    st.set_defaults(func=cmd_serve_table)

    d = sub.add_parser("demo", help="three local pods, a table and the proxy, on loopback")
    d.add_argument("--listen", help="proxy address (default 127.0.0.1:8080, or KEYROUTE_PROXY_LISTEN)")
    d.add_argument("--admin", help="admin address (default 127.0.0.1:9901, or KEYROUTE_ADMIN_LISTEN)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, out))
    except sources.SourceError as exc:
        print(f"keyroute {args.command}: cannot read table: {exc}", file=sys.stderr)
        return 1
    except core.AssignmentError as exc:
        print(f"keyroute {args.command}: invalid table: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"keyroute {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"keyroute {args.command}: {exc}", file=sys.stderr)
        return 2
