"""`cleansweep ui`: the MLflow UI on the sweeps' store, loopback only, stopped by Ctrl-C."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from sweep_store import SWEEP, TRIALS, make_sweep

from cleansweep.cli import main
from cleansweep.errors import UserError
from cleansweep.tracking.server import mlflow_ui_command


def test_command_serves_the_sqlite_store_on_loopback(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    cmd = mlflow_ui_command(f"sqlite:///{db}", host="127.0.0.1", port=5123)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{db}"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")


def test_command_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="already an MLflow server"):
        mlflow_ui_command("http://127.0.0.1:5000", host="127.0.0.1", port=5000)
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow database at" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.integration
def test_ui_serves_the_sweep_and_stops_on_ctrl_c(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_sweep(uri)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cleansweep", "ui", "--port", str(port), "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 240, []
        while not any("MLflow UI for" in line for line in seen):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert f"http://127.0.0.1:{port}" in next(line for line in seen if "MLflow UI for" in line)
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        exps = _post(f"{base}/experiments/search", {"max_results": 100})["experiments"]
        runs = _post(f"{base}/runs/search", {"experiment_ids": [e["experiment_id"] for e in exps],
                                             "filter": f"tags.`cleansweep.sweep` = '{SWEEP}'"})["runs"]
        kinds = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "cleansweep.kind") for r in runs)
        assert kinds == ["sweep"] + ["trial"] * (len(TRIALS) + 1)  # + the preselect trial
        listening = [c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and set(listening) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server is gone with the command
