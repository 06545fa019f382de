"""Sweep runs: one parent run per sweep, one child run per trial, and each trial's outcome on its run.

The layout of docs/interfaces.md: both kinds of run are found again by their `cleansweep.key` tag, so a resumed
sweep (or a resumed trial in a fresh Ray actor) reuses its runs. The driver, which knows why Tune ended a trial,
writes the outcome (`finish_trial`, `fail_trial`); a trial records its own error and best checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from cleansweep.runtime import layout
from cleansweep.tracking.runs import RunHandle, Status, find_run, mark_stale_runs, runs_tagged, start_run
from cleansweep.tracking.tags import (
    BEST_CKPT_TAG,
    BEST_STEP_TAG,
    ERROR_TAG,
    KIND_TAG,
    LOST_TAG,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
)


def sweep_key(name: str) -> str:
    """`cleansweep.key` of a sweep's parent run."""
    return f"sweep/{name}"


def trial_key(sweep: str, trial_id: str) -> str:
    """`cleansweep.key` of one trial's child run (Tune trial ids survive `Tuner.restore`)."""
    return f"sweep/{sweep}/trial/{trial_id}"


def find_sweep_run(client: MlflowClient, experiment_id: str, name: str) -> Any | None:
    """The parent run of sweep `name` in the experiment, or None."""
    return find_run(client, experiment_id, sweep_key(name))


def start_sweep(client: MlflowClient, experiment_id: str, name: str, *,
                params: Mapping[str, Any] | None = None) -> RunHandle:
    """Start (or, on resume, reopen) the parent run of sweep `name` and log its params once."""
    run = start_run(client, experiment_id, key=sweep_key(name), run_name=name,
                    tags={KIND_TAG: "sweep", SWEEP_TAG: name})
    if params:
        run.log_params(params, on_conflict="rename")
    return run


def start_trial(client: MlflowClient, experiment_id: str, *, sweep: str, trial_id: str, parent_run_id: str,
                params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> RunHandle:
    """Start (or reopen, after a restore) the child run of one trial, with its sampled params under dotted names."""
    run = start_run(client, experiment_id, key=trial_key(sweep, trial_id),
                    run_name=layout.trial_run_name(sweep, trial_id),
                    tags={KIND_TAG: "trial", SWEEP_TAG: sweep, TRIAL_ID_TAG: trial_id, **(tags or {})},
                    parent_run_id=parent_run_id)
    run.log_params(params, on_conflict="rename")
    return run


def end_if_running(client: MlflowClient, run_id: str, status: Status) -> bool:
    """Terminate `run_id` with `status` only if it is still RUNNING (a trial that ended itself keeps its status)."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def mark_stale_trials(client: MlflowClient, experiment_id: str, sweep: str) -> list[str]:
    """Mark the sweep's trial runs still RUNNING as KILLED (call when no trial of the sweep is alive)."""
    return mark_stale_runs(client, experiment_id, tags={KIND_TAG: "trial", SWEEP_TAG: sweep})


def tag_lost_trials(client: MlflowClient, experiment_id: str, sweep: str, known_trial_ids: Iterable[str],
                    tags: Mapping[str, str] | None = None) -> list[str]:
    """Tag the sweep's trial runs that Tune no longer knows (and end them KILLED if still RUNNING).

    A driver killed with SIGKILL loses the trials created after Tune's last experiment snapshot (at most ~1 s of
    them); `Tuner.restore` re-suggests replacements, so their MLflow runs would otherwise pass for sweep trials.

    Returns:
        The run ids tagged.
    """
    known, lost = set(known_trial_ids), []
    for run in runs_tagged(client, experiment_id, {KIND_TAG: "trial", SWEEP_TAG: sweep, **(tags or {})}):
        if run.data.tags.get(TRIAL_ID_TAG) in known or LOST_TAG in run.data.tags:
            continue
        client.set_tag(run.info.run_id, LOST_TAG, "created after Tune's last snapshot before a kill; re-suggested")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
        lost.append(run.info.run_id)
    return lost


# ------------------------------------------------------------------------------------------ trial outcomes
def record_best_checkpoint(client: MlflowClient, run_id: str, path: str, step: int) -> None:
    """Point the trial's run at the checkpoint of its best feasible evaluation (Tune's persisted copy)."""
    client.log_batch(run_id, tags=[RunTag(BEST_CKPT_TAG, str(path)), RunTag(BEST_STEP_TAG, str(int(step)))],
                     synchronous=True)


def record_error(run: RunHandle, exc: BaseException) -> None:
    """Keep a failed trial's error on its run (the UI shows it beside the FAILED status)."""
    run.set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:4000]})


def fail_trial(client: MlflowClient, run_id: str, cause: str) -> None:
    """End a trial Tune reports failed: FAILED, with `cause` as its error unless the trial recorded its own.

    A trial that raised tags its error itself (`record_error`); one whose worker process died (OOM killer, kill -9,
    a lost node) cannot, so the driver names the cause here. A run that already ended (say FINISHED just before its
    worker died) still becomes FAILED: Tune counts the trial as errored, so no reader may count it as a result.
    """
    run = client.get_run(run_id)
    if ERROR_TAG not in run.data.tags:
        client.set_tag(run_id, ERROR_TAG, cause[:4000])
    if run.info.status != "FAILED":
        client.set_terminated(run_id, status="FAILED")


def failed_trial(client: MlflowClient, experiment_id: str, sweep: str, trial_id: str) -> str | None:
    """The recorded cause of a trial whose run ended FAILED ("unknown cause" without one), else None."""
    run = find_run(client, experiment_id, trial_key(sweep, trial_id))
    if run is None or run.info.status != "FAILED":
        return None
    return run.data.tags.get(ERROR_TAG, "unknown cause")


def find_trial_run(client: MlflowClient, experiment_id: str, sweep: str, trial_id: str) -> str | None:
    """The run id of one trial of a sweep (None before the trial started its run)."""
    run = find_run(client, experiment_id, trial_key(sweep, trial_id))
    return None if run is None else run.info.run_id


def finished_trial(client: MlflowClient, experiment_id: str, sweep: str, trial_id: str) -> dict[str, Any] | None:
    """The last logged metrics (+ `mlflow_run_id`) of a trial whose run already ended FINISHED, else None.

    A driver killed within a second of a trial's end restores that trial from Tune's previous snapshot: its run
    says it is done, so it must not train (or log) again.
    """
    run = find_run(client, experiment_id, trial_key(sweep, trial_id))
    if run is None or run.info.status != "FINISHED":
        return None
    return {**run.data.metrics, "mlflow_run_id": run.info.run_id}


def finish_trial(client: MlflowClient, run_id: str, *, stopped_early: bool) -> None:
    """End a trial Tune completed: FINISHED (whatever it was), with `stopped_early` when the scheduler cut it short.

    A trial stopped by Tune (ASHA, the time budget, or having reached the scheduler's max_t) cannot tell from the
    inside why it was stopped, so it leaves its run RUNNING and the driver, which knows, ends it here.
    """
    client.set_tag(run_id, STOPPED_TAG, "true" if stopped_early else "false")
    if client.get_run(run_id).info.status != "FINISHED":  # RUNNING, or KILLED by an interrupt a resume outlived
        client.set_terminated(run_id, status="FINISHED")

