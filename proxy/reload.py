"""Following a table source: what it yields is offered to the runtime; newer
generations go in force, the rest is refused, counted and logged."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Runtime


def follow(rt: Runtime, source: Any) -> asyncio.Task[None]:
    """Apply what a table source yields: newer generations go in force, the
    rest is refused, counted and logged; the table in force stays."""
    from .sources import Failure

    async def run() -> None:
        # aclosing: stopping early closes the source (its watch, its helper) now.
        async with contextlib.aclosing(source.updates()) as updates:
            async for item in updates:
                if rt.closing:  # draining: no new requests to route, helper stopped
                    return
                if isinstance(item, Failure):
                    rt.note_reload(item.kind, item.detail)
                else:
                    rt.offer(item)

    return rt.loop.create_task(run())
