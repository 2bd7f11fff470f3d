"""The admin listener over real sockets."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from proxy import assignment as core

from .conftest import Pod, ProxyFactory, parse_metrics, table_for


async def test_health_readiness_and_lookup(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    px = await proxy_factory(None, admin=True)
    async with aiohttp.ClientSession() as s:
        async with s.get(px.admin + "/-/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with s.get(px.admin + "/-/readyz") as r:
            assert r.status == 503 and (await r.json())["ready"] is False
        async with s.get(px.admin + "/-/lookup?key=user-1") as r:
            assert r.status == 503 and (await r.json())["error"] == "no_table"
        table = table_for(pods, generation=11)
        px.runtime.set_assignment(table)
        async with s.get(px.admin + "/-/readyz") as r:
            assert r.status == 200 and (await r.json())["generation"] == 11
        async with s.get(px.admin + "/-/lookup", params={"key": "user-1"}) as r:
            info = await r.json()
            route = table.lookup(b"user-1")
            assert info["position"] == 7038226039998199158
            assert info["owner"] == route.pod.id and info["epoch"] == route.epoch
            assert info["backups"] == list(route.backups) and info["slice"] == route.index
        async with s.get(px.admin + "/-/lookup") as r:
            assert r.status == 400 and (await r.json())["error"] == "missing_key"
        async with s.get(px.admin + "/-/assignment") as r:
            doc = await r.json()
            assert doc["generation"] == 11 and doc["last_error"] is None
            assert core.from_json(doc["table"]).shares() == table.shares()


async def test_put_needs_token_and_refuses_bad_tables(proxy_factory: ProxyFactory, pods: list[Pod]) -> None:
    read_only = await proxy_factory(table_for(pods), admin=True)
    async with aiohttp.ClientSession() as s:
        async with s.put(read_only.admin + "/-/assignment", data=table_for(pods, 99).dumps()) as r:
            assert r.status == 405 and (await r.json())["error"] == "read_only"
        assert read_only.runtime.table is not None and read_only.runtime.table.generation == 7

        px = await proxy_factory(table_for(pods), admin=True, admin__token="s3cret")
        url = px.admin + "/-/assignment"
        good = {"Authorization": "Bearer s3cret"}
        async with s.put(url, data=table_for(pods, 99).dumps(), headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.put(url, data=table_for(pods, 99).dumps()) as r:
            assert r.status == 401
        async with s.put(url, data=b'{"version": 1, "generation": 100, "pods": {}}', headers=good) as r:
            body = await r.json()
            assert r.status == 400 and body["error"] == "invalid_table" and body["detail"].startswith("pods:")
        async with s.put(url, data=table_for(pods, 3).dumps(), headers=good) as r:
            assert r.status == 409 and "stale" in (await r.json())["detail"]
        assert px.runtime.table is not None and px.runtime.table.generation == 7
        async with s.get(url) as r:
            last = (await r.json())["last_error"]
            assert "stale" in last["error"] and last["result"] == "stale" and last["resolved"] is False
            assert isinstance(last["at"], float) and last["generation_in_force"] == 7
        async with s.put(url, data=table_for(pods, 99).dumps(), headers=good) as r:
            assert r.status == 200 and (await r.json())["generation"] == 99
        async with s.get(url) as r:
            last = (await r.json())["last_error"]
            # Still shown, with its time, but marked as resolved by the table now in force.
            assert "stale" in last["error"] and last["resolved"] is True and last["resolved_by_generation"] == 99
        # Traffic now runs on generation 99.
        async with s.get(px.base + "/", headers={"X-Routing-Key": "k"}) as r:
            assert r.headers["X-Keyroute-Generation"] == "99"
        other = table_for(pods[:2], 99)
        async with s.put(url, data=other.dumps(), headers=good) as r:
            assert r.status == 409 and "conflicting" in (await r.json())["detail"]
        async with s.get(px.admin + "/metrics") as r:
            text = await r.text()
            samples = parse_metrics(text)
            assert samples['keyroute_reloads_total{result="applied"}'] == 1
            assert samples['keyroute_reloads_total{result="stale"}'] == 1
            assert samples['keyroute_reloads_total{result="conflict"}'] == 1
            assert samples['keyroute_reloads_total{result="invalid"}'] == 1
            assert samples["keyroute_generation"] == 99
            owner = px.runtime.table.assignment.lookup(b"k").pod.id
            assert samples[f'keyroute_responses_total{{code="2xx",pod="{owner}"}}'] == 1
            assert samples["keyroute_request_duration_seconds_count"] == 1
            assert 0 <= samples["keyroute_seconds_since_last_reload"] < 60


async def test_access_log_lines(proxy_factory: ProxyFactory, pods: list[Pod], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keyroute.access")
    px = await proxy_factory(table_for(pods), proxy__access_log=True)
    async with aiohttp.ClientSession() as s:
        async with s.get(px.base + "/a?x=1", headers={"X-Routing-Key": "k"}) as r:
            assert r.status == 200
        async with s.get(px.base + "/b") as r:
            assert r.status == 400
    lines = [orjson.loads(rec.getMessage()) for rec in caplog.records if rec.name == "keyroute.access"]
    assert [(x["path"], x["status"], x["error"]) for x in lines] == [("/a?x=1", 200, None), ("/b", 400, "missing_key")]
    route = table_for(pods).lookup(b"k")
    assert lines[0]["pod"] == route.pod.id and lines[0]["epoch"] == route.epoch and lines[0]["ms"] >= 0
    quiet = await proxy_factory(table_for(pods))
    caplog.clear()
    async with aiohttp.ClientSession() as s, s.get(quiet.base + "/a", headers={"X-Routing-Key": "k"}) as r:
        assert r.status == 200
    assert not [rec for rec in caplog.records if rec.name == "keyroute.access"]
