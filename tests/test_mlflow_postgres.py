"""A real `mlflow server` on PostgreSQL with a real sweep logging to it through the CLI (integration).

The database is $CLEANSWEEP_TEST_POSTGRES_URI when set (.ci/run starts one), else a PostgreSQL server this module
starts on loopback (tests/pg_server.py), so `pytest -m integration` runs anywhere the server binaries are installed.
One sweep (2 Optuna trials x 2 epochs of a tiny backdoored model) runs once per module; every test reads it back
independently: MlflowClient over HTTP, the server's artifact proxy, and SQL on PostgreSQL's own tables.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from conftest import TINY_PATCH
from mlflow import MlflowClient
from pg_server import start as start_postgres
from pg_server import stop as stop_postgres

from cleansweep import cli

pytestmark = pytest.mark.integration

URI_ENV = "CLEANSWEEP_TEST_POSTGRES_URI"
TOP1, ASR = "zeroshot_top1", "asr_top1"
PATCH = TINY_PATCH  # conftest's tiny backdoored model: a fixed 8 px BadNet patch in a fixed corner
EPOCHS, TRIALS = 2, 2


# ------------------------------------------------------------------------------------------------ services
@pytest.fixture(scope="module")
def postgres_uri():
    """CI's PostgreSQL, else a fresh one for this module."""
    if os.environ.get(URI_ENV):
        yield os.environ[URI_ENV]
        return
    # Not under pytest's tmp_path: that folder is private to the caller, and as root the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="cleansweep-pg-"))
    try:
        yield start_postgres(root).uri
    finally:
        stop_postgres(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not become healthy: " + log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory):
    """`mlflow server` on the PostgreSQL store, artifacts proxied to a local folder: (url, artifacts folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner (and its extra processes) for a test server
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", postgres_uri, "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log_path)
        yield url, root / "artifacts"
    finally:
        os.killpg(server.pid, 15)  # the server's uvicorn workers share its session
        server.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ the sweep
def _threshold_for(tiny: dict) -> float:
    # Below the starting model's ASR (as test_search): the start is infeasible and cleaning has to lower the ASR.
    return round(0.6 * float(tiny["metrics"][ASR]), 3)


# Learning rates: at 3e-3..3e-2 two epochs drove ASR to 0 and top-1 to chance (0.17-0.22), so the constraint never
# bound; at 3e-4..3e-3 one of the two trials is infeasible after epoch 1 (ASR 0.37 > 0.28) and feasible after epoch 2.
SPACE = """
model: {{checkpoint: {checkpoint}, name: tiny-rn}}
data: {{train_csv: {clean_csv}, eval_dir: {eval_dir}, batch_size: 16, eval_batch_size: 64}}
attack: {{patch_size: {patch}, location: fixed, patch: fixed}}
mlflow: {{tracking_uri: "{url}", experiment: {experiment}}}
epochs: {epochs}
eval_every: 1
objective: {{threshold: {threshold}}}
base: {{optim.warmup_steps: 2, method.ssl_weight: 0.0}}
space:
  optim.lr: {{loguniform: [3.0e-4, 3.0e-3]}}
search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: 2, n_startup_trials: {trials}}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
seed: 0
"""


@pytest.fixture(scope="module")
def sweep(mlflow_server, tiny_checkpoint, tmp_path_factory):
    """`cleansweep search` logging to the server: name, experiment, threshold, url, workdir, artifacts folder."""
    from ray._raylet import AuthenticationTokenLoader

    url, artifacts = mlflow_server
    root = tmp_path_factory.mktemp("sweep")
    world = tiny_checkpoint["world"]
    run = {"name": f"pg-{uuid.uuid4().hex[:8]}", "experiment": f"pg-{uuid.uuid4().hex[:8]}", "url": url,
           "threshold": _threshold_for(tiny_checkpoint), "workdir": root / "work", "artifacts": artifacts}
    space = root / "space.yaml"
    space.write_text(textwrap.dedent(SPACE).format(
        checkpoint=tiny_checkpoint["checkpoint"], clean_csv=world["clean_csv"], eval_dir=world["eval_dir"],
        patch=PATCH, url=url, experiment=run["experiment"], epochs=EPOCHS, threshold=run["threshold"],
        trials=TRIALS))
    with pytest.MonkeyPatch.context() as mp:
        # Token-auth Ray with its token in a temp HOME (as test_search's sweep_env); no store from the environment.
        (root / "home").mkdir()
        mp.setenv("HOME", str(root / "home"))
        for var in ("RAY_AUTH_MODE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        AuthenticationTokenLoader.instance().reset_cache()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = cli.main(["search", str(space), "--name", run["name"], "--workdir", str(run["workdir"])])
        AuthenticationTokenLoader.instance().reset_cache()
    assert code == 0, printed.getvalue()[-3000:]
    return run


# ------------------------------------------------------------------------------------------------ reading back
def _runs(run: dict) -> tuple[MlflowClient, object, list]:
    """Client over HTTP, the sweep's parent run and its child runs, found by tags only."""
    client = MlflowClient(tracking_uri=run["url"])
    exp = client.get_experiment_by_name(run["experiment"])
    assert exp is not None, f"experiment {run['experiment']} is not on the server"
    every = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in every if r.data.tags.get("cleansweep.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].data.tags["cleansweep.sweep"] == run["name"]
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(every) == 1 + len(children)  # nothing else was logged into the experiment
    return client, parents[0], children


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_one_parent_one_child_per_trial_every_evaluation_once(sweep):
    client, parent, children = _runs(sweep)
    assert parent.info.status == "FINISHED"
    assert len(children) == TRIALS
    assert {c.info.status for c in children} == {"FINISHED"}  # no scheduler: every trial runs to the end
    assert len({c.data.tags["cleansweep.trial_id"] for c in children}) == TRIALS
    for child in children:
        trial_id = child.data.tags["cleansweep.trial_id"]
        assert child.info.end_time and child.info.run_name == f"{sweep['name']}-{trial_id}"
        top1, asr, epoch = (_history(client, child.info.run_id, k) for k in (TOP1, ASR, "epoch"))
        steps = [s for s, _ in top1]
        # One evaluation per epoch (eval_every 1), the start is the parent's: each step once, in every metric.
        assert len(steps) == len(set(steps)) == EPOCHS and min(steps) > 0
        assert [s for s, _ in asr] == [s for s, _ in epoch] == steps
        assert [v for _, v in epoch] == [float(e) for e in range(1, EPOCHS + 1)]
        assert 3e-4 <= float(child.data.params["optim.lr"]) <= 3e-3


def _best_from_histories(client: MlflowClient, children: list, threshold: float) -> tuple[float, set]:
    """Best feasible top-1 over every evaluation of every trial, and the (trial, step) pairs that reach it."""
    points = []
    for child in children:
        asr = dict(_history(client, child.info.run_id, ASR))
        for step, top1 in _history(client, child.info.run_id, TOP1):
            if asr[step] <= threshold:
                points.append((top1, child.data.tags["cleansweep.trial_id"], step))
    evaluations = sum(len(client.get_metric_history(c.info.run_id, TOP1)) for c in children)
    assert points, f"no evaluation with ASR <= {threshold}: recalibrate the sweep's threshold or learning rates"
    assert len(points) < evaluations, f"every evaluation has ASR <= {threshold}: the constraint never binds"
    best = max(p[0] for p in points)
    return best, {(trial, step) for top1, trial, step in points if top1 == best}


def test_results_command_names_the_recomputed_best(sweep, capsys):
    client, _, children = _runs(sweep)
    best_top1, reaching = _best_from_histories(client, children, sweep["threshold"])
    argv = ["results", sweep["name"], "--tracking-uri", sweep["url"], "--format", "json",
            "--workdir", str(sweep["workdir"])]
    assert cli.main(argv) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert best[TOP1] == pytest.approx(best_top1, abs=1e-9) and best[ASR] <= sweep["threshold"]
    assert (best["trial_id"], best["step"]) in reaching


def test_leaderboard_artifact_downloads_through_the_server(sweep, tmp_path):
    client, parent, children = _runs(sweep)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "leaderboard.csv"} <= names
    got = Path(client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path)))
    local = sweep["workdir"] / "sweeps" / sweep["name"] / "leaderboard.csv"
    assert got.read_bytes() == local.read_bytes()
    assert list(sweep["artifacts"].rglob("leaderboard.csv"))  # proxied into the server's destination, not a client path
    board = pd.read_csv(got)
    assert sorted(board["trial_id"]) == sorted(c.data.tags["cleansweep.trial_id"] for c in children)
    best_top1, reaching = _best_from_histories(client, children, sweep["threshold"])
    assert board.iloc[0][TOP1] == best_top1 and (board.iloc[0]["trial_id"], int(board.iloc[0]["step"])) in reaching


def test_the_runs_are_rows_in_postgresql(sweep, postgres_uri):
    client, parent, children = _runs(sweep)
    with psycopg.connect(postgres_uri) as conn:
        rows = conn.execute("SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
                            "ON r.experiment_id = e.experiment_id WHERE e.name = %s", (sweep["experiment"],)).fetchall()
        points = dict(conn.execute("SELECT run_uuid, count(*) FROM metrics WHERE key = %s AND run_uuid = ANY(%s) "
                                   "GROUP BY run_uuid", (TOP1, [c.info.run_id for c in children])).fetchall())
    assert dict(rows) == {r.info.run_id: r.info.status for r in [parent, *children]}
    assert points == {c.info.run_id: EPOCHS for c in children}
