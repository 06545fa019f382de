"""Read side: sweeps in MLflow back as plain Python and pandas (`load_sweep`, `list_sweeps`, `run_tags`).

Used by report/study/notebook: MLflow in, plain pandas out, so nothing downstream imports mlflow or knows a tag.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from cleansweep.errors import UserError
from cleansweep.tracking.store import open_client
from cleansweep.tracking.tags import (
    BEST_CKPT_TAG,
    BEST_STEP_TAG,
    ERROR_TAG,
    KIND_TAG,
    LOST_TAG,
    PARENT_TAG,
    SAMPLED_TAG,
    STAGE_TAG,
    STEP_METRIC,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    tag_filter,
)


@dataclass(frozen=True)
class SweepRecord:
    """One sweep as stored in MLflow (the layout of docs/interfaces.md), as plain Python and pandas.

    Attributes:
        name: Sweep name (the parent run's name and `cleansweep.sweep` tag).
        parent_run_id: Id of the sweep's parent run (report artifacts go here).
        experiment_id: MLflow experiment holding the parent and its trials.
        params: Parent run params (flattened space + search settings), as strings.
        metrics: Parent run metrics (latest values), e.g. `start_zeroshot_top1`, `start_asr_top1`.
        tags: Parent run tags.
        trials: One row per trial child run: `run_id`, `trial_id`, `run_name`, `status`, `start_time` (ms),
            `stage` (main / preselect), `sampled` (dict of the sampled hyperparameters), `best_checkpoint` (path or
            None), `best_step`, `stopped_early` (bool), `error` (str or None), one `params.<dotted name>` column per
            logged param (strings, as MLflow stores them) and one `tags.<key>` column per `cleansweep.*` tag.
        history: One row per evaluation (trial run and step): `run_id`, `trial_id`, `step` and one column per
            logged metric key (`zeroshot_top1`, `asr_top1`, `epoch`, ...); NaN where a key was not logged.
    """

    name: str
    parent_run_id: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    trials: pd.DataFrame
    history: pd.DataFrame


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} in {client.tracking_uri}; "
                        "check --experiment and the tracking URI")
    return [exp.experiment_id]


def list_sweeps(tracking_uri: str, experiment: str | None = None) -> pd.DataFrame:
    """Sweep parent runs in the store, newest first.

    Args:
        tracking_uri: Resolved MLflow tracking URI.
        experiment: Experiment name to look in; None = every active experiment.

    Returns:
        DataFrame with `name`, `run_id`, `experiment_id`, `status`, `start_time` (ms).
    """
    client = open_client(tracking_uri)
    runs = _search_all(client, _experiment_ids(client, experiment), f"tags.`{KIND_TAG}` = 'sweep'")
    rows = [{"name": r.data.tags.get(SWEEP_TAG, r.info.run_name), "run_id": r.info.run_id,
             "experiment_id": r.info.experiment_id, "status": r.info.status, "start_time": r.info.start_time}
            for r in runs]
    frame = pd.DataFrame(rows, columns=["name", "run_id", "experiment_id", "status", "start_time"])
    return frame.sort_values("start_time", ascending=False, ignore_index=True)


# An MLflow server reads one metric of up to 100 runs per request on the route its UI draws charts from
# (mlflow/server/handlers.py, get_metric_history_bulk_handler: at most 100 run ids and 25000 points per response).
# One GetMetricHistory per run and key cost `results` of a 300-trial sweep ~3300 round trips (~100 s); this ~35.
BULK_ROUTE = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
BULK_RUNS, BULK_POINTS = 100, 25000


def bulk_metric_history(tracking_uri: str, run_ids: list[str], key: str,
                        max_points: int = BULK_POINTS) -> dict[str, list[tuple[int, int, float]]] | None:
    """Every (step, timestamp, value) of metric `key` of each run, in one request per 100 runs.

    Returns None where the store is not an MLflow server, the server lacks the route, or a response may have been
    cut at `max_points`: the caller then reads each run's history on its own.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request_safe

    out: dict[str, list[tuple[int, int, float]]] = {rid: [] for rid in run_ids}
    for i in range(0, len(run_ids), BULK_RUNS):
        params = [("run_id", rid) for rid in run_ids[i:i + BULK_RUNS]]
        params += [("metric_key", key), ("max_results", str(max_points))]
        try:
            reply = http_request_safe(get_default_host_creds(tracking_uri), BULK_ROUTE, "GET", params=params,
                                      max_retries=0).json()
        except (MlflowException, OSError, ValueError):
            return None
        points = reply.get("metrics", [])
        if len(points) >= max_points:
            return None
        for m in points:
            out[m["run_id"]].append((int(m["step"]), int(m["timestamp"]), float(m["value"])))
    return out


def _metric_points(client: MlflowClient, tracking_uri: str,
                   runs: list[Any]) -> dict[str, dict[str, list[tuple[int, int, float]]]]:
    """run id -> metric key -> every logged (step, timestamp, value); in bulk from a server, else run by run."""
    out: dict[str, dict[str, list[tuple[int, int, float]]]] = {r.info.run_id: {} for r in runs}
    for key in sorted({k for r in runs for k in r.data.metrics if k != STEP_METRIC}):
        ids = [r.info.run_id for r in runs if key in r.data.metrics]  # the resume sentinel repeats the step: skipped
        bulk = bulk_metric_history(tracking_uri, ids, key)
        for rid in ids:
            out[rid][key] = bulk[rid] if bulk is not None else [
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(rid, key)]
    return out


def _history_rows(run_id: str, trial_id: str, metrics: dict[str, list[tuple[int, int, float]]]) -> list[dict]:
    # One evaluation = one batch of metrics at one step; a step re-logged after a resume keeps its newest value.
    points: dict[int, dict[str, tuple[int, float]]] = {}
    for key, history in metrics.items():
        for step, timestamp, value in history:
            old = points.setdefault(step, {}).get(key)
            if old is None or timestamp >= old[0]:
                points[step][key] = (timestamp, value)
    return [{"run_id": run_id, "trial_id": trial_id, "step": step, **{k: v for k, (_, v) in kv.items()}}
            for step, kv in sorted(points.items())]


def _trial_fields(tags: Mapping[str, str]) -> dict[str, Any]:
    """A trial run's cleansweep tags as plain fields (readers never need a tag name)."""
    step = tags.get(BEST_STEP_TAG)
    return {"stage": tags.get(STAGE_TAG, "main"), "sampled": json.loads(tags[SAMPLED_TAG]) if SAMPLED_TAG in tags
            else {}, "best_checkpoint": tags.get(BEST_CKPT_TAG), "best_step": int(step) if step else None,
            "stopped_early": tags.get(STOPPED_TAG) == "true", "error": tags.get(ERROR_TAG)}


def load_sweep(name: str, tracking_uri: str, *, experiment: str | None = None) -> SweepRecord:
    """Read a sweep (parent run, trial runs, every evaluation) back from MLflow.

    Args:
        name: Sweep name (`cleansweep.sweep` tag of the parent run). The newest parent of that name wins.
        tracking_uri: Resolved MLflow tracking URI (sqlite file or http server).
        experiment: Experiment name to look in; None = every active experiment.

    Returns:
        The sweep as a `SweepRecord` of dicts and DataFrames.

    Raises:
        UserError: No sweep of that name exists (the message lists the sweeps that do).
    """
    client = open_client(tracking_uri)
    ids = _experiment_ids(client, experiment)
    query = f"tags.`{KIND_TAG}` = 'sweep' and {tag_filter(SWEEP_TAG, name)}"
    parents = _search_all(client, ids, query)
    if not parents:
        known = ", ".join(list_sweeps(tracking_uri, experiment)["name"].unique()[:20]) or "none"
        raise UserError(f"no sweep named {name!r} in {tracking_uri} (sweeps there: {known}); "
                        "check the name, --experiment and --tracking-uri")
    parent = max(parents, key=lambda r: r.info.start_time)
    children = _search_all(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    children = [r for r in children if LOST_TAG not in r.data.tags]  # replaced by re-suggested trials
    children.sort(key=lambda r: (r.info.start_time, r.info.run_name))
    trial_rows, history_rows = [], []
    metric_points = _metric_points(client, tracking_uri, children)
    for run in children:
        trial_id = run.data.tags.get(TRIAL_ID_TAG, run.info.run_name)
        trial_rows.append({"run_id": run.info.run_id, "trial_id": trial_id, "run_name": run.info.run_name,
                           "status": run.info.status, "start_time": run.info.start_time,
                           **_trial_fields(run.data.tags),
                           **{f"params.{k}": v for k, v in run.data.params.items()},
                           **{f"tags.{k}": v for k, v in run.data.tags.items() if k.startswith("cleansweep.")}})
        history_rows.extend(_history_rows(run.info.run_id, trial_id, metric_points[run.info.run_id]))
    trials = pd.DataFrame(trial_rows, columns=None if trial_rows else
                          ["run_id", "trial_id", "run_name", "status", "start_time", *_trial_fields({})])
    history = pd.DataFrame(history_rows, columns=None if history_rows else ["run_id", "trial_id", "step"])
    return SweepRecord(name=name, parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
                       params=dict(parent.data.params), metrics=dict(parent.data.metrics),
                       tags=dict(parent.data.tags), trials=trials, history=history)


def run_tags(tracking_uri: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
    """Tags of each run (e.g. a trial's sampled params and best checkpoint path), by run id."""
    client = open_client(tracking_uri)
    return {rid: dict(client.get_run(rid).data.tags) for rid in run_ids}

