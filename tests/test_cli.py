"""The command line, through ``main(argv, out)``: check, lookup, gen."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import assignment as core
from proxy.cli import main

EXAMPLE = str(Path(__file__).resolve().parent.parent / "config" / "assignment.json")
PODS = ["--pod", "a=http://127.0.0.1:9001", "--pod", "b=http://127.0.0.1:9002", "--pod", "c=http://127.0.0.1:9003"]


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = main(list(argv), out)
    return rc, out.getvalue()


def write_table(path: Path, table: Any) -> str:
    path.write_bytes(orjson.dumps(table))
    return str(path)


# -- check ---------------------------------------------------------------------------


def test_check_ok() -> None:
    rc, out = run("check", EXAMPLE)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"table {EXAMPLE}: ok"
    assert "generation: 1732780800000" in lines
    assert "slices: 3 (explicit)" in lines
    assert "pods: 3" in lines
    pod_lines = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(pod_lines) == {"pod-a", "pod-b", "pod-c"}
    assert "http://127.0.0.1:9001" in pod_lines["pod-a"] and "33.33%" in pod_lines["pod-a"]
    assert "(weight 2)" in pod_lines["pod-b"]
    assert "(draining)" in pod_lines["pod-c"]


def test_check_generated_table(tmp_path: Path) -> None:
    path = write_table(
        tmp_path / "t.json", {"version": 1, "generation": 3, "slice_count": 8, "pods": {"a": {"url": "http://x:1"}}}
    )
    rc, out = run("check", path)
    assert rc == 0
    assert "slices: 8 (generated)" in out and "100.00%" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"version": 1, "generation": 5, "pods": {"a": {"url": "http://x:1"}},'
            b' "slices": [{"start": 0, "pod": "a"}, {"start": 9, "pod": "zz"}]}',
            "invalid table: slices[1].pod: unknown pod 'zz'",
        ),
        (b'{"version": 1, "generation": 5, "pods": {"a": {"url": "https://x"}}}', "invalid table: pods.a.url:"),
        (b'{"version": 2}', "invalid table: version:"),
        (b"{", "invalid table: not valid JSON"),
    ],
)
def test_check_bad_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(content)
    rc, out = run("check", str(path))
    assert rc == 1
    assert out == ""
    err = capsys.readouterr().err
    assert err.startswith("keyroute check: ") and message in err


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("check", str(tmp_path / "nope.json"))
    assert rc == 1
    assert "cannot read table" in capsys.readouterr().err


def test_check_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("check")[0] == 2
    assert "give a table FILE" in capsys.readouterr().err


def test_check_config(tmp_path: Path) -> None:
    cfg = tmp_path / "keyroute.toml"
    cfg.write_text(f'[assignment]\nsource = "file:{EXAMPLE}"\n')
    rc, out = run("check", "--config", str(cfg))
    assert rc == 0
    assert out.startswith(f"config {cfg}: ok\ntable {EXAMPLE}: ok\n")
    assert "generation: 1732780800000" in out


def test_check_config_with_http_source(tmp_path: Path) -> None:
    cfg = tmp_path / "keyroute.toml"
    cfg.write_text('[assignment]\nsource = "http://tables.internal/t"\n')
    assert run("check", "--config", str(cfg)) == (0, f"config {cfg}: ok\n")


def test_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "keyroute.toml"
    cfg.write_text('[proxy]\nlisten_on = "x"\n')
    assert run("check", "--config", str(cfg))[0] == 2
    assert "config error: proxy.listen_on: unknown key" in capsys.readouterr().err
    cfg.write_text(f'[assignment]\nsource = "file:{tmp_path / "missing.json"}"\n')
    assert run("check", "--config", str(cfg))[0] == 1
    assert "cannot read table" in capsys.readouterr().err


# -- lookup ---------------------------------------------------------------------------


def test_lookup_text() -> None:
    rc, out = run("lookup", EXAMPLE, "user-1", "tenant/42", "", "ключ")
    assert rc == 0
    lines = out.splitlines()
    assert lines == [
        "user-1\tposition=7038226039998199158 (0x61accd4b12ff3576)\towner=pod-b\tepoch=1732780800000"
        "\tbackups=pod-a\tslice=1",
        "tenant/42\tposition=17509279960656205544 (0xf2fd755b27c756e8)\towner=pod-c\tepoch=1732780000000"
        "\tbackups=pod-b,pod-a\tslice=2",
        "\tposition=0 (0x0000000000000000)\towner=pod-a\tepoch=1732780000000\tbackups=pod-b\tslice=0",
        "ключ\tposition=17753313917685924547 (0xf66070f271ab02c3)\towner=pod-c\tepoch=1732780000000"
        "\tbackups=pod-b,pod-a\tslice=2",
    ]


def test_lookup_json_one_key() -> None:
    rc, out = run("lookup", EXAMPLE, "user-2", "--json")
    assert rc == 0
    assert orjson.loads(out) == {
        "key": "user-2",
        "position": 7117674071722160687,
        "position_hex": "0x62c70edb7001f22f",
        "slice": 1,
        "slice_start": "0x5555555555555555",
        "owner": "pod-b",
        "url": "http://127.0.0.1:9002",
        "epoch": 1732780800000,
        "backups": ["pod-a"],
        "generation": 1732780800000,
    }


def test_lookup_json_many_keys() -> None:
    rc, out = run("lookup", "--json", EXAMPLE, "user-1", "user-2", "tenant/42")
    assert rc == 0
    rows = orjson.loads(out)
    assert [r["position"] for r in rows] == [7038226039998199158, 7117674071722160687, 17509279960656205544]
    assert [r["owner"] for r in rows] == ["pod-b", "pod-b", "pod-c"]


def test_lookup_needs_keys() -> None:
    with pytest.raises(SystemExit) as exc:
        run("lookup", EXAMPLE)
    assert exc.value.code == 2


# -- gen ------------------------------------------------------------------------------


def test_gen_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(
        "gen", "--pod", "a=http://127.0.0.1:9001", "--pod", "b=http://127.0.0.1:9002,weight=3",
        "--generation", "42", "--slices", "64",
    )  # fmt: skip
    assert rc == 0
    t = core.parse(out)
    assert t.generation == 42 and t.slice_count == 64 and not t.generated
    assert t.pods["b"].weight == 3.0
    assert t.slice_specs() == core.generate(42, t.pods, 64).slice_specs()
    report = capsys.readouterr().err
    assert report.startswith("generation 42, 64 slices, 2 pods\n")
    assert "  a: " in report and "  b: " in report


def test_gen_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run("gen", "--pod", "a=http://127.0.0.1:9001")
    assert rc == 0
    t = core.parse(out)
    assert t.slice_count == core.DEFAULT_SLICE_COUNT
    assert t.generation > 1_700_000_000_000  # now, in ms


def gen_out(path: Path, *argv: str) -> tuple[core.Assignment, str]:
    rc, out = run("gen", *argv, "--out", str(path))
    assert rc == 0, out
    return core.parse(path.read_bytes()), out


def test_gen_out_file(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    t, report = gen_out(path, *PODS, "--slices", "128", "--generation", "7")
    assert report.startswith("generation 7, 128 slices, 3 pods\n")
    assert t.slice_count == 128
    assert [f for f in os.listdir(tmp_path)] == ["table.json"]  # no temp file left behind
    # Readable by a proxy running as another user, like any written file.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    gen_out(path, *PODS, "--slices", "128", "--generation", "8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_gen_from_keeps_active_owners(tmp_path: Path) -> None:
    old_path = tmp_path / "old.json"
    old, _ = gen_out(old_path, *PODS, "--slices", "256", "--generation", "10")
    # Adding a pod without --rebalance moves nothing.
    new, report = gen_out(tmp_path / "new.json", "--from", str(old_path), *PODS, "--pod", "d=http://127.0.0.1:9004")
    assert "moved: 0.00% of the key space" in report
    assert [r.pod_id for r in new.routes] == [r.pod_id for r in old.routes]
    assert [r.epoch for r in new.routes] == [r.epoch for r in old.routes]
    assert new.generation > old.generation
    # Removing pod c moves exactly c's slices, and the report says how much.
    new, report = gen_out(
        tmp_path / "new.json", "--from", str(old_path), "--remove", "c", "--generation", "11"
    )  # fmt: skip
    share = old.shares()["c"]
    assert f"moved: {share * 100:.2f}% of the key space" in report
    assert core.moved_share(old, new) == share
    for a, b in zip(old.routes, new.routes, strict=True):
        assert (a.pod_id == b.pod_id) == (a.pod_id != "c")
        assert b.epoch == (a.epoch if a.pod_id != "c" else 11)


def test_gen_from_keeps_old_pods_by_default(tmp_path: Path) -> None:
    old_path = tmp_path / "old.json"
    old, _ = gen_out(old_path, *PODS, "--slices", "32", "--generation", "10")
    new, report = gen_out(tmp_path / "new.json", "--from", str(old_path), "--generation", "12")
    # Same pods: same owners, epochs and backups; only the generation moves on.
    assert new.generation == 12 and dict(new.pods) == dict(old.pods)
    assert new.slice_specs() == old.slice_specs()
    assert "moved: 0.00%" in report


def test_gen_drain(tmp_path: Path) -> None:
    old_path = tmp_path / "old.json"
    old, _ = gen_out(old_path, *PODS, "--slices", "256", "--generation", "10")
    new, report = gen_out(tmp_path / "new.json", "--from", str(old_path), "--drain", "b", "--generation", "11")
    assert new.pods["b"].state == "draining"
    assert new.shares()["b"] == 0.0
    assert f"moved: {old.shares()['b'] * 100:.2f}%" in report
    assert "  b: 0.00%" in report
    # A fresh table with a draining pod gives it nothing either.
    fresh, _ = gen_out(tmp_path / "fresh.json", *PODS, "--drain", "c", "--slices", "64")
    assert fresh.shares()["c"] == 0.0 and fresh.pods["c"].state == "draining"


def test_gen_rebalance(tmp_path: Path) -> None:
    old_path = tmp_path / "old.json"
    old, _ = gen_out(old_path, *PODS, "--slices", "512", "--generation", "10")
    argv = ["--from", str(old_path), *PODS, "--pod", "d=http://127.0.0.1:9004", "--rebalance", "--generation", "11"]
    new, report = gen_out(tmp_path / "new.json", *argv)
    shares = new.shares()
    assert all(abs(s - 0.25) <= 4 / 512 for s in shares.values()), shares
    moved = core.moved_share(old, new)
    assert abs(moved - 0.25) <= 4 / 512
    assert f"moved: {moved * 100:.2f}%" in report
    for a, b in zip(old.routes, new.routes, strict=True):
        assert b.epoch == (a.epoch if a.pod_id == b.pod_id else 11)


USAGE_ERRORS = [
    (["gen"], "give at least one --pod"),
    (["gen", "--pod", "a"], "expected id=http://host:port"),
    (["gen", "--pod", "=http://x:1"], "expected id=http://host:port"),
    (["gen", "--pod", "a=http://x:1,weight=heavy"], "is not a number"),
    (["gen", "--pod", "a=http://x:1,color=red"], "unknown option 'color'"),
    (["gen", "--pod", "a=http://x:1", "--drain", "z"], "--drain 'z': no such pod"),
    (["gen", "--pod", "a=http://x:1", "--slices", "0"], "--slices 0"),
    (["gen", "--pod", "a=http://x:1", "--slices", "-4"], "--slices -4"),
    (["gen", "--pod", "a=http://x:1", "--slices", str(core.MAX_SLICE_COUNT + 1)], "--slices"),
    (["gen", "--pod", "a=http://x:1", "--generation", "0"], "--generation 0"),
    (["gen", "--pod", "a=http://x:1", "--generation", "-1"], "--generation -1"),
    (["gen", "--from", EXAMPLE, "--slices", "16"], "--slices cannot be combined with --from"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS)
def test_gen_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(*argv)
    assert rc == 2
    assert out == ""
    err = capsys.readouterr().err
    assert err.startswith("keyroute gen: ") and message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gen", "--pod", "a=https://x:1"], "invalid table: pods.a.url:"),
        (["gen", "--pod", "a=http://x:1,weight=0"], "invalid table: pods.a.weight:"),
        (["gen", "--pod", "a=http://x:1,state=gone"], "invalid table: pods.a.state:"),
        (["gen", "--pod", "a=http://x:1", "--drain", "a"], "invalid table: pods: no active pod"),
        (["gen", "--from", EXAMPLE, "--generation", "5"], "invalid table: generation: 5 must be above"),
    ],
)
def test_gen_bad_tables(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(*argv) == (1, "")
    assert message in capsys.readouterr().err


def test_gen_failure_leaves_out_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(b"old")
    assert run("gen", "--pod", "a=https://x", "--out", str(path))[0] == 1
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("argv", [["bogus"], [], ["gen", "--slices", "many"], ["check", "--nope"]])
def test_argparse_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2
