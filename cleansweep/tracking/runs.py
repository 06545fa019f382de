"""Write side of MLflow runs: start-or-resume a run by a stable key, log metrics, params, tags and artifacts, end it.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the same code works in the
CLI driver, in Ray Train workers and in Tune trial threads.

- `start_run`: start-or-resume a run identified by a tag (`cleansweep.key`). `MlflowClient.create_run` always
  creates a new run (mlflow/tracking/client.py), and a Tune trial resumed by `Tuner.restore` after a driver kill
  runs its function again: starting a run there would leave a second run for the same trial, the first stuck
  RUNNING. Finding the trial's run by its key reuses it instead.
- `RunHandle`: one `log_batch` per evaluation, a step is never logged twice (on open it reads the run's last
  logged step from the `step` sentinel metric: MLflow keeps every point logged, so a re-logged step would show
  twice in the metric's history), params once, tags, artifacts, end status. Over a network store the client is
  an `outage.PatientClient` (from `store.open_client`): a write waits out a server outage instead of failing.
- `mark_stale_runs`: a run ends only when its process says so (`set_terminated`); after a SIGKILL it stays
  RUNNING forever, so RUNNING runs left behind by a killed process become KILLED.

Sweeps build on these (`trials`): a parent run is `start_run(..., key=sweep key)`, a trial is
`start_run(..., key=trial key, parent_run_id=parent.run_id)` (MLflow's `mlflow.parentRunId` tag nests it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from cleansweep.errors import UserError
from cleansweep.tracking.store import open_client
from cleansweep.tracking.tags import KEY_TAG, PARENT_TAG, STALE_TAG, STEP_METRIC, tag_filter

TRUNCATED_MARKER = "...[truncated]"
Status = Literal["FINISHED", "FAILED", "KILLED"]


# ------------------------------------------------------------------------------------------------ runs
def find_run(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    """The newest run of the experiment tagged `cleansweep.key = key`, or None."""
    runs = client.search_runs([experiment_id], filter_string=tag_filter(KEY_TAG, key),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def start_run(client: MlflowClient, experiment_id: str, *, key: str, run_name: str,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> RunHandle:
    """Start the run identified by `key`, or resume it (status back to RUNNING) if it exists.

    Args:
        client: From `open_client`.
        experiment_id: From `get_or_create_experiment`.
        key: Stable identity of the run (e.g. `pretrain/NAME/<uid>` or `sweep/NAME/<trial id>`).
        run_name: Display name.
        tags: Extra tags, set on creation and on resume.
        parent_run_id: Nest under this run (sweep trials).

    Returns:
        A `RunHandle` positioned after the run's last logged step.
    """
    all_tags = {KEY_TAG: key, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = find_run(client, experiment_id, key)
    if run is None:
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return RunHandle(client, run.info.run_id, last_step=-1)
    client.update_run(run.info.run_id, status="RUNNING")
    handle = RunHandle(client, run.info.run_id)
    handle.set_tags(all_tags)
    return handle


def runs_tagged(client: MlflowClient, experiment_id: str, tags: Mapping[str, str] | None, *conditions: str) -> list:
    """Runs of the experiment whose tags equal `tags` and that meet the extra filter `conditions`."""
    filters = [*conditions] + [tag_filter(k, v) for k, v in (tags or {}).items()]
    return client.search_runs([experiment_id], filter_string=" and ".join(filters), max_results=10_000)


def mark_stale_runs(client: MlflowClient, experiment_id: str, *, tags: Mapping[str, str] | None = None,
                    exclude: Iterable[str] = ()) -> list[str]:
    """Mark RUNNING runs whose tags match `tags` as KILLED (left behind by a process killed with SIGKILL).

    Only call this when no other live process writes to the matching runs (e.g. a driver resuming its own sweep):
    a RUNNING status alone cannot tell a live run from a dead one.

    Returns:
        The ids of the runs marked KILLED.
    """
    skip = set(exclude)
    marked = []
    for run in runs_tagged(client, experiment_id, tags, "attributes.status = 'RUNNING'"):
        if run.info.run_id in skip:
            continue
        client.set_tag(run.info.run_id, STALE_TAG, "killed process; marked by mark_stale_runs")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    return marked


class RunHandle:
    """Write side of one MLflow run, by explicit run id (picklable as `(tracking_uri, run_id)` via `reopen`)."""

    def __init__(self, client: MlflowClient, run_id: str, *, last_step: int | None = None):
        self.client = client
        self.run_id = run_id
        self.last_step = self._read_last_step() if last_step is None else last_step
        # The run's params as this handle knows them: {} for a run it just created, None = read them first.
        self._params: dict[str, str] | None = {} if last_step == -1 else None

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> RunHandle:
        """Attach to an existing run from another process (e.g. a Ray worker)."""
        return cls(open_client(tracking_uri), run_id)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def _read_last_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, STEP_METRIC)
        return max((int(m.step) for m in history), default=-1)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Log one evaluation as one batch at `step`; numeric values only (bools as 0/1, others ignored).

        Returns:
            False (and logs nothing) when `step` was already logged, e.g. re-reported after a resume.
        """
        step = int(step)
        if step <= self.last_step:
            return False
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        values[STEP_METRIC] = float(step)
        entries = [Metric(k, v, now, step) for k, v in values.items()]
        # The sentinel goes last so a crash mid-way never marks a step as logged before its values are.
        entries.sort(key=lambda m: m.key == STEP_METRIC)
        for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i:i + MAX_METRICS_PER_BATCH], synchronous=True)
        self.last_step = step
        return True

    def log_params(self, params: Mapping[str, Any], *, on_conflict: Literal["error", "rename"] = "error") -> dict:
        """Log (nested) params once under dotted keys; values over 6000 characters end in `...[truncated]`.

        MLflow params are immutable. A key already logged with the same value is skipped. A different value raises
        a `UserError` by default; with `on_conflict="rename"` it is stored as `<key>.v2` (`.v3`, ...) instead, so
        a resumed run whose settings changed keeps both values.

        Returns:
            The params actually written (key -> stored string).
        """
        if self._params is None:
            self._params = dict(self.client.get_run(self.run_id).data.params)
        existing = self._params
        new: dict[str, str] = {}
        for key, value in flatten(params).items():
            text = _param_text(value)
            if existing.get(key) == text:
                continue
            if key in existing:
                if on_conflict == "error":
                    raise UserError(f"MLflow param {key!r} of run {self.run_id} is {existing[key]!r}, now {text!r}; "
                                    "params are immutable: keep the setting or start a new run (another name)")
                key = next(f"{key}.v{n}" for n in range(2, 10_000)
                           if existing.get(f"{key}.v{n}") in (None, text))
                if existing.get(key) == text:
                    continue
            new[key] = text
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
            existing.update((p.key, p.value) for p in items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        return new

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are stringified."""
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: Status = "FINISHED") -> None:
        """Terminate the run with FINISHED, FAILED or KILLED."""
        if status not in get_args(Status):  # a typo, or a status that does not end a run (RUNNING, SCHEDULED)
            raise ValueError(f"run status {status!r} does not end a run; use one of {', '.join(get_args(Status))}")
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self.end(exit_status(exc))


def exit_status(exc: BaseException | None) -> Status:
    """FINISHED without an exception, KILLED for Ctrl-C / SIGTERM, FAILED otherwise."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


# ------------------------------------------------------------------------------------------------ helpers
def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}`)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_text(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[:MAX_PARAM_VAL_LENGTH - len(TRUNCATED_MARKER)] + TRUNCATED_MARKER
    return text


def _is_number(value: Any) -> bool:
    # NaN is logged too: a diverged run should show it.
    if isinstance(value, bool | int | float):
        return True
    return hasattr(value, "item") and getattr(value, "ndim", 1) == 0  # numpy / torch scalars


def log_report_artifacts(run_id: str, local_dir: str | Path, tracking_uri: str, *,
                         artifact_path: str = "report") -> None:
    """Upload every file of `local_dir` as artifacts of an existing (possibly finished) run.

    Args:
        run_id: Run to attach the files to (the sweep's parent run).
        local_dir: Folder of report files.
        tracking_uri: Resolved MLflow tracking URI.
        artifact_path: Folder inside the run's artifacts.
    """
    open_client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path=artifact_path)

