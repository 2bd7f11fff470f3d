"""``file:PATH``: a watched table file.

Reacts to in-place writes, atomic renames (write a temp file, then ``mv``) and
the Kubernetes ConfigMap symlink swap (``..data`` -> a new timestamped folder):
all three change the identity (device, inode, size, mtime) of the file that
PATH resolves to. inotify (through watchfiles) wakes the watcher once the
folder has been quiet for ``step`` (5 ms); the identity is also checked every
``poll_interval`` in case events are lost, and ``watch = "poll"`` uses only
that, then waits for the identity to hold still for ``debounce``.

A file that fails to parse while it is still changing (an in-place write in
progress) is not reported: the change that completes it is read next. Big
files are read and parsed in the helper process of ``proxy.offload``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator

from ..assignment import Assignment, AssignmentError
from ..offload import Offload
from . import Failure, SourceError

Identity = tuple[int, int, int, int]


def identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ConfigMap is a new file
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
        step: float = 0.005,
        offload: Offload | None = None,
    ) -> None:
        self.path = path
        self.watch = watch
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.step = step
        self.seen: Identity | None = None
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
            # consumer drops a table equal to the one in force.
            self.seen = identity(self.path)
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
        if ident is None or ident == self.seen:
            return None
        if self.watch == "poll" and self.debounce:
            # Let a burst of writes settle (watchfiles does this for events):
            # read once the file has held still for ``debounce``, or after 1 s.
            for _ in range(max(1, int(1.0 / self.debounce))):
                await asyncio.sleep(self.debounce)
                now = identity(self.path)
                if now is None:
                    return None
                if now == ident:
                    break
                ident = now
        self.seen = ident
        return await self._read()

    async def _ticks(self) -> AsyncGenerator[None, None]:
        if self.watch == "poll":
            while True:
                await asyncio.sleep(self.poll_interval)
                yield None
        try:
            import watchfiles
        except ImportError as exc:  # pragma: no cover - watchfiles is a dependency
            raise SourceError(f'assignment.watch = auto needs watchfiles ({exc}); set watch = "poll"') from None
        folders = {os.path.dirname(os.path.abspath(self.path))}
        real = os.path.dirname(os.path.realpath(self.path))
        if os.path.isdir(real):
            folders.add(real)
        async for _ in watchfiles.awatch(
            *folders,
            watch_filter=None,
            debounce=max(int(self.debounce * 1000), 1),
            step=max(int(self.step * 1000), 1),
            recursive=False,
            rust_timeout=int(self.poll_interval * 1000),
            yield_on_timeout=True,
        ):
            yield None
