"""MLflow adapter: the only module that imports mlflow.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the same code works in the
CLI driver, in Ray Train workers and in Tune trial threads. The pieces:

- `resolve_tracking_uri`: explicit > `MLFLOW_TRACKING_URI` > `sqlite:///<abs workdir>/mlflow.db`, always absolute,
  because Ray workers run in another CWD (stack notes).
- `get_or_create_experiment`: tolerates two processes creating the same experiment at once.
- `start_run`: start-or-resume a run identified by a tag (`cleansweep.key`): a re-run or a resume after a crash
  reuses the run instead of creating a duplicate (reliability notes: kill + restore produced duplicates).
- `RunHandle`: one `log_batch` per evaluation, a step is never logged twice (on open it reads the run's last
  logged step from the `step` sentinel metric), params once, tags, artifacts, end status.
- `mark_stale_runs`: RUNNING runs left behind by a killed process become KILLED.

Sweeps build on these: a parent run is `start_run(..., key=sweep key)`, a trial is
`start_run(..., key=trial key, parent_run_id=parent.run_id)` (MLflow's `mlflow.parentRunId` tag nests it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from cleansweep.errors import UserError
from cleansweep.runtime import layout
from cleansweep.tracking import outage
from cleansweep.tracking.store import check_sqlite_file, check_store, probe_server, server_label  # noqa: F401 - check_store: callers' entry

# Every MLflow tag cleansweep writes or reads is named here (docs/interfaces.md, "MLflow layout").
KEY_TAG = "cleansweep.key"  # stable identity of a run: a re-run or resume finds it again
KIND_TAG = "cleansweep.kind"  # pretrain | sweep | trial
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
SWEEP_TAG = "cleansweep.sweep"
TRIAL_ID_TAG = "cleansweep.trial_id"
STAGE_TAG = "cleansweep.stage"  # preselect | main
SAMPLED_TAG = "cleansweep.sampled"  # the trial's sampled hyperparameters as JSON
BEST_CKPT_TAG = "cleansweep.best_checkpoint"  # storage path of the trial's best feasible checkpoint
BEST_STEP_TAG = "cleansweep.best_step"
ERROR_TAG = "cleansweep.error"
STOPPED_TAG = "cleansweep.stopped_early"  # "true" when the scheduler (ASHA) or the time budget ended the trial
LOST_TAG = "cleansweep.lost"  # a trial run Tune lost in a driver kill (see `tag_lost_trials`)
STALE_TAG = "cleansweep.stale"
NODE_TAG = "cleansweep.node"  # the Ray node a trial ran on
BEST_MODEL_TAG = "cleansweep.best_model"  # on a sweep's parent run: registered model name and version
BEST_MODEL_PROBLEM_TAG = "cleansweep.best_model_problem"  # on a parent run: why its best model was not delivered
_PRETRAIN_TAGS = {"objective": "cleansweep.objective", "dataset": "cleansweep.dataset",
                  "train_csv_sha256": "cleansweep.train_csv_sha256", "attack": "cleansweep.attack",
                  "target": "cleansweep.target", "eval_dir": "cleansweep.eval_dir",
                  "poison_manifest_sha256": "cleansweep.poison_manifest_sha256",
                  "worker_nodes": "cleansweep.worker_nodes", "num_nodes": "cleansweep.num_nodes",
                  "selection": "cleansweep.selection", "selected_step": "cleansweep.selected_step",
                  "selected_zeroshot_top1": "cleansweep.selected_zeroshot_top1",
                  "selected_asr_top1": "cleansweep.selected_asr_top1", "selected_path": "cleansweep.selected_path"}
STEP_METRIC = "step"  # sentinel: logged with every batch, its history tells a resumed run where it stopped
TRUNCATED_MARKER = "...[truncated]"
Status = Literal["FINISHED", "FAILED", "KILLED"]


def pretrain_tags(**values: Any) -> dict[str, str]:
    """Tags of a pre-training run from plain names (`objective=`, `dataset=`, `selected_step=`, ...; see
    `_PRETRAIN_TAGS`); None values are left out."""
    unknown = set(values) - set(_PRETRAIN_TAGS)
    if unknown:
        raise ValueError(f"unknown pre-training tag(s) {sorted(unknown)}; known: {sorted(_PRETRAIN_TAGS)}")
    return {_PRETRAIN_TAGS[k]: str(v) for k, v in values.items() if v is not None}


def pretrain_tag(name: str) -> str:
    """The MLflow tag key of one pre-training field (for readers filtering runs)."""
    return _PRETRAIN_TAGS[name]


# ------------------------------------------------------------------------------------------------ uri, client
_STORE_SCHEMES = {"sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}


def resolve_tracking_uri(explicit: str | None, workdir: Path, env: Mapping[str, str] | None = None) -> str:
    """The tracking URI every process of a run uses, made absolute.

    Args:
        explicit: `mlflow.tracking_uri` from the config or a flag; wins when set.
        workdir: Working directory; the default store is `<workdir>/mlflow.db` (sqlite, never the file store).
        env: Environment to read `MLFLOW_TRACKING_URI` from (default `os.environ`).

    Returns:
        A URI such as `sqlite:////abs/path/mlflow.db` or `http://127.0.0.1:5000`.
    """
    env = os.environ if env is None else env
    uri = explicit or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / layout.MLFLOW_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///rel.db is relative to the CWD, which differs in Ray workers: anchor it to the workdir.
        rel = uri[len("sqlite:///"):]
        uri = f"sqlite:///{(Path(workdir) / rel).resolve()}"
    elif "://" not in uri:
        raise UserError(f"tracking URI {uri!r} has no scheme; use sqlite:///PATH.db or http://HOST:PORT")
    elif uri.startswith("file:") or uri.startswith("/"):
        raise UserError(f"tracking URI {uri!r} is the deprecated file store; use sqlite:///PATH.db or http://HOST:PORT")
    elif uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise UserError("a sqlite tracking URI names a file: write sqlite:///relative.db or sqlite:////abs/path.db")
    elif uri.split("://")[0].split("+")[0] not in _STORE_SCHEMES:
        raise UserError(f"tracking URI scheme {uri.split('://')[0]!r} is not an MLflow store; use sqlite:///PATH.db, "
                        "http(s)://HOST:PORT or a database URI (postgresql://, mysql://)")
    return uri


_SQLITE_READY: set[str] = set()
# Creating a fresh store logs its schema steps at INFO on stderr, where a command's only line should be its error.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# A database error (say, a full disk) is logged there with its traceback and then raised; the raised error is what
# the command reports (one line), so the log copy would only bury it.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def open_client(uri: str, *, schema_ready: bool = False, wait_for_server: bool = False) -> MlflowClient:
    """A client bound to `uri` (for sqlite: the folder created and the database schema ready).

    `schema_ready=True` (sweep trials: their driver opened the database before starting any) skips the lock, so
    trials starting together do not queue behind each other's store set-up. A network store's client rides out
    an outage once the command runs (`outage.PatientClient`); its first check fails in seconds, unless
    `wait_for_server` (trials of a started sweep: the server may be restarting) waits for it too.
    """
    if not uri.startswith("sqlite:///"):
        label = server_label(uri)
        if wait_for_server:
            outage.call_patiently(probe_server, uri, what=label)
        else:
            probe_server(uri)
        return outage.PatientClient(MlflowClient(tracking_uri=uri), label)
    if uri in _SQLITE_READY or schema_ready:  # MLflow keeps one store per URI per process: the schema step is done
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    check_sqlite_file(db)  # before the lock file: a refusal writes nothing beside someone's CSV
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a sqlite schema on first use; two processes doing it at once (a sweep and a
    # reader, or `cleansweep ui`) corrupt the alembic version row and crash one of them. Serialise that step.
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # builds the store: schema creation/migration under the lock
    _SQLITE_READY.add(uri)
    return client


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    # MLflow's sqlite default artifact root is ./mlruns of the CWD at the time; keep artifacts beside the database.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / layout.MLFLOW_ARTIFACTS / experiment).as_uri()
    return None  # a tracking server decides (and proxies) artifact storage


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Return the id of experiment `name`, creating it if needed; safe when processes race to create it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_default_artifact_location(
                client.tracking_uri, name))
        except MlflowException:
            # Another process created it between our lookup and our create (stack notes: creation races).
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                        "or choose another experiment name")
    return exp.experiment_id


# ------------------------------------------------------------------------------------------------ runs
def find_run(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    """The newest run of the experiment tagged `cleansweep.key = key`, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{_quote(key)}'",
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


def _runs_tagged(client: MlflowClient, experiment_id: str, tags: Mapping[str, str] | None, *conditions: str) -> list:
    """Runs of the experiment whose tags equal `tags` and that meet the extra filter `conditions`."""
    filters = [*conditions] + [f"tags.`{k}` = '{_quote(v)}'" for k, v in (tags or {}).items()]
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
    for run in _runs_tagged(client, experiment_id, tags, "attributes.status = 'RUNNING'"):
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
        RunStatus.from_string(status)  # rejects typos
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


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


# ------------------------------------------------------------------------------------------ reading sweeps back
# Used by report/study/notebook: MLflow in, plain pandas out, so nothing downstream imports mlflow or knows a tag.


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


def _history_rows(client: MlflowClient, run: Any, trial_id: str) -> list[dict[str, Any]]:
    # One evaluation = one batch of metrics at one step; a step re-logged after a resume keeps its newest value.
    points: dict[int, dict[str, tuple[int, float]]] = {}
    for key in run.data.metrics:
        if key == STEP_METRIC:
            continue  # the resume sentinel repeats the step itself
        for m in client.get_metric_history(run.info.run_id, key):
            old = points.setdefault(m.step, {}).get(key)
            if old is None or m.timestamp >= old[0]:
                points[m.step][key] = (m.timestamp, m.value)
    return [{"run_id": run.info.run_id, "trial_id": trial_id, "step": step, **{k: v for k, (_, v) in kv.items()}}
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
    query = f"tags.`{KIND_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{_quote(name)}'"
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
    for run in children:
        trial_id = run.data.tags.get(TRIAL_ID_TAG, run.info.run_name)
        trial_rows.append({"run_id": run.info.run_id, "trial_id": trial_id, "run_name": run.info.run_name,
                           "status": run.info.status, "start_time": run.info.start_time,
                           **_trial_fields(run.data.tags),
                           **{f"params.{k}": v for k, v in run.data.params.items()},
                           **{f"tags.{k}": v for k, v in run.data.tags.items() if k.startswith("cleansweep.")}})
        history_rows.extend(_history_rows(client, run, trial_id))
    trials = pd.DataFrame(trial_rows, columns=None if trial_rows else
                          ["run_id", "trial_id", "run_name", "status", "start_time", *_trial_fields({})])
    history = pd.DataFrame(history_rows, columns=None if history_rows else ["run_id", "trial_id", "step"])
    return SweepRecord(name=name, parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
                       params=dict(parent.data.params), metrics=dict(parent.data.metrics),
                       tags=dict(parent.data.tags), trials=trials, history=history)


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


# ------------------------------------------------------------------------------------------ writing sweeps
# The layout of docs/interfaces.md: one parent run per sweep, one child run per trial, both found again by their
# `cleansweep.key` tag, so a resumed sweep (or a resumed trial in a fresh Ray actor) reuses its runs.
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
    for run in _runs_tagged(client, experiment_id, {KIND_TAG: "trial", SWEEP_TAG: sweep, **(tags or {})}):
        if run.data.tags.get(TRIAL_ID_TAG) in known or LOST_TAG in run.data.tags:
            continue
        client.set_tag(run.info.run_id, LOST_TAG, "created after Tune's last snapshot before a kill; re-suggested")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
        lost.append(run.info.run_id)
    return lost


def run_tags(tracking_uri: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
    """Tags of each run (e.g. a trial's sampled params and best checkpoint path), by run id."""
    client = open_client(tracking_uri)
    return {rid: dict(client.get_run(rid).data.tags) for rid in run_ids}


# ------------------------------------------------------------------------------------------ trial outcomes
def trial_tags(stage: str, sampled: Mapping[str, Any], node: str | None = None) -> dict[str, str]:
    """Tags a trial run starts with: its stage, its sampled hyperparameters (JSON) and the Ray node it runs on."""
    tags = {STAGE_TAG: stage, SAMPLED_TAG: json.dumps(dict(sampled), default=str)}
    return {**tags, NODE_TAG: node} if node else tags


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


# ------------------------------------------------------------------------------------------ best model
def register_best_model(parent: RunHandle, model_dir: Path, *, sweep: str, description: str,
                        tags: Mapping[str, Any]) -> dict[str, str]:
    """Log the sweep's best feasible model (weights + card) on its parent run and register it in the Model Registry.

    Args:
        parent: The sweep's parent run.
        model_dir: Folder with `model.safetensors` and `model.json` (the card).
        sweep: Sweep name; the registered model is `cleansweep-<sweep>`, one version per call.
        description: Version description (accuracy, ASR, trial, step).
        tags: Version tags (trial id, metrics, sampled hyperparameters).

    Returns:
        `{"name", "version", "source"}` of the registered version.
    """
    parent.log_artifact(model_dir, "best_model")
    client = parent.client
    name = f"cleansweep-{sweep}"
    try:
        client.create_registered_model(name, description=f"best feasible model of cleansweep sweep {sweep}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(parent.run_id).info.artifact_uri}/best_model"
    version = client.create_model_version(name, source=source, run_id=parent.run_id, description=description,
                                          tags={k: str(v) for k, v in tags.items()})
    parent.set_tags({BEST_MODEL_TAG: f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "source": source}
