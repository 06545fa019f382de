"""What Tune recorded about a stage's trials, read where it is right (Ray 2.60): which trials a `--resume` would run
on, and why a trial failed. The sweep driver (`search`) decides with them when a stage is over and what a failed
trial's MLflow run says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import cloudpickle, tune
from ray.exceptions import OutOfMemoryError, RayActorError


def resumable_trials(stage_dir: Path, grid: tune.ResultGrid | None = None) -> list[str]:
    """The trials that the stage's last experiment snapshot holds unfinished (what `--resume` would run on), less
    those `grid` (the stage's `fit` result) says errored.

    Not the statuses of the grid alone: on Ctrl-C / SIGTERM Tune snapshots the experiment with the running trials
    as they are, then stops their actors and marks those trials TERMINATED in memory
    (`TuneController._schedule_trial_stop`, Ray 2.60), so the grid cannot tell an interrupted trial from a finished
    one (judged by it, an interrupted trial was closed FINISHED `stopped_early` and lost its resume state). Nor the
    snapshot alone: a trial whose worker died is ERROR in memory but never written again, so the snapshot still
    holds it running (`clean_trial` refuses to run such a trial again on a resume).
    """
    errored = {(r.metrics or {}).get("trial_id") or Path(r.path).name for r in grid or [] if r.error is not None}
    trials = tune.ExperimentAnalysis(str(stage_dir)).trials
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR") and t.trial_id not in errored]


def recorded_error(trial: Any) -> BaseException | None:
    """The error Tune just recorded for a failed trial, from the driver's local copy (`Trial.handle_error` writes it
    there; `get_pickled_error` reads the storage copy, which is synced later and is not there yet)."""
    path = trial.pickled_error_file  # this driver's own file
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        return cloudpickle.load(f)


def error_is(error: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether a trial's recorded error is `kind`, raised in the trial (Ray wraps it: `RayTaskError(kind)` or its
    `cause`)."""
    return isinstance(error, kind) or isinstance(getattr(error, "cause", None), kind)


def failure_cause(error: BaseException | str | None) -> str:
    """One line saying why Tune failed a trial: `trial worker died: ...` when its process died (OOM killer, kill -9,
    a lost node: the trial could not record its own error), else the error's type and first line."""
    if error is None:
        return "trial failed; Tune recorded no error"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, str):  # Tune hands some errors back as their text only
        return lines[0] if lines else "trial failed; Tune recorded no error"
    if isinstance(error, RayActorError):
        why = next((line for line in lines if line.startswith("The actor is dead because")), "")
        return f"trial worker died: {type(error).__name__}: {' '.join([lines[0] if lines else '', why]).strip()}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def out_of_memory(error: BaseException) -> OutOfMemoryError | None:
    """The `OutOfMemoryError` of Ray's memory monitor behind `error`, if any. Tune's actor manager (Ray 2.60,
    ray/air/execution/_internal/actor_manager.py `_actor_task_failed`) knows only `RayActorError` and
    `RayTaskError`; a worker the memory monitor killed fails its task with `OutOfMemoryError`, which it re-raises as
    `RuntimeError("Caught unexpected exception ...")`, ending `Tuner.fit` for every trial."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OutOfMemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
