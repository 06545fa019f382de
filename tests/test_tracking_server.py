"""tracking.server: the `mlflow server` behind `cleansweep ui`: refusals before start, health wait, stop, serve."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cleansweep import tracking
from cleansweep.errors import UserError
from cleansweep.tracking import server

# A real HTTP server that answers GET /health with 200 (and anything else with 404), like MLflow's liveness route.
HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
# Prints "ready" once its SIGINT handling is set, then sleeps; SIGINT ends it with exit code 3 unless it ignores it.
SLEEPER = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:  # "ready" inside the try: a SIGINT right after it must still land in the handler below
    print("ready", flush=True)
    time.sleep(600)
except KeyboardInterrupt:
    sys.exit(3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sleeper(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_command_by_store_kind(tmp_path):
    pg = server.mlflow_ui_command("postgresql://u:p@db:5432/mlflow", host="127.0.0.1", port=5001)
    assert pg[pg.index("--backend-store-uri") + 1] == "postgresql://u:p@db:5432/mlflow"
    assert "--artifacts-destination" not in pg and pg[pg.index("--workers") + 1] == "1"
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org"):
        with pytest.raises(UserError, match=f"^the tracking URI {uri} is already an MLflow server; "):
            server.mlflow_ui_command(uri, host="127.0.0.1", port=5000)
    with pytest.raises(UserError, match=f"^no MLflow database at {tmp_path / 'none.db'}; run a sweep first"):
        server.mlflow_ui_command(f"sqlite:///{tmp_path / 'none.db'}", host="127.0.0.1", port=5000)


def test_port_in_use_and_unknown_host_are_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"^port {port} on 127.0.0.1 is already in use; pass --port"):
            server.check_port_free("127.0.0.1", port)
        with pytest.raises(UserError, match=f"^port {port} on 0.0.0.0 is already in use"):
            server.check_port_free("0.0.0.0", port)  # every interface, loopback among them
    server.check_port_free("127.0.0.1", port)  # closed again: free
    with pytest.raises(UserError, match=r"^--host no-such-host\.invalid: .+; pass an address to bind"):
        server.check_port_free("no-such-host.invalid", port)


def test_url_and_exposure_warning():
    assert server.ui_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert server.ui_url("10.1.2.3", 5001) == "http://10.1.2.3:5001"
    assert [server.exposure_warning(h, 5000) for h in ("127.0.0.1", "localhost", "::1")] == [None] * 3
    assert server.exposure_warning("0.0.0.0", 5002).startswith("warning: binding 0.0.0.0: MLflow has no login; "
                                                               "anyone who reaches port 5002 can read")


def test_wait_for_server_sees_health_an_exit_and_a_timeout():
    port = _free_port()
    healthy = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)])
    try:
        assert server.wait_for_server(healthy, f"http://127.0.0.1:{port}", timeout_s=60)
    finally:
        healthy.kill()
        healthy.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start = time.monotonic()
    assert not server.wait_for_server(dead, f"http://127.0.0.1:{port}", timeout_s=60)
    assert time.monotonic() - start < 5  # an exited server is not waited for
    silent = _sleeper("ignore")  # alive, but nothing answers on the port
    try:
        start = time.monotonic()
        assert not server.wait_for_server(silent, f"http://127.0.0.1:{_free_port()}", timeout_s=1.5)
        assert 1.5 <= time.monotonic() - start < 10
    finally:
        silent.kill()
        silent.wait()


def test_stop_server_interrupts_then_kills():
    polite = _sleeper("default")
    server.stop_server(polite, grace_s=30)
    assert polite.returncode == 3  # it saw SIGINT, and was not killed
    stubborn = _sleeper("ignore")
    start = time.monotonic()
    server.stop_server(stubborn, grace_s=0.5)
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - start < 10
    server.stop_server(stubborn)  # already gone: nothing to do


def test_serve_ui_refuses_before_starting_anything(tmp_path):
    with pytest.raises(UserError, match="already an MLflow server"):
        server.serve_ui("http://127.0.0.1:5000", tmp_path, host="127.0.0.1", port=_free_port())
    not_a_db = tmp_path / "runs.csv"
    not_a_db.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=f"^{not_a_db} is not an SQLite database"):
        server.serve_ui(f"sqlite:///{not_a_db}", tmp_path, host="127.0.0.1", port=_free_port())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]  # no lock file, no artifacts folder


@pytest.mark.integration
def test_serve_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.get_or_create_experiment(tracking.open_client(uri), "served")
    port = _free_port()
    code = f"import sys; from pathlib import Path; from cleansweep.tracking import server; " \
           f"sys.exit(server.serve_ui({uri!r}, Path({str(tmp_path)!r}), host='127.0.0.1', port={port}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        # The server's own lines share the pipe; ours comes once it is healthy (EOF if the call failed).
        lines = iter(proc.stdout.readline, "")
        line = next((line for line in lines if line.startswith("MLflow UI for")), None)
        assert line == f"MLflow UI for {uri}: http://127.0.0.1:{port}  (Ctrl-C to stop)\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server is gone with the call
