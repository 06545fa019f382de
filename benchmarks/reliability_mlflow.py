"""Reliability section `mlflow`: a sweep logs to a real `mlflow server` (sqlite backend, 127.0.0.1, a free port)
that is stopped while trials run, kept down for --down-minutes and restarted on the same port.

How long the client keeps trying (installed mlflow 3.17, mlflow/environment_variables.py and
mlflow/utils/request_utils.py, urllib3 2.x `Retry.get_backoff_time`): MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 retries with
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2 and up to 1 s of jitter; urllib3 sleeps 0 before the first retry, then
factor * 2^(n-1) capped at 120 s: 0 + 4 + 8 + 16 + 32 + 64 + 120 = 244 s (+ <= 7 s jitter). A refused connection
fails at once, so an outage under ~4 min is retried through; the default 5 min outage is longer, so requests made
early in it do fail. What the sweep does then (trials FAILED, exit code, metrics lost) is what this section reports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from reliability_common import is_lost, is_trial, markdown, mlflow_client, run_history, sweep_runs
from reliability_faults import Sweep, _notes, fault_space, fresh, mid_trial, resume_and_count
from reliability_store import after_resume, finished_trials, tune_lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:PORT with a sqlite store in `folder`, started in its own session."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120) -> float:
        """Start it and wait for /health; the seconds that took."""
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"mlflow server did not start in {timeout} s; see {self.folder / 'server.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def metrics_lost(work: Path, name: str, uri: str, evals: int) -> dict[str, Any]:
    """Trial runs by status, and evaluations missing from FINISHED runs (each should hold all `evals`)."""
    client = mlflow_client(work, uri)
    trials = [r for r in sweep_runs(client, name) if is_trial(r) and not is_lost(r)]
    missing = {r.data.tags["cleansweep.trial_id"]: evals - len({s for s, _, _ in run_history(client, r).get(
        "zeroshot_top1", [])}) for r in trials if r.info.status == "FINISHED"}
    return {"statuses": dict(Counter(r.info.status for r in trials)),
            "errors": sorted({r.data.tags.get("cleansweep.error", "")[:120] for r in trials
                              if r.info.status == "FAILED"}),
            "evaluations_missing": sum(max(0, n) for n in missing.values())}


def run_mlflow_down(root: Path, env: dict[str, str], *, down_minutes: float, trials: int, epochs: int,
                    clean_rows: int) -> dict[str, Any]:
    """Stop the MLflow server once a trial is half done, keep it down `down_minutes`, restart it on the same port,
    let the sweep end (and `--resume` it if it did not exit 0); what was lost."""
    folder = root / "mlflow" / "server"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh store: an earlier run's sweep of the same name is not this one
    folder.mkdir(parents=True)
    server = Server(folder, free_port())
    space, threshold, evals = fault_space(root, "mlflow", trials=trials, epochs=epochs, clean_rows=clean_rows,
                                          extra=f"mlflow: {{tracking_uri: '{server.url}'}}\n")
    work, name = fresh(root, "mlflow"), "mlflow"
    try:
        server.start()
        sweep = Sweep(work, env, space, name)
        seen = sweep.wait_event(mid_trial(evals), uri=server.url)
        if seen is None:
            return {"error": f"the sweep ended (exit {sweep.proc.returncode}) before a trial was half done"}
        at, tune_at = finished_trials(work, name, server.url), tune_lines(work / "sweeps" / name)
        row = _outage(sweep, server, down_minutes)
        row |= {"down_at_s": round(row.pop("t_down") - sweep.t0, 1), "evaluations_at_down": seen.evaluations,
                "finished_at_down": len(at)}
        row |= {"exit": sweep.end(), "stderr_tail": sweep.stderr_lines()[-3:]}
        row |= {"after_sweep": metrics_lost(work, name, server.url, evals)}
        if row["exit"] != 0:
            row |= resume_and_count(work, env, space, name, threshold, at, tune_at, uri=server.url)
        else:
            row |= {"resume_exit": "not needed"} | after_resume(work, name, threshold, at, tune_at, env, server.url)
        row["after_all"] = metrics_lost(work, name, server.url, evals)
    finally:
        server.stop()
    _print_mlflow(row, down_minutes)
    return row


def _outage(sweep: Sweep, server: Server, down_minutes: float) -> dict[str, Any]:
    """Stop the server, wait `down_minutes` (noting whether the sweep exits meanwhile), start it again."""
    t_down = time.monotonic()
    server.stop()
    deadline, exited_at = t_down + down_minutes * 60, None
    while time.monotonic() < deadline:
        if exited_at is None and sweep.proc.poll() is not None:
            exited_at = round(time.monotonic() - t_down, 1)
        time.sleep(1)
    restart_s = server.start()
    return {"t_down": t_down, "exited_during_outage_after_s": exited_at, "restart_s": round(restart_s, 1)}


def _print_mlflow(row: dict[str, Any], down_minutes: float) -> None:
    if "error" in row:
        print(f"mlflow: {row['error']}")
        return
    first, final = row["after_sweep"], row["after_all"]
    print(markdown(
        ["server down at", "down for", "sweep exit (exited during the outage?)", "trials after the sweep",
         "evaluations missing (FINISHED runs)", "resume exit", "trials after resume", "completed lost",
         "duplicate runs", "RUNNING left (MLflow / Optuna)", "steps twice", "`results` = MLflow",
         "Tune board = MLflow"],
        [[f"{row['down_at_s']} s ({row['evaluations_at_down']} evaluations, {row['finished_at_down']} finished)",
          f"{down_minutes:g} min", f"{row['exit']} ({row['exited_during_outage_after_s'] or 'no'})",
          first["statuses"], first["evaluations_missing"], row["resume_exit"], final["statuses"],
          row["completed_lost"], row["duplicate_runs"], f"{row['running_mlflow']} / {row['running_optuna']}",
          row["steps_twice"], row["results_match"], row["tune_board_match"]]]))
    _notes({"errors_on_failed_trials": final["errors"], "stderr_tail": row["stderr_tail"],
            "completed_lost_why": row.get("completed_lost_why")},
           ["errors_on_failed_trials", "stderr_tail", "completed_lost_why"])
