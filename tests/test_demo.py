"""`keyroute demo` as a user meets it: its pods are processes with printed
PIDs (kill one, its keys fail over), they take bodies of any size, the
commands it prints run as printed from a shell whose PATH lacks the venv, and
it leaves no temp folder or pod behind when stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from .conftest import free_port, wait_for

POD_LINE = re.compile(r"(pod-\w)=(http://127\.0\.0\.1:\d+) \(pid (\d+)\)")


class Demo:
    """A running ``keyroute demo`` process and what it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, err: Path) -> None:
        self.proc = proc
        self.port = port
        self.err = err
        self.text = ""

    async def read_until(self, marker: str | re.Pattern[str]) -> str:
        """Read stdout lines until one contains ``marker``; return all read so far."""
        assert self.proc.stdout is not None
        while not (marker in self.text if isinstance(marker, str) else marker.search(self.text)):
            line = await asyncio.to_thread(self.proc.stdout.readline)
            assert line, f"demo exited before printing {marker!r}:\n{self.text}\n{self.err.read_text()}"
            self.text += line.decode()
        return self.text

    def pods(self) -> dict[str, tuple[str, int]]:
        """pod id -> (url, pid), from the demo's first line."""
        first = self.text.splitlines()[0]
        return {m[1]: (m[2], int(m[3])) for m in POD_LINE.finditer(first)}

    def commands(self) -> list[str]:
        """The command lines the demo printed for the user to copy."""
        return [line[2:] for line in self.text.splitlines() if line.startswith("  ")]

    async def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.to_thread(self.proc.wait, 20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.asynccontextmanager
async def running_demo(
    tmp: Path, argv: list[str] | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[Demo]:
    """Start the demo with its temp folder under ``tmp`` (TMPDIR) and the proxy
    on a free port (KEYROUTE_PROXY_LISTEN, which the demo reads like ``run``);
    wait until it has printed its instructions; stop it with SIGINT at the end."""
    tmp.mkdir(exist_ok=True)
    port = free_port()
    full_env = dict(os.environ if env is None else env)
    full_env.update(TMPDIR=str(tmp), KEYROUTE_PROXY_LISTEN=f"127.0.0.1:{port}", KEYROUTE_ADMIN_LISTEN="127.0.0.1:0")
    err = tmp.parent / f"{tmp.name}.stderr"
    with err.open("wb") as err_fh:
        proc = subprocess.Popen(
            argv or [sys.executable, "-m", "proxy", "demo"],
            stdout=subprocess.PIPE,
            stderr=err_fh,
            env=full_env,
            cwd=cwd,
        )
    demo = Demo(proc, port, err)
    try:
        await demo.read_until("Ctrl-C")
        yield demo
    finally:
        await demo.stop()
        if proc.stdout is not None:
            proc.stdout.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def get(session: aiohttp.ClientSession, port: int, key: str, data: io.BytesIO | None = None) -> tuple[int, str]:
    method = "GET" if data is None else "POST"
    url = f"http://127.0.0.1:{port}/hello"
    async with session.request(method, url, headers={"X-Routing-Key": key}, data=data) as r:
        return r.status, await r.text()


async def test_demo_pods_are_processes_a_user_can_kill(tmp_path: Path) -> None:
    async with running_demo(tmp_path / "tmp") as demo, aiohttp.ClientSession() as session:
        pods = demo.pods()
        assert sorted(pods) == ["pod-a", "pod-b", "pod-c"], demo.text
        for _url, pid in pods.values():
            assert pid != demo.proc.pid
            # A child of the demo, running our pod.
            stat = Path(f"/proc/{pid}/stat").read_text()
            assert int(stat.rsplit(")", 1)[1].split()[1]) == demo.proc.pid
            assert "proxy.demo" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()

        status, body = await get(session, demo.port, "user-1")
        assert status == 200 and " role=owner " in body, body
        owner = body.split()[0]
        kill = next(c for c in demo.commands() if c.startswith("kill "))
        assert kill == f"kill {pods[owner][1]}"

        os.kill(pods[owner][1], signal.SIGTERM)
        await demo.read_until(f"{owner} (pid {pods[owner][1]}) exited")
        status, body = await get(session, demo.port, "user-1")
        assert status == 200, body
        assert body.split()[0] != owner and " role=backup " in body, body


async def test_demo_pods_take_a_body_above_one_mib(tmp_path: Path) -> None:
    async with running_demo(tmp_path / "tmp") as demo, aiohttp.ClientSession() as session:
        status, body = await get(session, demo.port, "user-1", data=io.BytesIO(b"x" * 5_000_000))
        assert status == 200, body
        assert " body=5000000B" in body, body


async def test_printed_commands_run_without_the_venv_on_path(tmp_path: Path) -> None:
    # README's install step leaves keyroute in .venv/bin, which the terminal
    # the user copies the demo's lines into need not have on its PATH.
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PATH")}
    bare["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    async with running_demo(tmp_path / "tmp") as demo, aiohttp.ClientSession() as session:
        cmds = demo.commands()
        gen = next(c for c in cmds if " gen --from " in c)
        lookup = next(c for c in cmds if " lookup " in c)
        owner = gen.split(" --drain ")[1].split()[0]
        r = await asyncio.to_thread(subprocess.run, ["sh", "-c", lookup], capture_output=True, text=True, env=bare)
        assert r.returncode == 0 and f"owner={owner}" in r.stdout, r.stdout + r.stderr
        r = await asyncio.to_thread(subprocess.run, ["sh", "-c", gen], capture_output=True, text=True, env=bare)
        assert r.returncode == 0 and "moved:" in r.stdout, r.stdout + r.stderr

        async def moved() -> bool:
            status, body = await get(session, demo.port, "user-1")
            return status == 200 and body.split()[0] != owner

        await wait_for(moved, 10, "user-1 to move off the drained pod")
        curl = next(c for c in cmds if c.startswith("curl -s http"))
        r = await asyncio.to_thread(subprocess.run, ["sh", "-c", curl], capture_output=True, text=True, env=bare)
        assert r.returncode == 0 and '"missing_key"' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_demo_removes_its_folder_and_stops_its_pods(tmp_path: Path, sig: int) -> None:
    tmp = tmp_path / "tmp"
    async with running_demo(tmp) as demo:
        folder = re.search(r"table: (\S+)/assignment\.json", demo.text)
        assert folder is not None and Path(folder[1]).parent == tmp
        assert Path(folder[1]).is_dir()
        pids = [pid for _url, pid in demo.pods().values()]
        assert len(pids) == 3
        assert await demo.stop(sig) == 0, demo.err.read_text()
    assert list(tmp.iterdir()) == []
    assert all(gone(pid) for pid in pids)
