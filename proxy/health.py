"""Pod health: passive (from real traffic) and active (optional probes),
one state per pod id.

A pod is ejected after ``eject_after`` consecutive failures, for a backoff
that doubles on each repeat (``eject_base`` up to ``eject_max``). When the
backoff ends, requests may try it again: one success clears its record, one
more failure ejects it again for twice as long. Ejection never covers more
than ``max_ejected_percent`` of a table's pods: beyond that the proxy routes
as if every pod were healthy ("panic"), because sending keys to their owners
is better than refusing them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("keyroute.health")


@dataclass(slots=True)
class PodHealth:
    failures: int = 0  # consecutive
    ejections: int = 0  # consecutive ejections (sets the backoff)
    ejected_until: float = 0.0  # loop time; 0: not ejected
    probe_ok: int = 0  # consecutive active-check successes while ejected


class Health:
    """Health of the pods of one worker. Only pods with a recent failure have
    an entry, so the hot path asks one dict membership question."""

    def __init__(
        self,
        *,
        eject_after: int = 3,
        eject_base: float = 1.0,
        eject_max: float = 30.0,
        max_ejected_percent: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.eject_after = max(1, eject_after)
        self.eject_base = eject_base
        self.eject_max = eject_max
        self.max_ejected_percent = max_ejected_percent
        self.clock = clock
        self.pods: dict[str, PodHealth] = {}
        self.ejections_total = 0
        self.in_panic = False
        # The pods of the table in force, and until when the panic verdict
        # over them holds: it changes only with a failure, a success, a new
        # table or the end of an ejection, so requests do not recompute it.
        self._table_pods: tuple[str, ...] = ()
        self._table_set: frozenset[str] | None = None  # None: no table given, keep every record
        self._panic_until = 0.0

    def set_pods(self, pod_ids: Iterable[str]) -> None:
        """A new table is in force: forget pods that left it (their records
        would otherwise keep every request on the slow path)."""
        self._table_pods = tuple(pod_ids)
        keep = self._table_set = frozenset(self._table_pods)
        for pod_id in [p for p in self.pods if p not in keep]:
            del self.pods[pod_id]
        self._panic_until = 0.0
        if not self.pods:
            self._set_panic(False, 0, len(keep))

    def panic_now(self, now: float) -> bool:
        """``panic`` over the table's pods, recomputed only when it may have changed."""
        if now < self._panic_until:
            return self.in_panic
        ids = self._table_pods
        ends = [h.ejected_until for p in ids if (h := self.pods.get(p)) is not None and h.ejected_until > now]
        self._panic_until = min(ends) if ends else float("inf")
        self._set_panic(len(ends) * 100 > self.max_ejected_percent * len(ids) if ids else False, len(ends), len(ids))
        return self.in_panic

    def ejected(self, pod_id: str, now: float) -> bool:
        h = self.pods.get(pod_id)
        return h is not None and h.ejected_until > now

    def success(self, pod_id: str) -> None:
        if pod_id in self.pods:
            del self.pods[pod_id]
            self._panic_until = 0.0
            log.info("pod %s healthy again", pod_id)
            if not self.pods and self.in_panic:
                # The data plane stops asking panic() once no pod has a record.
                self.in_panic = False
                log.info("panic over: no pod ejected")

    def failure(self, pod_id: str, reason: str) -> None:
        if self._table_set is not None and pod_id not in self._table_set:
            return  # a request on an older table, to a pod that has left
        now = self.clock()
        h = self.pods.get(pod_id)
        if h is None:
            h = self.pods[pod_id] = PodHealth()
        h.failures += 1
        if h.failures >= self.eject_after and h.ejected_until <= now:
            backoff = min(self.eject_max, self.eject_base * (2**h.ejections))
            h.ejections += 1
            h.ejected_until = now + backoff
            h.probe_ok = 0
            self.ejections_total += 1
            self._panic_until = 0.0
            log.warning("pod %s ejected for %gs after %d failures (last: %s)", pod_id, backoff, h.failures, reason)

    def panic(self, pod_ids: Iterable[str], now: float) -> bool:
        """True if more than ``max_ejected_percent`` of these pods are ejected."""
        ids = list(pod_ids)
        if not ids or not self.pods:
            out, panic = 0, False  # still record the change: in_panic is what keyroute_panic reports
        else:
            out = sum(1 for p in ids if self.ejected(p, now))
            panic = out * 100 > self.max_ejected_percent * len(ids)
        self._set_panic(panic, out, len(ids))
        return panic

    def _set_panic(self, panic: bool, out: int, total: int) -> None:
        if panic != self.in_panic:
            self.in_panic = panic
            if panic:
                log.warning("panic: %d of %d pods ejected; routing as if all were healthy", out, total)
            else:
                log.info("panic over: %d of %d pods ejected", out, total)

    def state(self, pod_id: str, now: float) -> str:
        h = self.pods.get(pod_id)
        if h is None:
            return "healthy"
        if h.ejected_until > now:
            return "ejected"
        return "failing" if h.failures else "healthy"

    def retry_after(self, pod_ids: Iterable[str], now: float) -> float:
        """Seconds until the first of these pods may be tried again."""
        waits = [h.ejected_until - now for p in pod_ids if (h := self.pods.get(p)) is not None]
        return max(1.0, min(waits)) if waits else 1.0

    # -- active checks --------------------------------------------------------

    def probe_result(self, pod_id: str, ok: bool, healthy_after: int, reason: str) -> None:
        """One active check. Failures count like passive ones; an ejected pod
        comes back after ``healthy_after`` consecutive good probes."""
        if not ok:
            self.failure(pod_id, reason)
            record = self.pods.get(pod_id)
            if record is not None:
                record.probe_ok = 0  # good probes must be consecutive
            return
        h = self.pods.get(pod_id)
        if h is None:
            return
        if h.ejected_until > self.clock():
            h.probe_ok += 1
            if h.probe_ok >= healthy_after:
                self.success(pod_id)
        else:
            self.success(pod_id)


async def probe_loop(
    targets: Callable[[], Iterable[tuple[str, str, int]]],
    health: Health,
    *,
    path: str,
    interval: float,
    timeout: float,
    healthy_after: int,
) -> None:
    """``GET path`` on every pod each ``interval``; 2xx is healthy."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def probe(pod_id: str, host: str, port: int) -> None:
            url = f"http://{host}:{port}{path}"
            try:
                async with session.get(url, headers={"User-Agent": "keyroute-health"}) as r:
                    await r.read()
                    ok = 200 <= r.status < 300
                    reason = f"health check {path}: HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok, reason = False, f"health check {path}: {exc.__class__.__name__}"
            health.probe_result(pod_id, ok, healthy_after, reason)

        while True:
            await asyncio.gather(*(probe(*t) for t in targets()))
            await asyncio.sleep(interval)
