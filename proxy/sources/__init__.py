"""Where tables come from. Each source yields validated ``Assignment``s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..assignment import MAX_TABLE_BYTES, Assignment, AssignmentError, epoch_regression, parse

if TYPE_CHECKING:
    from ..offload import Offload


class SourceError(Exception):
    """A source cannot be used at all (unsupported scheme, unreadable file)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """What a source yields when it could not produce a table: ``kind`` is
    "invalid" (content refused) or "error" (could not fetch)."""

    kind: str
    detail: str


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
            data = fh.read(MAX_TABLE_BYTES + 1)  # parse() names the limit
    except FileNotFoundError:
        raise SourceError(f"assignment table {path!r} not found") from None
    except OSError as exc:
        raise SourceError(f"assignment table {path!r}: {exc.strerror}") from None
    try:
        return parse(data)
    except AssignmentError as exc:
        raise AssignmentError(f"{path}: {exc}") from None


def initial_identity(source: str) -> tuple[int, ...] | None:
    """The identity (device, inode, size, mtime, ctime) of a file source's file now;
    None for other sources or a missing file."""
    if source.startswith(("http://", "https://")):
        return None
    from .file import identity

    return identity(file_path(source))


def load_initial(source: str) -> Assignment | None:
    """The first table of a file source, read at startup so that a missing or
    invalid file stops startup. HTTP sources start empty (503, not ready) and
    fill in when the first fetch succeeds."""
    if source.startswith(("http://", "https://")):
        return None
    try:
        return read_file(file_path(source))
    except SourceError as exc:
        raise SourceError(f"{exc} (set assignment.source or --assignment)") from None


class Source(Protocol):
    """A source of tables: ``updates()`` yields each new validated table, or a
    ``Failure`` when a change could not be used. It never ends by itself."""

    @property
    def name(self) -> str: ...

    def updates(self) -> AsyncIterator[Assignment | Failure]: ...


def open_source(
    source: str,
    *,
    watch: str = "auto",
    poll_interval: float = 1.0,
    authorization: str = "",
    offload: Offload | None = None,
    known: tuple[int, ...] | None = None,
) -> Source:
    """The source named by ``assignment.source``. Big tables are parsed by
    ``offload`` (the caller's; the source starts its own if none is given).
    ``known``: see ``FileSource``."""
    if source.startswith(("http://", "https://")):
        from .http import HttpSource

        return HttpSource(source, poll_interval=poll_interval, authorization=authorization, offload=offload)
    from .file import FileSource

    return FileSource(file_path(source), watch=watch, poll_interval=poll_interval, offload=offload, known=known)


# Why a table was refused (the ``reloads_total`` result label), by the start of
# ``judge``'s verdict.
STALE = "stale"
CONFLICT = "conflict"
EPOCH_REGRESSION = "epoch_regression"


def judge(old: Assignment | None, new: Assignment) -> str | None:
    """None if ``new`` may replace ``old``; "" if it is the same table; else
    why not, starting with "stale", "conflicting" or "epoch regression"
    (``verdict_kind`` gives the label)."""
    if old is None:
        return None
    if new.generation > old.generation:
        # Worked out in the helper process for big tables (see proxy.offload).
        regression = epoch_regression(old, new)
        if regression is None:
            return None
        return f"epoch regression: {regression}"
    if new.generation < old.generation:
        return f"stale table: generation {new.generation} is below the one in force, {old.generation}"
    # Same pods and same slices (owners, epochs, backups): the same table.
    # Column comparison in C, not a rebuild of both tables as JSON.
    if dict(new.pods) == dict(old.pods) and new.same_slices(old):
        return ""
    return f"conflicting table: generation {new.generation} is in force with different content"


def verdict_kind(verdict: str) -> str:
    """The ``reloads_total`` result label of a refusal by ``judge``."""
    if verdict.startswith("stale"):
        return STALE
    if verdict.startswith("epoch regression"):
        return EPOCH_REGRESSION
    return CONFLICT
