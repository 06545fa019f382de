"""What every command module shares: the parser that raises, the common flags, the workdir, the store, JSON out."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from cleansweep.errors import UserError

WORKDIR_HELP = "default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs"
TRACKING_URI_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)"


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code and the one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see '{self.prog} --help'")


def default_workdir() -> Path:
    """Where presets cache data, models and sweeps: $CLEANSWEEP_WORKDIR or ./cleansweep-runs."""
    return Path(os.environ.get("CLEANSWEEP_WORKDIR", "cleansweep-runs")).resolve()


def workdir_of(args: argparse.Namespace) -> Path:
    """The command's `--workdir`, else the default one, as an absolute path."""
    return (args.workdir or default_workdir()).resolve()


def add_workdir(p: argparse.ArgumentParser, help_text: str = WORKDIR_HELP) -> None:
    """The `--workdir` flag (read back with `workdir_of`)."""
    p.add_argument("--workdir", type=Path, default=None, help=help_text)


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    """The `--tracking-uri` flag of the commands that read or write MLflow."""
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)


def tracking_store(explicit: str | None, workdir: Path, *, must_exist: bool = False) -> str:
    """The tracking URI a command uses, refused here (one line, nothing written) when it cannot be used."""
    from cleansweep import tracking

    uri = tracking.resolve_tracking_uri(explicit, workdir)
    tracking.check_store(uri, workdir, must_exist=must_exist)
    return uri


def names_list(text: str | None) -> list[str] | None:
    """A comma-separated flag value as a list of its non-empty names; None when the flag was not given."""
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def print_json(obj: object) -> None:
    """Strict JSON on stdout: a NaN (an ASR with no non-target image) is written as null, not as invalid NaN."""

    def finite(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list | tuple) else value

    print(json.dumps(finite(obj), indent=2, default=str, allow_nan=False))
