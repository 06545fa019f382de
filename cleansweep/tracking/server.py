"""`mlflow server` for `cleansweep ui`: the MLflow UI on the sweeps' store, started and stopped with the command.

`serve_ui` refuses, before starting anything, a store that is already a server, a missing database and a port in
use; starts `mlflow server` as a child process; waits until it answers `GET /health` (MLflow's liveness route,
mlflow/server/__init__.py); and stops it when the command ends: SIGINT first, as Ctrl-C in a terminal would
(the server shuts down cleanly), then SIGKILL if it still runs after `STOP_GRACE_S`.
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
from cleansweep.tracking.store import check_store

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0


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


def check_port_free(host: str, port: int) -> None:
    """Refuse (UserError) a `--host` that does not resolve and a port something already listens on."""
    try:
        with socket.socket() as s:
            in_use = s.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0
    except OSError as e:  # an unknown --host name
        raise UserError(f"--host {host}: {e.strerror or type(e).__name__}; pass an address to bind, e.g. "
                        "127.0.0.1") from None
    if in_use:
        raise UserError(f"port {port} on {host} is already in use; pass --port with a free port")


def exposure_warning(host: str, port: int) -> str | None:
    """The warning for binding an interface other than loopback (MLflow's UI has no login), else None."""
    if host in LOOPBACK_HOSTS:
        return None
    return (f"warning: binding {host}: MLflow has no login; anyone who reaches port {port} can read "
            "and delete runs. Prefer the default 127.0.0.1 and an SSH tunnel.")


def ui_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens (0.0.0.0 binds every interface, loopback among them)."""
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def wait_for_server(proc: subprocess.Popen, url: str, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Whether the server at `url` answered `GET /health` with 200 before `proc` exited or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def stop_server(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop `proc` if it still runs: SIGINT (a graceful shutdown), SIGKILL when it outlives `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_ui(tracking_uri: str, workdir: Path, *, host: str, port: int) -> int:
    """Serve the MLflow UI for `tracking_uri` until Ctrl-C or the server exits; the server never outlives the call.

    Args:
        tracking_uri: From `store.resolve_tracking_uri`: a sqlite file or a database URI (not an http server).
        workdir: The command's working directory (for `store.check_store`).
        host: Interface to bind; anything but loopback prints a warning on stderr.
        port: Port to bind; refused when something listens there already.

    Returns:
        0 after Ctrl-C, else the server's exit code.

    Raises:
        UserError: The store or the port cannot be served, or the server did not start.
    """
    cmd = mlflow_ui_command(tracking_uri, host=host, port=port)
    check_store(tracking_uri, workdir, must_exist=True)
    check_port_free(host, port)
    if (warning := exposure_warning(host, port)) is not None:
        print(warning, file=sys.stderr)
    url = ui_url(host, port)
    # MLflow's job runner (GenAI judges/scorers) starts ~8 worker processes we never use; the user's setting wins.
    proc = subprocess.Popen(cmd, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    try:
        if not wait_for_server(proc, url):
            proc.terminate()
            proc.wait(timeout=30)
            raise UserError(f"mlflow server did not start (exit code {proc.returncode}); see its output above")
        print(f"MLflow UI for {tracking_uri}: {url}  (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
