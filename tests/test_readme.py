"""README's commands, run as written; and what README promises about the CLI
and the container image.

Every ```sh block of README.md is split into commands (a line ending in a
backslash continues on the next; comments are dropped). A command is run, or
left out for a reason in ``EXCLUDED``; a command that matches neither fails
``test_every_readme_command_is_run_or_excluded``, so a new command in README
gets a decision. Left out:

- blocks with ``docker``, ``kubectl``, ``locust``, ``bench/`` scripts or
  ``&`` (servers in the background): they need a Docker engine or a cluster,
  start servers on fixed ports, or run minutes of load; a later command in
  such a block depends on the earlier ones, so the whole block is left out.
  tests/test_fleet.py lints the Dockerfile, runs its install steps and checks
  the Kubernetes manifests; bench/ is measured, not tested.
- the install line (``python3 -m venv .venv && .venv/bin/pip install ...``):
  it needs the network. The test stands in for it: its temp dir has a
  ``.venv`` link to this environment, whose ``bin`` goes first on PATH as
  ``. .venv/bin/activate`` does. ``.ci/run`` runs the install on a fresh clone.
- ``keyroute run``: it serves until stopped, on the config's fixed ports
  (tests/test_process.py runs it on free ports).
- a synopsis line with placeholders (``[--flag]``, ``...``).

The rest run in that temp dir, which holds a copy of ``config/``, one block
after another in README's order (``-o table.json`` then ``--from table.json``).
``keyroute demo`` runs on a free port (``KEYROUTE_PROXY_LISTEN``, read as by
``run``) until it has printed its instructions; then every line it printed runs
as printed, in a shell whose PATH lacks the venv, the 5 MB upload and the
``kill`` of a pod included, and Ctrl-C stops it, leaving no temp folder.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.markers import Marker
from packaging.requirements import Requirement

from proxy.config import load as load_settings

from .conftest import free_port
from .test_demo import Demo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

BLOCK_EXCLUDED = (
    (re.compile(r"^(sudo )?docker\b"), "needs a Docker engine (tests/test_fleet.py lints the Dockerfile)"),
    (re.compile(r"^kubectl\b"), "needs a Kubernetes cluster (tests/test_fleet.py checks the manifests)"),
    (re.compile(r"^locust\b"), "a load test: minutes of load on fixed ports"),
    (re.compile(r"\bbench/\w+\.py\b"), "bench/ servers and load tests, on fixed ports"),
    (re.compile(r"&\s*$"), "starts a server in the background"),
)
EXCLUDED = (
    (re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install\b"), "the install step: needs the network"),
    (re.compile(r"^keyroute run\b"), "serves until stopped, on fixed ports (tests/test_process.py runs it)"),
    (re.compile(r"\[-|\.\.\."), "a synopsis with placeholders"),
)
RUN = re.compile(r"^(\.venv/bin/)?keyroute (--version$|check |lookup |gen |demo$)")


@dataclass
class Command:
    text: str
    section: str
    line: int


def readme_blocks(text: str) -> Iterator[list[Command]]:
    """The commands of each ```sh block, with the section and line they are on."""
    section, block, start = "", None, 0
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if block is None:
            if line.startswith("## "):
                section = line[3:]
            elif line.strip() in ("```sh", "```bash", "```shell"):
                block, start = [], i
            continue
        if line.strip() != "```":
            block.append(line)
            continue
        cmds: list[Command] = []
        joined, first = "", start + 1
        for j, raw in enumerate(block, start + 1):
            if not joined:
                first = j
            raw = re.sub(r"\s+#\s.*$", "", raw).rstrip()  # a trailing comment
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            if raw.endswith("\\"):
                joined += raw[:-1].rstrip() + " "
                continue
            cmds.append(Command(" ".join((joined + raw).split()), section, first))
            joined = ""
        yield cmds
        block = None


BLOCKS = list(readme_blocks(README.read_text()))


def plan(block: list[Command]) -> list[tuple[Command, str | None]]:
    """Each command with None (run it) or the reason it is left out."""
    for cmd in block:
        for rule, reason in BLOCK_EXCLUDED:
            if rule.search(cmd.text):
                return [(c, f"its block: {reason}") for c in block]
    out: list[tuple[Command, str | None]] = []
    for cmd in block:
        reason = next((r for rule, r in EXCLUDED if rule.search(cmd.text)), None)
        if reason is None and not RUN.match(cmd.text):
            reason = "UNCLASSIFIED"
        out.append((cmd, reason))
    return out


def test_every_readme_command_is_run_or_excluded() -> None:
    planned = [p for block in BLOCKS for p in plan(block)]
    unclassified = [f"README.md:{c.line} ({c.section}): {c.text}" for c, r in planned if r == "UNCLASSIFIED"]
    assert not unclassified, "README commands neither run nor excluded in tests/test_readme.py:\n" + "\n".join(
        unclassified
    )
    ran = {c.text.split()[1] for c, r in planned if r is None}
    # The commands the issue asks to see working, as README writes them.
    assert {"--version", "check", "lookup", "gen", "demo"} <= ran, ran


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A checkout as README's install step leaves it: config/ and a .venv."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "config", work / "config")
    (work / ".venv").symlink_to(VENV_BIN.parent)
    (tmp_path / "tmp").mkdir()
    return work


def activated_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROUTE_")}
    env["VIRTUAL_ENV"] = str(work / ".venv")
    env["PATH"] = os.pathsep.join([str(work / ".venv" / "bin"), env.get("PATH", "/usr/bin:/bin")])
    env["TMPDIR"] = str(work.parent / "tmp")
    return env


def check_output(cmd: str, r: subprocess.CompletedProcess[str], cwd: Path) -> None:
    where = f"{cmd}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert r.returncode == 0, where
    argv = shlex.split(cmd)
    sub = argv[1]
    if sub == "--version":
        assert r.stdout.strip() == f"keyroute {importlib.metadata.version('keyroute')}", where
    elif sub == "check":
        assert re.search(r"^(table|config) \S+: ok$", r.stdout, re.M), where
    elif sub == "lookup":
        for key in (a for a in argv[3:] if not a.startswith("--")):
            # --json: "key": "user-1"; plain: user-1<TAB>position=... owner=...
            plain = re.search(rf"^{re.escape(key)}\tposition=\d+ .*\towner=\S+", r.stdout, re.M)
            assert plain or f'"key": "{key}"' in r.stdout, where
    elif sub == "gen":
        assert re.search(r"^generation \d+, \d+ slices, \d+ pods$", r.stdout + r.stderr, re.M), where
        if "-o" in argv:
            assert (cwd / argv[argv.index("-o") + 1]).is_file(), where


async def run_demo(cmd: str, work: Path, env: dict[str, str]) -> None:
    tmp = Path(env["TMPDIR"])
    port = free_port()
    denv = dict(env, KEYROUTE_PROXY_LISTEN=f"127.0.0.1:{port}", KEYROUTE_ADMIN_LISTEN="127.0.0.1:0")
    err = work.parent / "demo.stderr"
    with err.open("wb") as err_fh:
        # Its own process group, so that cleaning up can kill whatever is left.
        proc = subprocess.Popen(
            ["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=err_fh, env=denv, cwd=work, start_new_session=True
        )
    demo = Demo(proc, port, err)
    try:
        await demo.read_until("Ctrl-C")
        # A shell the user opens next to the demo: no venv on its PATH.
        bare = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
        bare["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        outputs = []
        for line in demo.commands():
            r = await asyncio.to_thread(
                subprocess.run, ["sh", "-c", line], capture_output=True, text=True, env=bare, cwd=work, timeout=30
            )
            assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
            outputs.append((line, r.stdout))
        user1 = [out for line, out in outputs if "'X-Routing-Key: user-1'" in line and line.endswith("/hello")]
        assert user1[0].split()[0] == user1[1].split()[0], user1  # same key, same pod
        assert all(" role=" in out for out in user1), user1
        missing = next(out for line, out in outputs if line.startswith("curl -s http"))
        assert '"error": "missing_key"' in missing or '"error":"missing_key"' in missing, missing
        upload = next(out for line, out in outputs if "--data-binary" in line)
        assert " body=5000000B" in upload, upload
        # Ctrl-C, as the demo sees it. (Not to the harness's sh: a non-interactive
        # dash dies of a SIGINT it gets while waiting, whatever its child does.)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children or [str(proc.pid)]:  # sh may have exec'd the command
            os.kill(int(pid), signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 20) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await demo.stop()
        if proc.stdout is not None:
            proc.stdout.close()
    assert list(tmp.iterdir()) == [], "the demo left its temp folder behind"


async def test_readme_commands_run_as_written(workdir: Path) -> None:
    env = activated_env(workdir)
    ran = 0
    for block in BLOCKS:
        for cmd, reason in plan(block):
            if reason is not None:
                continue
            ran += 1
            if cmd.text.endswith(" demo"):
                await run_demo(cmd.text, workdir, env)
                continue
            r = await asyncio.to_thread(
                subprocess.run, ["sh", "-c", cmd.text], capture_output=True, text=True, env=env, cwd=workdir, timeout=60
            )
            check_output(f"README.md:{cmd.line}: {cmd.text}", r, workdir)
    assert ran >= 6


# -- the CLI promises README makes ---------------------------------------------------


def test_check_config_reads_the_environment_as_run_does(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROUTE_")}
    env["KEYROUTE_UPSTREAM_RETRIES"] = "many"
    base = [sys.executable, "-m", "proxy"]
    cfg = str(ROOT / "config" / "keyroute.toml")
    table = f"file:{ROOT / 'config' / 'assignment.json'}"
    check = subprocess.run([*base, "check", "--config", cfg], capture_output=True, text=True, env=env, cwd=ROOT)
    run = subprocess.run(
        [*base, "run", "--config", cfg, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--assignment", table],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert run.returncode == 2 and "upstream.retries" in run.stderr, run.stderr
    assert check.returncode == 2 and "upstream.retries" in check.stderr, check.stdout + check.stderr
    del env["KEYROUTE_UPSTREAM_RETRIES"]
    env["KEYROUTE_UPSTREAM_RETRIES"] = "3"
    check = subprocess.run([*base, "check", "--config", cfg], capture_output=True, text=True, env=env, cwd=ROOT)
    assert check.returncode == 0 and f"config {cfg}: ok" in check.stdout, check.stderr


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"keyroute {importlib.metadata.version('keyroute')}\n", r


# -- the container image ----------------------------------------------------------------


def docker_runs(text: str) -> list[str]:
    """``docker run`` commands in README's blocks or the Dockerfile's header comment."""
    lines = [re.sub(r"^#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [m.group(0) for m in re.finditer(r"docker run [^\n]*", joined)]


def image_settings() -> tuple[float, int]:
    df = DockerfileParser(str(ROOT / "Dockerfile"))
    src = next(
        str(i["value"]).split()[0]
        for i in df.structure
        if i["instruction"] == "COPY" and str(i["value"]).endswith(" /etc/keyroute/keyroute.toml")
    )
    settings = load_settings(str(ROOT / src), env={})
    return settings.proxy.shutdown_timeout, settings.admin_address[1]


def test_docker_run_lines_keep_admin_on_loopback_and_outlast_the_drain() -> None:
    drain, admin_port = image_settings()
    runs = {
        "Dockerfile": docker_runs((ROOT / "Dockerfile").read_text()),
        "README.md": [r for r in docker_runs(README.read_text()) if "keyroute:" in r and "--entrypoint" not in r],
    }
    for where, cmds in runs.items():
        assert cmds, f"no docker run line in {where}"
        for cmd in cmds:
            published = re.findall(r"-p (\S+)", cmd)
            admin = [p for p in published if p.endswith(f":{admin_port}")]
            assert admin and all(p.startswith("127.0.0.1:") for p in admin), f"{where}: {cmd}"
            stop = re.search(r"--stop-timeout (\d+)", cmd)
            # docker stop's default (10 s) would SIGKILL a drain of proxy.shutdown_timeout.
            assert stop is not None and int(stop[1]) > drain, f"{where}: {cmd} (drain {drain:g} s)"


def test_image_dependencies_are_pinned() -> None:
    df = DockerfileParser(str(ROOT / "Dockerfile"))
    text = (ROOT / "Dockerfile").read_text()
    assert "PIP_CONSTRAINT=/src/constraints.txt" in text
    assert any(
        i["instruction"] == "COPY" and "constraints.txt" in str(i["value"]).split()[:-1] for i in df.structure
    ), "the build stage does not copy constraints.txt"
    assert "--no-build-isolation" in text  # the pinned setuptools builds the wheel
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()

    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canon(req.name)] = spec.version
    base = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", text)
    assert base is not None
    marker_env = {"python_version": base[1], "python_full_version": f"{base[1]}.0", "sys_platform": "linux",
                  "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "platform_machine": "x86_64", "extra": ""}  # fmt: skip

    def requirements(dist: str) -> list[Requirement]:
        reqs = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
        return [r for r in reqs if r.marker is None or Marker(str(r.marker)).evaluate(marker_env)]

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    todo = [Requirement(r) for r in build] + requirements("keyroute")
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canon(req.name)
        assert name in pins, f"{req.name} (needed in the image) is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {req}"
        if name not in seen and name != "setuptools":
            seen.add(name)
            todo.extend(requirements(req.name))
    assert set(pins) == seen | {"setuptools"}, f"pinned but not needed: {set(pins) - seen - {'setuptools'}}"


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the speed figures README quotes ------------------------------------------------------


def test_readme_speed_figures_are_the_latest_data_plane_run() -> None:
    """Every figure in README's comparison with nginx is in the newest
    data-plane run recorded in bench/RESULTS.md (not invented, not stale)."""
    results = "\n" + (ROOT / "bench" / "RESULTS.md").read_text()
    plane = results.split("\n## Data plane", 1)[1].split("\n## ", 1)[0]
    runs = re.split(r"\n### ", plane)
    latest = runs[-1]
    readme = README.read_text()
    section = readme.split("\n## keyroute or nginx", 1)[1].split("\n## ", 1)[0]
    commit = re.search(r"re-run at\s+([0-9a-f]{7,})", section)
    assert commit is not None and latest.startswith(f"Re-run at {commit[1]}"), (commit, latest[:80])
    # Measured figures: decimals and thousands (not versions such as HTTP/1.1).
    figures = re.findall(r"(?<![/\w.,])(?:\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+)", section)
    assert len(figures) >= 10, figures
    missing = [f for f in figures if f not in latest]
    assert not missing, f"README figures not in bench/RESULTS.md's latest data-plane run: {missing}"
