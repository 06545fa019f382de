"""Numeric flags out of range: every int/float flag of every subcommand, read from `cleansweep.cli.build_parser()`,
given -1 (and NaN for floats) on an otherwise valid command, plus a few boundary values users type (port 70000,
batch size 0). Each must be refused in one line naming the flag, before any work starts or anything is written."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reliability_cases import TRIGGER, _absent
from reliability_fixtures import Case

EXTRA_VALUES = {("ui", "--port"): ["70000"], ("evaluate", "--batch-size"): ["0"], ("poison", "--image-size"): ["0"],
                ("scan", "--steps"): ["0"], ("data demo", "--image-size"): ["0"], ("pretrain", "--epochs"): ["0"],
                ("pretrain", "--batch-size"): ["0"], ("pretrain", "--lr"): ["inf"], ("search", "--top-k"): ["0"],
                ("report", "--threshold"): ["inf"], ("study", "--clean-epochs"): ["0"], ("poison", "--fraction"): ["0"]}


def _numeric_kind(convert: Any) -> type | None:
    """int or float when argparse's `type` turns "1" into a number (int, float or a validating function), else None:
    derived from behaviour so flags whose plain int/float gets a range-checking converter are still found."""
    if convert is None or convert in (str, Path) or isinstance(convert, argparse.FileType):
        return None
    try:
        one = convert("1")
    except Exception:  # noqa: BLE001 - not a numeric converter
        return None
    if isinstance(one, bool) or not isinstance(one, int | float):
        return None
    try:
        return float if isinstance(convert("0.5"), float) else int
    except Exception:  # noqa: BLE001 - an int converter refuses 0.5
        return int


def numeric_flags() -> list[tuple[str, str, type]]:
    """(subcommand path, flag, int or float) of every numeric option the CLI declares."""
    from cleansweep.cli import build_parser

    out: list[tuple[str, str, type]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])
            elif action.option_strings and (kind := _numeric_kind(action.type)) is not None:
                out.append((" ".join(path), action.option_strings[-1], kind))

    walk(build_parser(), [])
    return out


def base_command(command: str, flag: str, value: str, fx: dict[str, Any], work: Path,
                 scratch: Path) -> tuple[list[str], Path]:
    """A valid command of `command` (fast, writing only under the returned scratch path) that `flag` is added to."""
    w, model = fx["world"], str(fx["model"])
    own = scratch / f"{command.replace(' ', '-')}{flag}={value}"
    wd = ["--workdir", str(own / "workdir")]
    bases = {
        "data demo": ["data", "demo", "--out", str(own), "--n-train", "32", "--n-clean", "32", "--n-eval", "12",
                      "--image-size", "32", "--knob", "num_classes=6"],
        "poison": ["poison", "--csv", w["train_csv"], "--out", str(own), "--image-size", "32",
                   *(["--fraction", "0.25"] if flag not in ("--fraction", "--num-poison") else [])],
        "evaluate": ["evaluate", model, "--eval-data", w["eval_dir"], "--device", "cpu", *TRIGGER],
        "scan": ["scan", model, "--eval-data", w["eval_dir"], "--device", "cpu", "--out", str(own), "--steps", "1",
                 "--subset", "4"],
        "pretrain": ["pretrain", "--train-csv", w["train_csv"], "--eval-data", w["eval_dir"], "--name", "flag",
                     "--model", "tiny-rn", "--num-workers", "0", "--epochs", "1", "--batch-size", "8", *wd],
        "search": ["search", str(fx["fx"] / "yaml" / "kept.yaml"), "--name", "flag", *wd],
        "results": ["results", "kept", "--workdir", str(work)],
        "report": ["report", "kept", "--no-log", "--out", str(own), "--workdir", str(work)],
        "study": ["study", "toy", *wd],
        "ui": ["ui", "--workdir", str(work)],
    }
    return bases[command], own


def flag_cases(fx: dict[str, Any], work: Path, scratch: Path) -> list[Case]:
    """One row per numeric flag and bad value."""
    cases = []
    for command, flag, kind in numeric_flags():
        values = ["-1", *(["nan"] if kind is float else []), *EXTRA_VALUES.get((command, flag), [])]
        name = flag.removeprefix("--")
        for value in values:
            args, own = base_command(command, flag, value, fx, work, scratch / "flags")
            cases.append(Case("flag", f"{command} {flag} {value}", [*args, f"{flag}={value}"],
                              (f"{flag}|{name}|{name.replace('-', '_')}",), _absent(own)))
    return cases
