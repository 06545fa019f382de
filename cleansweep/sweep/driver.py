"""Cleaning sweeps on Ray Tune + Optuna: one driver (`search`) and one trial function (`clean_trial`).

Objective: maximise zero-shot top-1 subject to ASR <= threshold. Every trial reports at each evaluation
`zeroshot_top1`, `asr_top1`, `feasible` and the monotone `best_feasible_top1` (kept by the loop): the searcher and ASHA
rank on the monotone value because `OptunaSearch.on_trial_complete` only sees a trial's *last* result (stack notes),
and Optuna sees the ASR constraint itself through `trial.set_constraint` (`ConstrainedOptunaSearch`).

The starting model arrives resolved and measured (`start_model.resolve`), so this module never pre-trains.

Reliability (reliability notes): trials checkpoint at every evaluation that a resume or the result needs
(`loop.needs_checkpoint`) and the experiment state is snapshotted every second (`TUNE_GLOBAL_CHECKPOINT_S`), so
`--resume` after Ctrl-C / SIGTERM / kill -9 redoes at most one evaluation interval per running trial; each trial
finds its MLflow run again by tag and the step de-dup of `tracking.RunHandle` drops re-reported steps; a trial that
raises, hits NaN or loses its worker process is FAILED in MLflow (with its cause) and in Optuna, is never feasible,
and the sweep goes on (not retried: see `_run_config`). The best checkpoint's path is recorded by the driver as Tune
persists it, and checked to load at the end (`delivery`). A trial Tune completes (its last epoch, or ASHA / the
time budget stopped it) is FINISHED, with `stopped_early` when it had epochs left; KILLED is for interrupted sweeps
only, and `--resume` runs those trials to their end (`tune_records.resumable_trials`).

Layout of a sweep folder: `layout.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
from ray import tune
from ray.train.constants import CHECKPOINT_DIR_NAME
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from cleansweep import tracking
from cleansweep.config import deep_update
from cleansweep.errors import UserError
from cleansweep.objective import (
    ASR,
    BEST,
    BEST_STEP,
    EPOCH,
    EVALUATION,
    FEASIBLE,
    MIN_ASR,
    SCORE,
    STEP,
    TOP1,
    best_metric,
    checkpoint_score,
    start_metric,
)
from cleansweep.results import analysis, figures
from cleansweep.runtime import atomic, cluster, diskguard, interrupts, layout, scratch
from cleansweep.sweep import delivery
from cleansweep.sweep import records as tune_records
from cleansweep.sweep import space as spaces
from cleansweep.sweep.config import Domain, SearchConfig
from cleansweep.train_config import TrainSpec

POINT = "point"  # grid sweeps: Tune grid-searches over whole points (method-conditional grids, duplicates kept)
DEFAULT_SAMPLES = 8
RESUME_STATE = layout.STATE_FILE


# ------------------------------------------------------------------------------------------------ searcher
class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the ASR constraint and marks failed trials FAIL.

    Optuna 5 reads constraints from `trial.set_constraint(key, value)` (feasible when <= 0); Ray's OptunaSearch
    never sets them, so this sets `min_asr_top1 - threshold` on the trial before `super()` tells the value
    (`_ot_trials` is a private attribute of ray 2.60: pinned in pyproject, unit-tested with real Optuna).
    A trial that errored, or whose value is missing or not finite, is told FAIL: Ray's version would leave it
    RUNNING forever after a NaN (reliability notes), so the sampler would never learn from it.
    """

    def __init__(self, *args: Any, constraint_metric: str = MIN_ASR, threshold: float = 0.05, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._constraint_metric = constraint_metric
        self._threshold = threshold

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        value = (result or {}).get(self.metric)
        if error or not _finite(value):
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return None
        asr = (result or {}).get(self._constraint_metric)
        if _finite(asr):
            ot_trial.set_constraint(self._constraint_metric, float(asr) - self._threshold)
        return super().on_trial_complete(trial_id, result, error)


# ------------------------------------------------------------------------------------------------ trial side
@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (passed once through `tune.with_parameters`)."""

    sweep: str
    stage: str
    base: dict[str, Any]
    tracking_uri: str  # absolute: trials run in another CWD (stack notes)
    experiment_id: str
    parent_run_id: str
    threshold: float
    scratch: str  # `scratch.name(sweep_dir)`: this sweep's folder for in-flight checkpoints in each node's temp
    gpu: float = 0.0  # the trial's GPU fraction: Ray only books it, the trial caps its memory (stack notes)
    constraint: str = ASR  # the ASR feasibility is judged on: asr_top1, or proxy_asr_top1 (unknown trigger)


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters under dotted names (grid trials carry theirs under `point`)."""
    params = dict(config.get(POINT, config))
    return {k: v for k, v in params.items() if not isinstance(v, dict)}


class TrialReporter:
    """`report(metrics, checkpoint_dir)` for `session.fit` inside a Tune trial: MLflow batch + `tune.report`."""

    def __init__(self, run: tracking.RunHandle, threshold: float, eval_every: float, constraint: str = ASR):
        self.run = run
        self.threshold = threshold
        self.eval_every = eval_every
        self.constraint = constraint
        self.min_asr = math.inf  # of the constraint metric

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the running state saved in a trial checkpoint."""
        path = Path(checkpoint_dir) / layout.TRIAL_STATE
        if path.is_file():
            self.min_asr = float(json.loads(path.read_text()).get(MIN_ASR, math.inf))

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        effective = metrics.get("params")
        if effective:
            self.run.log_params(effective, on_conflict="rename")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, bool | int | float)}
        asr = scalars.get(self.constraint)
        for key in (TOP1, self.constraint):
            if not _finite(scalars.get(key)):
                raise FloatingPointError(f"evaluation metric {key} is {scalars.get(key)}; the model diverged")
        self.min_asr = min(self.min_asr, asr)
        step = int(scalars["step"])
        scalars.update({MIN_ASR: self.min_asr, SCORE: checkpoint_score(scalars[TOP1], asr, self.threshold, step),
                        EVALUATION: float(round(scalars.get(EPOCH, 0.0) / self.eval_every))})
        self.run.log_metrics(scalars, step=step)  # one batch per evaluation; a re-reported step is skipped
        result = {**scalars, "mlflow_run_id": self.run.run_id}  # lets the driver's TrialEndCallback end the run
        if checkpoint_dir is None:
            tune.report(result)
            return
        state = {"run_id": self.run.run_id, MIN_ASR: self.min_asr}
        (Path(checkpoint_dir) / layout.TRIAL_STATE).write_text(json.dumps(state))
        # The driver tags the run with the persisted copy's path (`TrialEndCallback.on_checkpoint`): read here after
        # `report`, `tune.get_checkpoint()` is the session's, which Tune may already have shut down or handed to the
        # next trial of a reused actor, so it named the previous, deleted checkpoint (or another trial's).
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


def changes_start_weights(spec: TrainSpec) -> bool:
    """Whether a trial trains from other weights than the sweep's starting model (shrink-and-perturb does)."""
    return spec.method.changes_start_weights()


def clean_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One cleaning trial: `session.fit` with this trial's parameters, logged to its own MLflow child run."""
    from cleansweep import fit as session  # imported in the trial process only: the driver never loads torch models

    trial_id = tune.get_context().get_trial_id()
    params = trial_params(config)
    spec = spaces.trial_spec(ctx.base, params, f"trial {trial_id}")
    if spec.eval_at_start and not changes_start_weights(spec):
        # The very model the sweep evaluated once (the parent run's start_* metrics): not again in every trial.
        spec = spec.model_copy(update={"eval_at_start": False})
    # The driver built the store before any trial; a server restarting meanwhile is waited for, not a failure.
    client = tracking.open_client(ctx.tracking_uri, schema_ready=True, wait_for_server=True)
    done = tracking.finished_trial(client, ctx.experiment_id, ctx.sweep, trial_id)
    if done is not None:  # completed before a driver kill that Tune's last snapshot missed: report, do not retrain
        tune.report(done)
        return
    failed = tracking.failed_trial(client, ctx.experiment_id, ctx.sweep, trial_id)
    if failed is not None:  # a failed trial a resume restored as unfinished (`tune_records`): it stays failed
        raise AlreadyFailed(f"trial {trial_id} failed before this resume and is not run again ({failed})")
    run = tracking.start_trial(client, ctx.experiment_id, sweep=ctx.sweep, trial_id=trial_id,
                               parent_run_id=ctx.parent_run_id, params=params,
                               tags=tracking.trial_tags(ctx.stage, params, ray.get_runtime_context().get_node_id()))
    reporter = TrialReporter(run, ctx.threshold, spec.eval_every, ctx.constraint)
    _cap_gpu_memory(ctx.gpu)
    checkpoint = tune.get_checkpoint()
    with scratch.folder(ctx.scratch, trial_id) as in_flight:
        try:
            if checkpoint is None:
                session.fit(spec, reporter, checkpoints="needed", scratch_dir=in_flight)
            else:
                with checkpoint.as_directory() as resume_dir:
                    reporter.load(Path(resume_dir))
                    session.fit(spec, reporter, resume_from=resume_dir, checkpoints="needed", scratch_dir=in_flight)
        except SystemExit:
            # Tune stopped the trial at a report: ASHA, the time budget or the end of its budget (FINISHED, ended by
            # the driver's TrialEndCallback, which knows which), or an interrupted sweep (KILLED by the driver).
            raise
        except BaseException as e:
            if diskguard.disk_full_line(e) is not None:
                # A full disk is no verdict on the trial: KILLED, and `--resume` runs it on from its last checkpoint.
                run.end("KILLED")
                raise
            if not isinstance(e, KeyboardInterrupt):
                tracking.record_error(run, e)
            run.end(tracking.exit_status(e))
            raise
    run.end("FINISHED")


class AlreadyFailed(RuntimeError):
    """A trial that ended FAILED before a resume was restored by it: it is not run again, and keeps its cause."""


def _cap_gpu_memory(fraction: float) -> None:
    if 0 < fraction < 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(fraction)


class TrialEndCallback(tune.Callback):
    """Driver side: ends the MLflow run of every trial Tune completed (FINISHED, `stopped_early` when it had epochs
    left) or that errored (FAILED, with its cause), points each run at its best checkpoint as Tune persisted it, and
    drops the resume state a finished trial no longer needs.

    A few light MLflow calls per trial (the run id comes with the trial's results), nothing per plain result.
    """

    def __init__(self, tracking_uri: str, epochs: float, sweep: str = "", experiment_id: str = ""):
        self.tracking_uri = tracking_uri
        self.epochs = epochs
        self.sweep, self.experiment_id = sweep, experiment_id
        self._client = None

    def _client_for(self) -> Any:
        if self._client is None:
            self._client = tracking.open_client(self.tracking_uri)
        return self._client

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """Tag the run with the path of the checkpoint just persisted when it holds the trial's new best feasible
        evaluation. Tune processes a trial's result, then its save, before it runs the trial on, so the trial's
        last result is this checkpoint's (its `checkpoint_dir_name` says so; anything else is not tagged)."""
        result = trial.last_result or {}
        run_id, step = result.get("mlflow_run_id"), result.get(STEP)
        if not run_id or step is None or not result.get(FEASIBLE) or int(result.get(BEST_STEP, -1)) != int(step):
            return
        if Path(checkpoint.path).name != result.get(CHECKPOINT_DIR_NAME):
            return
        with contextlib.suppress(Exception):  # never let bookkeeping kill the sweep: the end-of-sweep check is loud
            tracking.record_best_checkpoint(self._client_for(), run_id, checkpoint.path, int(step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("mlflow_run_id"):
            with contextlib.suppress(Exception):  # never let bookkeeping kill the sweep
                stopped = float(result.get(EPOCH, 0.0)) < self.epochs - 1e-6
                tracking.finish_trial(self._client_for(), result["mlflow_run_id"], stopped_early=stopped)
        # Not from the latest checkpoint yet: a driver killed before its next snapshot resumes the trial from it.
        drop_resume_state(trial.path, keep_latest=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with contextlib.suppress(Exception):
            client = self._client_for()
            run_id = (trial.last_result or {}).get("mlflow_run_id") or (
                self.sweep and tracking.find_trial_run(client, self.experiment_id, self.sweep, trial.trial_id))
            error = tune_records.recorded_error(trial)
            if not run_id or tune_records.error_is(error, AlreadyFailed):  # it keeps the cause it failed with
                return
            if error is not None and diskguard.disk_full_line(error) is not None:  # resumable, not a verdict
                tracking.end_if_running(client, run_id, "KILLED")
                return
            tracking.fail_trial(client, run_id, tune_records.failure_cause(error))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}


def settle_statuses(grid: tune.ResultGrid, tracking_uri: str, epochs: float) -> None:
    """Once a stage is over, every trial's run says how it ended: FINISHED (+ `stopped_early`) or FAILED.

    The callback does it as trials end; this catches what a killed driver missed (a trial completed after the last
    snapshot, its callback never ran) and what an interrupt marked KILLED before a resume completed it.
    """
    client = tracking.open_client(tracking_uri)
    for result in grid:
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if not run_id:
            continue
        if result.error is not None:
            tracking.fail_trial(client, run_id, tune_records.failure_cause(result.error))
        else:
            stopped = float((result.metrics or {}).get(EPOCH, 0.0)) < epochs - 1e-6
            tracking.finish_trial(client, run_id, stopped_early=stopped)


def drop_resume_state(trial_dir: str | None, *, keep_latest: bool) -> int:
    """Delete the resume-only file of a finished trial's checkpoints (the kept weights stay); returns bytes freed.

    Hundreds of trials would otherwise keep every best checkpoint at three times its weights' size.
    """
    if not trial_dir or not Path(trial_dir).is_dir():  # remote storage (s3://...): left to its lifecycle rules
        return 0
    dirs = sorted(Path(trial_dir).glob("checkpoint_*"))
    freed = 0
    for d in dirs[:-1] if keep_latest else dirs:
        f = d / RESUME_STATE
        with contextlib.suppress(FileNotFoundError):
            freed += f.stat().st_size
            f.unlink()
    return freed


# ------------------------------------------------------------------------------------------------ progress
def _say(line: str) -> None:
    print(line)  # looked up at call time: the print of the process that unpickled the reporter


class TrialTable(tune.ProgressReporter):
    """Tune's live table in cleansweep's words: MLflow's statuses, the sampled hyperparameters, the objective."""

    STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}

    def __init__(self, params: list[str], epochs: float, every_s: float = 30.0,
                 echo: Callable[[str], None] = print):
        self.params, self.epochs, self.every_s, self.echo = params, epochs, every_s, echo
        self._last = -math.inf

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the run config into the sweep folder; `echo` may be a closure or a `print` that Ray Train has
        # since patched (builtins.print is then another object and pickling it fails), so it stays behind.
        return {**self.__dict__, "echo": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, echo=_say)

    def should_report(self, trials: list, done: bool = False) -> bool:
        return done or time.monotonic() - self._last >= self.every_s

    def report(self, trials: list, done: bool, *sys_info: Any) -> None:
        self._last = time.monotonic()
        self.echo(self.render(trials))

    def render(self, trials: list) -> str:
        """The table: one row per trial, its status, sampled values and last/best metrics."""
        rows = []
        for t in trials:
            res, params = t.last_result or {}, trial_params(t.config or {})
            status = self.STATUS.get(t.status, t.status)
            if t.status == "TERMINATED" and float(res.get(EPOCH, self.epochs)) < self.epochs - 1e-6:
                status = "FINISHED (stopped early)"
            rows.append({"trial": t.trial_id, "status": status, **{p: params.get(p) for p in self.params},
                         EPOCH: res.get(EPOCH), TOP1: res.get(TOP1), ASR: res.get(ASR), BEST: res.get(BEST)})
        counts = pd.Series([r["status"] for r in rows]).value_counts().to_dict() if rows else {}
        head = "trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        table = pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-")
        return f"{head}\n{table}" if rows else head


# ------------------------------------------------------------------------------------------------ driver
def sweep_location(cfg: SearchConfig, name: str, workdir: Path, storage_path: Path | None = None) -> Path:
    """The folder of sweep `name`: `--storage-path`, else the YAML's `storage_path`, else `<workdir>/sweeps`."""
    return layout.sweep_dir(storage_path or cfg.storage_path or layout.default_storage(workdir), name)


def check_name(sweep_dir: Path, name: str, *, resume: bool, in_mlflow: bool = False) -> None:
    """A new sweep needs a free name; `--resume` needs an existing one (one-line errors, before anything starts)."""
    exists = (sweep_dir / layout.SWEEP_FILE).is_file()
    if resume and not exists:
        raise UserError(f"--resume: no sweep named {name!r} in {sweep_dir.parent}; drop --resume to start it, or "
                        "pass the --storage-path it ran with")
    if not resume and (exists or in_mlflow):
        where = sweep_dir if exists else "MLflow"
        raise UserError(f"sweep {name!r} already exists ({where}); pass --resume to continue it, or choose another "
                        "--name")


def search(cfg: SearchConfig, start: Any, *, name: str, workdir: Path, space_file: Path | None = None,
           storage_path: Path | None = None, num_samples: int | None = None, address: str | None = None,
           resume: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) cleaning sweep `name` and return its leaderboard.

    Args:
        cfg: A checked `SearchConfig` (`spaces.load`).
        start: The resolved starting model (`start_model.resolve(cfg, workdir)`): its `base` (every trial's
            TrainSpec values), `init` and `metrics`.
        name: Sweep name (Tune experiment folder, MLflow parent run).
        workdir: Holds the default storage (`sweeps/`) and the default MLflow database.
        space_file: The YAML the config came from (kept as an artifact).
        storage_path: Tune storage folder; default `cfg.storage_path` or `<workdir>/sweeps`.
        num_samples: Override `search.num_samples`.
        address: Ray cluster address; default `cfg.address`, else $RAY_ADDRESS, else a new local Ray.
        resume: Continue an interrupted sweep of this name (without it an existing name is an error).
        echo: Where progress lines go.

    Returns:
        `{"name", "leaderboard" (DataFrame), "best" (row dict or None), "sweep_dir", "parent_run_id",
        "tracking_uri", "seconds", "start", "best_model", "best_model_problem"}`; `best_model_problem` (else None)
        says why the best feasible trial's checkpoint is missing or does not load (`delivery`).
    """
    started = time.monotonic()
    sweep_dir = sweep_location(cfg, name, Path(workdir), storage_path)
    check_name(sweep_dir, name, resume=resume)
    cfg = _with_num_samples(cfg, sweep_dir, num_samples, resume)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, Path(workdir).resolve())
    diskguard.check_space(diskguard.sweep_paths(sweep_dir, uri), name)  # before anything is written
    client = tracking.open_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment)
    in_mlflow = tracking.find_sweep_run(client, experiment_id, name) is not None
    check_name(sweep_dir, name, resume=resume, in_mlflow=in_mlflow)
    # A trial's error is Tune's to record (its MLflow run says FAILED with the cause); Ray would also print it as an
    # "unhandled error" with its traceback when a sweep stops while trials fail (a full disk), burying the one line.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    with cluster.connect(address or cfg.address, echo=echo, worker_logs=False):
        _check_trial_fits(cfg)  # refused before any of the sweep exists: a fixed YAML can reuse the name
        _open_sweep_dir(sweep_dir, cfg, name, space_file, resume)
        parent = _start_parent(client, experiment_id, cfg, name, start, sweep_dir, space_file, resume)
        if getattr(start, "warning", None):  # after every refusal: a refused sweep prints its one error line only
            print(start.warning, file=sys.stderr, flush=True)
        ctx = TrialContext(sweep=name, stage="main", base=start.base, tracking_uri=uri, experiment_id=experiment_id,
                           parent_run_id=parent.run_id, threshold=cfg.objective.threshold, gpu=cfg.resources.gpu,
                           scratch=scratch.name(sweep_dir), constraint=cfg.objective.constraint)
        try:
            outputs = _run_stages(cfg, ctx, sweep_dir, resume, start, parent, echo)
            tracking.mark_stale_trials(client, experiment_id, name)
        except BaseException as e:
            with contextlib.suppress(Exception):
                tracking.mark_stale_trials(client, experiment_id, name)
            parent.end(tracking.exit_status(e))
            raise
    parent.end("FINISHED")
    return {"name": name, **outputs, "sweep_dir": str(sweep_dir), "parent_run_id": parent.run_id,
            "tracking_uri": uri, "seconds": time.monotonic() - started, "start": dict(start.metrics)}


def _start_parent(client: Any, experiment_id: str, cfg: SearchConfig, name: str, start: Any, sweep_dir: Path,
                  space_file: Path | None, resume: bool) -> tracking.RunHandle:
    """The sweep's parent run (reopened on resume) with its params, space file and the starting model's metrics."""
    parent = tracking.start_sweep(client, experiment_id, name, params=_sweep_params(cfg, start))
    if space_file is not None and not resume:
        parent.log_artifact(sweep_dir / layout.SPACE_FILE)
    parent.log_metrics({start_metric(k): v for k, v in start.metrics.items()}, step=0)
    return parent


def _run_stages(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, resume: bool, start: Any,
                parent: tracking.RunHandle, echo: Callable[[str], None]) -> dict[str, Any]:
    """Preselection (if any) and the main stage, then the sweep's outputs from what MLflow recorded."""
    # Snapshot the experiment every second: a resume redoes at most one evaluation per trial (reliability notes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # ...which is deliberate, so Tune's "snapshotting may become a bottleneck" warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's default TensorBoard logger duplicates what MLflow holds, per result, on the driver's CPU: only the
    # CSV and JSON loggers (its `ResultGrid` reads them) are added, in `run_stage`.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's own table ignores custom reporters unless its new output engine is off: ours shows our words.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if cfg.preselect is not None:
        chosen = run_preselect(cfg, ctx, sweep_dir, resume, echo)
        ctx = replace(ctx, base=deep_update(ctx.base, chosen))
    run_stage(cfg, ctx, sweep_dir, resume, echo)
    return write_outputs(cfg, ctx, sweep_dir, start, parent)


def _check_trial_fits(cfg: SearchConfig) -> None:
    check_trial_resources(cfg.resources.cpu, cfg.resources.gpu, cluster.cluster_capacity())


def check_trial_resources(cpu: float, gpu: float, capacity: cluster.Capacity | list[dict]) -> None:
    """Fail fast when no node (live, or one the autoscaler may add) can ever host one trial."""
    if not isinstance(capacity, cluster.Capacity):
        capacity = cluster.Capacity.from_nodes(capacity)
    cluster.check_resources({"CPU": cpu, "GPU": gpu}, 1, capacity, unit="trial",
                            ask=f"resources: a trial asks for {cpu:g} CPU and {gpu:g} GPU, which",
                            fix="lower resources.cpu / resources.gpu or connect to a bigger cluster (--address)")


def run_stage(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, resume: bool,
              echo: Callable[[str], None] = print) -> tune.ResultGrid:
    """Fit (or restore and finish) one Tune experiment of the sweep; KeyboardInterrupt when it was interrupted."""
    stage_dir = sweep_dir / ctx.stage
    points = spaces.preselect_points(cfg) if ctx.stage == "preselect" else None
    trainable = tune.with_resources(tune.with_parameters(clean_trial, ctx=ctx),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    param_space, tune_config, expected = _tune_setup(cfg, ctx, points)
    if resume:
        diskguard.repair_state(stage_dir)  # a state file a full disk truncated: its last complete copy
    if resume and tune.Tuner.can_restore(str(stage_dir)):
        # Errored trials are restored too: one a full disk stopped runs on from its last checkpoint (its run is
        # KILLED); one that failed (its run is FAILED) refuses at once (`AlreadyFailed`) and keeps its cause.
        tuner = tune.Tuner.restore(str(stage_dir), trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=True, restart_errored=False)
    else:
        if stage_dir.exists():  # constructed but never snapshotted: start the stage afresh
            shutil.rmtree(stage_dir)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=_run_config(cfg, ctx, sweep_dir, echo))
    budget_start = time.monotonic()
    with interrupts.sigterm_as_sigint():
        grid = tuner.fit()
    diskguard.raise_if_tripped(stage_dir, ctx.sweep)
    diskguard.raise_if_trials_hit_full_disk(grid, ctx.sweep)
    if resume:
        client = tracking.open_client(ctx.tracking_uri)
        tracking.tag_lost_trials(client, ctx.experiment_id, ctx.sweep, [r.metrics.get("trial_id") or
                                 Path(r.path).name for r in grid], tags={tracking.STAGE_TAG: ctx.stage})
    done = not tune_records.resumable_trials(stage_dir, grid)
    if done:  # the experiment is over: no trial will resume from any checkpoint
        settle_statuses(grid, ctx.tracking_uri, 0 if ctx.stage == "preselect" else cfg.epochs)
        for result in grid:
            drop_resume_state(result.path, keep_latest=False)
        scratch.remove(ctx.scratch)  # what killed trials on this node left (other nodes: when a trial resumes there)
    budget_hit = cfg.search.time_budget_s is not None and time.monotonic() - budget_start >= cfg.search.time_budget_s
    if not done or (len(grid) < expected and not budget_hit):
        raise KeyboardInterrupt
    return grid


def _run_config(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, echo: Callable[[str], None]) -> tune.RunConfig:
    variants = spaces.variants(cfg)
    params = sorted({k for v in variants.values() for k, d in v.items() if isinstance(d, Domain)}
                    | ({spaces.VARIANT_KEY} if len(variants) > 1 else set()))
    if ctx.stage == "preselect" and cfg.preselect is not None:
        params = sorted(cfg.preselect.space)
    return tune.RunConfig(
        name=ctx.stage, storage_path=str(sweep_dir), verbose=1,
        progress_reporter=TrialTable(params, 0 if ctx.stage == "preselect" else cfg.epochs, echo=echo),
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                   TrialEndCallback(ctx.tracking_uri, 0 if ctx.stage == "preselect" else cfg.epochs, ctx.sweep,
                                    ctx.experiment_id),
                   diskguard.DiskGuard(diskguard.sweep_paths(sweep_dir, ctx.tracking_uri), sweep_dir / ctx.stage)],
        # Failed trials are not retried. An exception in the trial (a diverged loss, bad input, GPU out of memory)
        # recurs with the same config, and so does, as a rule, a worker the OOM killer ended (same config, same
        # batch); they end FAILED with their cause (`TrialEndCallback.on_trial_error`). A trial whose node was
        # preempted (drained) is retried from its last checkpoint anyway: Tune does not count that as a failure
        # (`Trial._handle_ray_actor_error`, Ray 2.60).
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                checkpoint_score_order="max"))


def _tune_setup(cfg: SearchConfig, ctx: TrialContext, points: list[dict] | None) -> tuple[dict, tune.TuneConfig, int]:
    """param_space, TuneConfig and expected trial count of a stage."""
    threshold = cfg.objective.threshold
    common = {"max_concurrent_trials": cfg.search.max_concurrent, "reuse_actors": True,
              "trial_dirname_creator": _trial_dirname, "time_budget_s": cfg.search.time_budget_s}
    if points is not None or cfg.search.algorithm == "grid":
        points = points if points is not None else spaces.grid_points(cfg)
        repeats = 1 if ctx.stage == "preselect" else (cfg.search.num_samples or 1)
        scheduler = _scheduler(cfg) if ctx.stage == "main" else FIFOScheduler()
        return ({POINT: tune.grid_search(points)},
                tune.TuneConfig(num_samples=repeats, scheduler=scheduler, **common), len(points) * repeats)
    n = cfg.search.num_samples or DEFAULT_SAMPLES
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.search.n_startup_trials,
                                          constant_liar=True)
               if cfg.search.algorithm == "optuna" else optuna.samplers.RandomSampler(seed=cfg.seed))
    searcher = ConstrainedOptunaSearch(space=spaces.DefineByRun(spaces.variants(cfg)), metric=BEST, mode="max",
                                       sampler=sampler, study_name=f"cleansweep-{ctx.sweep}-{ctx.stage}",
                                       threshold=threshold)
    return {}, tune.TuneConfig(num_samples=n, search_alg=searcher, scheduler=_scheduler(cfg), **common), n


def _scheduler(cfg: SearchConfig) -> Any:
    s = cfg.scheduler
    if s.name == "none":
        return FIFOScheduler()
    max_t = cfg.epochs if s.time_attr == "epoch" else max(1, round(cfg.epochs / cfg.eval_every))
    # An explicit counter, not wall time: Tune does not restore scheduler state, the counter comes back with the
    # trial (stack notes). Grace must cover the epochs cleaning needs before ASR drops.
    return ASHAScheduler(time_attr=s.time_attr, metric=BEST, mode="max", max_t=max(max_t, 1),
                         grace_period=min(s.grace_period, max(max_t, 1)), reduction_factor=s.reduction_factor)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_preselect(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, resume: bool,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    """Stage 1 of the paper's shrink-and-perturb: evaluate every perturbed model, keep the best with ASR < max_asr."""
    chosen_file = sweep_dir / layout.PRESELECT_FILE
    if chosen_file.is_file():
        return json.loads(chosen_file.read_text())["params"]
    run_stage(cfg, replace(ctx, stage="preselect"), sweep_dir, resume, echo)
    record = tracking.load_sweep(ctx.sweep, ctx.tracking_uri, experiment=cfg.mlflow.experiment)
    pick = analysis.preselect_choice(record, cfg.preselect.max_asr)
    if pick is None:
        raise UserError("preselect: no perturbed model could be evaluated; see the failed trials in MLflow")
    if not pick["below_max_asr"]:
        echo(f"preselect: no perturbed model has ASR < {cfg.preselect.max_asr}; taking the lowest ASR "
             f"({pick[ASR]:.3f})")
    echo(f"preselect: perturbed model {pick['params']} top1 {pick[TOP1]:.4f} asr {pick[ASR]:.4f}")
    atomic.write_json(chosen_file, {"params": pick["params"], TOP1: pick[TOP1], ASR: pick[ASR]})
    return pick["params"]


def sweep_state(tracking_uri: str, workdir: Path, name: str) -> str:
    """`finished` (FINISHED parent run in MLflow), `started` (its Tune folder exists: resume it) or `new`."""
    runs = tracking.list_sweeps(tracking_uri) if _db_exists(tracking_uri) else pd.DataFrame(columns=["name"])
    mine = runs[runs["name"] == name]
    if len(mine) and mine.iloc[0]["status"] == "FINISHED":
        return "finished"
    return "started" if layout.sweep_exists(layout.default_storage(workdir), name) else "new"


def _db_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


# ------------------------------------------------------------------------------------------------ outputs
def write_outputs(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, start: Any,
                  parent: tracking.RunHandle) -> dict[str, Any]:
    """The leaderboard (from every evaluation MLflow holds), its CSV and Pareto plot in the sweep folder and on the
    parent run, the best feasible metrics on the parent, and the best model in the Model Registry."""
    record = tracking.load_sweep(ctx.sweep, ctx.tracking_uri, experiment=cfg.mlflow.experiment)
    board = analysis.sweep_leaderboard(record, cfg.objective.threshold)
    csv = atomic.write_atomic(sweep_dir / layout.LEADERBOARD_FILE, lambda p: board.to_csv(p, index=False))
    trials, history = analysis.main_stage(record)
    evals = analysis.evaluations(history, trials, constraint=ctx.constraint)
    first = analysis.Start(start.metrics[TOP1], start.metrics[ctx.constraint], "starting model")
    fig, _ = figures.plot_pareto(evals, first, cfg.objective.threshold,
                                 title=f"{len(evals)} evaluations of {len(board)} trials")
    png = atomic.write_atomic(sweep_dir / layout.PARETO_FILE, lambda p: fig.savefig(p, format="png"))
    parent.log_artifact(csv)
    parent.log_artifact(png)
    best = board[board["feasible"]].head(1)
    best_model = problem = None
    if len(best):
        row = best.iloc[0]
        # Under their own names: a proxy-ASR sweep's best has `best_proxy_asr_top1`, and `best_asr_top1` only when
        # the trigger is known (the leaderboard's `asr_top1` is then the true ASR of the same evaluation).
        asrs = {best_metric(k): float(row[k]) for k in dict.fromkeys((ctx.constraint, ASR)) if _finite(row[k])}
        parent.log_metrics({best_metric(TOP1): float(row[TOP1]), **asrs}, step=1)
        problem = delivery.best_checkpoint_problem(row["trial_id"], row.get("checkpoint"))
        if problem is None:
            best_model = _register_best(ctx.sweep, row, parent, ctx.constraint)
        else:
            parent.set_tags({tracking.BEST_MODEL_PROBLEM_TAG: problem})
    return {"leaderboard": board, "best": best.iloc[0].to_dict() if len(best) else None, "best_model": best_model,
            "best_model_problem": problem}


def _register_best(sweep: str, row: pd.Series, parent: tracking.RunHandle, constraint: str = ASR
                   ) -> dict[str, str] | None:
    """The best feasible checkpoint's weights + card as a Model Registry version (None if it was not kept)."""
    checkpoint = row.get("checkpoint")
    if not isinstance(checkpoint, str) or not (Path(checkpoint) / layout.MODEL_FILE).is_file():
        return None
    weights = Path(checkpoint) / layout.MODEL_FILE
    staging = Path(checkpoint).parent / f".best-model-{row['trial_id']}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for part in (weights, weights.with_suffix(".json")):
            if part.is_file():
                shutil.copy2(part, staging / part.name)
        return tracking.register_best_model(
            parent, staging, sweep=sweep,
            description=f"best feasible evaluation: top-1 {row[TOP1]:.4f}, {constraint} {row[constraint]:.4f}, trial "
                        f"{row['trial_id']} step {int(row['step'])} (epoch {row['epoch']:g})",
            tags={"trial_id": row["trial_id"], TOP1: row[TOP1], constraint: row[constraint],
                  **({ASR: row[ASR]} if _finite(row[ASR]) else {}), "step": int(row["step"]),
                  "config": row["config"], "checkpoint": checkpoint})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ helpers
def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _with_num_samples(cfg: SearchConfig, sweep_dir: Path, num_samples: int | None, resume: bool) -> SearchConfig:
    if num_samples is None and resume:  # a resume without --num-samples keeps the one the sweep started with
        num_samples = json.loads((sweep_dir / layout.SWEEP_FILE).read_text())["config"]["search"]["num_samples"]
    if num_samples is None:
        return cfg
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": num_samples})})


def _open_sweep_dir(sweep_dir: Path, cfg: SearchConfig, name: str, space_file: Path | None, resume: bool) -> None:
    identity = {"name": name, "config": cfg.model_dump(mode="json")}
    if resume:
        old = json.loads((sweep_dir / layout.SWEEP_FILE).read_text())
        if not _same_config(old.get("config"), identity["config"]):
            raise UserError(f"--resume: the space of sweep {name!r} changed since it started; resume with the "
                            f"original file (kept as {sweep_dir / layout.SPACE_FILE}) or start a new --name")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if space_file is not None:
        shutil.copyfile(space_file, sweep_dir / layout.SPACE_FILE)
    atomic.write_json(sweep_dir / layout.SWEEP_FILE, identity)


def _same_config(recorded: Any, current: dict[str, Any]) -> bool:
    """Whether a sweep's recorded config is `current`: a config recorded before a setting existed reads as that
    setting's default (so adding a field to SearchConfig does not lock every older sweep out of `--resume`)."""
    if recorded == current:
        return True
    try:
        return SearchConfig.model_validate(recorded).model_dump(mode="json") == current
    except ValueError:
        return False


def _sweep_params(cfg: SearchConfig, start: Any) -> dict[str, Any]:
    params: dict[str, Any] = dict(spaces.space_summary(cfg))
    params.update({"asr_threshold": cfg.objective.threshold, "constraint": cfg.objective.constraint,
                   "algorithm": cfg.search.algorithm,
                   "num_samples": spaces.count_trials(cfg)["main"], "max_concurrent": cfg.search.max_concurrent,
                   "scheduler": cfg.scheduler.name, "grace_period": cfg.scheduler.grace_period,
                   "time_attr": cfg.scheduler.time_attr, "epochs": cfg.epochs, "eval_every": cfg.eval_every,
                   "resources.cpu": cfg.resources.cpu, "resources.gpu": cfg.resources.gpu, "seed": cfg.seed,
                   "model.init": str(start.init), "start_metrics_source": start.source,
                   "description": cfg.description})
    params.update(start.tracking_params())  # the trigger the start was measured with, and any warning about it
    return params


