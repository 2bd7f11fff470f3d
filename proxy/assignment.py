"""The routing core: key positions, assignment tables, lookup, generation.

Nothing here does I/O. Every function takes bytes or plain values and returns
plain values, so the core can be tested with plain calls.

Invariants of an ``Assignment`` (checked once by ``parse``/``build``, trusted
afterwards by ``lookup``):

* ``generation`` is a positive integer.
* ``pods`` is non-empty; every id matches ``POD_ID_RE`` and every URL is
  ``http://host:port``.
* ``starts`` is strictly increasing, ``starts[0] == 0`` and every start is
  below ``2**64``; slice ``i`` covers ``[starts[i], starts[i + 1])`` and the
  last one runs to ``2**64``. So every position lies in exactly one slice.
* ``_index`` is derived from ``starts`` (see ``_lookup_index``) and
  narrows every lookup to the slices of one bucket of top bits.
* ``route(i)`` describes slice ``i``: its owner names a pod of the table,
  ``1 <= epoch <= generation``, and its backups are distinct pods of the
  table other than the owner.
* Size: at most ``MAX_PODS`` pods, ``MAX_SLICES`` written slices or
  ``MAX_GENERATED`` slices x pods for a generated table, from at most
  ``MAX_TABLE_BYTES`` of JSON in which no object lists a key twice.

A table is written in one of three forms, all parsed into the same columns:
explicit (``slices``: one object per slice), compact (``owners``: per pod,
the numbers of the slices it owns, over ``slice_count`` equal slices adjusted
by ``splits``/``merges``; epochs and backups grouped alike; see
``_from_compact``) or pods-only (generated). The explicit and compact forms of
one table parse to equal ``Assignment``s and ``dumps`` writes either.

Between two tables in force one after the other (``epoch_regression``): the
epoch of every position never goes down, and goes up wherever the owner
changes. Epochs are fencing tokens: a lower one would let a deposed owner
write again.
"""

from __future__ import annotations

import math
import re
import weakref
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from operator import add, lt, ne
from types import MappingProxyType
from typing import Any, NamedTuple

import mmh3
import orjson

KEY_SPACE = 1 << 64
MAX_POSITION = KEY_SPACE - 1
FORMAT_VERSION = 1
DEFAULT_SLICE_COUNT = 4096
MAX_SLICE_COUNT = 1 << 20
MAX_WEIGHT = 1_000_000.0
# Bounds on what a table may ask of the process that parses it (the helper of
# ``proxy.offload``, or the proxy itself for small inputs). A 50 KB pods-only
# table of 1,000 pods x 2**20 slices would otherwise cost minutes and
# gigabytes. Up to these, parsing takes at most a few seconds in the helper.
MAX_PODS = 1000
# Written slices: 2.6 times the 100k-slice tables operators run (42 MB of
# indented JSON; ~400 MB in the helper while it parses).
MAX_SLICES = 1 << 18
# A generated table costs ~1 us per slice and pod: up to ~2 s (e.g. the
# default 4096 slices over 512 pods).
MAX_GENERATED = 1 << 21
# Bytes of a table's JSON (file, HTTP body, admin PUT).
MAX_TABLE_BYTES = 64 << 20
# Lookup index size: up to 2**20 buckets (8 MiB), about one per slice.
_INDEX_BITS = 20
# Generated tables list this many backups per slice; failover beyond them can
# walk the remaining pods in rendezvous order for the slice.
GENERATED_BACKUPS = 3
# Pod ids travel in headers and metrics labels: keep them to a safe alphabet.
POD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}")
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))")
# Fields of the compact form (``owners`` marks it; see ``_from_compact``).
_COMPACT_FIELDS = frozenset({"owners", "epoch", "epochs", "backups", "splits", "merges"})
_TOP_FIELDS = frozenset({"version", "generation", "pods", "slices", "slice_count"}) | _COMPACT_FIELDS
# ``"backups": "rendezvous"`` in the compact form: every slice's backups are
# derived from the pods, as in generated tables and ``evolve``.
RENDEZVOUS = "rendezvous"
# ``dumps`` writes "rendezvous" for tables of up to this many slices x pods
# (e.g. 4096 x 32; ~0.1 s to derive), and lists the backups of bigger ones.
RENDEZVOUS_WRITE_LIMIT = 1 << 17
# A compact form's list of slice numbers: "0-3,7,9-12" (ascending or not).
_RANGES_RE = re.compile(r"[0-9]{1,7}(?:-[0-9]{1,7})?(?:,[0-9]{1,7}(?:-[0-9]{1,7})?)*")
_RANGE_RE = re.compile(r"[0-9]{1,7}(?:-[0-9]{1,7})?")
# An epoch as a key of ``epochs``: a decimal integer, no sign or leading zero.
_EPOCH_KEY_RE = re.compile(r"[1-9][0-9]{0,19}")
_POD_FIELDS = frozenset({"url", "weight", "state"})
_SLICE_FIELDS = frozenset({"start", "pod", "epoch", "backups"})
_MISSING: Any = object()
# ASCII digits only (int() also takes other scripts' digits, "_" and spaces).
# 64 digits is far beyond 2**64 and keeps int() within its digit limit.
_START_RE = re.compile(r"0[xX][0-9A-Fa-f]{1,64}|[0-9]{1,64}")
STATES = ("active", "draining")


class AssignmentError(ValueError):
    """A table was refused. The message names the place: ``slices[3].pod: ...``."""


_hash64 = mmh3.hash64
_new_tuple = tuple.__new__


def position(key: bytes) -> int:
    """Position of a routing key on the 64-bit key space.

    The low 64 bits of MurmurHash3 x64_128 with seed 0, unsigned. Tables in the
    wild depend on this value: it must never change.
    """
    # signed= by keyword: mmh3 5.x ignores a positional signed argument.
    return _hash64(key, 0, signed=False)[0]


@dataclass(frozen=True, slots=True)
class Pod:
    """One backend pod of a table."""

    id: str
    url: str
    host: str
    port: int
    weight: float = 1.0
    state: str = "active"

    @property
    def active(self) -> bool:
        return self.state == "active"


class Route(NamedTuple):
    """Where one slice of the key space goes. ``lookup`` builds one per call
    from the table's columns: a short-lived tuple, freed with the request. A
    table keeps no object per slice, so garbage collections, which would walk
    every cached route of a 100k-slice table, stay short.

    A named tuple rather than a frozen dataclass: just as immutable, and a
    table of a million slices builds them several times faster."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, on purpose
    start: int
    end: int  # exclusive; 2**64 for the last slice
    pod: Pod
    epoch: int
    backups: tuple[str, ...]
    generation: int

    @property
    def pod_id(self) -> str:
        return self.pod.id

    @property
    def url(self) -> str:
        return self.pod.url

    @property
    def share(self) -> float:
        return (self.end - self.start) / KEY_SPACE


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """A slice as written in a table, before it is resolved into a ``Route``."""

    start: int
    pod: str
    epoch: int | None = None
    backups: tuple[str, ...] = ()


class Assignment:
    """An immutable, validated assignment table. Build with ``parse`` or ``build``.

    Slices are kept as columns of machine integers (starts, owner, epoch,
    backups) rather than one object each: a 100k-slice table is a few flat
    arrays, cheap to pickle from the helper process that parses big tables
    (``proxy.offload``) and invisible to the garbage collector. ``lookup``
    builds the ``Route`` of a slice when asked.

    Two tables are equal (``==``) when they route alike: same generation,
    pods and slices, whichever form they were written in.
    """

    __slots__ = (
        "generation",
        "pods",
        "generated",
        "compact",
        "slice_count",
        "starts",
        "_owner",
        "_epoch",
        "_backup",
        "_combos",
        "_pod_list",
        "_index",
        "_shift",
        "_vetted",
        "__weakref__",
    )

    generation: int
    pods: Mapping[str, Pod]
    generated: bool
    # Parsed from the compact form: ``dumps`` writes it back in that form.
    compact: bool
    slice_count: int
    starts: array[int]

    def __init__(
        self,
        generation: int,
        pods: Mapping[str, Pod],
        starts: Sequence[int],
        owners: Sequence[Pod],
        epochs: Sequence[int],
        backups: Sequence[tuple[str, ...]],
        generated: bool,
    ) -> None:
        """Columns from per-slice sequences (already validated)."""
        pos = {pid: k for k, pid in enumerate(pods)}
        # Backup lists repeat: each distinct one is stored once, in order of
        # first use, so equal tables get equal columns.
        combos: dict[tuple[str, ...], int] = {}
        self._setup(
            generation,
            dict(pods),
            generated,
            array("Q", starts),
            array("I", [pos[p.id] for p in owners]),
            array("Q", epochs),
            array("I", [combos.setdefault(b, len(combos)) for b in backups]),
            tuple(combos),
            None,
        )

    def _setup(
        self,
        generation: int,
        pods: dict[str, Pod],
        generated: bool,
        starts: array[int],
        owner: array[int],
        epoch: array[int],
        backup: array[int],
        combos: tuple[tuple[str, ...], ...],
        index: tuple[int, array[int]] | None,
        compact: bool = False,
    ) -> None:
        self.generation = generation
        self.pods = MappingProxyType(pods)
        self.generated = generated
        self.compact = compact
        self.slice_count = len(starts)
        self.starts = starts
        self._owner = owner
        self._epoch = epoch
        self._backup = backup
        self._combos = combos
        self._pod_list = tuple(pods.values())
        if index is None:
            index = _lookup_index(starts)
        self._shift, self._index = index
        # (table, verdict) of the last ``epoch_regression(table, self)``; not pickled.
        self._vetted: tuple[weakref.ref[Assignment], str | None] | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled as its columns and lookup index: unpickling is a few copies.
        return _restore, (
            self.generation,
            dict(self.pods),
            self.generated,
            self.starts,
            self._owner,
            self._epoch,
            self._backup,
            self._combos,
            (self._shift, self._index),
            self.compact,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Assignment):
            return NotImplemented
        return (
            self.generation == other.generation
            and self.slice_count == other.slice_count
            and dict(self.pods) == dict(other.pods)
            and self.same_slices(other)
        )

    def __hash__(self) -> int:
        return hash((self.generation, self.slice_count))

    def lookup(self, key: bytes) -> Route:
        """Route for a routing key (raw header bytes)."""
        # lookup_position(position(key)), inlined: this runs once per proxied request.
        pos = _hash64(key, 0, signed=False)[0]
        index, b, starts = self._index, pos >> self._shift, self.starts
        i = bisect_right(starts, pos, index[b], index[b + 1]) - 1
        # route(i), inlined; tuple.__new__ skips the named tuple's Python __new__.
        end = starts[i + 1] if i + 1 < self.slice_count else KEY_SPACE
        pod, backups = self._pod_list[self._owner[i]], self._combos[self._backup[i]]
        return _new_tuple(Route, (i, starts[i], end, pod, self._epoch[i], backups, self.generation))

    def lookup_position(self, pos: int) -> Route:
        """Route for a position in ``[0, 2**64)``."""
        index, b = self._index, pos >> self._shift
        return self.route(bisect_right(self.starts, pos, index[b], index[b + 1]) - 1)

    def route(self, i: int) -> Route:
        """The route of slice ``i``."""
        starts = self.starts
        end = starts[i + 1] if i + 1 < self.slice_count else KEY_SPACE
        pod, backups = self._pod_list[self._owner[i]], self._combos[self._backup[i]]
        return _new_tuple(Route, (i, starts[i], end, pod, self._epoch[i], backups, self.generation))

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every slice's route, in order."""
        return tuple(map(self.route, range(self.slice_count)))

    def owner_ids(self) -> list[str]:
        """The owner's pod id of each slice, without building routes."""
        ids = [p.id for p in self._pod_list]
        return [ids[k] for k in self._owner]

    def vetted(self, old: Assignment, verdict: str | None) -> None:
        """Record ``epoch_regression(old, self)``, worked out elsewhere (the
        helper process of ``proxy.offload``, as it parsed this table)."""
        self._vetted = (weakref.ref(old), verdict)

    def same_slices(self, other: Assignment) -> bool:
        """True if both tables have the same slices: starts, owners, epochs and
        backups (generation and pods are not compared)."""
        if self.starts != other.starts or self._epoch != other._epoch:
            return False
        if tuple(self.pods) == tuple(other.pods) and self._combos == other._combos:
            return self._owner == other._owner and self._backup == other._backup
        # Pods listed in another order: compare by id.
        return self.owner_ids() == other.owner_ids() and all(
            self._combos[a] == other._combos[b] for a, b in zip(self._backup, other._backup, strict=True)
        )

    def shares(self) -> dict[str, float]:
        """Share of the key space owned by each pod (0.0 for pods that own none)."""
        widths = dict.fromkeys(self.pods, 0)
        starts = self.starts
        for i, pid in enumerate(self.owner_ids()):
            widths[pid] += _end(starts, i) - starts[i]
        return {pid: w / KEY_SPACE for pid, w in widths.items()}

    def slice_specs(self) -> list[SliceSpec]:
        return [SliceSpec(r.start, r.pod.id, r.epoch, r.backups) for r in self.routes]

    def to_json(self, *, explicit: bool = True, compact: bool | None = None) -> dict[str, Any]:
        """The table as a JSON-ready dict. ``explicit=False`` keeps a generated
        table in its short pods-only form. ``compact`` writes the compact form
        (``owners``) instead of a ``slices`` list; by default, a table parsed
        from the compact form is written in it."""
        pods: dict[str, Any] = {}
        for p in self.pods.values():
            entry: dict[str, Any] = {"url": p.url}
            if p.weight != 1.0:
                entry["weight"] = int(p.weight) if p.weight.is_integer() else p.weight
            if p.state != "active":
                entry["state"] = p.state
            pods[p.id] = entry
        doc: dict[str, Any] = {"version": FORMAT_VERSION, "generation": self.generation, "pods": pods}
        if self.generated and not explicit:
            if self.slice_count != DEFAULT_SLICE_COUNT:
                doc["slice_count"] = self.slice_count
            return doc
        if self.compact if compact is None else compact:
            doc.update(self._compact_fields())
            return doc
        slices = []
        combos = self._combos
        for start, pid, epoch, b in zip(self.starts, self.owner_ids(), self._epoch, self._backup, strict=True):
            s: dict[str, Any] = {"start": f"0x{start:016x}", "pod": pid, "epoch": epoch}
            if combos[b]:
                s["backups"] = list(combos[b])
            slices.append(s)
        doc["slices"] = slices
        return doc

    def dumps(self, *, explicit: bool = True, compact: bool | None = None) -> bytes:
        """``to_json`` as indented JSON text."""
        return orjson.dumps(self.to_json(explicit=explicit, compact=compact), option=orjson.OPT_INDENT_2) + b"\n"

    def _compact_fields(self) -> dict[str, Any]:
        """The slices in the compact form (see ``_from_compact``): the grid of
        equal slices nearest to the starts, then each column grouped by value.
        The most common epoch is the default; backups are "rendezvous" when
        the derived ones are exactly the table's."""
        doc: dict[str, Any] = {}
        count, splits, merges = _grid_of(self.starts)
        doc["slice_count"] = count
        if splits:
            doc["splits"] = [f"0x{s:016x}" for s in splits]
        if merges:
            doc["merges"] = [f"0x{s:016x}" for s in merges]
        ids = [p.id for p in self._pod_list]
        doc["owners"] = {ids[k]: text for k, text in _grouped(self._owner).items()}
        by_epoch = _grouped(self._epoch)
        counts = {e: len(text) for e, text in by_epoch.items()}  # fewest characters left to write
        default = max(counts, key=lambda e: (counts[e], e))
        if default != self.generation:
            doc["epoch"] = default
        epochs = {str(e): by_epoch[e] for e in sorted(by_epoch) if e != default}
        if epochs:
            doc["epochs"] = epochs
        combos = self._combos
        if any(combos[b] for b in self._backup):
            # Derived backups cost their parser ~1 us per slice and pod: past
            # RENDEZVOUS_WRITE_LIMIT, the lists are written out instead.
            derive = self.slice_count * len(self.pods) <= RENDEZVOUS_WRITE_LIMIT
            grid = 0 if splits or merges else count
            derived = _rendezvous_backups(self.pods, self.starts, self._owner, grid) if derive else []
            if derive and all(combos[b] == d for b, d in zip(self._backup, derived, strict=True)):
                doc["backups"] = RENDEZVOUS
            else:
                doc["backups"] = {",".join(combos[b]): text for b, text in _grouped(self._backup).items() if combos[b]}
        return doc

    def render(self) -> bytes:
        """``{"shares": ..., "table": ...}`` as compact JSON (the admin view;
        a generated table in its short form)."""
        return orjson.dumps({"shares": self.shares(), "table": self.to_json(explicit=not self.generated)})


def _lookup_index(starts: array[int]) -> tuple[int, array[int]]:
    """An index on the top bits of positions: ``index[b]`` counts the starts
    whose top bits are below ``b``, so the slice of a position with top bits
    ``b`` lies in ``starts[index[b] - 1 : index[b + 1]]``, mostly one or two
    slices. A lookup then touches a few cache lines instead of walking a
    binary search over the whole table. Returns (shift, index)."""
    bits = min(max(len(starts).bit_length(), 1), _INDEX_BITS)
    shift = 64 - bits
    counts = [0] * ((1 << bits) + 1)
    for start in starts:
        counts[(start >> shift) + 1] += 1
    return shift, array("q", accumulate(counts))


def _restore(*columns: Any) -> Assignment:
    """A table from ``Assignment._setup``'s arguments (unpickling, ``generate``)."""
    a = Assignment.__new__(Assignment)
    a._setup(*columns)
    return a


# --------------------------------------------------------------------------
# Parsing and validation


def parse(data: bytes | str) -> Assignment:
    """Parse and validate a v1 table. Raises ``AssignmentError`` naming the place."""
    return from_json(loads(data), data)


def loads(data: bytes | str) -> Any:
    """Decode a table's JSON text (no validation), within ``MAX_TABLE_BYTES``."""
    if len(data) > MAX_TABLE_BYTES:
        raise AssignmentError(too_big(len(data)))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise AssignmentError(f"not valid JSON: {exc}") from None


def too_big(size: int) -> str:
    return f"table: {size} bytes is above the limit of {MAX_TABLE_BYTES} bytes (MAX_TABLE_BYTES)"


def from_json(doc: Any, raw: bytes | str | None = None) -> Assignment:
    """Validate a decoded JSON document as a v1 table. ``raw``: the JSON text
    ``doc`` was decoded from, checked for keys listed twice in an object (the
    decoder keeps the last one silently)."""
    if not isinstance(doc, dict):
        raise AssignmentError(f"table: expected a JSON object, got {_kind(doc)}")
    unknown = sorted(set(doc) - _TOP_FIELDS)
    if unknown:
        raise AssignmentError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(_TOP_FIELDS))})")
    if "version" not in doc:
        raise AssignmentError("version: missing (this proxy reads format version 1)")
    version = doc["version"]
    if version != FORMAT_VERSION or isinstance(version, bool) or not isinstance(version, int):
        raise AssignmentError(f"version: unsupported format version {version!r} (this proxy reads 1)")
    generation = _positive_int(doc.get("generation"), "generation")
    if "pods" not in doc:
        raise AssignmentError("pods: missing")
    raw_pods = doc["pods"]
    if isinstance(raw_pods, dict) and len(raw_pods) > MAX_PODS:
        raise AssignmentError(f"pods: {len(raw_pods)} pods is above the limit of {MAX_PODS} (MAX_PODS)")
    compact = sorted(_COMPACT_FIELDS.intersection(doc))
    if "slices" in doc:
        if "slice_count" in doc:
            raise AssignmentError("slice_count: only allowed in tables without slices")
        if compact:
            raise AssignmentError(
                f"{compact[0]}: a field of the compact form, which lists slices in owners instead of slices: "
                "write one form or the other"
            )
        raw_slices = doc["slices"]
        if isinstance(raw_slices, list) and len(raw_slices) > MAX_SLICES:
            raise AssignmentError(f"slices: {len(raw_slices)} slices is above the limit of {MAX_SLICES} (MAX_SLICES)")
        pods = _parse_pods(raw_pods)
        starts, owners, epochs, backups = _parse_slices(raw_slices, pods, generation)
        if raw is not None:
            _check_unique_keys(raw, doc, owners, backups)
        return Assignment(generation, pods, starts, owners, epochs, backups, generated=False)
    if compact:
        if "owners" not in doc:
            raise AssignmentError(
                f"owners: missing ({compact[0]} is a field of the compact form, whose owners lists each pod's slices)"
            )
        table = _from_compact(doc, generation)
        if raw is not None:
            _check_unique_keys(raw, doc, (), ())
        return table
    slice_count = DEFAULT_SLICE_COUNT
    if "slice_count" in doc:
        slice_count = _positive_int(doc["slice_count"], "slice_count")
        if slice_count > MAX_SLICE_COUNT:
            raise AssignmentError(f"slice_count: {slice_count} is above the limit {MAX_SLICE_COUNT}")
    if isinstance(raw_pods, dict):
        _check_generated_size(slice_count, len(raw_pods))
    pods = _parse_pods(raw_pods)
    if raw is not None:
        _check_unique_keys(raw, doc, (), ())
    return generate(generation, pods, slice_count)


def _check_generated_size(slice_count: int, pods: int) -> None:
    if slice_count * pods > MAX_GENERATED:
        raise AssignmentError(
            f"slice_count: {slice_count} slices x {pods} pods is above the limit of {MAX_GENERATED} "
            "for a generated table (MAX_GENERATED): use fewer slices, or write the slices out"
        )


def _check_unique_keys(
    raw: bytes | str, doc: dict[str, Any], owners: Sequence[Pod], backups: Sequence[tuple[str, ...]]
) -> None:
    """Refuse a table whose JSON lists a key twice in one object. ``doc`` is
    its decoded and validated form, in which the decoder kept the last one.

    Cheap in the usual case: every key in the text is followed by one ``:``
    outside strings, so the text's colons number the keys it lists plus the
    colons written inside its strings. The validated document says how many
    keys survived and how many colons its strings hold; a colon written as
    an escape (``\\u003a``) counts in the document but not in the text, so
    escapes are added to the text's side. If the text's side is not larger,
    no key was dropped. Otherwise (a key twice, or only escapes) the text is
    decoded again, slowly, keeping every key, to find the place.
    """
    colon: Any = ":" if isinstance(raw, str) else b":"
    escape: Any = "\\u003" if isinstance(raw, str) else b"\\u003"
    written = raw.count(colon) + raw.count(escape)
    pods: dict[str, Any] = doc["pods"]
    keys = len(doc) + len(pods) + sum(map(len, pods.values()))
    # Strings that can hold a colon: pod ids (also in slices) and URLs.
    # Field names, states and slice starts cannot.
    colons = sum(pid.count(":") + spec["url"].count(":") for pid, spec in pods.items())
    slices = doc.get("slices")
    if slices is not None:
        keys += sum(map(len, slices))
        if any(":" in pid for pid in pods):
            colons += sum(p.id.count(":") for p in owners)
            colons += sum(b.count(":") for bt in backups for b in bt)
    # The compact form: pod ids as keys of owners and backups; slice
    # numbers, epochs and starts hold no colon.
    for field in ("owners", "epochs", "backups"):
        group = doc.get(field)
        if isinstance(group, dict):
            keys += len(group)
            colons += sum(key.count(":") for key in group)
    if written > keys + colons:
        _find_duplicate_key(raw, doc)


def _find_duplicate_key(raw: bytes | str, doc: dict[str, Any]) -> None:
    """Decode ``raw`` again, keeping every key, and raise on the first object
    (in ``doc``'s terms) that lists one twice."""
    import json

    twice: list[tuple[str, dict[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    twice.append((key, obj))
                    break
                seen.add(key)
        return obj

    try:
        full = json.loads(raw, object_pairs_hook=pairs)
    except ValueError:  # e.g. a huge number in a value the decoder dropped
        raise AssignmentError("table: a JSON object lists a key twice") from None
    if not twice:
        return  # only escaped colons: no key twice
    places: dict[int, str] = {id(full): ""}
    if isinstance(full.get("pods"), dict):
        places[id(full["pods"])] = "pods."
        for pid, spec in full["pods"].items():
            places[id(spec)] = f"pods.{pid}."
    if isinstance(full.get("slices"), list):
        for i, s in enumerate(full["slices"]):
            places[id(s)] = f"slices[{i}]."
    for field in ("owners", "epochs", "backups"):
        if isinstance(full.get(field), dict):
            places[id(full[field])] = f"{field}."
    # Innermost objects are decoded first: report the first one in place.
    for key, obj in twice:
        where = places.get(id(obj))
        if where is not None:
            raise AssignmentError(f"{where}{key}: listed twice (a key may appear once in a JSON object)")
    raise AssignmentError(f"{twice[0][0]}: listed twice in a JSON object (a key may appear once)")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else "a number"
    )


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if v is None:
            raise AssignmentError(f"{where}: missing (a positive integer)")
        raise AssignmentError(f"{where}: expected a positive integer, got {v!r}")
    if v <= 0 or v > MAX_POSITION:
        raise AssignmentError(f"{where}: {v} is out of range (1 to 2**64-1)")
    return v


def parse_url(url: Any, where: str) -> tuple[str, int]:
    """Split ``http://host[:port][/]`` into host and port."""
    if not isinstance(url, str) or not url.startswith("http://"):
        raise AssignmentError(f"{where}: not an http URL: {url!r} (expected http://host:port)")
    rest = url[len("http://") :]
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise AssignmentError(f"{where}: {url!r} has a path, query or userinfo (expected http://host:port)")
    host, port = rest, 80
    if rest.startswith("["):
        close = rest.find("]")
        host, tail = rest[: close + 1], rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise AssignmentError(f"{where}: bad host in {url!r}")
            port = _port(tail[1:], url, where)
    elif ":" in rest:
        host, _, p = rest.rpartition(":")
        port = _port(p, url, where)
    if not host or not _HOST_RE.fullmatch(host):
        raise AssignmentError(f"{where}: bad host {host!r} in {url!r}")
    return host.strip("[]"), port


def _port(p: str, url: str, where: str) -> int:
    if not (p.isascii() and p.isdigit() and len(p) <= 5) or not 0 < int(p) < 65536:
        raise AssignmentError(f"{where}: bad port {p!r} in {url!r}")
    return int(p)


def _parse_pods(raw: Any) -> dict[str, Pod]:
    if not isinstance(raw, dict):
        raise AssignmentError(f"pods: expected an object of pod id -> pod, got {_kind(raw)}")
    if not raw:
        raise AssignmentError("pods: no pods (a table needs at least one)")
    if len(raw) > MAX_PODS:
        raise AssignmentError(f"pods: {len(raw)} pods is above the limit of {MAX_PODS} (MAX_PODS)")
    pods: dict[str, Pod] = {}
    for pid, spec in raw.items():
        if not POD_ID_RE.fullmatch(pid):
            raise AssignmentError(f"pods.{pid!r}: bad pod id (letters, digits and _.:- only, at most 253)")
        where = f"pods.{pid}"
        if not isinstance(spec, dict):
            raise AssignmentError(f'{where}: expected an object like {{"url": "http://host:port"}}')
        unknown = sorted(set(spec) - _POD_FIELDS)
        if unknown:
            raise AssignmentError(f"{where}.{unknown[0]}: unknown field (known: url, weight, state)")
        if "url" not in spec:
            raise AssignmentError(f"{where}.url: missing")
        host, port = parse_url(spec["url"], f"{where}.url")
        weight = spec.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise AssignmentError(f"{where}.weight: expected a positive number, got {weight!r}")
        if not (0 < weight <= MAX_WEIGHT) or not math.isfinite(weight):
            raise AssignmentError(f"{where}.weight: {weight!r} is out of range (0 < weight <= {MAX_WEIGHT:g})")
        state = spec.get("state", "active")
        if state not in STATES:
            raise AssignmentError(f"{where}.state: {state!r} is not one of active, draining")
        pods[pid] = Pod(pid, spec["url"].rstrip("/"), host, port, float(weight), state)
    return pods


def _parse_start(v: Any, where: str) -> int:
    if isinstance(v, str):
        if not _START_RE.fullmatch(v):
            raise AssignmentError(f"{where}: {v!r} is not a 0x hex string or a decimal integer")
        n = int(v, 16) if v[1:2] in ("x", "X") else int(v)
    elif isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        raise AssignmentError(f"{where}: expected a 0x hex string or a decimal integer, got {v!r}")
    if not 0 <= n <= MAX_POSITION:
        raise AssignmentError(f"{where}: {v!r} is outside the key space [0, 2**64)")
    return n


def _slice_spec(s: Any, where: str) -> SliceSpec:
    """Shape checks of one slice as written: its fields and their types."""
    if not isinstance(s, dict):
        raise AssignmentError(f"{where}: expected an object, got {_kind(s)}")
    unknown = sorted(set(s) - _SLICE_FIELDS)
    if unknown:
        raise AssignmentError(f"{where}.{unknown[0]}: unknown field (known: start, pod, epoch, backups)")
    if "start" not in s:
        raise AssignmentError(f"{where}.start: missing")
    start = _parse_start(s["start"], f"{where}.start")
    pod = s.get("pod")
    if not isinstance(pod, str):
        raise AssignmentError(f"{where}.pod: expected a pod id, got {pod!r}")
    epoch = None if "epoch" not in s else _positive_int(s["epoch"], f"{where}.epoch")
    backups = s.get("backups", [])
    if not isinstance(backups, list) or not all(isinstance(b, str) for b in backups):
        raise AssignmentError(f"{where}.backups: expected an array of pod ids")
    return SliceSpec(start, pod, epoch, tuple(backups))


def _check_slice(i: int, s: SliceSpec, prev: int, pods: Mapping[str, Pod], generation: int) -> tuple[Pod, int]:
    """Checks of slice ``i`` against its table (order, owner, epoch, backups).
    ``prev`` is the previous slice's start (-1 for the first). Returns the owner
    and the epoch."""
    where = f"slices[{i}]"
    if i == 0 and s.start != 0:
        raise AssignmentError(f"{where}.start: the first slice must start at 0x0, not 0x{s.start:x}")
    if s.start <= prev:
        raise AssignmentError(
            f"{where}.start: 0x{s.start:x} is not above the previous start 0x{prev:x} (slices must be sorted)"
        )
    pod = pods.get(s.pod)
    if pod is None:
        raise AssignmentError(f"{where}.pod: unknown pod {s.pod!r}")
    epoch = generation if s.epoch is None else s.epoch
    if epoch > generation:
        raise AssignmentError(f"{where}.epoch: {epoch} is above the table's generation {generation}")
    seen = {s.pod}
    for j, b in enumerate(s.backups):
        if b not in pods:
            raise AssignmentError(f"{where}.backups[{j}]: unknown pod {b!r}")
        if b in seen:
            raise AssignmentError(f"{where}.backups[{j}]: {b!r} is the owner or listed twice")
        seen.add(b)
    return pod, epoch


Columns = tuple[list[int], list[Pod], list[int], list[tuple[str, ...]]]


def _parse_slices(raw: Any, pods: Mapping[str, Pod], generation: int) -> Columns:
    """Validate a table's ``slices`` array and resolve it into columns:
    starts, owners, epochs and backups of each slice.

    Tables can hold a million slices, so the common well-formed slice is
    checked inline; any other slice (and the first of each owner/backups
    combination) goes through ``_slice_spec`` and ``_check_slice``, which are
    the reference checks and raise the located error.
    """
    if not isinstance(raw, list):
        raise AssignmentError(f"slices: expected an array, got {_kind(raw)}")
    if not raw:
        raise AssignmentError("slices: empty (omit the field to generate slices from the pods)")
    starts: list[int] = []
    owners: list[Pod] = []
    epochs: list[int] = []
    backups: list[tuple[str, ...]] = []
    # (owner id, *backup ids) -> backups, for combinations already checked.
    # Big tables repeat a few combinations; slices share one tuple for each.
    checked: dict[tuple[Any, ...], tuple[str, ...]] = {}
    match = _START_RE.fullmatch
    prev = -1
    for i, s in enumerate(raw):
        owner: Pod | None = None
        bt: tuple[str, ...] | None = None
        if type(s) is dict:
            start: Any = s.get("start")
            pid = s.get("pod")
            epoch: Any = s.get("epoch", _MISSING)
            bk = s.get("backups", _MISSING)
            if type(start) is str and match(start):
                start = int(start, 16) if start[1:2] in ("x", "X") else int(start)
            elif type(start) is not int:  # bools too: type(True) is bool
                start = -1
            if type(pid) is str:
                owner = pods.get(pid)
            fields = 2
            if epoch is _MISSING:
                epoch = generation
            else:
                fields += 1
            if bk is _MISSING:
                bt = ()
            else:
                fields += 1
                if type(bk) is list:
                    try:
                        bt = checked.get((pid, *bk))
                    except TypeError:  # an unhashable value: the reference checks name it
                        pass
            if not (
                owner is not None
                and bt is not None
                and prev < start <= MAX_POSITION
                and (prev >= 0 or start == 0)
                and type(epoch) is int
                and 0 < epoch <= generation
                and len(s) == fields  # no unknown fields
            ):
                owner = None
        if owner is None or bt is None:
            spec = _slice_spec(s, f"slices[{i}]")
            owner, epoch = _check_slice(i, spec, prev, pods, generation)
            start, bt = spec.start, spec.backups
            checked[(spec.pod, *bt)] = bt
        starts.append(start)
        owners.append(owner)
        epochs.append(epoch)
        backups.append(bt)
        prev = start
    return starts, owners, epochs, backups


# --------------------------------------------------------------------------
# The compact form


def _from_compact(doc: dict[str, Any], generation: int) -> Assignment:
    """Validate a table in the compact form and build it.

    The slices are ``slice_count`` equal slices (default 4096; starts as in
    ``slice_starts``), plus the starts listed in ``splits`` (each inside a
    slice of that grid), minus the grid starts listed in ``merges`` (each
    joins a slice to the one before it); both sorted. Slice numbers count the
    resulting slices from 0. Then, by value, each a string of slice numbers
    and ranges like ``"0-3,7,9-12"``:

    * ``owners``: pod id -> its slices; every slice under exactly one pod;
    * ``epochs``: epoch (decimal) -> slices; the others have ``epoch``
      (default: the generation);
    * ``backups``: comma-separated pod ids -> slices; the others have none.
      Or the string ``"rendezvous"``: every slice's backups are the first
      three other pods by rendezvous score at its start (as generated).

    The same bounds as other forms hold, and are checked before the work
    they bound: ``MAX_SLICES`` slices, and slices x pods up to
    ``MAX_GENERATED`` for rendezvous backups.
    """
    count = DEFAULT_SLICE_COUNT
    if "slice_count" in doc:
        count = _positive_int(doc["slice_count"], "slice_count")
        if count > MAX_SLICES:
            raise AssignmentError(f"slice_count: {count} slices is above the limit of {MAX_SLICES} (MAX_SLICES)")
    splits = _start_list(doc, "splits")
    merges = _start_list(doc, "merges")
    total = count + len(splits) - len(merges)
    if total > MAX_SLICES:
        raise AssignmentError(
            f"splits: {count} slices (slice_count) + {len(splits)} splits - {len(merges)} merges = {total} slices "
            f"is above the limit of {MAX_SLICES} (MAX_SLICES)"
        )
    raw_pods = doc["pods"]
    backups_doc = doc.get("backups", _MISSING)
    if backups_doc == RENDEZVOUS and isinstance(raw_pods, dict) and total * len(raw_pods) > MAX_GENERATED:
        raise AssignmentError(
            f'backups: "rendezvous" over {total} slices x {len(raw_pods)} pods is above the limit of '
            f"{MAX_GENERATED} (MAX_GENERATED): list the backups by slice instead"
        )
    pods = _parse_pods(raw_pods)
    starts = _compact_starts(count, splits, merges)
    n = len(starts)
    owner = _owner_column(doc["owners"], pods, starts)
    epoch = _epoch_column(doc, n, generation)
    ids = list(pods)
    if backups_doc is _MISSING:
        backups: list[tuple[str, ...]] = [()] * n
    elif backups_doc == RENDEZVOUS:
        backups = _rendezvous_backups(pods, starts, owner, 0 if splits or merges else count)
    else:
        backups = _backup_column(backups_doc, pods, ids, owner)
    combos: dict[tuple[str, ...], int] = {}
    backup = array("I", [combos.setdefault(b, len(combos)) for b in backups])
    starts_col = array("Q", starts)
    columns = (generation, pods, False, starts_col, array("I", owner), epoch, backup, tuple(combos))
    return _restore(*columns, _lookup_index(starts_col), True)


def _start_list(doc: dict[str, Any], field: str) -> list[int]:
    """``splits`` or ``merges``: strictly increasing slice starts."""
    raw = doc.get(field, [])
    if not isinstance(raw, list):
        raise AssignmentError(f"{field}: expected an array of slice starts, got {_kind(raw)}")
    if len(raw) > MAX_SLICES:
        raise AssignmentError(f"{field}: {len(raw)} starts is above the limit of {MAX_SLICES} (MAX_SLICES)")
    out: list[int] = []
    for i, v in enumerate(raw):
        start = _parse_start(v, f"{field}[{i}]")
        if out and start <= out[-1]:
            raise AssignmentError(
                f"{field}[{i}]: 0x{start:x} is not above the previous one, 0x{out[-1]:x} (write them sorted, once)"
            )
        out.append(start)
    return out


def _on_grid(start: int, count: int) -> bool:
    """Whether ``start`` is one of ``slice_starts(count)``."""
    i = -(-start * count // KEY_SPACE)  # the first grid index whose start is not below ``start``
    return i < count and i * KEY_SPACE // count == start


def _compact_starts(count: int, splits: list[int], merges: list[int]) -> list[int]:
    grid = slice_starts(count)
    if not splits and not merges:
        return grid
    for i, start in enumerate(merges):
        if start == 0:
            raise AssignmentError(f"merges[{i}]: 0x0 cannot be merged away (the first slice starts at 0)")
        if not _on_grid(start, count):
            raise AssignmentError(
                f"merges[{i}]: 0x{start:016x} is not a start of the {count} equal slices (slice_count)"
            )
    for i, start in enumerate(splits):
        if _on_grid(start, count):
            raise AssignmentError(
                f"splits[{i}]: 0x{start:016x} is a start of the {count} equal slices already (slice_count)"
            )
    dropped = set(merges)
    return sorted([s for s in grid if s not in dropped] + splits)


def _ranges(text: Any, where: str, n: int) -> list[tuple[int, int]]:
    """A string of slice numbers and ranges (``"0-3,7"``) as inclusive
    ``(first, last)`` pairs, each within the ``n`` slices of the table."""
    if type(text) is not str:
        raise AssignmentError(f'{where}: expected a string of slice numbers like "0-3,7,9", got {_kind(text)}')
    if not text:
        return []
    items = text.split(",")
    if not _RANGES_RE.fullmatch(text):
        for k, item in enumerate(items):
            if not _RANGE_RE.fullmatch(item):
                raise AssignmentError(
                    f"{where}: item {k + 1}, {item!r}, is not a slice number or a range like 4-9 "
                    '(comma-separated, no spaces: "0-3,7,9")'
                )
    out: list[tuple[int, int]] = []
    for item in items:
        first, dash, last = item.partition("-")
        lo = int(first)
        hi = int(last) if dash else lo
        if hi < lo:
            raise AssignmentError(f"{where}: range {item} runs backwards (write {hi}-{lo})")
        if hi >= n:
            raise AssignmentError(f"{where}: slice {hi} is beyond the table's {n} slices (numbered 0 to {n - 1})")
        out.append((lo, hi))
    return out


def _owner_column(raw: Any, pods: Mapping[str, Pod], starts: list[int]) -> list[int]:
    """``owners``: each slice's owner, as the index of a pod in ``pods``."""
    if not isinstance(raw, dict):
        raise AssignmentError(f'owners: expected an object of pod id -> slices like "0-3,7", got {_kind(raw)}')
    n = len(starts)
    owner = [-1] * n
    index = {pid: k for k, pid in enumerate(pods)}
    ids = list(pods)
    for pid, text in raw.items():
        where = f"owners.{pid}"
        k = index.get(pid)
        if k is None:
            raise AssignmentError(f"{where}: unknown pod {pid!r} (not in pods)")
        for lo, hi in _ranges(text, where, n):
            if lo == hi:
                if owner[lo] < 0:
                    owner[lo] = k
                    continue
            elif max(owner[lo : hi + 1]) < 0:
                owner[lo : hi + 1] = [k] * (hi - lo + 1)
                continue
            i = next(i for i in range(lo, hi + 1) if owner[i] >= 0)
            raise AssignmentError(f"{where}: slice {i} is also listed under owners.{ids[owner[i]]} (one owner a slice)")
    if -1 in owner:
        i = owner.index(-1)
        raise AssignmentError(f"owners: slice {i} (0x{starts[i]:016x}) has no owner (list it under one pod)")
    return owner


def _epoch_column(doc: dict[str, Any], n: int, generation: int) -> array[int]:
    """``epoch`` and ``epochs``: each slice's epoch."""
    default = generation
    if "epoch" in doc:
        default = _positive_int(doc["epoch"], "epoch")
        if default > generation:
            raise AssignmentError(f"epoch: {default} is above the table's generation {generation}")
    epoch = array("Q", [default]) * n
    raw = doc.get("epochs", {})
    if not isinstance(raw, dict):
        raise AssignmentError(f'epochs: expected an object of epoch -> slices like "0-3,7", got {_kind(raw)}')
    listed = bytearray(n)
    for key, text in raw.items():
        where = f"epochs.{key}"
        if not _EPOCH_KEY_RE.fullmatch(key):
            raise AssignmentError(f"{where}: {key!r} is not an epoch (a positive decimal integer)")
        value = int(key)
        if value > generation:
            raise AssignmentError(f"{where}: epoch {value} is above the table's generation {generation}")
        for lo, hi in _ranges(text, where, n):
            if listed.find(1, lo, hi + 1) >= 0:
                i = listed.index(1, lo, hi + 1)
                raise AssignmentError(f"{where}: slice {i} is listed under another epoch too (one epoch a slice)")
            listed[lo : hi + 1] = b"\x01" * (hi - lo + 1)
            epoch[lo : hi + 1] = array("Q", [value]) * (hi - lo + 1)
    return epoch


def _backup_column(raw: Any, pods: Mapping[str, Pod], ids: list[str], owner: list[int]) -> list[tuple[str, ...]]:
    """``backups`` as an object: each slice's backups (none if not listed)."""
    if not isinstance(raw, dict):
        raise AssignmentError(
            f'backups: expected "{RENDEZVOUS}" or an object of backup pod ids -> slices '
            f'like {{"pod-b,pod-c": "0-3,7"}}, got {_kind(raw)}'
        )
    n = len(owner)
    column: list[tuple[str, ...]] = [()] * n
    listed = bytearray(n)
    for key, text in raw.items():
        where = f"backups.{key}"
        combo = tuple(key.split(","))
        for j, b in enumerate(combo):
            if b not in pods:
                raise AssignmentError(f"{where}: unknown pod {b!r} (backup {j + 1} of the list)")
            if b in combo[:j]:
                raise AssignmentError(f"{where}: {b!r} is listed twice")
        members = {ids.index(b) for b in combo}
        for lo, hi in _ranges(text, where, n):
            for i in range(lo, hi + 1):
                if listed[i]:
                    raise AssignmentError(f"{where}: slice {i} is listed under other backups too (one list a slice)")
                if owner[i] in members:
                    raise AssignmentError(
                        f"{where}: slice {i} is owned by {ids[owner[i]]!r}, which cannot be its own backup"
                    )
                listed[i] = 1
                column[i] = combo
    return column


def _rendezvous_backups(
    pods: Mapping[str, Pod], starts: Sequence[int], owner: Sequence[int], grid: int
) -> list[tuple[str, ...]]:
    """Each slice's first ``GENERATED_BACKUPS`` pods other than its owner in
    rendezvous order at its start (active pods first), as ``generate`` and
    ``evolve`` choose them. ``grid``: the slice count if ``starts`` are
    ``slice_starts(grid)``, else 0."""
    values = list(pods.values())
    ids = [p.id for p in values]
    pod_range = range(len(values))
    combos: dict[tuple[int, ...], tuple[str, ...]] = {}
    out: list[tuple[str, ...]] = []
    add = out.append
    for o, keys in zip(owner, zip(*_rank_columns(values, starts, grid), strict=True), strict=True):
        order = sorted(pod_range, key=keys.__getitem__, reverse=True)
        order.remove(o)
        picked = tuple(order[:GENERATED_BACKUPS])
        combo = combos.get(picked)
        if combo is None:
            combo = combos[picked] = tuple(ids[k] for k in picked)
        add(combo)
    return out


def _grouped(column: Sequence[int]) -> dict[int, str]:
    """The slices of each value of a column, as the compact form writes them
    (``"0-3,7,9-12"``), by ascending value."""
    runs: dict[int, list[list[int]]] = {}
    prev = -1
    for i, v in enumerate(column):
        if v == prev:
            runs[v][-1][1] = i
        else:
            runs.setdefault(v, []).append([i, i])
            prev = v
    out: dict[int, str] = {}
    for v in sorted(runs):
        parts = []
        for lo, hi in runs[v]:
            if hi == lo:
                parts.append(str(lo))
            elif hi == lo + 1:
                parts.append(f"{lo},{hi}")
            else:
                parts.append(f"{lo}-{hi}")
        out[v] = ",".join(parts)
    return out


def _grid_of(starts: array[int]) -> tuple[int, list[int], list[int]]:
    """(slice_count, splits, merges) that describe ``starts`` with the fewest
    listed starts: the grid of ``len(starts)`` equal slices if they are that,
    else the nearest grid of a power of two slices (whose starts are the
    multiples of a power of two) or of ``len(starts)``."""
    n = len(starts)
    if starts == array("Q", slice_starts(n)):
        return n, [], []
    # Trailing zero bits of each start: on the grid of 2**k slices iff >= 64 - k.
    zeros = [0] * 65
    for s in starts:
        zeros[(s & -s).bit_length() - 1 if s else 64] += 1
    on = 0
    best = (KEY_SPACE, 0)  # (starts to list, slice count)
    for k in range(64, -1, -1):
        on += zeros[k]  # starts on the grid of 2**(64 - k) slices
        size = 1 << (64 - k)
        if size > MAX_SLICES:
            break
        best = min(best, (size - on + n - on, size))
    if n <= MAX_SLICES:
        on = sum(_on_grid(s, n) for s in starts)
        best = min(best, (2 * (n - on), n))
    count = best[1]
    present = set(starts)
    merges = [g for g in slice_starts(count) if g not in present]
    splits = [s for s in starts if not _on_grid(s, count)]
    return count, splits, merges


def build(generation: int, pods: Mapping[str, Pod], specs: Sequence[SliceSpec]) -> Assignment:
    """Validate explicit slices against ``pods`` and build the table."""
    if not specs:
        raise AssignmentError("slices: empty")
    if len(specs) > MAX_SLICES:
        raise AssignmentError(f"slices: {len(specs)} slices is above the limit of {MAX_SLICES} (MAX_SLICES)")
    if len(pods) > MAX_PODS:
        raise AssignmentError(f"pods: {len(pods)} pods is above the limit of {MAX_PODS} (MAX_PODS)")
    owners: list[Pod] = []
    epochs: list[int] = []
    prev = -1
    for i, s in enumerate(specs):
        owner, epoch = _check_slice(i, s, prev, pods, generation)
        owners.append(owner)
        epochs.append(epoch)
        prev = s.start
    starts = [s.start for s in specs]
    return Assignment(generation, pods, starts, owners, epochs, [s.backups for s in specs], generated=False)


# --------------------------------------------------------------------------
# Generation by weighted rendezvous hashing


def slice_starts(count: int) -> list[int]:
    """Starts of ``count`` equal slices of the key space."""
    return [(i * KEY_SPACE) // count for i in range(count)]


def score(pod: Pod, point: int) -> float:
    """Weighted rendezvous score of ``pod`` for a point (a slice start).

    ``-weight / ln(u)`` with ``u`` uniform in (0, 1) from the pod id and the
    point: the pod with the highest score wins, and a pod with weight w wins a
    share w / sum(weights) of points.
    """
    h = mmh3.hash64(pod.id.encode() + b"\x00" + point.to_bytes(8, "big"), 0, signed=False)[0]
    u = (h + 0.5) / KEY_SPACE
    return -pod.weight / math.log(u)


def rank(pods: Iterable[Pod], point: int) -> list[Pod]:
    """Pods in failover order for a point: active pods by descending score, then
    draining pods by descending score (a draining pod is a last resort)."""
    return sorted(pods, key=lambda p: (p.active, score(p, point)), reverse=True)


def _unit_scores(pod_id: str, count: int) -> array[float]:
    """``score`` of a pod of weight 1 at each of ``count`` equal slice starts."""
    return array("d", _unit_scores_at(pod_id, _points(slice_starts(count))))


# Tables are regenerated with the same pods and slice count again and again
# (weights and states change): the hashing part is kept per pod id, for up
# to 128 pods of tables up to 16384 slices (at most 16 MiB).
_cached_unit_scores = lru_cache(maxsize=128)(_unit_scores)
_CACHED_SLICE_COUNT = 16384


def _points(starts: Sequence[int]) -> list[bytes]:
    """Slice starts as the bytes ``score`` hashes after a pod's id."""
    return [start.to_bytes(8, "big") for start in starts]


def _unit_scores_at(pod_id: str, points: Sequence[bytes]) -> list[float]:
    """``score`` of a pod of weight 1 at each of ``points`` (see ``_points``)."""
    prefix, h64, log = pod_id.encode() + b"\x00", mmh3.hash64, math.log
    return [-1.0 / log((h64(prefix + point, 0, signed=False)[0] + 0.5) / KEY_SPACE) for point in points]


def _rank_columns(values: Sequence[Pod], starts: Sequence[int], grid: int) -> list[list[float]]:
    """``rank``'s order at every slice start, as one column of sort keys per
    pod: at ``starts``, or at ``slice_starts(grid)`` if ``grid``. ``score``
    is weight x unit score, and a draining pod's key -1/score is below every
    active pod's score yet keeps the draining pods in score order."""
    columns = []
    cached = grid and grid <= _CACHED_SLICE_COUNT
    points = [] if cached else _points(slice_starts(grid) if grid else starts)
    for p in values:
        w = p.weight
        u: Sequence[float] = _cached_unit_scores(p.id, grid) if cached else _unit_scores_at(p.id, points)
        columns.append([w * x for x in u] if p.active else [-1.0 / (w * x) for x in u])
    return columns


def generate(generation: int, pods: Mapping[str, Pod], slice_count: int = DEFAULT_SLICE_COUNT) -> Assignment:
    """A pods-only table: ``slice_count`` equal slices, each owned by the active
    pod with the highest rendezvous score; the next pods are its backups."""
    if not any(p.active for p in pods.values()):
        raise AssignmentError("pods: no active pod to own the generated slices (all are draining)")
    if len(pods) > MAX_PODS:
        raise AssignmentError(f"pods: {len(pods)} pods is above the limit of {MAX_PODS} (MAX_PODS)")
    _check_generated_size(slice_count, len(pods))
    values = list(pods.values())
    ids = [p.id for p in values]
    columns = _rank_columns(values, (), slice_count)
    # Straight into the columns of the table: owner and backups by pod index.
    pod_range = range(len(values))
    owner, backup = array("I"), array("I")
    combos: dict[tuple[int, ...], int] = {}
    add_owner, add_backup, combo = owner.append, backup.append, combos.setdefault
    for keys in zip(*columns, strict=True):
        order = sorted(pod_range, key=keys.__getitem__, reverse=True)
        add_owner(order[0])
        add_backup(combo(tuple(order[1 : 1 + GENERATED_BACKUPS]), len(combos)))
    starts = array("Q", slice_starts(slice_count))
    epochs = array("Q", [generation]) * slice_count
    backups = tuple(tuple(ids[k] for k in c) for c in combos)
    return _restore(generation, dict(pods), True, starts, owner, epochs, backup, backups, _lookup_index(starts))


# --------------------------------------------------------------------------
# Comparing and evolving tables


def moved_share(old: Assignment, new: Assignment) -> float:
    """Share of the key space whose owner differs between two tables."""
    if old.starts == new.starts:
        moved = 0
        for k, (was, now) in enumerate(zip(old.owner_ids(), new.owner_ids(), strict=True)):
            if was != now:
                moved += _end(new.starts, k) - new.starts[k]
        return moved / KEY_SPACE
    moved = i = j = lo = 0
    so, sn = old.starts, new.starts
    oo, on = old.owner_ids(), new.owner_ids()
    while lo < KEY_SPACE:
        end_old, end_new = _end(so, i), _end(sn, j)
        hi = min(end_old, end_new)
        if oo[i] != on[j]:
            moved += hi - lo
        lo = hi
        if end_old == hi:
            i += 1
        if end_new == hi:
            j += 1
    return moved / KEY_SPACE


def epoch_regression(old: Assignment, new: Assignment) -> str | None:
    """Why ``new`` may not follow ``old`` in force: the first position at
    which its epoch is lower than ``old``'s, or at which its owner differs
    while its epoch is not higher; None if there is none. The message names
    the slice of ``new`` and the position.

    A merge walk over both tables' slice starts (never per key), done with
    ``map`` over the integer columns so that it runs in C: some ms for two
    100k-slice tables. Remembers its verdict on ``new`` (see ``vetted``).
    """
    memo = new._vetted
    if memo is not None and memo[0]() is old:
        return memo[1]
    verdict = _epoch_regression(old, new)
    new.vetted(old, verdict)
    return verdict


def _epoch_regression(old: Assignment, new: Assignment) -> str | None:
    old_epoch, new_epoch = old._epoch, new._epoch
    if min(new_epoch) > max(old_epoch):
        return None  # every epoch went up (a generated table, a full reshuffle)
    # Owners as indices of ``old``'s pods; a pod new in ``new`` is -1, unlike
    # any owner in ``old``.
    index = {pid: k for k, pid in enumerate(old.pods)}
    to_old = [index.get(pid, -1) for pid in new.pods]
    old_owner: Sequence[int] = old._owner
    new_owner: Sequence[int] = new._owner
    if to_old != list(range(len(to_old))):
        new_owner = array("i", map(to_old.__getitem__, new_owner))
    if old.starts == new.starts:
        # Slice by slice, in C: refused where new epoch < old epoch + (owner changed).
        bad = list(map(lt, new_epoch, map(add, old_epoch, map(ne, old_owner, new_owner))))
        if True not in bad:
            return None
        i = j = bad.index(True)
        pos = new.starts[i]
    else:
        found = _merge_walk(old.starts, new.starts, old_epoch, new_epoch, old_owner, new_owner)
        if found is None:
            return None
        i, j = found
        pos = max(old.starts[i], new.starts[j])
    was, now = old.route(i), new.route(j)
    if new.compact:  # named as the compact form lists it
        where = f"slice {j} (0x{now.start:016x}, owners.{now.pod.id}): at position 0x{pos:016x}"
    else:
        where = f"slices[{j}] (0x{now.start:016x}): at position 0x{pos:016x}"
    if now.epoch < was.epoch:
        return (
            f"{where}, epoch {now.epoch} is below {was.epoch}, the epoch in force there "
            f"(generation {old.generation}): epochs are fencing tokens and never go down"
        )
    return (
        f"{where}, the owner changes from {was.pod.id!r} to {now.pod.id!r} but epoch {now.epoch} "
        f"is not above {was.epoch}, the epoch in force there (generation {old.generation}): "
        "a slice that changes owner takes a new epoch (the new generation)"
    )


def _merge_walk(
    old_starts: array[int],
    new_starts: array[int],
    old_epoch: Sequence[int],
    new_epoch: Sequence[int],
    old_owner: Sequence[int],
    new_owner: Sequence[int],
) -> tuple[int, int] | None:
    """The first pair (old slice, new slice) that overlap where the new epoch
    is below the old one plus one if the owner changed; None if none. Walks
    the segments between both tables' starts once (over lists: indexing an
    array makes a new int each time)."""
    so, sn = old_starts.tolist(), new_starts.tolist()
    so.append(KEY_SPACE)
    sn.append(KEY_SPACE)
    oe, ne_, oo, no = list(old_epoch), list(new_epoch), list(old_owner), list(new_owner)
    i = j = 0
    end_old, end_new = so[1], sn[1]
    while True:
        if ne_[j] < oe[i] + (oo[i] != no[j]):
            return i, j
        if end_old < end_new:
            i += 1
            end_old = so[i + 1]
        elif end_new < end_old:
            j += 1
            end_new = sn[j + 1]
        elif end_old == KEY_SPACE:
            return None
        else:
            i += 1
            j += 1
            end_old, end_new = so[i + 1], sn[j + 1]


def _end(starts: array[int], i: int) -> int:
    return starts[i + 1] if i + 1 < len(starts) else KEY_SPACE


def evolve(
    old: Assignment,
    pods: Mapping[str, Pod],
    generation: int,
    *,
    rebalance: bool = False,
) -> Assignment:
    """A new explicit table for ``pods`` that moves as little as possible from ``old``.

    Every slice whose owner is still an active pod keeps its owner and its
    epoch. Slices whose owner left or is draining go to their first active
    old backup, else to the active pod with the highest rendezvous score, and
    take ``generation`` as their epoch. With ``rebalance``, slices are also
    moved from pods above their weighted fair share to pods below it, fewest
    moves first, so that added pods receive keys.
    """
    if generation <= old.generation:
        raise AssignmentError(f"generation: {generation} must be above the old table's {old.generation}")
    active = [p for p in pods.values() if p.active]
    if not active:
        raise AssignmentError("pods: no active pod to own slices (all are draining)")
    values = list(pods.values())
    owners: list[str] = []
    epochs: list[int] = []
    for r in old.routes:
        owner = pods.get(r.pod.id)
        if owner is not None and owner.active:
            owners.append(owner.id)
            epochs.append(r.epoch)
            continue
        heir = next((b for b in r.backups if b in pods and pods[b].active), None)
        if heir is None:
            heir = rank(active, r.start)[0].id
        owners.append(heir)
        epochs.append(generation)
    if rebalance:
        _rebalance(old.routes, owners, epochs, pods, generation)
    specs = []
    for r, owner_id, epoch in zip(old.routes, owners, epochs, strict=True):
        order = [p.id for p in rank(values, r.start) if p.id != owner_id]
        specs.append(SliceSpec(r.start, owner_id, epoch, tuple(order[:GENERATED_BACKUPS])))
    return build(generation, pods, specs)


def _rebalance(
    routes: Sequence[Route], owners: list[str], epochs: list[int], pods: Mapping[str, Pod], generation: int
) -> None:
    active = {p.id: p for p in pods.values() if p.active}
    total_w = sum(p.weight for p in active.values())
    target = {pid: KEY_SPACE * p.weight / total_w for pid, p in active.items()}
    load = dict.fromkeys(active, 0)
    for r, owner in zip(routes, owners, strict=False):
        load[owner] += r.end - r.start
    # Candidate moves: slices of over-loaded pods, least attached first (lowest
    # rendezvous score for their owner), each to the under-loaded pod that
    # scores highest for it. Deterministic for a given input.
    candidates = sorted(
        (i for i, o in enumerate(owners) if load[o] > target[o]),
        key=lambda i: (score(active[owners[i]], routes[i].start), i),
    )
    for i in candidates:
        owner = owners[i]
        width = routes[i].end - routes[i].start
        # Move only if the owner stays at or above target minus half a slice.
        if load[owner] - width < target[owner] - width / 2:
            continue
        under = [active[p] for p in active if load[p] + width / 2 <= target[p]]
        if not under:
            break
        dest = rank(under, routes[i].start)[0].id
        owners[i] = dest
        epochs[i] = generation
        load[owner] -= width
        load[dest] += width


def make_pods(specs: Iterable[tuple[str, str, float, str]]) -> dict[str, Pod]:
    """Pods from ``(id, url, weight, state)`` tuples, validated like a table's."""
    raw: dict[str, Any] = {}
    for pid, url, weight, state in specs:
        if pid in raw:
            raise AssignmentError(f"pods.{pid}: listed twice")
        raw[pid] = {"url": url, "weight": weight, "state": state}
    return _parse_pods(raw)
