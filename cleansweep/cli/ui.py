"""`cleansweep ui`: serve the MLflow UI on the store the sweeps use (`tracking.server.serve_ui`)."""

from __future__ import annotations

import argparse

from cleansweep import limits
from cleansweep.cli.parser import add_tracking_uri, add_workdir, workdir_of


def add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI on the store the sweeps use (Ctrl-C to stop)")
    p.add_argument("--port", type=limits.port, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback: MLflow has no login, so tunnel rather than expose it)")
    add_tracking_uri(p)
    add_workdir(p)
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(args: argparse.Namespace) -> int:
    from cleansweep import tracking  # mlflow loads only for the commands that use it

    workdir = workdir_of(args)
    uri = tracking.resolve_tracking_uri(args.tracking_uri, workdir)
    return tracking.serve_ui(uri, workdir, host=args.host, port=args.port)
