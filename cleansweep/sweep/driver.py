"""Cleaning sweeps on Ray Tune + Optuna: the driver, `search`, runs a sweep's stages (the shrink-and-perturb
preselection, if any, then the main stage) as Tune experiments of `trial.clean_trial`, and resumes them.

Objective: maximise zero-shot top-1 subject to ASR <= threshold (`optuna`: the searcher and the scheduler; `trial`:
what each trial reports). The starting model arrives resolved and measured (`start.resolve`), so this module never
pre-trains.

Reliability: trials checkpoint at every evaluation that a resume or the result needs (`loop.needs_checkpoint`) and
the experiment state is snapshotted every second (`TUNE_GLOBAL_CHECKPOINT_S`; by default Tune waits at least 10 s,
`ray/tune/execution/experiment_state.py`), so `--resume` after Ctrl-C / SIGTERM / kill -9 redoes at most one
evaluation interval per running trial; each trial finds its MLflow run again by tag and the step de-dup of
`tracking.RunHandle` drops re-reported steps; a trial that raises, hits NaN or loses its worker process is FAILED in
MLflow (with its cause) and in Optuna, is never feasible, and the sweep goes on (not retried: see `_run_config`).
The best checkpoint's path is recorded by the driver as Tune persists it, and checked to load at the end
(`delivery`). A trial Tune completes (its last epoch, or ASHA / the time budget stopped it) is FINISHED, with
`stopped_early` when it had epochs left; KILLED is for interrupted sweeps only, and `--resume` runs those trials to
their end (`records.resumable_trials`). How trials end: `lifecycle`; the outputs: `outputs`.

Layout of a sweep folder: `runtime.layout`. The sweep folder may be an object-storage URI (`runtime.storage`): Tune
then persists trials and checkpoints there, and the driver writes its own files (sweep.json, space.yaml, the
leaderboard and Pareto plot) there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import FIFOScheduler

from cleansweep import tracking
from cleansweep.config import deep_update
from cleansweep.errors import NodeOutOfMemory, UserError
from cleansweep.objective import ASR, SCORE, TOP1, start_metric
from cleansweep.results import analysis
from cleansweep.runtime import atomic, cluster, diskguard, interrupts, layout, scratch, storage
from cleansweep.sweep import names, records, space
from cleansweep.sweep.config import Domain, SearchConfig
from cleansweep.sweep.console import TrialTable
from cleansweep.sweep.lifecycle import TrialEndCallback, drop_resume_state, settle_statuses
from cleansweep.sweep.optuna import constrained_searcher, trial_scheduler
from cleansweep.sweep.outputs import write_outputs
from cleansweep.sweep.trial import POINT, TrialContext, clean_trial

DEFAULT_SAMPLES = 8


def sweep_location(cfg: SearchConfig, name: str, workdir: Path, storage_path: storage.Location | None = None
                   ) -> storage.Location:
    """The folder of sweep `name`: `--storage-path`, else the YAML's `storage_path`, else `<workdir>/sweeps` (a
    `str` URI for object storage, else a resolved `Path`)."""
    where = storage.parse_location(storage_path or cfg.storage_path or layout.default_storage(workdir))
    return storage.join(where, name) if storage.is_remote(where) else layout.sweep_dir(where, name)


def search(cfg: SearchConfig, start: Any, *, name: str, workdir: Path, space_file: Path | None = None,
           storage_path: storage.Location | None = None, num_samples: int | None = None, address: str | None = None,
           resume: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) cleaning sweep `name` and return its leaderboard.

    Args:
        cfg: A checked `SearchConfig` (`space.load`).
        start: The resolved starting model (`start.resolve(cfg, workdir)`): its `base` (every trial's
            TrainSpec values), `init` and `metrics`.
        name: Sweep name (Tune experiment folder, MLflow parent run).
        workdir: Holds the default storage (`sweeps/`) and the default MLflow database.
        space_file: The YAML the config came from (kept as an artifact).
        storage_path: Tune storage folder or s3:// / gs:// URI; default `cfg.storage_path` or `<workdir>/sweeps`.
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
    storage.check_storage(sweep_dir)
    names.check_sweep_name(name, sweep_dir, resume=resume)
    cfg = _with_num_samples(cfg, sweep_dir, num_samples, resume)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, Path(workdir).resolve())
    diskguard.check_space(_disk_paths(sweep_dir, uri), name)  # before anything is written
    client = tracking.open_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment)
    in_mlflow = tracking.find_sweep_run(client, experiment_id, name) is not None
    names.check_sweep_name(name, sweep_dir, resume=resume, in_mlflow=in_mlflow)
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
                           scratch=scratch.name(str(sweep_dir)), constraint=cfg.objective.constraint)
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


def _start_parent(client: Any, experiment_id: str, cfg: SearchConfig, name: str, start: Any,
                  sweep_dir: storage.Location, space_file: Path | None, resume: bool) -> tracking.RunHandle:
    """The sweep's parent run (reopened on resume) with its params, space file and the starting model's metrics."""
    parent = tracking.start_sweep(client, experiment_id, name, params=_sweep_params(cfg, start))
    if space_file is not None and not resume:
        if storage.is_remote(sweep_dir):  # MLflow logs local files, under their own name
            staging = storage.local_staging("space")
            try:
                parent.log_artifact(shutil.copyfile(space_file, staging / layout.SPACE_FILE))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            parent.log_artifact(sweep_dir / layout.SPACE_FILE)
    parent.log_metrics({start_metric(k): v for k, v in start.metrics.items()}, step=0)
    return parent


def _run_stages(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, resume: bool, start: Any,
                parent: tracking.RunHandle, echo: Callable[[str], None]) -> dict[str, Any]:
    """Preselection (if any) and the main stage, then the sweep's outputs from what MLflow recorded."""
    # Snapshot the experiment every second: a resume redoes at most one evaluation per trial.
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


def _disk_paths(sweep_dir: storage.Location, tracking_uri: str) -> list[Path]:
    """Local folders a sweep fills: with object storage, Tune stages checkpoints in the temp folder (in the list)."""
    local = Path(tempfile.gettempdir()) if storage.is_remote(sweep_dir) else Path(sweep_dir)
    return diskguard.sweep_paths(local, tracking_uri)


def _guard_dir(stage_dir: storage.Location, ctx: TrialContext) -> Path:
    """The local experiment folder the disk guard keeps state copies of (none with object storage: a name only)."""
    return Path(tempfile.gettempdir()) / ctx.scratch / ctx.stage if storage.is_remote(stage_dir) else Path(stage_dir)


def _check_trial_fits(cfg: SearchConfig) -> None:
    check_trial_resources(cfg.resources.cpu, cfg.resources.gpu, cluster.cluster_capacity())


def check_trial_resources(cpu: float, gpu: float, capacity: cluster.Capacity | list[dict]) -> None:
    """Fail fast when no node (live, or one the autoscaler may add) can ever host one trial."""
    if not isinstance(capacity, cluster.Capacity):
        capacity = cluster.Capacity.from_nodes(capacity)
    cluster.check_resources({"CPU": cpu, "GPU": gpu}, 1, capacity, unit="trial",
                            ask=f"resources: a trial asks for {cpu:g} CPU and {gpu:g} GPU, which",
                            fix="lower resources.cpu / resources.gpu or connect to a bigger cluster (--address)")


def run_stage(cfg: SearchConfig, ctx: TrialContext, sweep_dir: storage.Location, resume: bool,
              echo: Callable[[str], None] = print) -> tune.ResultGrid:
    """Fit (or restore and finish) one Tune experiment of the sweep; KeyboardInterrupt when it was interrupted."""
    stage_dir = storage.join(sweep_dir, ctx.stage)
    points = space.preselect_points(cfg) if ctx.stage == "preselect" else None
    trainable = tune.with_resources(tune.with_parameters(clean_trial, ctx=ctx),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    param_space, tune_config, expected = _tune_setup(cfg, ctx, points)
    if resume and not storage.is_remote(stage_dir):  # an object is written whole or not at all
        diskguard.repair_state(stage_dir)  # a state file a full disk truncated: its last complete copy
    if resume and tune.Tuner.can_restore(str(stage_dir)):
        # Errored trials are restored too: one a full disk stopped runs on from its last checkpoint (its run is
        # KILLED); one that failed (its run is FAILED) refuses at once (`AlreadyFailed`) and keeps its cause.
        tuner = tune.Tuner.restore(str(stage_dir), trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=True, restart_errored=False)
    else:
        if storage.exists(stage_dir):  # constructed but never snapshotted: start the stage afresh
            storage.remove_tree(stage_dir)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=_run_config(cfg, ctx, sweep_dir, echo))
    budget_start = time.monotonic()
    with interrupts.sigterm_as_sigint(), interrupts.tune_signal_handlers_removed_after():
        try:
            grid = tuner.fit()
        except RuntimeError as e:
            if records.out_of_memory(e) is None:
                raise
            raise NodeOutOfMemory(f"sweep {ctx.sweep!r}: Ray's memory monitor killed a trial worker (the node ran "
                                  "out of memory) and Tune stopped the sweep; free memory or lower "
                                  "search.max_concurrent, then re-run with --resume") from None
    diskguard.raise_if_tripped(_guard_dir(stage_dir, ctx), ctx.sweep)
    diskguard.raise_if_trials_hit_full_disk(grid, ctx.sweep)
    if resume:
        client = tracking.open_client(ctx.tracking_uri)
        tracking.tag_lost_trials(client, ctx.experiment_id, ctx.sweep, [r.metrics.get("trial_id") or
                                 Path(r.path).name for r in grid], tags={tracking.STAGE_TAG: ctx.stage})
    done = not records.resumable_trials(stage_dir, grid)
    if done:  # the experiment is over: no trial will resume from any checkpoint
        settle_statuses(grid, ctx.tracking_uri, 0 if ctx.stage == "preselect" else cfg.epochs)
        for result in grid:
            drop_resume_state(result.path, keep_latest=False, filesystem=result.filesystem)
        scratch.remove(ctx.scratch)  # what killed trials on this node left (other nodes: when a trial resumes there)
    budget_hit = cfg.search.time_budget_s is not None and time.monotonic() - budget_start >= cfg.search.time_budget_s
    if not done or (len(grid) < expected and not budget_hit):
        raise KeyboardInterrupt
    return grid


def _run_config(cfg: SearchConfig, ctx: TrialContext, sweep_dir: storage.Location, echo: Callable[[str], None]
                ) -> tune.RunConfig:
    variants = space.variants(cfg)
    params = sorted({k for v in variants.values() for k, d in v.items() if isinstance(d, Domain)}
                    | ({space.VARIANT_KEY} if len(variants) > 1 else set()))
    if ctx.stage == "preselect" and cfg.preselect is not None:
        params = sorted(cfg.preselect.space)
    return tune.RunConfig(
        name=ctx.stage, storage_path=str(sweep_dir), verbose=1,
        progress_reporter=TrialTable(params, 0 if ctx.stage == "preselect" else cfg.epochs, echo=echo),
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                   TrialEndCallback(ctx.tracking_uri, 0 if ctx.stage == "preselect" else cfg.epochs, ctx.sweep,
                                    ctx.experiment_id),
                   diskguard.DiskGuard(_disk_paths(sweep_dir, ctx.tracking_uri),
                                       _guard_dir(storage.join(sweep_dir, ctx.stage), ctx))],
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
    common = {"max_concurrent_trials": cfg.search.max_concurrent, "reuse_actors": True,
              "trial_dirname_creator": _trial_dirname, "time_budget_s": cfg.search.time_budget_s}
    if points is not None or cfg.search.algorithm == "grid":
        points = points if points is not None else space.grid_points(cfg)
        repeats = 1 if ctx.stage == "preselect" else (cfg.search.num_samples or 1)
        scheduler = trial_scheduler(cfg) if ctx.stage == "main" else FIFOScheduler()
        return ({POINT: tune.grid_search(points)},
                tune.TuneConfig(num_samples=repeats, scheduler=scheduler, **common), len(points) * repeats)
    n = cfg.search.num_samples or DEFAULT_SAMPLES
    searcher = constrained_searcher(cfg, f"cleansweep-{ctx.sweep}-{ctx.stage}")
    return {}, tune.TuneConfig(num_samples=n, search_alg=searcher, scheduler=trial_scheduler(cfg), **common), n


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_preselect(cfg: SearchConfig, ctx: TrialContext, sweep_dir: storage.Location, resume: bool,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    """Stage 1 of the paper's shrink-and-perturb: evaluate every perturbed model, keep the best with ASR < max_asr."""
    chosen_file = storage.join(sweep_dir, layout.PRESELECT_FILE)
    if storage.is_file(chosen_file):
        return json.loads(storage.read_bytes(chosen_file))["params"]
    run_stage(cfg, replace(ctx, stage="preselect"), sweep_dir, resume, echo)
    record = tracking.load_sweep(ctx.sweep, ctx.tracking_uri, experiment=cfg.mlflow.experiment)
    pick = analysis.preselect_choice(record, cfg.preselect.max_asr)
    if pick is None:
        raise UserError("preselect: no perturbed model could be evaluated; see the failed trials in MLflow")
    if not pick["below_max_asr"]:
        echo(f"preselect: no perturbed model has ASR < {cfg.preselect.max_asr}; taking the lowest ASR "
             f"({pick[ASR]:.3f})")
    echo(f"preselect: perturbed model {pick['params']} top1 {pick[TOP1]:.4f} asr {pick[ASR]:.4f}")
    _write_json(chosen_file, {"params": pick["params"], TOP1: pick[TOP1], ASR: pick[ASR]})
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


def _write_json(location: storage.Location, data: dict[str, Any]) -> None:
    if storage.is_remote(location):
        storage.write_bytes(location, json.dumps(data, indent=2).encode())
    else:
        atomic.write_json(location, data)


def _with_num_samples(cfg: SearchConfig, sweep_dir: storage.Location, num_samples: int | None, resume: bool
                      ) -> SearchConfig:
    if num_samples is None and resume:  # a resume without --num-samples keeps the one the sweep started with
        recorded = json.loads(storage.read_bytes(storage.join(sweep_dir, layout.SWEEP_FILE)))
        num_samples = recorded["config"]["search"]["num_samples"]
    if num_samples is None:
        return cfg
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": num_samples})})


def _open_sweep_dir(sweep_dir: storage.Location, cfg: SearchConfig, name: str, space_file: Path | None,
                    resume: bool) -> None:
    identity = {"name": name, "config": cfg.model_dump(mode="json")}
    if resume:
        old = json.loads(storage.read_bytes(storage.join(sweep_dir, layout.SWEEP_FILE)))
        if not _same_config(old.get("config"), identity["config"]):
            raise UserError(f"--resume: the space of sweep {name!r} changed since it started; resume with the "
                            f"original file (kept as {storage.join(sweep_dir, layout.SPACE_FILE)}) or start a new "
                            "--name")
        return
    if not storage.is_remote(sweep_dir):
        sweep_dir.mkdir(parents=True, exist_ok=True)
    if space_file is not None:
        storage.upload(space_file, storage.join(sweep_dir, layout.SPACE_FILE))
    _write_json(storage.join(sweep_dir, layout.SWEEP_FILE), identity)


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
    params: dict[str, Any] = dict(space.space_summary(cfg))
    params.update({"asr_threshold": cfg.objective.threshold, "constraint": cfg.objective.constraint,
                   "algorithm": cfg.search.algorithm,
                   "num_samples": space.count_trials(cfg)["main"], "max_concurrent": cfg.search.max_concurrent,
                   "scheduler": cfg.scheduler.name, "grace_period": cfg.scheduler.grace_period,
                   "time_attr": cfg.scheduler.time_attr, "epochs": cfg.epochs, "eval_every": cfg.eval_every,
                   "resources.cpu": cfg.resources.cpu, "resources.gpu": cfg.resources.gpu, "seed": cfg.seed,
                   "model.init": str(start.init), "start_metrics_source": start.source,
                   "description": cfg.description})
    params.update(start.tracking_params())  # the trigger the start was measured with, and any warning about it
    return params


