"""Routing state built on the table in force: what the wire and failover
need per slice and per pod, computed once per table and shared by every
request routed on it."""

from __future__ import annotations

import mmh3

from .assignment import KEY_SPACE, Assignment, Pod, Route, rank

_new_tuple = tuple.__new__
_hash64 = mmh3.hash64


class RoutingTable:
    """An ``Assignment`` plus what the wire and failover need, built lazily:
    header bytes per slice (bytes: the garbage collector does not track them),
    candidate pods per owner and backups. Swapped as one reference; exchanges
    keep the one they started with."""

    __slots__ = (
        "assignment",
        "generation",
        "failover",
        "_req_tags",
        "_resp_tags",
        "_candidates",
        "_pods",
        "_any",
        "_fixed",
        "_starts",
        "_index",
        "_shift",
        "_owner",
        "_epoch",
        "_backup",
        "_combos",
        "_count",
    )

    def __init__(self, assignment: Assignment, failover: str = "backups") -> None:
        self.assignment = assignment
        self.generation = assignment.generation
        self.failover = failover
        n = assignment.slice_count
        self._req_tags: list[bytes | None] = [None] * n
        self._candidates: dict[tuple[str, tuple[str, ...]], tuple[Pod, ...]] = {}
        self._pods = tuple(assignment.pods.values())
        # failover = "any": per slice, the other active pods in the slice's
        # rendezvous order, as positions in _pods (a tuple of ints, which the
        # garbage collector stops tracking).
        self._any: list[tuple[int, ...] | None] = [None] * n if failover == "any" else []
        self._resp_tags: dict[str, bytes] = {}
        self._fixed: dict[str, Route] = {}
        # The table's columns, for lookup (compiled: read as C arrays).
        self._starts = assignment.starts
        self._index = assignment._index
        self._shift = assignment._shift
        self._owner = assignment._owner
        self._epoch = assignment._epoch
        self._backup = assignment._backup
        self._combos = assignment._combos
        self._count = assignment.slice_count

    def lookup(self, key: bytes) -> Route:
        """The route for a routing key: ``assignment.lookup(key)``."""
        return self.route_at(_hash64(key, 0, signed=False)[0])  # position(key), inlined

    def route_at(self, pos: int) -> Route:
        """The route for a position: ``assignment.lookup_position(pos)``."""
        starts = self._starts
        lo = self._index[pos >> self._shift]
        hi = self._index[(pos >> self._shift) + 1]
        while lo < hi:  # bisect_right(starts, pos, lo, hi), over one bucket of the index
            mid = (lo + hi) >> 1
            if pos < starts[mid]:
                hi = mid
            else:
                lo = mid + 1
        i = lo - 1
        end = starts[i + 1] if i + 1 < self._count else KEY_SPACE
        pod = self._pods[self._owner[i]]
        backups = self._combos[self._backup[i]]
        return _new_tuple(Route, (i, starts[i], end, pod, self._epoch[i], backups, self.generation))

    def request_tag(self, route: Route, pod: Pod) -> bytes:
        """X-Keyroute-* request headers for ``pod`` serving ``route``."""
        i = route.index
        if pod is route.pod and i >= 0:
            tag = self._req_tags[i]
            if tag is None:
                tag = self._req_tags[i] = self._tag(route, pod, b"owner")
            return tag
        return self._tag(route, pod, b"owner" if pod is route.pod else b"backup")

    @staticmethod
    def _tag(route: Route, pod: Pod, role: bytes) -> bytes:
        return b"X-Keyroute-Pod: %s\r\nX-Keyroute-Generation: %d\r\nX-Keyroute-Epoch: %d\r\nX-Keyroute-Role: %s\r\n" % (
            pod.id.encode(),
            route.generation,
            route.epoch,
            role,
        )

    def response_tag(self, pod: Pod) -> bytes:
        tag = self._resp_tags.get(pod.id)
        if tag is None:
            tag = self._resp_tags[pod.id] = b"X-Keyroute-Pod: %s\r\nX-Keyroute-Generation: %d\r\n" % (
                pod.id.encode(),
                self.generation,
            )
        return tag

    def candidates(self, route: Route) -> tuple[Pod, ...]:
        """Pods for a slice in failover order: the owner, its backups, then
        (``failover = "any"``) the other active pods in rendezvous order. The
        same on every proxy replica."""
        i = route.index
        if self._any and i >= 0:
            order = self._with_backups(route)
            rest = self._any[i]
            pods = self._pods
            if rest is None:
                seen = {p.id for p in order}
                where = {p.id: k for k, p in enumerate(pods)}
                ranked = rank(pods, route.start)
                rest = self._any[i] = tuple([where[p.id] for p in ranked if p.id not in seen and p.active])
            return (*order, *[pods[k] for k in rest])
        return self._with_backups(route)

    def _with_backups(self, route: Route) -> tuple[Pod, ...]:
        """The owner, then its backups (``failover = "backups"`` or "any"),
        one tuple per distinct owner and backups: a table has few."""
        key = (route.pod.id, route.backups if self.failover != "none" and route.index >= 0 else ())
        cands = self._candidates.get(key)
        if cands is None:
            pods = self.assignment.pods
            cands = self._candidates[key] = (route.pod, *[pods[b] for b in key[1]])
        return cands

    def fixed_route(self, pod_id: str) -> Route | None:
        """A route to a named pod (``missing_key = "pod:<id>"``)."""
        route = self._fixed.get(pod_id)
        if route is None:
            pod = self.assignment.pods.get(pod_id)
            if pod is None:
                return None
            g = self.generation
            route = self._fixed[pod_id] = Route(-1, 0, 0, pod, g, (), g)
        return route
