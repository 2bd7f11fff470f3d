"""Where tables come from. Each source yields validated ``Assignment``s."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from ..assignment import Assignment, AssignmentError, parse


class SourceError(Exception):
    """A source cannot be used at all (unsupported scheme, unreadable file)."""


def file_path(source: str) -> str:
    """``file:PATH`` -> PATH."""
    if not source.startswith("file:") or len(source) <= 5:
        raise SourceError(f"assignment.source: {source!r} is not file:PATH")
    return source[5:]


def read_file(path: str) -> Assignment:
    """Read and validate a table file. Raises ``SourceError`` if the file cannot
    be read and ``AssignmentError`` if its content is not a valid table."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SourceError(f"assignment table {path!r} not found (set assignment.source or --assignment)") from None
    except OSError as exc:
        raise SourceError(f"assignment table {path!r}: {exc.strerror}") from None
    try:
        return parse(data)
    except AssignmentError as exc:
        raise AssignmentError(f"{path}: {exc}") from None


def load_initial(source: str) -> Assignment:
    """The first table, read once at startup."""
    if source.startswith(("http://", "https://")):
        raise SourceError(
            f"assignment.source: {source!r}: HTTP table sources are not available in this build; use file:PATH"
        )
    return read_file(file_path(source))


async def poll_file(
    path: str,
    interval: float,
    current: Callable[[], Assignment | None],
    apply: Callable[[Assignment], None],
    refuse: Callable[[str], None],
) -> None:
    """Re-read ``path`` whenever its identity (inode, size, mtime) changes and
    apply tables with a higher generation. A missing, partial or invalid file,
    a stale or a conflicting table is refused through ``refuse`` and the table
    in force stays. Runs until cancelled."""
    seen: tuple[int, int, int] | None = None
    while True:
        try:
            st = os.stat(path)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident is not None and ident != seen:
            seen = ident
            try:
                table = read_file(path)
            except (SourceError, AssignmentError) as exc:
                refuse(str(exc))
            else:
                verdict = judge(current(), table)
                if verdict is None:
                    apply(table)
                elif verdict:
                    refuse(verdict)
        await asyncio.sleep(interval)


def judge(old: Assignment | None, new: Assignment) -> str | None:
    """None if ``new`` may replace ``old``; "" if it is the same table; else why not."""
    if old is None or new.generation > old.generation:
        return None
    if new.generation < old.generation:
        return f"stale table: generation {new.generation} is below the one in force, {old.generation}"
    if new.to_json() == old.to_json():
        return ""
    return f"conflicting table: generation {new.generation} is in force with different content"
