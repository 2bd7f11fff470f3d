"""Settings: one frozen object, defaults in one place.

Layers, each overriding the previous: built-in defaults, a TOML file,
``KEYROUTE_<SECTION>_<KEY>`` environment variables, command-line flags.
Unknown keys and bad values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "KEYROUTE_"
# Environment variables with this prefix that are not settings.
ENV_NON_SETTINGS = frozenset({"KEYROUTE_CONFIG"})


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names it."""


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str) -> float:
    """``"250ms"``, ``"2s"``, ``"1m"``, ``"1h"`` (or a number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a duration like "250ms" or "2s", got {value!r}')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f'{key}: expected a duration like "250ms" or "2s", got {value!r}')
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{key}: duration must be finite and not negative, got {value!r}")
    return seconds


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses,
    and int() refuses more than 4300 digits."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def parse_address(value: Any, key: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port). Port 0 picks a free port."""
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "host:port", got {value!r}')
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _is_number(port) or int(port) > 65535:
        raise ConfigError(f'{key}: expected "host:port" (like "127.0.0.1:8080"), got {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _dur(default: str) -> Any:
    return field(default=parse_duration(default, "default"), metadata={"kind": "duration", "text": default})


def _addr(default: str) -> Any:
    return field(default=default, metadata={"kind": "address"})


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: str = _addr("127.0.0.1:8080")
    workers: int | str = 1  # or "auto": one per core
    key_header: str = "X-Routing-Key"
    missing_key: str = "reject"  # reject | random | pod:<id>
    allow_empty_key: bool = False  # route an empty key header as the key ""; else it counts as missing
    get_body: str = "reject"  # reject | forward: GET and HEAD requests with a body
    response_headers: bool = True
    header_timeout: float = _dur("10s")  # whole request head
    body_timeout: float = _dur("30s")  # idle time between body reads
    idle_timeout: float = _dur("60s")  # client keep-alive
    send_timeout: float = _dur("60s")  # a client that reads nothing of its response for this long is closed
    max_header_bytes: int = 65536  # request line + headers; 431 above
    max_body_bytes: int = 0  # 0: no limit; 413 above
    shutdown_timeout: float = _dur("30s")
    access_log: bool = False  # one JSON log line per request
    access_log_keys: bool = False  # include the routing key in access log lines (keys can be personal data)
    via: str = "keyroute"  # our token in Via; loop detection looks for it


@dataclass(frozen=True, slots=True)
class AssignmentSettings:
    source: str = "file:config/assignment.json"
    watch: str = "auto"  # auto | poll
    poll_interval: float = _dur("1s")
    authorization: str = ""  # Authorization header for http(s) sources, e.g. "Bearer ..."


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: str = _addr("127.0.0.1:9901")
    token: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = _dur("2s")
    response_timeout: float = _dur("60s")
    # Below the 5 s keep-alive of uvicorn, Node and most pod servers, so the
    # proxy closes an idle connection before the pod does (a request sent as
    # the pod closes would fail).
    idle_timeout: float = _dur("4s")
    retries: int = 2
    failover: str = "backups"  # backups | any | none
    max_idle_per_pod: int = 256
    eject_after: int = 3  # consecutive failures that eject a pod
    eject_base: float = _dur("1s")  # first ejection; doubles on repeat
    eject_max: float = _dur("30s")
    max_ejected_percent: int = 50  # beyond this, route as if all were healthy (panic)
    fail_statuses: str = "502,503,504"  # pod statuses that count as failures (and may be retried)
    health_path: str = ""  # active checks: GET this path on every pod; empty: off
    health_interval: float = _dur("5s")
    healthy_after: int = 2  # good probes that bring an ejected pod back

    @property
    def fail_status_set(self) -> frozenset[int]:
        return frozenset(int(x) for x in self.fail_statuses.replace(" ", "").split(",") if x)


@dataclass(frozen=True, slots=True)
class Settings:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    assignment: AssignmentSettings = field(default_factory=AssignmentSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)

    # Derived values, computed once.
    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.proxy.listen, "proxy.listen")

    @property
    def admin_address(self) -> tuple[str, int]:
        return parse_address(self.admin.listen, "admin.listen")

    @property
    def worker_count(self) -> int:
        w = self.proxy.workers
        return available_cpus() if w == "auto" else int(w)


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2
    CPU quota (``cpu.max``), so a container limited to one CPU gets one
    worker whatever the host has."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota(root: str) -> float | None:
    """CPUs allowed by ``cpu.max`` in this process's cgroup (or the root of the
    cgroup namespace, as seen in a container); None without a quota."""
    paths = []
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    paths.append(os.path.join(root, line[3:].strip().lstrip("/"), "cpu.max"))
    except OSError:
        pass
    paths.append(os.path.join(root, "cpu.max"))
    for path in paths:
        try:
            with open(path) as fh:
                quota, _, period = fh.read().strip().partition(" ")
        except OSError:
            continue
        if quota == "max":
            return None
        try:
            return int(quota) / int(period or "100000")
        except ValueError:
            return None
    return None


_SECTIONS: dict[str, type[Any]] = {
    "proxy": ProxySettings,
    "assignment": AssignmentSettings,
    "admin": AdminSettings,
    "upstream": UpstreamSettings,
}

# Flag name -> dotted key.
FLAG_KEYS = {
    "listen": "proxy.listen",
    "admin": "admin.listen",
    "assignment": "assignment.source",
    "workers": "proxy.workers",
}


def _coerce(section: str, f: dataclasses.Field[Any], value: Any, from_text: bool) -> Any:
    key = f"{section}.{f.name}"
    kind = f.metadata.get("kind")
    if kind == "duration":
        return parse_duration(value, key)
    if kind == "address":
        parse_address(value, key)
        return value
    default = f.default
    if isinstance(default, bool):
        if (
            from_text
            and isinstance(value, str)
            and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off")
        ):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and f.name != "workers":
        if from_text and isinstance(value, str) and _is_number(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
        return value
    if f.name == "workers":
        if value == "auto":
            return value
        if from_text and isinstance(value, str) and _is_number(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'{key}: expected a positive integer or "auto", got {value!r}')
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _check(s: Settings) -> None:
    """Cross-field checks, once at load."""
    p = s.proxy
    if p.missing_key not in ("reject", "random") and not (p.missing_key.startswith("pod:") and len(p.missing_key) > 4):
        raise ConfigError(f'proxy.missing_key: expected reject, random or "pod:<id>", got {p.missing_key!r}')
    if p.get_body not in ("reject", "forward"):
        raise ConfigError(f"proxy.get_body: expected reject or forward, got {p.get_body!r}")
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", p.key_header):
        raise ConfigError(f"proxy.key_header: {p.key_header!r} is not a valid header name")
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", p.via):
        raise ConfigError(f"proxy.via: {p.via!r} must be a single token")
    if p.max_header_bytes < 1024:
        raise ConfigError(f"proxy.max_header_bytes: {p.max_header_bytes} is below the minimum 1024")
    if s.assignment.watch not in ("auto", "poll"):
        raise ConfigError(f"assignment.watch: expected auto or poll, got {s.assignment.watch!r}")
    src = s.assignment.source
    if not (src.startswith("file:") and len(src) > 5) and not src.startswith(("http://", "https://")):
        raise ConfigError(f'assignment.source: expected "file:PATH" or an http(s):// URL, got {src!r}')
    u = s.upstream
    if not re.fullmatch(r"(\s*[1-5]\d\d\s*(,\s*[1-5]\d\d\s*)*)?", u.fail_statuses):
        raise ConfigError(
            f'upstream.fail_statuses: expected a comma list of statuses like "502,503", got {u.fail_statuses!r}'
        )
    # Counts the data plane keeps as machine integers.
    for key, value, top in (
        ("upstream.retries", u.retries, 100),
        ("upstream.max_idle_per_pod", u.max_idle_per_pod, 1 << 20),
    ):
        if value > top:
            raise ConfigError(f"{key}: {value} is above the maximum {top}")
    if u.max_ejected_percent > 100:
        raise ConfigError(f"upstream.max_ejected_percent: expected 0 to 100, got {u.max_ejected_percent}")
    if u.eject_after < 1:
        raise ConfigError("upstream.eject_after: must be at least 1")
    if u.health_path and not u.health_path.startswith("/"):
        raise ConfigError(f"upstream.health_path: expected a path starting with /, got {u.health_path!r}")
    if u.health_path and u.health_interval <= 0:
        raise ConfigError("upstream.health_interval: must be above zero when health_path is set")
    if s.upstream.failover not in ("backups", "any", "none"):
        raise ConfigError(f"upstream.failover: expected backups, any or none, got {s.upstream.failover!r}")
    for key, v in (
        ("upstream.connect_timeout", s.upstream.connect_timeout),
        ("upstream.response_timeout", s.upstream.response_timeout),
    ):
        if v <= 0:
            raise ConfigError(f"{key}: must be above zero")


def _apply(base: Settings, layer: Mapping[str, Mapping[str, Any]], from_text: bool, origin: str) -> Settings:
    sections = {}
    for name, cls in _SECTIONS.items():
        values = layer.get(name)
        current = getattr(base, name)
        if not values:
            sections[name] = current
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes = {}
        for k, v in values.items():
            if k not in fields:
                raise ConfigError(f"{name}.{k}: unknown key in {origin} (known: {', '.join(fields)})")
            changes[k] = _coerce(name, fields[k], v, from_text)
        sections[name] = dataclasses.replace(current, **changes)
    return Settings(**sections)


def _from_toml(doc: Mapping[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, values in doc.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section in {origin} (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a [{name}] table in {origin}")
        layer[name] = values
    return layer


# What Kubernetes injects for a Service (enableServiceLinks): NAME_SERVICE_HOST,
# NAME_SERVICE_PORT[_PORTNAME], NAME_PORT, NAME_PORT_80_TCP[_PROTO|_PORT|_ADDR].
_SERVICE_LINK = re.compile(
    r"KEYROUTE(?:_[A-Z0-9_]+)?_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)"
)


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``KEYROUTE_<SECTION>_<KEY>`` variables. Variables whose section is not
    ours, and Kubernetes service links, are someone else's and are skipped;
    an unknown key in one of our sections is an error."""
    layer: dict[str, dict[str, Any]] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in ENV_NON_SETTINGS:
            continue
        if _SERVICE_LINK.fullmatch(var):
            continue  # Kubernetes' variables for a Service named keyroute or keyroute-*
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # not one of our sections: someone else's variable
        layer.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return layer


def load(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from defaults, the TOML file at ``path``, the environment
    and ``overrides`` (dotted keys like ``"proxy.listen"``, from flags)."""
    env = os.environ if env is None else env
    settings = Settings()
    if path is None:
        path = env.get("KEYROUTE_CONFIG") or None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except OSError as exc:
            raise ConfigError(f"config file {path!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r}: not valid TOML: {exc}") from None
        settings = _apply(settings, _from_toml(doc, path), False, path)
    settings = _apply(settings, _from_env(env), True, "the environment")
    if overrides:
        layer: dict[str, dict[str, Any]] = {}
        for dotted, v in overrides.items():
            if v is None:
                continue
            section, _, key = dotted.partition(".")
            layer.setdefault(section, {})[key] = v
        settings = _apply(settings, layer, True, "the command line")
    _check(settings)
    return settings
