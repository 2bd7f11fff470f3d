"""``keyroute gen``: README's and deploy/kubernetes/table.yaml's commands run
as written, as real processes in a temp dir; ``--from`` adds and updates pods,
removes only with ``--remove``, drains and undrains, reports every change and
refuses to move more than half of the key space without ``--force``; the
tables it writes fit a ConfigMap.

The Kubernetes commands run against a stand-in ``kubectl`` on PATH (the API
server is outside this process boundary): it keeps ConfigMaps in a JSON file,
answers ``get -o jsonpath``, ``create --dry-run=client -o yaml``, ``replace``
and client-side ``apply`` with the API's size limits (1 MiB of data; 256 KiB
of annotations, which client-side apply fills with the whole object)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy import assignment as core

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE_YAML = ROOT / "deploy" / "kubernetes" / "table.yaml"
VENV_BIN = Path(sys.executable).parent
DNS = "http://app-{}.app.default.svc.cluster.local:8080"
BUDGET = 64 * 1024

FAKE_KUBECTL = """
import json, os, sys
import yaml

STORE = os.environ["FAKE_KUBE_STORE"]
DATA_LIMIT = 1 << 20         # a ConfigMap's data
ANNOTATIONS_LIMIT = 256 << 10  # metadata.annotations, all together


def load():
    with open(STORE) as fh:
        return json.load(fh)


def save(maps):
    with open(STORE, "w") as fh:
        json.dump(maps, fh)


def store(obj, annotate):
    assert obj["kind"] == "ConfigMap", obj["kind"]
    data = obj.get("data") or {}
    if sum(len(k) + len(v.encode()) for k, v in data.items()) > DATA_LIMIT:
        sys.exit("The ConfigMap is invalid: data: Too long: must have at most 1048576 bytes")
    if annotate:
        note = json.dumps(obj)
        if len(note) > ANNOTATIONS_LIMIT:
            sys.exit("The ConfigMap is invalid: metadata.annotations: Too long: must have at most 262144 bytes")
    maps = load()
    maps[obj["metadata"]["name"]] = data
    save(maps)


args = sys.argv[1:]
if args[:1] == ["scale"]:
    print(f"{args[1]} scaled")
elif args[:2] == ["get", "configmap"] and args[3] == "-o" and args[4].startswith("jsonpath={.data."):
    key = args[4][len("jsonpath={.data."):-1].replace("\\\\.", ".")
    sys.stdout.write(load()[args[2]][key])
elif args[:2] == ["create", "configmap"] and "--dry-run=client" in args and args[-2:] == ["-o", "yaml"]:
    data = {}
    for a in args:
        if a.startswith("--from-file="):
            key, _, path = a[len("--from-file="):].partition("=")
            data[key] = open(path).read()
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": args[2]}, "data": data}
    sys.stdout.write(yaml.safe_dump(obj))
elif args == ["replace", "-f", "-"]:
    store(yaml.safe_load(sys.stdin), annotate=False)
    print("configmap replaced")
elif args == ["apply", "-f", "-"]:
    store(yaml.safe_load(sys.stdin), annotate=True)
    print("configmap configured")
elif args[:3] == ["apply", "--server-side", "--force-conflicts"] and args[3:] == ["-f", "-"]:
    store(yaml.safe_load(sys.stdin), annotate=False)
    print("configmap serverside-applied")
else:
    sys.exit(f"fake kubectl: unsupported: {args}")
"""


# -- running commands as written ------------------------------------------------------------


def commands(lines: list[str]) -> list[str]:
    """Shell commands from lines: a trailing backslash continues a command."""
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append(text)
    return out


def readme_block(containing: str) -> list[str]:
    """The commands of README's ```sh block that contains ``containing``."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README: {len(found)} sh blocks contain {containing!r}"
    return commands(found[0].splitlines())


def table_yaml_commands() -> list[str]:
    """The commands in table.yaml's header comment (indented under '#')."""
    lines = [line[1:].strip() for line in TABLE_YAML.read_text().splitlines() if line.startswith("#   ")]
    return commands(lines)


class Shell:
    """A temp dir where commands run as written: PATH has the venv first (as
    README's install leaves it) and the stand-in kubectl."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        bin_dir = tmp / ".bin"
        bin_dir.mkdir()
        kubectl = bin_dir / "kubectl"
        kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
        kubectl.chmod(0o755)
        self.store = tmp / ".kube-store.json"
        self.store.write_text("{}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROUTE_")}
        env["PATH"] = os.pathsep.join([str(VENV_BIN), str(bin_dir), env.get("PATH", "")])
        env["FAKE_KUBE_STORE"] = str(self.store)
        self.env = env

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", command], cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=60
        )

    def ok(self, command: str) -> subprocess.CompletedProcess[str]:
        r = self.run(command)
        assert r.returncode == 0, f"{command}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r

    def configmaps(self) -> dict[str, dict[str, str]]:
        maps: dict[str, dict[str, str]] = orjson.loads(self.store.read_bytes())
        return maps

    def put_configmap(self, manifest: dict[str, Any]) -> None:
        maps = self.configmaps()
        maps[manifest["metadata"]["name"]] = manifest["data"]
        self.store.write_bytes(orjson.dumps(maps))


def table_yaml_configmap() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(TABLE_YAML.read_text()) if d and d.get("kind") == "ConfigMap"]
    assert len(docs) == 1
    manifest: dict[str, Any] = docs[0]
    return manifest


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def check_gen(command: str, old: core.Assignment | None, new: core.Assignment, report: str) -> None:
    """What a ``gen`` command promises, whatever its flags: the pods it names
    and nothing else change, the report lists each change and the share that
    moved, no more than half moves, moved slices take the new generation."""
    argv = shlex.split(command, comments=True)
    given = {p.split("=", 1)[0]: p for p in flag_values(argv, "--pod")}
    removed = set(flag_values(argv, "--remove"))
    drained = set(flag_values(argv, "--drain"))
    undrained = set(flag_values(argv, "--undrain"))
    lines = report.splitlines()
    assert new.dumps() == new.dumps(compact=True), "gen writes the compact form"
    if old is None:
        assert set(new.pods) == set(given)
        return
    assert set(new.pods) == (set(old.pods) | set(given)) - removed
    for pid, pod in new.pods.items():
        if pid not in given and pid not in drained | undrained:
            assert pod == old.pods[pid], f"{pid} changed without being named"
    changes = sorted(line for line in lines if re.match(r"(added|removed|drained|undrained|changed): ", line))
    expected = sorted(
        [f"added: {p} ({new.pods[p].url})" for p in set(given) - set(old.pods)]
        + [f"removed: {p} ({old.pods[p].url})" for p in removed]
        + [f"drained: {p}" for p in drained if old.pods[p].active]
        + [f"undrained: {p}" for p in undrained if not old.pods[p].active]
        + [
            f"changed: {p} {what} {a} -> {b}"
            for p in set(given) & set(old.pods)
            for what, a, b in (
                ("url", old.pods[p].url, new.pods[p].url),
                ("weight", f"{old.pods[p].weight:g}", f"{new.pods[p].weight:g}"),
            )
            if a != b
        ]
    )
    assert changes == expected, report
    moved = core.moved_share(old, new)
    assert f"moved: {moved * 100:.2f}% of the key space" in lines, report
    assert moved <= 0.5
    for a, b in zip(old.routes, new.routes, strict=True):
        assert b.epoch == (a.epoch if a.pod_id == b.pod_id else new.generation)
        if new.pods.get(a.pod_id, None) is not None and new.pods[a.pod_id].active and "--rebalance" not in argv:
            assert b.pod_id == a.pod_id, "a slice left an active owner without --rebalance"
    if "--rebalance" in argv:
        active = {p.id: p.weight for p in new.pods.values() if p.active}
        total = sum(active.values())
        shares = new.shares()
        for pid, w in active.items():
            assert abs(shares[pid] - w / total) <= 4 / new.slice_count, (pid, shares)


def run_gen(sh: Shell, command: str, table: Path) -> tuple[core.Assignment | None, core.Assignment, str]:
    old = core.parse(table.read_bytes()) if "--from" in command else None
    r = sh.ok(command)
    new = core.parse(table.read_bytes())
    check_gen(command, old, new, r.stdout + r.stderr)
    return old, new, r.stdout + r.stderr


# -- README and table.yaml as written -------------------------------------------------------


def test_readme_command_line_gen_commands_as_written(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    gens = [c for c in readme_block("keyroute check config/assignment.json") if c.startswith("keyroute gen ")]
    assert len(gens) >= 5
    seen: set[str] = set()
    for command in gens:
        argv = shlex.split(command, comments=True)
        seen.update(a for a in argv if a.startswith("--"))
        old, new, report = run_gen(sh, command, tmp_path / argv[argv.index("-o") + 1])
        if old is not None and set(new.pods) - set(old.pods):  # README's "add a pod"
            added = (set(new.pods) - set(old.pods)).pop()
            assert 0 < new.shares()[added] < 0.5, report
    # README shows each way of changing the pods.
    assert {"--from", "--pod", "--remove", "--drain", "--undrain", "--rebalance"} <= seen


def test_readme_kubernetes_add_a_pod_as_written(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    sh.put_configmap(table_yaml_configmap())
    before = core.parse(sh.configmaps()["keyroute-table"]["assignment.json"])
    block = readme_block("kubectl scale statefulset/app")
    assert any("kubectl replace -f -" in c or "kubectl apply --server-side" in c for c in block)
    for command in block:
        r = sh.ok(command)
        if command.startswith("keyroute gen "):
            check_gen(command, before, core.parse((tmp_path / "table.json").read_bytes()), r.stdout + r.stderr)
    after = core.parse(sh.configmaps()["keyroute-table"]["assignment.json"])
    assert set(after.pods) == {"app-0", "app-1", "app-2", "app-3"}
    shares = after.shares()
    assert all(abs(s - 0.25) <= 4 / after.slice_count for s in shares.values()), shares
    assert abs(core.moved_share(before, after) - 0.25) <= 4 / after.slice_count
    assert after.generation > before.generation


def test_table_yaml_commands_as_written(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    sh.put_configmap(table_yaml_configmap())
    before = core.parse(sh.configmaps()["keyroute-table"]["assignment.json"])
    block = table_yaml_commands()
    assert [c.split()[:2] for c in block] == [["kubectl", "get"], ["keyroute", "gen"], ["kubectl", "create"]]
    assert block[2].endswith("| kubectl replace -f -")
    # The same commands as README's, so one test of their effect covers both.
    readme = [c for c in readme_block("kubectl scale statefulset/app") if not c.startswith("kubectl scale")]
    assert [c.split() for c in block] == [c.split() for c in readme]
    for command in block:
        r = sh.ok(command)
        if command.startswith("keyroute gen "):
            check_gen(command, before, core.parse((tmp_path / "table.json").read_bytes()), r.stdout + r.stderr)
    after = core.parse(sh.configmaps()["keyroute-table"]["assignment.json"])
    assert "app-3" in after.pods and 0.2 < after.shares()["app-3"] < 0.3


def test_configmap_of_8_dns_pods_through_many_changes(tmp_path: Path) -> None:
    """4096 slices x 8 pods with full DNS names, through drains, undrains, an
    added and a removed pod: each table under 64 KiB and through ``kubectl
    replace``; the explicit form would not pass client-side apply."""
    sh = Shell(tmp_path)
    pods = " ".join(f"--pod app-{i}={DNS.format(i)}" for i in range(8))
    sh.ok(f"keyroute gen {pods} -o table.json")
    steps = [
        "--drain app-1",
        "--undrain app-1 --rebalance",
        f"--pod app-8={DNS.format(8)} --rebalance",
        "--drain app-2",
        "--remove app-8",
        "--undrain app-2 --rebalance",
        "--drain app-5 --drain app-6",
        "--undrain app-5 --undrain app-6 --rebalance",
    ]
    publish = (
        "kubectl create configmap keyroute-table --from-file=assignment.json=table.json "
        "--dry-run=client -o yaml | kubectl replace -f -"
    )
    for step in steps:
        command = f"keyroute gen --from table.json {step} -o table.json"
        run_gen(sh, command, tmp_path / "table.json")
        size = (tmp_path / "table.json").stat().st_size
        assert size <= BUDGET, (step, size)
        sh.ok(publish)
    table = core.parse(sh.configmaps()["keyroute-table"]["assignment.json"])
    assert len({r.epoch for r in table.routes}) >= 6  # epochs differ by slice
    sh.ok("keyroute check table.json")
    assert (
        orjson.loads(sh.ok("keyroute lookup table.json user-1 --json").stdout)["owner"]
        == table.lookup(b"user-1").pod_id
    )
    # The same table, one object per slice: client-side apply refuses it.
    sh.ok("keyroute gen --from table.json --explicit -o explicit.json")
    assert (tmp_path / "explicit.json").stat().st_size > 256 * 1024
    r = sh.run(
        "kubectl create configmap keyroute-table --from-file=assignment.json=explicit.json "
        "--dry-run=client -o yaml | kubectl apply -f -"
    )
    assert r.returncode != 0 and "metadata.annotations: Too long" in r.stderr


# -- --from: add, update, remove, drain, undrain, and the half-the-keys guard -----------------


def three(sh: Shell) -> core.Assignment:
    sh.ok(
        "keyroute gen --pod a=http://127.0.0.1:9001 --pod b=http://127.0.0.1:9002 --pod c=http://127.0.0.1:9003 "
        "--slices 512 --generation 10 -o t.json"
    )
    return core.parse((sh.dir / "t.json").read_bytes())


def test_pod_with_from_adds_or_updates_and_never_replaces(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    old = three(sh)
    # The README bug: one --pod with --from used to become the whole pod list.
    _, new, report = run_gen(
        sh, "keyroute gen --from t.json --pod d=http://127.0.0.1:9004 -o t.json", tmp_path / "t.json"
    )
    assert set(new.pods) == {"a", "b", "c", "d"} and "added: d (http://127.0.0.1:9004)" in report
    assert "moved: 0.00% of the key space" in report and new.owner_ids() == old.owner_ids()
    # Same id: updated in place (URL, weight), reported; no slice moves.
    _, new, report = run_gen(
        sh, "keyroute gen --from t.json --pod a=http://127.0.0.1:9101,weight=2 -o t.json", tmp_path / "t.json"
    )
    assert new.pods["a"].url == "http://127.0.0.1:9101" and new.pods["a"].weight == 2
    assert "changed: a url http://127.0.0.1:9001 -> http://127.0.0.1:9101" in report
    assert "changed: a weight 1 -> 2" in report and "moved: 0.00%" in report


def test_remove_drain_undrain(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    old = three(sh)
    _, drained, report = run_gen(sh, "keyroute gen --from t.json --drain b -o t.json", tmp_path / "t.json")
    assert drained.shares()["b"] == 0 and f"moved: {old.shares()['b'] * 100:.2f}%" in report
    _, back, report = run_gen(sh, "keyroute gen --from t.json --undrain b --rebalance -o t.json", tmp_path / "t.json")
    assert back.pods["b"].active and "undrained: b" in report and back.shares()["b"] > 0.3
    _, gone, report = run_gen(sh, "keyroute gen --from t.json --remove c -o t.json", tmp_path / "t.json")
    assert set(gone.pods) == {"a", "b"} and "removed: c (http://127.0.0.1:9003)" in report


def test_a_change_moving_more_than_half_is_refused_unless_forced(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    three(sh)
    before = (tmp_path / "t.json").read_bytes()
    r = sh.run("keyroute gen --from t.json --remove b --remove c -o t.json")
    assert r.returncode == 2, r.stderr
    assert "keyroute gen: this change would move 6" in r.stderr and "more than half" in r.stderr
    assert "removed: b (http://127.0.0.1:9002); removed: c (http://127.0.0.1:9003)" in r.stderr
    assert "--force" in r.stderr and (tmp_path / "t.json").read_bytes() == before
    r = sh.ok("keyroute gen --from t.json --remove b --remove c --force -o t.json")
    assert set(core.parse((tmp_path / "t.json").read_bytes()).pods) == {"a"}
    assert "removed: b" in r.stdout and "moved: 6" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--from t.json --remove z", "--remove 'z': no such pod (pods: a, b, c)"),
        ("--from t.json --undrain z", "--undrain 'z': no such pod"),
        ("--from t.json --remove a --pod a=http://127.0.0.1:1", "--remove 'a': also given with --pod"),
        ("--pod a=http://127.0.0.1:1 --remove a", "--remove 'a': needs --from OLD"),
        ("--pod a=http://127.0.0.1:1 --undrain a", "--undrain 'a': needs --from OLD"),
        ("--from t.json --drain a --drain b --drain c", "invalid table: pods: no active pod"),
    ],
)
def test_gen_from_usage_errors(tmp_path: Path, args: str, message: str) -> None:
    sh = Shell(tmp_path)
    three(sh)
    before = (tmp_path / "t.json").read_bytes()
    r = sh.run(f"keyroute gen {args} -o t.json")
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert (tmp_path / "t.json").read_bytes() == before


def test_gen_writes_compact_unless_explicit(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    t = three(sh)
    doc = orjson.loads((tmp_path / "t.json").read_bytes())
    assert "owners" in doc and "slices" not in doc and doc["backups"] == core.RENDEZVOUS
    sh.ok("keyroute gen --from t.json --explicit --generation 11 -o e.json")
    exp = orjson.loads((tmp_path / "e.json").read_bytes())
    assert "slices" in exp and len(exp["slices"]) == 512
    e = core.parse((tmp_path / "e.json").read_bytes())
    assert e.generation == 11 and e.same_slices(t) and dict(e.pods) == dict(t.pods)
    r = sh.ok("keyroute gen --pod a=http://127.0.0.1:1 --slices 16 --generation 5")
    assert core.parse(r.stdout) == core.generate(5, core.parse(r.stdout).pods, 16)
    assert "owners" in orjson.loads(r.stdout)
