"""The `mlflow server` supervisor behind `cleansweep ui`: check the store and the address, start it, stop it cleanly.

MOVING: this module goes to `cleansweep/tracking/server.py` (issue 18, H3); `cli/ui.py` is its only caller.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cleansweep.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def mlflow_ui_command(tracking_uri: str, *, host: str, port: int) -> list[str]:
    """The `mlflow server` command line that serves the UI for the store at `tracking_uri`.

    Artifacts of experiments created from the UI land beside a sqlite file, where `cleansweep.tracking` puts them.
    """
    if tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking URI {tracking_uri} is already an MLflow server; open it in a browser "
                        "(or pass --tracking-uri sqlite:///PATH.db to serve a local store)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"no MLflow database at {db}; run a sweep first, or pass --tracking-uri / set "
                            "CLEANSWEEP_WORKDIR to the folder holding mlflow.db")
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def serve_ui(tracking_uri: str | None, workdir: Path, *, host: str, port: int) -> int:
    """Serve the MLflow UI for a store until Ctrl-C or the server exits; return the exit code for the CLI.

    Args:
        tracking_uri: The store (None: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db).
        workdir: Where the default store lives.
        host: Interface to bind; anything but loopback gets a warning (MLflow has no login).
        port: Port to bind; refused when something already listens there.

    Raises:
        UserError: An http store, a missing database, an unknown host, a port in use, a server that did not start.
    """
    from cleansweep import tracking  # MLflow loads in seconds: only when this command runs

    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    cmd = mlflow_ui_command(uri, host=host, port=port)
    tracking.check_store(uri, workdir, must_exist=True)
    _check_free(host, port)
    if host not in LOOPBACK:
        print(f"warning: binding {host}: MLflow has no login; anyone who reaches port {port} can read "
              "and delete runs. Prefer the default 127.0.0.1 and an SSH tunnel.", file=sys.stderr)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    # MLflow's job runner (GenAI judges/scorers) starts ~8 worker processes we never use; the user's setting wins.
    proc = subprocess.Popen(cmd, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    try:
        if not _wait_for_server(proc, url):
            proc.terminate()
            proc.wait(timeout=30)
            raise UserError(f"mlflow server did not start (exit code {proc.returncode}); see its output above")
        print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(proc)


def _check_free(host: str, port: int) -> None:
    """Refuse an unknown host or a port something already listens on."""
    try:
        with socket.socket() as s:
            in_use = s.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0
    except OSError as e:  # an unknown --host name
        raise UserError(f"--host {host}: {e.strerror or type(e).__name__}; pass an address to bind, e.g. "
                        "127.0.0.1") from None
    if in_use:
        raise UserError(f"port {port} on {host} is already in use; pass --port with a free port")


def _wait_for_server(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (mlflow server's clean shutdown), then kill after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
