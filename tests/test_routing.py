"""The data plane's lookup (``RoutingTable.lookup``, compiled on the native
path) against the routing core's (``Assignment.lookup``), which every table
and tool uses: the same route for every key and position, on random tables,
at every slice boundary."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import assignment as core
from proxy import native
from proxy.routing import RoutingTable

from .test_tables_compact import tables

KEY_SPACE = core.KEY_SPACE


def test_the_path_under_test_is_the_one_chosen() -> None:
    import proxy.routing

    assert str(proxy.routing.__file__).endswith(".py") is not native.ACTIVE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.lists(st.binary(max_size=40), max_size=20), st.lists(st.integers(0, KEY_SPACE - 1), max_size=20))
def test_lookup_matches_the_core(table: core.Assignment, keys: list[bytes], positions: list[int]) -> None:
    rt = RoutingTable(table)
    for key in keys:
        assert rt.lookup(key) == table.lookup(key)
    edges = {0, KEY_SPACE - 1}
    for start in table.starts:
        edges.update({start, max(start - 1, 0), min(start + 1, KEY_SPACE - 1)})
    for pos in [*positions, *edges]:
        route = rt.route_at(pos)
        assert route == table.lookup_position(pos)
        assert route.start <= pos < route.end


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 8), st.lists(st.binary(max_size=20), min_size=1, max_size=50))
def test_lookup_matches_the_core_on_generated_tables(slices: int, n_pods: int, keys: list[bytes]) -> None:
    pods = core.make_pods((f"p{i}", f"http://10.0.0.{i + 1}:80", 1.0, "active") for i in range(n_pods))
    table = core.generate(7, pods, slices)
    rt = RoutingTable(table, "any")
    for key in keys:
        assert rt.lookup(key) == table.lookup(key)


def test_each_compiled_module_loads_first_in_a_fresh_process() -> None:
    # The compiled modules import each other's C types in a cycle: any of
    # them may be the first one a program imports.
    import subprocess
    import sys

    for module in native.COMPILED:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"import {module}: {done.stderr}"
