"""Sweeps read back over a real `mlflow server` in bulk (one request per metric per 100 runs) equal the database read.

The store is a real sqlite MLflow store (tests/sweep_store.py: numbers chosen by hand, a re-logged step) plus 130
runs of one metric, served by a real `mlflow server`; the per-run reads through MlflowClient are the reference.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from sweep_store import RELOGGED, SWEEP, TRIALS, make_sweep

from cleansweep import tracking
from cleansweep.tracking import read

MANY = 130  # runs of the bulk experiment: two requests of at most read.BULK_RUNS
KEY = "zeroshot_top1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _many_runs(uri: str) -> list[str]:
    """MANY runs in experiment "bulk"; run i logs KEY at steps 0..i%3 (value i + step/10, NaN for step 2 of run 5)."""
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("bulk")
    ids = []
    for i in range(MANY):
        rid = client.create_run(eid).info.run_id
        values = [math.nan if (i, step) == (5, 2) else i + step / 10 for step in range(i % 3 + 1)]
        client.log_batch(rid, metrics=[Metric(KEY, v, 1000 + step, step) for step, v in enumerate(values)])
        ids.append(rid)
    return ids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server URL, sqlite URI, ids of the bulk experiment's runs): the toy sweep and the runs behind a server."""
    root = tmp_path_factory.mktemp("bulk")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_sweep(uri)
    ids = _many_runs(uri)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", uri, "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url, uri, ids
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def _points(history: list) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in history)


def _same(a: list[tuple[int, int, float]], b: list[tuple[int, int, float]]) -> bool:
    return len(a) == len(b) and all(x[:2] == y[:2] and (x[2] == y[2] or math.isnan(x[2]) and math.isnan(y[2]))
                                    for x, y in zip(a, b, strict=True))


def test_bulk_history_equals_each_runs_history(served):
    url, uri, ids = served
    client = MlflowClient(tracking_uri=uri)
    bulk = read.bulk_metric_history(url, ids, KEY)
    assert bulk is not None and set(bulk) == set(ids)
    assert sum(map(len, bulk.values())) == sum(i % 3 + 1 for i in range(MANY))
    for rid in ids:
        assert _same(sorted(bulk[rid]), _points(client.get_metric_history(rid, KEY)))
    assert math.isnan(dict((s, v) for s, _, v in bulk[ids[5]])[2])


def test_bulk_history_declines_what_it_cannot_read_whole(served):
    url, uri, ids = served
    total = sum(i % 3 + 1 for i in range(100))  # the first request's points
    assert read.bulk_metric_history(url, ids, KEY, max_points=total) is None  # may have been cut: per-run reads
    assert read.bulk_metric_history(url, ids[:100], KEY, max_points=total + 1) is not None
    assert read.bulk_metric_history(uri, ids, KEY) is None  # not a server
    assert read.bulk_metric_history(f"http://127.0.0.1:{_free_port()}", ids, KEY) is None  # nothing listening


def test_load_sweep_over_the_server_equals_the_database_read(served):
    url, uri, _ = served
    direct, remote = tracking.load_sweep(SWEEP, uri), tracking.load_sweep(SWEEP, url)
    columns = sorted(direct.history.columns)
    assert sorted(remote.history.columns) == columns
    order = ["trial_id", "step"]
    pd.testing.assert_frame_equal(remote.history[columns].sort_values(order, ignore_index=True),
                                  direct.history[columns].sort_values(order, ignore_index=True))
    pd.testing.assert_frame_equal(remote.trials, direct.trials)
    trial, epoch, first = RELOGGED
    asr = remote.history.set_index(["trial_id", "step"])["asr_top1"]
    newest = next(a for e, _, a in TRIALS[trial][3] if e == epoch)
    assert asr[trial, 10 * epoch] == newest != first  # the step logged again after a resume keeps its newer value
    assert len(remote.history) == sum(len(v[3]) for v in TRIALS.values()) + 1  # + the preselect trial's evaluation
