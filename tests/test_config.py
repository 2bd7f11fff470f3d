"""Settings: defaults, TOML, environment and flag layers, errors naming the key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.config import ConfigError, Settings, load

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "keyroute.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keyroute.toml"
    path.write_text(text)
    return str(path)


def error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load(*args, **kwargs)
    return str(exc.value)


def test_defaults() -> None:
    s = load(None, env={})
    assert s == Settings()
    assert s.proxy.listen == "127.0.0.1:8080" and s.listen_address == ("127.0.0.1", 8080)
    assert s.admin.listen == "127.0.0.1:9901" and s.admin_address == ("127.0.0.1", 9901)
    assert s.proxy.workers == 1 and s.worker_count == 1
    assert s.proxy.key_header == "X-Routing-Key"
    assert s.proxy.missing_key == "reject"
    assert s.proxy.response_headers is True
    assert s.assignment.source == "file:config/assignment.json"
    assert s.assignment.watch == "auto"
    assert s.assignment.poll_interval == 1.0
    assert s.admin.token == ""
    u = s.upstream
    assert (u.connect_timeout, u.response_timeout, u.idle_timeout) == (2.0, 60.0, 4.0)
    assert (u.retries, u.failover) == (2, "backups")


def test_settings_are_frozen() -> None:
    s = load(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.proxy.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_example_file_documents_the_defaults() -> None:
    assert load(str(EXAMPLE), env={}) == Settings()
    # ... and every setting, so it can serve as the reference.
    doc = tomllib.loads(EXAMPLE.read_text())
    for name, cls in config._SECTIONS.items():
        assert set(doc[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert set(doc) == set(config._SECTIONS)


def test_toml_layer(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[proxy]
listen = "0.0.0.0:9000"
workers = "auto"
missing_key = "pod:pod-a"
response_headers = false

[assignment]
source = "https://tables.internal/keyroute"
watch = "poll"
poll_interval = "250ms"

[upstream]
connect_timeout = "1m"
response_timeout = 1.5
retries = 0
failover = "none"
""",
    )
    s = load(path, env={})
    assert s.listen_address == ("0.0.0.0", 9000)
    assert s.proxy.workers == "auto" and s.worker_count == (os.cpu_count() or 1)
    assert s.proxy.missing_key == "pod:pod-a"
    assert s.proxy.response_headers is False
    assert s.assignment.source == "https://tables.internal/keyroute"
    assert (s.assignment.watch, s.assignment.poll_interval) == ("poll", 0.25)
    assert (s.upstream.connect_timeout, s.upstream.response_timeout) == (60.0, 1.5)
    assert (s.upstream.retries, s.upstream.failover) == (0, "none")
    # Untouched keys keep their defaults.
    assert s.admin == Settings().admin
    assert s.proxy.key_header == "X-Routing-Key"


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlisten = "0.0.0.0:9000"\nworkers = 3\n[upstream]\nretries = 5\n')
    env = {
        "KEYROUTE_PROXY_LISTEN": "127.0.0.1:7000",
        "KEYROUTE_PROXY_RESPONSE_HEADERS": "off",
        "KEYROUTE_UPSTREAM_CONNECT_TIMEOUT": "500ms",
        "KEYROUTE_UPSTREAM_RETRIES": "1",
        "KEYROUTE_ADMIN_TOKEN": "s3cret",
        "HOME": "/root",  # other variables are not ours
    }
    s = load(path, env=env)
    assert s.proxy.listen == "127.0.0.1:7000"
    assert s.proxy.workers == 3  # from TOML, not overridden
    assert s.proxy.response_headers is False
    assert s.upstream.connect_timeout == 0.5
    assert s.upstream.retries == 1
    assert s.admin.token == "s3cret"


@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("Yes", True), ("on", True), ("0", False)])
def test_env_booleans(text: str, value: bool) -> None:
    assert load(None, env={"KEYROUTE_PROXY_RESPONSE_HEADERS": text}).proxy.response_headers is value


def test_env_workers() -> None:
    assert load(None, env={"KEYROUTE_PROXY_WORKERS": "auto"}).proxy.workers == "auto"
    assert load(None, env={"KEYROUTE_PROXY_WORKERS": " 4 "}).proxy.workers == 4


def test_flags_override_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlisten = "0.0.0.0:9000"\n[admin]\nlisten = "127.0.0.1:1"\n')
    env = {"KEYROUTE_PROXY_LISTEN": "127.0.0.1:7000", "KEYROUTE_ASSIGNMENT_SOURCE": "file:/env.json"}
    overrides = {"proxy.listen": "127.0.0.1:6000", "proxy.workers": "2", "admin.listen": None}
    s = load(path, env=env, overrides=overrides)
    assert s.proxy.listen == "127.0.0.1:6000"
    assert s.proxy.workers == 2
    assert s.admin.listen == "127.0.0.1:1"  # None: flag not given
    assert s.assignment.source == "file:/env.json"


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[admin]\ntoken = "t"\n')
    assert load(None, env={"KEYROUTE_CONFIG": path}).admin.token == "t"


def test_unknown_section_and_key(tmp_path: Path) -> None:
    assert error(write(tmp_path, "[proxyy]\nlisten = 1\n"), env={}).startswith("proxyy: unknown section")
    assert error(write(tmp_path, '[proxy]\nlisten_on = "x"\n'), env={}).startswith("proxy.listen_on: unknown key")
    assert error(write(tmp_path, "proxy = 5\n"), env={}).startswith("proxy:")
    assert error(None, env={}, overrides={"proxy.bogus": "1"}).startswith("proxy.bogus: unknown key")


def test_unknown_env_vars() -> None:
    # Not one of our sections: someone else's variable, skipped.
    assert load(None, env={"KEYROUTE_PROXYY_LISTEN": "127.0.0.1:1", "KEYROUTE_HOME": "/x"}) == Settings()
    # An unknown key in one of our sections is still an error.
    msg = error(None, env={"KEYROUTE_UPSTREAM_RETRY": "1"})
    assert msg.startswith("upstream.retry: unknown key in the environment")


# What Kubernetes injects for Services named keyroute, keyroute-proxy, keyroute-admin.
SERVICE_LINKS = {
    f"{name}_{suffix}": "10.0.0.1"
    for name in ("KEYROUTE", "KEYROUTE_PROXY", "KEYROUTE_ADMIN", "KEYROUTE_UPSTREAM")
    for suffix in (
        "SERVICE_HOST",
        "SERVICE_PORT",
        "SERVICE_PORT_HTTP",
        "PORT",
        "PORT_80_TCP",
        "PORT_80_TCP_PROTO",
        "PORT_80_TCP_PORT",
        "PORT_80_TCP_ADDR",
        "PORT_9901_UDP",
    )
}


def test_kubernetes_service_links_are_ignored() -> None:
    s = load(None, env={**SERVICE_LINKS, "KEYROUTE_PROXY_LISTEN": "127.0.0.1:7000"})
    assert s.proxy.listen == "127.0.0.1:7000"
    assert s.upstream == Settings().upstream


def test_workers_auto_follows_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    from proxy.config import available_cpus

    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert available_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(str(tmp_path)) == min(2, affinity)
    one = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-c",
            "from proxy.config import load; print(load(None, env={}, "
            "overrides={'proxy.workers': 'auto'}).worker_count)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert one.stdout.strip() == "1"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    assert "not found" in error(str(tmp_path / "nope.toml"), env={})
    assert "not valid TOML" in error(write(tmp_path, "[proxy\n"), env={})


BAD_TOML = [
    ("proxy.listen", 'listen = "8080"'),
    ("proxy.listen", 'listen = "host:"'),
    ("proxy.listen", 'listen = ":80"'),
    ("proxy.listen", 'listen = "host:99999"'),
    ("proxy.listen", 'listen = "host:²"'),
    ("proxy.listen", 'listen = "host:' + "1" * 5000 + '"'),
    ("proxy.listen", "listen = 8080"),
    ("proxy.workers", "workers = 0"),
    ("proxy.workers", "workers = -2"),
    ("proxy.workers", 'workers = "many"'),
    ("proxy.workers", 'workers = "2"'),
    ("proxy.workers", "workers = true"),
    ("proxy.missing_key", 'missing_key = "drop"'),
    ("proxy.missing_key", 'missing_key = "pod:"'),
    ("proxy.missing_key", 'missing_key = ""'),
    ("proxy.missing_key", "missing_key = 1"),
    ("proxy.response_headers", 'response_headers = "yes"'),
    ("proxy.key_header", 'key_header = "X Routing Key"'),
    ("proxy.key_header", 'key_header = ""'),
    ("proxy.via", 'via = "key route"'),
    ("proxy.max_header_bytes", "max_header_bytes = 100"),
    ("proxy.max_body_bytes", "max_body_bytes = -1"),
    ("proxy.header_timeout", 'header_timeout = "10"'),
    ("proxy.header_timeout", 'header_timeout = "10 sec"'),
    ("proxy.header_timeout", 'header_timeout = "1d"'),
    ("proxy.header_timeout", 'header_timeout = "-1s"'),
    ("proxy.header_timeout", "header_timeout = -1"),
    ("proxy.header_timeout", "header_timeout = nan"),
    ("proxy.header_timeout", "header_timeout = inf"),
    ("proxy.header_timeout", "header_timeout = true"),
    ("proxy.header_timeout", "header_timeout = []"),
]


@pytest.mark.parametrize(("key", "line"), BAD_TOML)
def test_bad_proxy_values_name_the_key(tmp_path: Path, key: str, line: str) -> None:
    msg = error(write(tmp_path, f"[proxy]\n{line}\n"), env={})
    assert msg.startswith(f"{key}:"), msg


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("assignment.watch", '[assignment]\nwatch = "inotify"'),
        ("assignment.source", '[assignment]\nsource = "config/assignment.json"'),
        ("assignment.source", '[assignment]\nsource = "file:"'),
        ("assignment.source", '[assignment]\nsource = "ftp://x/t.json"'),
        ("assignment.poll_interval", '[assignment]\npoll_interval = "soon"'),
        ("admin.listen", '[admin]\nlisten = "localhost"'),
        ("admin.token", "[admin]\ntoken = 5"),
        ("upstream.failover", '[upstream]\nfailover = "all"'),
        ("upstream.connect_timeout", '[upstream]\nconnect_timeout = "0s"'),
        ("upstream.response_timeout", "[upstream]\nresponse_timeout = 0"),
        ("upstream.idle_timeout", '[upstream]\nidle_timeout = "1 minute"'),
        ("upstream.retries", "[upstream]\nretries = -1"),
        ("upstream.retries", '[upstream]\nretries = "2"'),
        ("upstream.retries", "[upstream]\nretries = 1.5"),
        ("upstream.retries", "[upstream]\nretries = 9223372036854775808"),
        ("upstream.max_idle_per_pod", "[upstream]\nmax_idle_per_pod = 9223372036854775808"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, text: str) -> None:
    msg = error(write(tmp_path, text + "\n"), env={})
    assert msg.startswith(f"{key}:"), msg


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("KEYROUTE_PROXY_LISTEN", "nowhere", "proxy.listen"),
        ("KEYROUTE_PROXY_WORKERS", "0", "proxy.workers"),
        ("KEYROUTE_PROXY_WORKERS", "²", "proxy.workers"),
        ("KEYROUTE_PROXY_WORKERS", "9" * 5000, "proxy.workers"),
        ("KEYROUTE_PROXY_RESPONSE_HEADERS", "maybe", "proxy.response_headers"),
        ("KEYROUTE_PROXY_MISSING_KEY", "drop", "proxy.missing_key"),
        ("KEYROUTE_UPSTREAM_RETRIES", "two", "upstream.retries"),
        ("KEYROUTE_UPSTREAM_RETRIES", "-1", "upstream.retries"),
        ("KEYROUTE_UPSTREAM_CONNECT_TIMEOUT", "5", "upstream.connect_timeout"),
        ("KEYROUTE_UPSTREAM_FAILOVER", "random", "upstream.failover"),
        ("KEYROUTE_ASSIGNMENT_WATCH", "inotify", "assignment.watch"),
    ],
)
def test_bad_env_values_name_the_key(var: str, value: str, key: str) -> None:
    msg = error(None, env={var: value})
    assert msg.startswith(f"{key}:"), msg


def test_bad_flag_values_name_the_key() -> None:
    assert error(None, env={}, overrides={"proxy.listen": "8080"}).startswith("proxy.listen:")
    assert error(None, env={}, overrides={"proxy.workers": "none"}).startswith("proxy.workers:")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), (" 3s ", 3.0), (0, 0.0), (2.5, 2.5)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert config.parse_duration(text, "k") == seconds


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:8080", ("::1", 8080)), ("localhost:80", ("localhost", 80))],
)
def test_addresses(text: str, address: tuple[str, int]) -> None:
    assert config.parse_address(text, "k") == address
