"""Reload policy, in one place: what a table source yields (or an admin push
brings) is offered to the runtime; ``sources.judge`` says whether it may go
in force (newer, no conflict, no epoch going back); the rest is refused,
counted and logged, and the table in force stays.

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
import time
from typing import TYPE_CHECKING, Any

import orjson

from .assignment import Assignment

if TYPE_CHECKING:
    from .runtime import Runtime

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
                    note(rt, item.kind, item.detail)
                else:
                    offer(rt, item)

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
            note(rt, "error", f"{source.name}: {problem}; restarting it in {delay:.2f}s")
            await asyncio.sleep(delay)

    return rt.loop.create_task(run())


def offer(rt: Runtime, assignment: Assignment) -> str:
    """Apply ``assignment`` if its generation is above the one in force.
    Returns "" when applied (or identical to the table in force), else why not."""
    from .sources import judge, verdict_kind  # sources import this module's callers

    old = rt.table.assignment if rt.table is not None else None
    verdict = judge(old, assignment)
    if verdict is None:
        rt.set_assignment(assignment)
        note(rt, "applied", None)
        if old is None:
            _log_applied(rt, None, assignment, 1.0)
        else:
            # Comparing two 100k-slice tables takes tens of ms: not on the loop.
            task = rt.loop.create_task(_log_moved(rt, old, assignment))
            rt._background.add(task)
            task.add_done_callback(rt._background.discard)
        return ""
    if verdict:
        note(rt, verdict_kind(verdict), verdict)
    return verdict


async def _log_moved(rt: Runtime, old: Assignment, new: Assignment) -> None:
    try:
        moved: float | None = await rt.offload.moved_share(old, new)
    except Exception as exc:  # only the log line misses it
        log.warning("reload log: moved share not computed: %r", exc)
        moved = None
    _log_applied(rt, old, new, moved)


def _log_applied(rt: Runtime, old: Assignment | None, new: Assignment, moved: float | None) -> None:
    log.info(
        "%s",
        orjson.dumps(
            {
                "event": "reload",
                "result": "applied",
                "old_generation": old.generation if old else None,
                "generation": new.generation,
                "moved": None if moved is None else round(moved, 6),
                "source": rt.settings.assignment.source,
            }
        ).decode(),
    )


def note(rt: Runtime, result: str, error: str | None) -> None:
    """Count a reload result; remember (and log) a refusal or failure, and mark
    the last one resolved when a table applies."""
    rt.stats.reload(result)
    last = rt.last_reload_error
    if result == "applied" and last is not None and not last["resolved"]:
        last["resolved"] = True
        last["resolved_at"] = time.time()
        last["resolved_by_generation"] = rt.table.generation if rt.table else None
    if error is not None:
        rt.last_reload_error = {
            "result": result,
            "error": error,
            "at": time.time(),
            "generation_in_force": rt.table.generation if rt.table else None,
            "resolved": False,
        }
        log.warning(
            "%s",
            orjson.dumps(
                {
                    "event": "reload",
                    "result": result,
                    "generation": rt.table.generation if rt.table else None,
                    "error": error,
                    "source": rt.settings.assignment.source,
                }
            ).decode(),
        )
