"""What a sweep leaves behind, read back for the reliability benchmark: the store's view while it runs, Tune's
trial folders and searcher snapshot, and the counts that should be 0 after a fault and `--resume`."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from reliability_common import (
    ASR,
    POLL_S,
    TOP1,
    evaluations,
    is_lost,
    is_trial,
    mlflow_client,
    repeated_steps,
    run_cli,
    run_history,
    sweep_runs,
)


@dataclass
class Seen:
    """What the store shows of a running sweep: its parent run and each trial run's status and evaluations."""

    parent: bool = False
    start_logged: bool = False
    trials: dict[str, tuple[str, int]] = field(default_factory=dict)  # trial id -> (status, evaluations logged)

    @property
    def evaluations(self) -> int:
        return sum(n for _, n in self.trials.values())


def look(workdir: Path, name: str, uri: str | None = None) -> Seen:
    """The store's view of sweep `name` now (empty while the driver has not created it; retried on a busy db)."""
    try:
        client = mlflow_client(workdir, uri)
        if client is None:
            return Seen()
        seen = Seen()
        for run in sweep_runs(client, name):
            if not is_trial(run):
                seen.parent, seen.start_logged = True, f"start_{TOP1}" in run.data.metrics
            elif not is_lost(run):
                n = len(client.get_metric_history(run.info.run_id, TOP1)) if TOP1 in run.data.metrics else 0
                seen.trials[run.data.tags["cleansweep.trial_id"]] = (run.info.status, n)
        return seen
    except Exception:  # noqa: BLE001 - the sweep is writing the database; look again at the next poll
        return Seen()


def kill_events(trials: int, evals_per_trial: int) -> dict[int, tuple[str, Callable[[Seen, str], bool]]]:
    """The five kill points: a description and the predicate on (store view, driver output) that fires it."""
    half = max(1, evals_per_trial // 2)

    def mid(s: Seen) -> bool:
        return any(st == "RUNNING" and half <= n < evals_per_trial for st, n in s.trials.values())

    return {
        1: ("the driver evaluates the starting model, no trial yet",
            lambda s, out: not s.trials and ("evaluating the starting model" in out or "Ray dashboard" in out)),
        2: ("first trial's run exists, nothing reported", lambda s, out: len(s.trials) >= 1),
        3: (f"a running trial has reported {half} of {evals_per_trial} evaluations", lambda s, out: mid(s)),
        4: ("a trial's run just turned FINISHED",
            lambda s, out: any(st == "FINISHED" for st, _ in s.trials.values())),
        5: (f"the last trial's run exists ({trials} of {trials})", lambda s, out: len(s.trials) >= trials),
    }


def wait_for(proc: subprocess.Popen, log: Path, workdir: Path, name: str, event: Callable[[Seen, str], bool],
             timeout: float = 600, uri: str | None = None) -> Seen | None:
    """Poll the store and the driver's output until `event` holds; None when the driver ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        seen = look(workdir, name, uri)
        if event(seen, log.read_text(errors="replace")):
            return seen
        time.sleep(POLL_S)
    return None


def kill_group(proc: subprocess.Popen) -> list[str]:
    """SIGKILL the driver's process group (it was started in its own session, Ray's processes with it); returns the
    names of the driver's descendants that outlived that (other process groups), then killed one by one."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    survivors = []
    for child in family:
        try:
            child.wait(timeout=5)  # a process still exiting is not a survivor
        except psutil.TimeoutExpired:
            if child.status() == psutil.STATUS_ZOMBIE:  # dead, waiting for a parent that does not reap it
                continue
            survivors.append(f"{child.name()} (pid {child.pid}, group {os.getpgid(child.pid)})")
            child.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return survivors


def tune_lines(sweep_dir: Path) -> dict[str, int]:
    """Tune's trial folders: trial id -> lines in its result.json (one per reported result)."""
    main = sweep_dir / "main"
    if not main.is_dir():
        return {}
    return {d.name: len((d / "result.json").read_text().splitlines()) if (d / "result.json").is_file() else 0
            for d in main.iterdir() if (d / "params.json").is_file()}


def finished_trials(workdir: Path, name: str, uri: str | None = None) -> dict[str, dict[str, Any]]:
    """Trial runs FINISHED in the store: trial id -> run id, end time and evaluation steps."""
    client = mlflow_client(workdir, uri)
    out = {}
    for run in sweep_runs(client, name) if client else []:
        if is_trial(run) and not is_lost(run) and run.info.status == "FINISHED":
            steps = sorted({int(m.step) for m in client.get_metric_history(run.info.run_id, TOP1)})
            out[run.data.tags["cleansweep.trial_id"]] = {"run_id": run.info.run_id, "end": run.info.end_time,
                                                         "steps": steps}
    return out



def find_study(state: Any) -> Any:
    """The Optuna study inside Tune's pickled searcher state (a dict of the searcher's attributes)."""
    import optuna

    todo, seen = [state], set()
    while todo:
        obj = todo.pop()
        if isinstance(obj, optuna.Study):
            return obj
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
    return None


def optuna_trials(sweep_dir: Path) -> list[Any]:
    """Optuna's trials from the newest searcher snapshot Tune wrote in the sweep folder ([] without one)."""
    # One file per driver session, named by the session's start time: the newest name is the resumed session's.
    files = sorted((sweep_dir / "main").glob("searcher-state-*.pkl"))
    if not files:
        return []
    with open(files[-1], "rb") as f:
        state = pickle.load(f)  # this benchmark's own sweep wrote it (never unpickle a file from elsewhere)
    study = find_study(state)
    return study.get_trials(deepcopy=False) if study is not None else []


def recomputed_board(kept: list[Any], histories: dict[str, dict], threshold: float) -> dict[str, tuple]:
    """Trial id -> (feasible, top1, asr, step) of its best feasible evaluation, from the raw MLflow histories:
    the most accurate evaluation with ASR <= threshold, the earliest step on ties; none for a FAILED run."""
    out = {}
    for run in kept:
        ev = evaluations(histories[run.info.run_id])
        feasible = [(top1, -step, asr, step) for step, (top1, asr) in ev.items() if asr <= threshold]
        tid = run.data.tags["cleansweep.trial_id"]
        if feasible and run.info.status != "FAILED":  # a FAILED trial (killed, diverged) is never feasible
            top1, _, asr, step = max(feasible)
            out[tid] = (True, round(top1, 6), round(asr, 6), step)
        else:
            out[tid] = (False, None, None, -1)
    return out


def _board_rows(records: list[dict[str, Any]]) -> dict[str, tuple]:
    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)

    return {str(r["trial_id"]): (bool(r["feasible"]), num(r[TOP1]), num(r[ASR]), int(r["step"])) for r in records}


def boards_match(expected: dict[str, tuple], workdir: Path, name: str, env: dict[str, str],
                 uri: str | None = None) -> tuple[bool, bool]:
    """Whether `cleansweep results NAME --format json` and Tune's leaderboard.csv equal the recomputation (every
    trial's best feasible evaluation, and the best trial: highest accuracy, then the lowest trial id)."""
    import pandas as pd

    store = ["--tracking-uri", uri] if uri else []
    proc = run_cli(["results", name, "--workdir", str(workdir), "--format", "json", "--top-k", "10000", *store],
                   env, workdir)
    printed = json.loads(proc.stdout) if proc.returncode == 0 else {"top": [], "best": None}
    csv = workdir / "sweeps" / name / "leaderboard.csv"
    tune = _board_rows(pd.read_csv(csv).to_dict("records")) if csv.is_file() else {}
    best = min(((-v[1], tid) for tid, v in expected.items() if v[0]), default=(None, None))[1]
    printed_best = (printed.get("best") or {}).get("trial_id")
    return _board_rows(printed["top"]) == expected and printed_best == best, tune == expected



def after_resume(workdir: Path, name: str, threshold: float, at_kill: dict[str, dict], tune_at_kill: dict[str, int],
                 env: dict[str, str], uri: str | None = None) -> dict[str, Any]:
    """The counts that should all be 0 once `--resume` finished, and whether the leaderboards are right."""
    client = mlflow_client(workdir, uri)
    runs = sweep_runs(client, name)
    trials = [r for r in runs if is_trial(r)]
    kept = [r for r in trials if not is_lost(r)]
    histories = {r.info.run_id: run_history(client, r) for r in runs}
    by_id = {r.data.tags["cleansweep.trial_id"]: r for r in kept}
    tune_now = tune_lines(workdir / "sweeps" / name)
    lost = {}
    for tid, rec in at_kill.items():
        run = by_id.get(tid)
        steps = sorted({s for s, _, _ in histories[run.info.run_id].get(TOP1, [])}) if run else None
        why = ["missing" if run is None else "another run" if run.info.run_id != rec["run_id"] else "",
               "reopened (new end time)" if run is not None and run.info.end_time != rec["end"] else "",
               f"steps {rec['steps']} -> {steps}" if run is not None and steps != rec["steps"] else "",
               "Tune re-reported it" if tune_now.get(tid, 0) > tune_at_kill.get(tid, 0) else ""]
        if any(why):
            lost[tid] = ", ".join(w for w in why if w)
    expected = recomputed_board(kept, histories, threshold)
    printed_ok, tune_ok = boards_match(expected, workdir, name, env, uri)
    states = Counter(t.state.name for t in optuna_trials(workdir / "sweeps" / name))
    return {"trials": len(kept), "completed_lost": len(lost), "completed_lost_why": lost,
            "duplicate_runs": sum(n - 1 for n in Counter(r.data.tags["cleansweep.trial_id"] for r in trials).values()),
            "running_mlflow": sum(r.info.status == "RUNNING" for r in runs), "running_optuna": states["RUNNING"],
            "steps_twice": sum(repeated_steps(h) for h in histories.values()), "resuggested": len(trials) - len(kept),
            "statuses": dict(Counter(r.info.status for r in kept)), "optuna": dict(states),
            "results_match": printed_ok, "tune_board_match": tune_ok}


