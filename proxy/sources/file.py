"""``file:PATH``: a watched table file.

Reacts to in-place writes, atomic renames (write a temp file, then ``mv``) and
the Kubernetes ConfigMap symlink swap (``..data`` -> a new timestamped folder):
all three change the identity (device, inode, size, mtime, ctime, in
nanoseconds) of the file that PATH resolves to. A rewrite of the same size
within one tick of the filesystem's clock leaves the identity as it was, so
while a file's timestamps are recent (``RACY_NS``) its content hash, taken
before it is read, decides; one more hash once they are no longer recent
covers a write in the tick's last moments (git's "racily clean" entries).

inotify (through inotify_simple, on the event loop: no thread, no timer
while nothing happens) wakes the watcher once the folder has
been quiet for ``step`` (2 ms); the identity is also checked every
``poll_interval`` in case events are lost, and ``watch = "poll"`` uses only
that, then waits for the identity to hold still for ``debounce``.

A file that fails to parse while it is still changing (an in-place write in
progress) is not reported: the change that completes it is read next. Big
files are read and parsed in the helper process of ``proxy.offload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ..assignment import MAX_TABLE_BYTES, Assignment, AssignmentError
from ..offload import Offload
from . import Failure

log = logging.getLogger("keyroute.sources")
Identity = tuple[int, int, int, int, int]
# Timestamps tick coarsely (a jiffy on Linux, 2 s on FAT, a server's clock on
# NFS): a file changed less than this long ago may change again, at the same
# size, without changing them.
RACY_NS = 2_000_000_000
# inotify events on a watched folder that can change the file PATH resolves
# to (IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO,
# IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF).
_EVENTS = 0x002 | 0x004 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200 | 0x400 | 0x800


def identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ConfigMap is a new file
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def racy(ident: Identity) -> bool:
    """Whether the file may still change within its timestamps' tick."""
    return time.time_ns() - max(ident[3], ident[4]) < RACY_NS


def digest(path: str) -> bytes | None:
    """Hash of the file's content (of its first ``MAX_TABLE_BYTES`` + 1
    bytes: beyond that it is refused anyway); None if it cannot be read."""
    h = hashlib.sha256()
    left = MAX_TABLE_BYTES + 1
    try:
        with open(path, "rb") as fh:
            while left > 0 and (chunk := fh.read(min(left, 1 << 20))):
                h.update(chunk)
                left -= len(chunk)
    except OSError:
        return None
    return h.digest()


class FileSource:
    """Yields the file's table, then a validated ``Assignment`` each time the
    file changes, or a ``Failure`` when the content cannot be used."""

    def __init__(
        self,
        path: str,
        *,
        watch: str = "auto",
        poll_interval: float = 1.0,
        debounce: float = 0.02,
        step: float = 0.002,
        offload: Offload | None = None,
        known: tuple[int, ...] | None = None,
    ) -> None:
        self.path = path
        # The identity of the file when the table in force was read from it
        # (at startup): if the file still has it, the first read is skipped.
        self.known = known
        self.watch = watch
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.step = step
        self.seen: Identity | None = None
        # Content hash of the file as last read, while its identity is racy.
        self.digest: bytes | None = None
        self._own_offload = offload is None
        self.offload = offload if offload is not None else Offload()

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    async def _read(self) -> Assignment | Failure | None:
        """The file's table; a ``Failure``; or None if the file changed while
        it was read (the next tick reads the new content)."""
        try:
            return await self.offload.read(self.path)
        except OSError as exc:
            failure = Failure("error", f"{self.path}: cannot read: {exc.strerror or exc}")
        except AssignmentError as exc:
            failure = Failure("invalid", f"{self.path}: {exc}")
        if identity(self.path) not in (self.seen, None):
            return None
        return failure

    async def updates(self) -> AsyncIterator[Assignment | Failure]:
        ticks = self._ticks()
        # The watch is set up (first step of the first tick) before the first
        # read, so that no change can fall between the two unseen.
        tick = asyncio.ensure_future(anext(ticks))
        try:
            await asyncio.sleep(0)
            # The file as it is now comes first: it may have changed since the
            # table in force was read (at startup, before workers started); a
            # consumer drops a table equal to the one in force. Unless the
            # file provably did not change (``known``): then nothing to read.
            self.seen = identity(self.path)
            if self.known is None or self.seen != self.known or (self.seen is not None and racy(self.seen)):
                await self._note_digest()
                first = await self._read()
                if first is not None:
                    yield first
            await tick
            while True:
                item = await self._check()
                if item is not None:
                    yield item
                await anext(ticks)
        finally:
            if tick.done():
                await ticks.aclose()
            else:
                tick.cancel()
            if self._own_offload:
                self.offload.close()

    async def _check(self) -> Assignment | Failure | None:
        """The new table if the file changed since it was last read."""
        ident = identity(self.path)
        if ident is None:
            return None
        if ident == self.seen:
            if self.digest is None:
                return None
            # Decided before hashing: a write after this moment changes the
            # timestamps, so a hash that matches now proves no change.
            settled = not racy(ident)
            now = await self._hash()
            if now is None or now == self.digest:
                if settled and now is not None:
                    self.digest = None
                return None
            # Same identity, other content: a rewrite within one tick.
        elif self.watch == "poll" and self.debounce:
            # Let a burst of writes settle (the inotify watch does this itself):
            # read once the file has held still for ``debounce``, or after 1 s.
            for _ in range(max(1, int(1.0 / self.debounce))):
                await asyncio.sleep(self.debounce)
                now_ident = identity(self.path)
                if now_ident is None:
                    return None
                if now_ident == ident:
                    break
                ident = now_ident
        self.seen = ident
        await self._note_digest()
        return await self._read()

    async def _note_digest(self) -> None:
        """Hash the file before it is read if its identity is racy (a later
        rewrite in the same tick then shows as another hash)."""
        seen = self.seen
        self.digest = await self._hash() if seen is not None and racy(seen) else None

    async def _hash(self) -> bytes | None:
        # Off the loop: a 10 MB table takes some ms to hash (hashlib and file
        # reads let go of the GIL).
        return await asyncio.get_running_loop().run_in_executor(None, digest, self.path)

    async def _ticks(self) -> AsyncGenerator[None, None]:
        """One tick per settled burst of changes in the watched folders, and
        one every ``poll_interval`` in any case."""
        ino = None
        if self.watch != "poll":
            try:
                from inotify_simple import INotify

                ino = INotify(nonblocking=True)
            except (ImportError, OSError) as exc:  # not Linux, or out of inotify instances
                log.warning("%s: no inotify (%s): checking every %gs", self.name, exc, self.poll_interval)
        if ino is None:
            while True:
                await asyncio.sleep(self.poll_interval)
                yield None
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()
        with ino:
            watches: dict[tuple[int, int], int] = {}

            def on_events() -> None:
                ino.read(timeout=0)
                woke.set()

            loop.add_reader(ino.fileno(), on_events)
            try:
                while True:
                    self._rewatch(ino, watches)
                    try:
                        await asyncio.wait_for(woke.wait(), self.poll_interval)
                    except TimeoutError:
                        yield None
                        continue
                    # Let a burst of events settle: ``step`` without one, at
                    # most ``debounce`` in all.
                    settle = loop.time() + self.debounce
                    while woke.is_set() and loop.time() < settle:
                        woke.clear()
                        await asyncio.sleep(self.step)
                    woke.clear()
                    yield None
            finally:
                loop.remove_reader(ino.fileno())

    def _rewatch(self, ino: Any, watches: dict[tuple[int, int], int]) -> None:
        """Watch the folder of PATH and the folder of the file it resolves to
        now (a ConfigMap swap changes the latter). Keyed by the folders'
        (device, inode): two paths to one folder share one inotify watch."""
        want: dict[tuple[int, int], str] = {}
        for folder in (os.path.dirname(os.path.abspath(self.path)), os.path.dirname(os.path.realpath(self.path))):
            with contextlib.suppress(OSError):  # not there (yet): the poll covers it
                st = os.stat(folder)
                want[(st.st_dev, st.st_ino)] = folder
        for key in set(watches) - set(want):
            wd = watches.pop(key)
            with contextlib.suppress(OSError):  # already gone with its folder
                ino.rm_watch(wd)
        for key in set(want) - set(watches):
            with contextlib.suppress(OSError):
                watches[key] = ino.add_watch(want[key], _EVENTS)
