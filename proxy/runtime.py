"""The state one worker shares between its connections: settings, the table
in force, pools, health, counters. One explicit object, passed where it is
needed; no module globals."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from . import native
from .assignment import Assignment, Pod
from .config import Settings
from .health import Health
from .http1.heads import RequestPolicy
from .http1.upstream import Pool, Upstreams
from .metrics import METRICS_DIR_ENV, RuntimeCollector, Shared, Stats, exposition
from .offload import Offload
from .routing import RoutingTable

if TYPE_CHECKING:
    from .http1.client import ClientProtocol

log = logging.getLogger("keyroute")


class Runtime:
    """Shared state of one worker: settings, the table in force, pools, live
    connections. Passed to every protocol instance; no module globals."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        p = settings.proxy
        self.response_headers = p.response_headers
        self.missing_key = p.missing_key
        self.header_timeout = p.header_timeout
        self.body_timeout = p.body_timeout
        self.idle_timeout = p.idle_timeout
        self.send_timeout = p.send_timeout
        self.request_policy = RequestPolicy(
            key_header=p.key_header,
            via=p.via,
            get_body=p.get_body,
            allow_empty_key=p.allow_empty_key,
            max_header_bytes=p.max_header_bytes,
            max_body_bytes=p.max_body_bytes,
        )
        # How far ahead a client connection's timer is ever scheduled.
        self.timer_step = min(t for t in (p.header_timeout, p.body_timeout, p.idle_timeout, 3600.0) if t > 0)
        self.table: RoutingTable | None = None
        self.upstreams = Upstreams(loop, settings.upstream)
        self.connections: set[ClientProtocol] = set()
        self.closing = False
        self.stats = Stats()
        u = settings.upstream
        self.health = Health(
            eject_after=u.eject_after,
            eject_base=u.eject_base,
            eject_max=u.eject_max,
            max_ejected_percent=u.max_ejected_percent,
            clock=loop.time,
        )
        self.fail_statuses = u.fail_status_set
        self.retries = u.retries
        # A request and its retries share one deadline: every attempt may use
        # its full response_timeout, and none starts after this much time.
        self.request_budget = u.response_timeout * (u.retries + 1)
        self.access_log = p.access_log
        self.access_log_keys = p.access_log and p.access_log_keys
        self.request_count = 0
        self.id_prefix = f"{os.getpid():x}"
        folder = os.environ.get(METRICS_DIR_ENV)
        self.shared = Shared(folder) if folder else None
        self.collector = RuntimeCollector(self.stats, self.gauges, self.shared)
        self.table_loaded_at: float | None = None  # Unix time
        # The last refused or failed reload: what, when, and whether a later
        # table has applied since ("resolved").
        self.last_reload_error: dict[str, Any] | None = None
        self.admin_port: int | None = None
        # Parses big tables in a helper process (sources, admin PUT) and
        # compares them for the reload log.
        self.offload = Offload()
        self._background: set[asyncio.Task[None]] = set()

    def set_assignment(self, assignment: Assignment) -> None:
        """Publish a new table: one reference assignment. What was kept for
        pods that left the table (health records, pools, per-pod counters)
        goes with them."""
        self.table = RoutingTable(assignment, self.settings.upstream.failover)
        self.table_loaded_at = time.time()
        self.offload.baseline = assignment  # big tables are checked against it as they are parsed
        pods = assignment.pods
        self.health.set_pods(pods)
        self.upstreams.prune({(p.host, p.port) for p in pods.values()})
        by_pod = self.stats.by_pod
        for pod_id in [p for p in by_pod if p not in pods and p != "-"]:
            del by_pod[pod_id]

    def gauges(self) -> dict[str, float]:
        return {
            "generation": self.table.generation if self.table is not None else 0,
            "in_flight": sum(1 for c in self.connections if c.exchange is not None),
            "client_connections": len(self.connections),
            "pool_idle_connections": sum(len(p.idle) for p in self.upstreams.pools.values()),
            "workers": 1,
            "native": 1 if native.ACTIVE else 0,
            "pods_ejected": sum(1 for p in self.health.pods if self.health.ejected(p, self.loop.time())),
            "panic": 1 if self.health.panic_now(self.loop.time()) else 0,
            "ejections": self.health.ejections_total,
            "table_helper_calls": self.offload.calls,
            "table_helper_fallbacks": self.offload.fallbacks,
        }

    def metrics_text(self) -> bytes:
        """Prometheus text exposition (all workers' counters when there are several)."""
        return exposition(self.collector)

    async def publish_metrics(self) -> None:
        """With several workers: share this worker's counters every second."""
        assert self.shared is not None
        while True:
            try:
                self.shared.publish(self.stats.snapshot(), self.gauges())
            except OSError as exc:
                log.warning("cannot publish metrics to %s: %s", self.shared.folder, exc)
            await asyncio.sleep(1.0)

    def pool_for(self, pod: Pod) -> Pool:
        return self.upstreams.pool(pod.id, pod.host, pod.port)
