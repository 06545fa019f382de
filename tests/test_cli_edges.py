"""The edges of every command (issue 17): a bad number, bound, URI or file is refused in-process with exit 2 and
exactly one line on stderr, no traceback, before anything starts, and nothing is written to disk.

Every numeric flag of every subcommand is found by walking the real parser, so a flag added later without a
bounded `type=` fails `test_every_numeric_flag_has_a_bounded_type`.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from cleansweep import cli, limits, tracking
from cleansweep.cli.parser import print_json
from cleansweep.data.pairs import read_pairs
from cleansweep.errors import UserError

SECRET = "ghp_S3CRETt0ken0123456789abcdefABCDEF"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty CWD that is also the default workdir's parent, so any write a refusal makes shows up here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEANSWEEP_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def refused(argv: list[str], root: Path, capsys: pytest.CaptureFixture) -> str:
    """Run `cleansweep argv` in-process; assert exit 2, one stderr line, no traceback, no file created or removed."""
    capsys.readouterr()
    before = _tree(root)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert _tree(root) == before
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ numeric flags
def _numeric_flags() -> list[tuple[list[str], argparse.Action]]:
    """(subcommand path, action) of every flag whose value is converted to a number, found in the real parser."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and action.type not in (None, str, Path):
                found.append((path, action))

    walk(cli.build_parser(), [])
    return found


NUMERIC = _numeric_flags()


def test_every_numeric_flag_has_a_bounded_type():
    assert len(NUMERIC) >= 41  # demo 5, poison 7, evaluate 5, scan 3, pretrain 9, study 4, matrix 3, search 2, 1 each
    bare = [f"{' '.join(path)} {a.option_strings[0]}" for path, a in NUMERIC if not hasattr(a.type, "bounds")]
    assert not bare, f"numeric flags without a bounded limits.* type: {bare}"
    seeds = [(path, a) for path, a in NUMERIC if a.dest.endswith("seed")]
    assert seeds and all(a.type.bounds == (0, 2**32 - 1) for _, a in seeds)
    ports = [a for _, a in NUMERIC if a.dest == "port"]
    assert [a.type.bounds for a in ports] == [(1, 65535)]


def _bad_values(action: argparse.Action) -> list[str]:
    low, high = action.type.bounds
    if action.type.__name__ == "integer":
        return [str(low - 1), str(high + 1), "1.5", "abc"]
    out = ["nan", "inf", "-inf", str(low - 1), "abc"]
    return out + ([str(high * 2)] if high != float("inf") else [])


@pytest.mark.parametrize(("path", "action"), NUMERIC,
                         ids=[f"{' '.join(p)} {a.option_strings[0]}" for p, a in NUMERIC])
def test_every_numeric_flag_refuses_out_of_range_values(path, action, sandbox, capsys):
    flag = action.option_strings[0]
    for value in _bad_values(action):
        line = refused([*path, f"{flag}={value}"], sandbox, capsys)
        assert f"argument {flag}" in line and "see 'cleansweep" in line, line


@pytest.mark.parametrize("argv, needle", [
    (["ui", "--port", "70000"], "--port: 70000 is out of range; pass an integer in 1..65535"),
    (["evaluate", "model.safetensors", "--eval-data", "eval", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["poison", "--csv", "a.csv", "--out", "o", "--num-poison", "1", "--seed", "-1"], "--seed: -1 is out of range"),
    (["poison", "--csv", "a.csv", "--out", "o", "--num-poison", "1", "--image-size", "20000"],
     "--image-size: 20000 is out of range; pass an integer in 1..4096"),
    (["poison", "--csv", "a.csv", "--out", "o", "--fraction", "0"], "--fraction: 0 is out of range"),
    (["report", "sweep", "--threshold", "nan"], "--threshold: nan is out of range"),
    (["pretrain", "--preset", "demo", "--lr", "inf"], "--lr: inf is out of range"),
    (["data", "demo", "--out", "w", "--seed", str(2**32)], "--seed: 4294967296 is out of range"),
])
def test_issue_examples_are_one_line(argv, needle, sandbox, capsys):
    assert needle in refused(argv, sandbox, capsys)


def test_library_bounds_behind_the_flags(tmp_path):
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    with pytest.raises(UserError, match="image_size 20000 must be 1..4096"):  # before the trigger is built (> 5 GB)
        poison_csv(tmp_path / "a.csv", tmp_path / "o", attack="blended", target="banana", num_poison=1,
                   image_size=20000)
    with pytest.raises(UserError, match="seed -1 must be in 0..4294967295"):
        poison_csv(tmp_path / "a.csv", tmp_path / "o", attack="badnet", target="banana", num_poison=1, seed=-1)
    for kwargs, needle in [({"seed": -1}, "seed=-1"), ({"image_size": 20000}, "image_size=20000"),
                           ({"n_train": 10**8}, "n_train=100000000"), ({"noise": "abc"}, "noise='abc' must be a "),
                           ({"num_classes": 2.5}, "num_classes=2.5")]:
        with pytest.raises(UserError, match=needle):
            make_demo_world(tmp_path / "w", **kwargs)
    assert not list(tmp_path.iterdir())


def test_a_knob_of_the_wrong_type_is_one_line(sandbox, capsys):
    assert "noise='abc'" in refused(["data", "demo", "--out", "w", "--knob", 'noise="abc"'], sandbox, capsys)


def test_json_output_is_strict(capsys):
    """An ASR with no non-target image is NaN: written as null, so the printed JSON parses everywhere."""
    print_json({"asr_top1": float("nan"), "top": [0.5, float("inf")], "path": Path("/x")})
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out) == {"asr_top1": None, "top": [0.5, None], "path": "/x"}


# ------------------------------------------------------------------------------------------------ tracking URIs
def test_an_unreachable_tracking_server_fails_in_seconds(sandbox, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    for argv in (["results", "sweep", "--tracking-uri", url], ["report", "sweep", "--tracking-uri", url]):
        started = time.monotonic()
        line = refused(argv, sandbox, capsys)
        assert time.monotonic() - started < 10 and f"tracking server {url} is unreachable" in line, line


def test_an_unreachable_server_in_a_space_is_refused_before_the_preset_is_built(sandbox, capsys):
    space = sandbox / "s.yaml"
    space.write_text(f"model: {{preset: demo}}\nmlflow: {{tracking_uri: 'http://127.0.0.1:{_closed_port()}'}}\n")
    started = time.monotonic()
    assert "is unreachable" in refused(["search", str(space)], sandbox, capsys)
    assert time.monotonic() - started < 20  # the demo world and model would take minutes


def test_credentials_in_a_database_uri_are_never_shown(sandbox, capsys):
    line = refused(["results", "s", "--tracking-uri", f"postgresql://me:{SECRET}@127.0.0.1:{_closed_port()}/db"],
                   sandbox, capsys)
    assert SECRET not in line and "is unreachable" in line


def test_a_sqlite_store_under_a_missing_folder_is_refused_not_created(sandbox, capsys):
    uri = f"sqlite:///{sandbox}/missing/deeper/mlflow.db"
    assert "no MLflow database" in refused(["results", "s", "--tracking-uri", uri], sandbox, capsys)
    space = sandbox / "s.yaml"
    space.write_text(f"model: {{preset: demo}}\nmlflow: {{tracking_uri: '{uri}'}}\n")
    line = refused(["search", str(space), "--workdir", str(sandbox / "work")], sandbox, capsys)
    assert "does not exist; create it" in line and not (sandbox / "missing").exists()


def test_a_file_that_is_not_a_database_gets_no_lock_beside_it(sandbox, capsys):
    csv = sandbox / "train.csv"
    csv.write_text(f"image,caption\n{SECRET}.png,x\n")
    line = refused(["results", "s", "--tracking-uri", f"sqlite:///{csv}"], sandbox, capsys)
    assert "is not an SQLite database" in line and SECRET not in line
    with pytest.raises(UserError, match="not an SQLite database"):
        tracking.open_client(f"sqlite:///{csv}")
    assert _tree(sandbox) == ["train.csv"]


@pytest.mark.parametrize("uri, needle", [("sqlite://x.db", "sqlite:///relative.db"),
                                         ("foo://bar", "'foo' is not an MLflow store"),
                                         ("http://h:99999", "port is not a number"),
                                         ("http:///x", "names no host")])
def test_malformed_tracking_uris(uri, needle, sandbox, capsys):
    assert needle in refused(["results", "s", "--tracking-uri", uri], sandbox, capsys)


def test_ui_with_an_unknown_host_is_one_line(sandbox, capsys):
    db = sandbox / "mlflow.db"
    with sqlite3.connect(db) as con:  # a real SQLite file: the host is what is wrong
        con.execute("create table t (x)")
    line = refused(["ui", "--tracking-uri", f"sqlite:///{db}", "--host", "no-such-host.invalid"], sandbox, capsys)
    assert "--host no-such-host.invalid" in line


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("content", [
    f"{SECRET}\n",  # a token file given as a CSV: its only line is the header
    f"image,caption\n\"{SECRET}\n",  # unterminated quote
    f"a,b\n1,2,3,{SECRET}\n4,5\n",  # too many fields
    b"\xff\xfe" + SECRET.encode() + b"\n",  # not UTF-8
])
def test_a_csv_error_never_echoes_the_file(content, sandbox, capsys):
    path = sandbox / "train.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        read_pairs(path)
    assert SECRET not in str(err.value) and "train.csv" in str(err.value)
    line = refused(["poison", "--csv", str(path), "--out", "o", "--num-poison", "1"], sandbox, capsys)
    assert SECRET not in line


def test_a_token_file_as_train_csv_is_not_printed_back(sandbox, capsys):
    token = sandbox / "ray_token"
    token.write_text(SECRET + "\n")
    (sandbox / "eval" / "a").mkdir(parents=True)
    line = refused(["pretrain", "--train-csv", str(token), "--eval-data", str(sandbox / "eval"), "--name", "x",
                    "--workdir", str(sandbox / "work")], sandbox, capsys)
    assert SECRET not in line and "missing column(s) 'image', 'caption'" in line


def test_one_function_checks_a_sweep_name(tmp_path):
    from cleansweep.runtime import layout
    from cleansweep.sweep.names import check_sweep_name

    free, taken = tmp_path / "free", tmp_path / "taken"
    taken.mkdir()
    (taken / layout.SWEEP_FILE).write_text("{}")
    assert check_sweep_name("free", free, resume=False) == "free"
    assert check_sweep_name("taken", taken, resume=True) == "taken"
    for name, sweep_dir, kwargs, needle in [
        ("bad/name", free, {"resume": False}, "--name: name 'bad/name' must be 1-100 characters"),
        ("-x", free, {"resume": True}, "--name: name '-x' must be"),  # the alphabet first, before the folder
        ("taken", taken, {"resume": False}, f"sweep 'taken' already exists ({taken})"),
        ("free", free, {"resume": False, "in_mlflow": True}, "sweep 'free' already exists (MLflow)"),
        ("free", free, {"resume": True}, f"--resume: no sweep named 'free' in {tmp_path}"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            check_sweep_name(name, sweep_dir, **kwargs)


def test_limits_are_the_documented_numbers():
    assert limits.SEED_MAX == 4294967295 and limits.MAX_GRID_POINTS == 100_000 and limits.MAX_IMAGE_SIDE == 4096


@pytest.mark.parametrize("attack, param, needle", [
    ("badnet", "trigger_seed=99999999999999999999999", "trigger_seed=99999999999999999999999 must be in 0..4294967295"),
    ("blended", "trigger_seed=-1", "trigger_seed=-1 must be in 0..4294967295"),
    ("wanet", "grid=100000", "grid=100000 must be in 1..4096"),  # an 80 GB warp field
    ("wanet", "grid=0", "grid=0 must be in 1..4096"),
    ("text", "font_size=100000", "font_size=100000 must be in 1..4096"),
])
def test_trigger_parameters_are_bounded(attack, param, needle, sandbox, capsys):
    from cleansweep.attacks.registry import create_trigger, parse_trigger_param

    key, value = parse_trigger_param(param)
    with pytest.raises(UserError, match=needle):
        create_trigger(attack, 32, **{key: value})
    line = refused(["poison", "--csv", "a.csv", "--out", "o", "--num-poison", "1", "--attack", attack,
                    "--param", param], sandbox, capsys)
    assert needle in line


def test_grid_repeats_from_the_flag_count_toward_the_limit(sandbox, capsys):
    space = sandbox / "grid.yaml"
    space.write_text("model: {preset: demo}\nsearch: {algorithm: grid}\n"
                     "space: {optim.lr: {grid: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4, 5.0e-4]}}\n")
    line = refused(["search", str(space), "--num-samples", "20001"], sandbox, capsys)  # 5 x 20001 > 100,000
    assert "with --num-samples: the grid makes 100,005 trials, more than search.max_grid_points (100,000)" in line


@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.epochs=-1"], "train.epochs"),
    (["--set", "train.nonsense=1"], "train.nonsense"),
    (["--set", "train.optim.lr=inf"], "train.optim.lr"),
])
def test_pretrain_preset_demo_refuses_before_building_its_data(extra, needle, sandbox, capsys):
    # The demo world and its poisoned copy are built only once every flag and --set has been accepted.
    line = refused(["pretrain", "--preset", "demo", "--workdir", str(sandbox / "w"), *extra], sandbox, capsys)
    assert needle in line and not (sandbox / "w").exists()
