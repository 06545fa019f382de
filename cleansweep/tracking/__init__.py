"""MLflow adapter: the only package that imports mlflow. This facade re-exports its public API (`tracking.x(...)`).

- `store`: the tracking URI (`resolve_tracking_uri`), checks before a command starts (`check_store`), a client
  (`open_client`) and experiments (`get_or_create_experiment`).
- `runs`: start-or-resume a run by a stable key, `RunHandle` (metrics, params, tags, artifacts, end status),
  stale runs of killed processes.
- `trials`: a sweep's parent run, its trial runs and their outcomes.
- `read`: sweeps back as pandas (`load_sweep`, `list_sweeps`, `run_tags`).
- `tags`: every tag name cleansweep writes; `registry`: the best model in the Model Registry.
- `outage`: MLflow calls that wait out a tracking-server outage; `server`: `mlflow server` for `cleansweep ui`.
"""

from __future__ import annotations

from cleansweep.tracking import outage, store
from cleansweep.tracking.read import SweepRecord, bulk_metric_history, list_sweeps, load_sweep, run_tags
from cleansweep.tracking.registry import register_best_model
from cleansweep.tracking.runs import (
    TRUNCATED_MARKER,
    RunHandle,
    Status,
    exit_status,
    find_run,
    flatten,
    log_report_artifacts,
    mark_stale_runs,
    runs_tagged,
    start_run,
)
from cleansweep.tracking.server import (
    check_port_free,
    exposure_warning,
    mlflow_ui_command,
    serve_ui,
    stop_server,
    ui_url,
    wait_for_server,
)
from cleansweep.tracking.store import (
    check_sqlite_file,
    check_store,
    get_or_create_experiment,
    open_client,
    probe_server,
    resolve_tracking_uri,
    server_label,
)
from cleansweep.tracking.tags import (
    BEST_CKPT_TAG,
    BEST_MODEL_PROBLEM_TAG,
    BEST_MODEL_TAG,
    BEST_STEP_TAG,
    ERROR_TAG,
    KEY_TAG,
    KIND_TAG,
    LOST_TAG,
    NODE_TAG,
    PARENT_TAG,
    RUN_NAME_TAG,
    SAMPLED_TAG,
    STAGE_TAG,
    STALE_TAG,
    STEP_METRIC,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    pretrain_tag,
    pretrain_tags,
    tag_filter,
    trial_tags,
)
from cleansweep.tracking.trials import (
    end_if_running,
    fail_trial,
    failed_trial,
    find_sweep_run,
    find_trial_run,
    finish_trial,
    finished_trial,
    mark_stale_trials,
    record_best_checkpoint,
    record_error,
    start_sweep,
    start_trial,
    sweep_key,
    tag_lost_trials,
    trial_key,
)

__all__ = [
    # modules
    "outage", "store",
    # store
    "check_sqlite_file", "check_store", "get_or_create_experiment", "open_client", "probe_server",
    "resolve_tracking_uri", "server_label",
    # tags
    "BEST_CKPT_TAG", "BEST_MODEL_PROBLEM_TAG", "BEST_MODEL_TAG", "BEST_STEP_TAG", "ERROR_TAG", "KEY_TAG", "KIND_TAG",
    "LOST_TAG", "NODE_TAG", "PARENT_TAG", "RUN_NAME_TAG", "SAMPLED_TAG", "STAGE_TAG", "STALE_TAG", "STEP_METRIC",
    "STOPPED_TAG", "SWEEP_TAG", "TRIAL_ID_TAG", "pretrain_tag", "pretrain_tags", "tag_filter", "trial_tags",
    # runs
    "TRUNCATED_MARKER", "RunHandle", "Status", "exit_status", "find_run", "flatten", "log_report_artifacts",
    "mark_stale_runs", "runs_tagged", "start_run",
    # trials
    "end_if_running", "fail_trial", "failed_trial", "find_sweep_run", "find_trial_run", "finish_trial",
    "finished_trial", "mark_stale_trials", "record_best_checkpoint", "record_error", "start_sweep", "start_trial",
    "sweep_key", "tag_lost_trials", "trial_key",
    # read
    "SweepRecord", "bulk_metric_history", "list_sweeps", "load_sweep", "run_tags",
    # registry
    "register_best_model",
    # server
    "check_port_free", "exposure_warning", "mlflow_ui_command", "serve_ui", "stop_server", "ui_url",
    "wait_for_server",
]
