"""Following a table source: what it yields is offered to the runtime; newer
generations go in force, the rest is refused, counted and logged.

The watcher never dies silently. A source is an async iterator that should
run forever; if it raises (a bug, a helper call that fails in a way nobody
foresaw) or ends, that is logged with its traceback, counted as
``reloads_total{result="error"}`` and the source is started again after a
jittered, capped, exponential backoff. The table in force stays meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Runtime

log = logging.getLogger("keyroute.reload")

# Restart backoff: the n-th restart in a row waits between half and all of
# min(RESTART_CAP, RESTART_BASE * 2**(n-1)) seconds.
RESTART_BASE = 0.25
RESTART_CAP = 30.0


def restart_delay(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before restarting a source that failed ``failures`` times in a
    row (1 for the first). "Equal jitter": never less than half the capped
    exponential step, so a source that fails at once cannot spin; never more
    than ``cap``."""
    step: float = min(cap, base * 2 ** min(failures - 1, 62))
    jitter: float = (rng or random).uniform(0, step / 2)
    return step / 2 + jitter


def follow(
    rt: Runtime, source: Any, *, restart_base: float = RESTART_BASE, restart_cap: float = RESTART_CAP
) -> asyncio.Task[None]:
    """Apply what a table source yields: newer generations go in force, the
    rest is refused, counted and logged; the table in force stays. A source
    that raises or ends is restarted (``source.updates()`` is called again)
    after a backoff, until the task is cancelled or the worker drains."""
    from .sources import Failure

    async def run_once() -> None:
        # aclosing: stopping early closes the source (its watch, its helper) now.
        async with contextlib.aclosing(source.updates()) as updates:
            async for item in updates:
                if rt.closing:  # draining: no new requests to route, helper stopped
                    return
                if isinstance(item, Failure):
                    rt.note_reload(item.kind, item.detail)
                else:
                    rt.offer(item)

    async def run() -> None:
        failures = 0
        while not rt.closing:
            started = rt.loop.time()
            try:
                await run_once()
            except Exception as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
                log.error("table source %s failed", source.name, exc_info=exc)
            else:
                if rt.closing:
                    return
                problem = "the source stopped"
            # A source that ran well for longer than the cap starts its
            # backoff afresh.
            failures = 1 if rt.loop.time() - started > restart_cap else failures + 1
            delay = restart_delay(failures, restart_base, restart_cap)
            rt.note_reload("error", f"{source.name}: {problem}; restarting it in {delay:.2f}s")
            await asyncio.sleep(delay)

    return rt.loop.create_task(run())
