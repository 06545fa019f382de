"""Reliability parts `kills` (kill -9 of the sweep driver at five moments, then `--resume`) and `nan` (diverging
trials isolated); see reliability.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability_common import (
    ASR,
    CLI,
    evaluations,
    is_lost,
    is_trial,
    markdown,
    mlflow_client,
    poisoned_model,
    run_cli,
    run_history,
    sweep_runs,
    threshold_for,
    write_space,
)
from reliability_store import (
    Seen,
    after_resume,
    finished_trials,
    kill_events,
    kill_group,
    look,
    optuna_trials,
    tune_lines,
    wait_for,
)

KILL_EXTRA = """
objective: {{threshold: {threshold}}}
epochs: {epochs}
eval_every: 0.5
base: {{optim.warmup_steps: 2, device: cpu}}
space:
  optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}
search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: 2}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
"""


def kill_point(work: Path, env: dict[str, str], space: Path, point: int, event: Callable[[Seen, str], bool],
               threshold: float) -> dict[str, Any]:
    """One kill -9 at `event`, then `--resume` to the end; the observed moment and the counts."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    name = f"kill{point}"
    args = ["search", str(space), "--name", name, "--workdir", str(work)]
    log = work / "first.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, *args], env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        fired = wait_for(proc, log, work, name, event)
    finally:
        survivors = kill_group(proc) if proc.poll() is None else []
    killed_at = time.monotonic() - t0
    if fired is None:
        return {"point": point, "error": f"the driver ended (exit {proc.returncode}) before the event"}
    seen = look(work, name)
    at_kill, tune_at_kill = finished_trials(work, name), tune_lines(work / "sweeps" / name)
    (work / "at-kill.json").write_text(json.dumps({"finished": at_kill, "tune_lines": tune_at_kill,
                                                   "trials": seen.trials}, indent=2))
    t1 = time.monotonic()
    resumed = run_cli([*args, "--resume"], env, work, timeout=1800)
    refused = resumed.stderr.strip() if resumed.returncode == 2 and "drop --resume" in resumed.stderr else None
    if refused:  # killed before the sweep existed: nothing to resume, start it as the message says
        resumed = run_cli(args, env, work, timeout=1800)
    (work / "resume.log").write_text(resumed.stdout + resumed.stderr)
    counts = after_resume(work, name, threshold, at_kill, tune_at_kill, env)
    return {"point": point, "killed_at_s": round(killed_at, 1), "trial_runs_at_kill": len(seen.trials),
            "evaluations_at_kill": seen.evaluations, "finished_at_kill": len(at_kill),
            "parent_at_kill": seen.parent, "survivors": survivors, "resume_refused": refused,
            "resume_exit": resumed.returncode,
            "resume_s": round(time.monotonic() - t1, 1), **counts}


def run_kill(root: Path, env: dict[str, str], points: list[int], *, trials: int, epochs: int,
             clean_rows: int) -> dict[str, Any]:
    """Part 1: kill -9 at each point, resume, count; prints the table."""
    model = poisoned_model(root, clean_rows)
    threshold = threshold_for(model)
    evals = round(epochs / 0.5)
    events = kill_events(trials, evals)
    space = write_space(root / "kill" / "space.yaml", model["world"], Path(model["checkpoint"]),
                        KILL_EXTRA.format(threshold=threshold, epochs=epochs, trials=trials))
    rows = []
    for point in points:
        rows.append({"event": events[point][0], **kill_point(root / "kill" / f"point{point}", env, space, point,
                                                            events[point][1], threshold)})
        print(f"kill point {point}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown(
        ["point", "killed when", "at kill: parent run / trial runs / evaluations / finished", "resume exit",
         "completed trials lost", "duplicate runs", "RUNNING left (MLflow / Optuna)", "steps logged twice",
         "re-suggested", "`results` = MLflow", "Tune board = MLflow", "outlived kill -9 of the group"],
        [[r["point"], f"{r['event']} ({r.get('killed_at_s')} s)",
          f"{'yes' if r.get('parent_at_kill') else 'no'} / {r.get('trial_runs_at_kill')} / "
          f"{r.get('evaluations_at_kill')} / {r.get('finished_at_kill')}",
          f"2 -> {r['resume_exit']} (nothing to resume)" if r.get("resume_refused") else r.get("resume_exit",
                                                                                                 r.get("error")),
          r.get("completed_lost"), r.get("duplicate_runs"), f"{r.get('running_mlflow')} / {r.get('running_optuna')}",
          r.get("steps_twice"), r.get("resuggested"), r.get("results_match"), r.get("tune_board_match"),
          len(r.get("survivors", []))] for r in rows]))
    for r in rows:
        for tid, why in (r.get("completed_lost_why") or {}).items():
            print(f"- point {r['point']}: trial {tid} had finished before the kill: {why}")
        if r.get("survivors"):
            print(f"- point {r['point']}: outlived the group kill: {'; '.join(r['survivors'])}")
        if r.get("resume_refused"):
            print(f"- point {r['point']}: `--resume` answered: {r['resume_refused']}")
    bad = [r["point"] for r in rows if r.get("resume_exit") != 0 or any(r.get(k) for k in (
        "completed_lost", "duplicate_runs", "running_mlflow", "running_optuna", "steps_twice"))
        or not (r.get("results_match") and r.get("tune_board_match"))]
    print(f"\n{trials} trials x {epochs} epochs x {clean_rows // 16} steps, an evaluation every half epoch, "
          f"2 at a time; threshold {threshold} (start ASR {model['metrics'][ASR]:.3f}); points not all 0: "
          f"{bad or 'none'}")
    return {"threshold": threshold, "start": model["metrics"], "rows": rows, "points_failing": bad}


# ============================================================================================ part 2: NaN trials
NAN_EXTRA = """
objective: {{threshold: {threshold}}}
epochs: 1
base: {{optim.warmup_steps: 2, method.name: shrink_perturb, device: cpu}}
space:
  method.perturb: {{choice: [0.0, 1.0e+30]}}
search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: 2, n_startup_trials: {trials}}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
"""


def run_nan(root: Path, env: dict[str, str], clean_rows: int, trials: int = 4) -> dict[str, Any]:
    """Part 2: a sweep where trials with perturb 1e30 diverge; FAILED in MLflow and Optuna, the rest finish."""
    model = poisoned_model(root, clean_rows)
    work = root / "nan"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    space = write_space(work / "space.yaml", model["world"], Path(model["checkpoint"]),
                        NAN_EXTRA.format(threshold=threshold_for(model), trials=trials))
    t0 = time.monotonic()
    proc = run_cli(["search", str(space), "--name", "nan", "--workdir", str(work)], env, work)
    (work / "sweep.log").write_text(proc.stdout + proc.stderr)
    groups = nan_groups(work, "nan")
    expect = {0.0: ("FINISHED", "COMPLETE"), 1e30: ("FAILED", "FAIL")}
    ok = proc.returncode == 0 and set(groups) == set(expect) and all(
        set(g["mlflow"]) == {expect[v][0]} and set(g["optuna"]) == {expect[v][1]}
        and g["mlflow"][expect[v][0]] == g["optuna"][expect[v][1]] == g["trials"]
        and (v != 0.0 or g["finite_evaluations"] >= g["trials"]) for v, g in groups.items())
    print(markdown(["method.perturb", "trials", "MLflow status", "Optuna state", "finite evaluations logged",
                    "error recorded on the run"],
                   [[f"{v:g}", g["trials"], dict(g["mlflow"]), dict(g["optuna"]), g["finite_evaluations"],
                     "; ".join(sorted(g["errors"])) or "-"] for v, g in sorted(groups.items())]))
    print(f"\nsweep exit code {proc.returncode}; RUNNING left: {sum(g['mlflow']['RUNNING'] for g in groups.values())}; "
          f"diverging trials isolated: {'yes' if ok else 'NO'}")
    return {"exit": proc.returncode, "isolated": ok, "minutes": round((time.monotonic() - t0) / 60, 1),
            "groups": {str(v): {k: (dict(x) if isinstance(x, Counter) else sorted(x) if isinstance(x, set) else x)
                                for k, x in g.items()} for v, g in groups.items()}}


def nan_groups(work: Path, name: str) -> dict[float, dict[str, Any]]:
    """perturb value -> trial count, MLflow statuses, Optuna states, finite evaluations, recorded errors."""
    client = mlflow_client(work)

    def group(value: float) -> dict[str, Any]:
        return groups.setdefault(value, {"trials": 0, "mlflow": Counter(), "optuna": Counter(),
                                         "finite_evaluations": 0, "errors": set()})

    groups: dict[float, dict[str, Any]] = {}
    for run in (r for r in sweep_runs(client, name) if is_trial(r) and not is_lost(r)):
        g = group(float(run.data.params["method.perturb"]))
        g["trials"] += 1
        g["mlflow"][run.info.status] += 1
        ev = evaluations(run_history(client, run))
        g["finite_evaluations"] += sum(math.isfinite(a) and math.isfinite(b) for a, b in ev.values())
        if "cleansweep.error" in run.data.tags:
            g["errors"].add(run.data.tags["cleansweep.error"][:90])
    for trial in optuna_trials(work / "sweeps" / name):
        group(float(trial.params.get("method.perturb", math.nan)))["optuna"][trial.state.name] += 1
    return groups


