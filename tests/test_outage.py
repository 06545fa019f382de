"""A tracking-server outage after a command started: MLflow writes wait for the server, nothing is lost.

Unit tests drive `outage.call_patiently` with a fake clock; the integration test stops a real `mlflow server`
while a run logs, restarts it on the same port, and checks every evaluation arrives exactly once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cleansweep.errors import UserError
from cleansweep.tracking import outage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _failing(times: int, exc: BaseException, value: object = "ok"):
    calls = {"n": 0}

    def fn() -> object:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return value

    return fn, calls


def _wrapped(inner: BaseException) -> Exception:
    # MLflow's REST layer re-raises a requests error as MlflowException inside its `except` block.
    try:
        try:
            raise inner
        except Exception as e:
            raise RuntimeError(f"API request failed with exception {e}")  # noqa: B904 - mirrors MLflow
    except RuntimeError as outer:
        return outer


def test_an_unreachable_server_is_waited_for_and_said_once():
    clock, lines = FakeClock(), []
    fn, calls = _failing(3, _wrapped(ConnectionRefusedError(111, "refused")))
    assert outage.call_patiently(fn, what="x", window=100, sleep=clock.sleep, clock=clock, warn=lines.append) == "ok"
    assert calls["n"] == 4
    assert len(lines) == 1 and "unreachable" in lines[0] and outage.WINDOW_ENV in lines[0]
    assert clock.slept == [outage.RETRY_EVERY_S] * 3


def test_an_outage_longer_than_the_window_raises_the_original_error():
    clock = FakeClock()
    err = _wrapped(ConnectionRefusedError(111, "refused"))
    fn, calls = _failing(10**6, err)
    with pytest.raises(RuntimeError) as got:
        outage.call_patiently(fn, what="x", window=25, sleep=clock.sleep, clock=clock, warn=lambda _: None)
    assert got.value is err
    assert clock.now == pytest.approx(25) and calls["n"] == 4  # 0, 10, 20, 25 s


def test_other_errors_are_raised_at_once():
    clock = FakeClock()
    fn, calls = _failing(1, ValueError("bad param"))
    with pytest.raises(ValueError):
        outage.call_patiently(fn, what="x", window=100, sleep=clock.sleep, clock=clock, warn=lambda _: None)
    assert calls["n"] == 1 and clock.slept == []


def test_the_window_comes_from_the_environment_and_is_bounded():
    assert outage.window_s({}) == outage.DEFAULT_WINDOW_S
    assert outage.window_s({outage.WINDOW_ENV: "90"}) == 90
    for bad in ("-1", "soon", "1e9"):
        with pytest.raises(UserError, match=outage.WINDOW_ENV):
            outage.window_s({outage.WINDOW_ENV: bad})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_mlflow_client_error_on_a_closed_port_reads_as_unreachable(monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(Exception) as got:
        client.search_experiments(max_results=1)
    assert outage.is_unreachable(got.value)


def test_a_missing_run_is_not_an_outage(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(Exception) as got:
        client.get_run("0" * 32)
    assert not outage.is_unreachable(got.value)


def _start_server(port: int, root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(root / "server.log", "a")  # noqa: SIM115 - the server writes it while the test runs
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
        time.sleep(0.5)


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    server.wait(timeout=60)


@pytest.mark.integration
def test_a_run_logging_through_a_server_restart_loses_nothing(tmp_path, monkeypatch):
    from cleansweep import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # MLflow gives up fast: the outage is ours to ride
    monkeypatch.setenv(outage.WINDOW_ENV, "300")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(port, tmp_path)
    try:
        client = tracking.open_client(uri)
        experiment = tracking.get_or_create_experiment(client, "outage")
        run = tracking.RunHandle(client, client.create_run(experiment).info.run_id, last_step=-1)
        run.log_metrics({"top1": 0.5}, step=0)
        _stop_server(server)
        restarted: list[subprocess.Popen] = []
        restart = threading.Timer(8.0, lambda: restarted.append(_start_server(port, tmp_path)))
        restart.start()
        began = time.monotonic()
        run.log_metrics({"top1": 0.6}, step=1)  # the server is down: this waits for it, then logs
        waited = time.monotonic() - began
        restart.join()
        server = restarted[0]
        run.log_metrics({"top1": 0.7}, step=2)
        run.end("FINISHED")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "top1"))
        assert history == [(0, 0.5), (1, 0.6), (2, 0.7)]
        assert waited >= 8.0
        assert client.get_run(run.run_id).info.status == "FINISHED"
    finally:
        _stop_server(server)
