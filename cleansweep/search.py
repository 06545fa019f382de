"""Cleaning sweeps on Ray Tune + Optuna: one driver (`search`) and one trial function (`clean_trial`).

Objective: maximise zero-shot top-1 subject to ASR <= threshold. Every trial reports at each evaluation
`zeroshot_top1`, `asr_top1`, `feasible` and the monotone `best_feasible_top1` (kept by the loop): the searcher and ASHA
rank on the monotone value because `OptunaSearch.on_trial_complete` only sees a trial's *last* result (stack notes),
and Optuna sees the ASR constraint itself through `trial.set_constraint` (`ConstrainedOptunaSearch`).

Reliability (reliability notes): trials checkpoint at every evaluation that a resume or the result needs
(`loop.needs_checkpoint`) and the experiment state is snapshotted every second (`TUNE_GLOBAL_CHECKPOINT_S`), so
`--resume` after Ctrl-C / SIGTERM / kill -9 redoes at most one evaluation interval per running trial; each trial
finds its MLflow run again by tag and the step de-dup of `tracking.RunHandle` drops re-reported steps; a trial that
raises or hits NaN is FAILED in MLflow and in Optuna and the sweep goes on (`max_failures=0`: deterministic failures
are not retried). Trials do not re-evaluate the starting model the driver evaluated once (`changes_start_weights`).

Layout of `<storage>/NAME/`: `sweep.json` (identity), `space.yaml`, `preselect/` + `preselect.json` (two-stage
shrink-and-perturb), `main/` (Tune's experiment: trials, checkpoints), `leaderboard.csv`, `pareto.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from cleansweep import scratch, spaces, tracking
from cleansweep.config import DataSpec, Domain, SearchConfig, TrainSpec, deep_update
from cleansweep.errors import UserError

TOP1, ASR, BEST, FEASIBLE = "zeroshot_top1", "asr_top1", "best_feasible_top1", "feasible"
MIN_ASR = "min_asr_top1"  # running minimum of ASR: the trial's constraint value for Optuna
SCORE = "checkpoint_score"  # top-1 when feasible, else -ASR: CheckpointConfig keeps the best feasible evaluation
EVALUATION = "evaluation"  # explicit evaluation counter (a time_attr restored with the trial, unlike wall time)
TRIAL_STATE = "cleansweep_trial.json"  # written into every trial checkpoint: MLflow run id, running min ASR
STAGE_TAG, SAMPLED_TAG, BEST_CKPT_TAG = "cleansweep.stage", "cleansweep.sampled", "cleansweep.best_checkpoint"
RESUME_STATE = "state.pt"  # session.STATE_FILE (optimizer moments, RNG): read by a resume only, 2/3 of a checkpoint
POINT = "point"  # grid sweeps: Tune grid-searches over whole points (method-conditional grids, duplicates kept)
DEFAULT_SAMPLES = 8


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


class DefineByRun:
    """Optuna define-by-run space: pick a method variant, then only that variant's parameters (picklable)."""

    def __init__(self, variants: Mapping[str, Mapping[str, Any]]):
        self.variants = {label: dict(params) for label, params in variants.items()}

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        labels = list(self.variants)
        label = trial.suggest_categorical(spaces.VARIANT_KEY, labels) if len(labels) > 1 else labels[0]
        fixed: dict[str, Any] = {spaces.VARIANT_KEY: label}
        for key, dom in self.variants[label].items():
            if not isinstance(dom, Domain):
                fixed[key] = dom
            elif dom.kind == "choice":
                trial.suggest_categorical(key, dom.choice)
            elif dom.kind == "uniform":
                trial.suggest_float(key, *dom.uniform)
            elif dom.kind == "loguniform":
                trial.suggest_float(key, *dom.loguniform, log=True)
            else:  # spaces.check rejects grids for optuna/random; guard anyway
                raise UserError(f"{key}: grid is not supported by Optuna; use search.algorithm grid")
        return fixed


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


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters under dotted names (grid trials carry theirs under `point`)."""
    params = dict(config.get(POINT, config))
    return {k: v for k, v in params.items() if not isinstance(v, dict)}


class TrialReporter:
    """`report(metrics, checkpoint_dir)` for `session.fit` inside a Tune trial: MLflow batch + `tune.report`."""

    def __init__(self, run: tracking.RunHandle, threshold: float, eval_every: float):
        self.run = run
        self.threshold = threshold
        self.eval_every = eval_every
        self.min_asr = math.inf

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the running state saved in a trial checkpoint."""
        path = Path(checkpoint_dir) / TRIAL_STATE
        if path.is_file():
            self.min_asr = float(json.loads(path.read_text()).get(MIN_ASR, math.inf))

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        effective = metrics.get("params")
        if effective:
            self.run.log_params(effective, on_conflict="rename")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, bool | int | float)}
        for key in (TOP1, ASR):
            if not _finite(scalars.get(key)):
                raise FloatingPointError(f"evaluation metric {key} is {scalars.get(key)}; the model diverged")
        self.min_asr = min(self.min_asr, scalars[ASR])
        feasible = scalars[ASR] <= self.threshold
        step = int(scalars["step"])
        # Feasible evaluations outrank infeasible ones; on equal accuracy the earlier step wins (as in the
        # leaderboard and the loop's tracker), so the kept checkpoint is the one the leaderboard names.
        score = (scalars[TOP1] if feasible else -scalars[ASR]) - 1e-9 * step
        scalars.update({MIN_ASR: self.min_asr, SCORE: score,
                        EVALUATION: float(round(scalars.get("epoch", 0.0) / self.eval_every))})
        self.run.log_metrics(scalars, step=step)  # one batch per evaluation; a re-reported step is skipped
        result = {**scalars, "mlflow_run_id": self.run.run_id}  # lets the driver's TrialEndCallback end the run
        if checkpoint_dir is None:
            tune.report(result)
            return
        (Path(checkpoint_dir) / TRIAL_STATE).write_text(json.dumps({"run_id": self.run.run_id, MIN_ASR: self.min_asr}))
        try:
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        finally:  # also when Tune stops the trial inside report (SystemExit): its last evaluation may be the best
            if feasible and int(scalars.get("best_feasible_step", -1)) == step:
                persisted = tune.get_checkpoint()  # the copy in storage (report persists it synchronously)
                if persisted is not None:
                    self.run.set_tags({BEST_CKPT_TAG: persisted.path, "cleansweep.best_step": step})


def changes_start_weights(spec: TrainSpec) -> bool:
    """Whether a trial trains from other weights than the sweep's starting model (shrink-and-perturb does)."""
    return spec.method.shrink != 1.0 or spec.method.perturb != 0.0


def clean_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One cleaning trial: `session.fit` with this trial's parameters, logged to its own MLflow child run."""
    from cleansweep import session  # imported in the trial process only: the driver never loads torch models

    trial_id = tune.get_context().get_trial_id()
    params = trial_params(config)
    spec = spaces.trial_spec(ctx.base, params, f"trial {trial_id}")
    if spec.eval_at_start and not changes_start_weights(spec):
        # The very model the sweep evaluated once (the parent run's start_* metrics): not again in every trial.
        spec = spec.model_copy(update={"eval_at_start": False})
    client = tracking.open_client(ctx.tracking_uri, schema_ready=True)  # the driver built it before any trial
    run = tracking.start_trial(client, ctx.experiment_id, sweep=ctx.sweep, trial_id=trial_id,
                               parent_run_id=ctx.parent_run_id, params=params,
                               tags={STAGE_TAG: ctx.stage, SAMPLED_TAG: json.dumps(params, default=str)})
    reporter = TrialReporter(run, ctx.threshold, spec.eval_every)
    if 0 < ctx.gpu < 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(ctx.gpu)
    checkpoint = tune.get_checkpoint()
    with scratch.folder(ctx.scratch, trial_id) as in_flight:
        try:
            if checkpoint is None:
                session.fit(spec, reporter, checkpoints="needed", scratch_dir=in_flight)
            else:
                with checkpoint.as_directory() as resume_dir:
                    reporter.load(Path(resume_dir))
                    session.fit(spec, reporter, resume_from=resume_dir, checkpoints="needed", scratch_dir=in_flight)
        except BaseException as e:
            # SystemExit = Tune stopped the trial at a report (ASHA, time budget): KILLED; an error: FAILED.
            if not isinstance(e, SystemExit | KeyboardInterrupt):
                run.set_tags({"cleansweep.error": f"{type(e).__name__}: {e}"[:4000]})
            run.end(tracking.exit_status(e))
            raise
    run.end("FINISHED")


class TrialEndCallback(tune.Callback):
    """Driver side: a trial that Tune stopped or lost without ending its MLflow run gets KILLED / FAILED.

    One light MLflow call per finished trial (the run id comes with the trial's last result), nothing per result.
    """

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._client = None

    def _end(self, trial: Any, status: tracking.Status) -> None:
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if not run_id:
            return
        if self._client is None:
            self._client = tracking.open_client(self.tracking_uri)
        with contextlib.suppress(Exception):  # never let bookkeeping kill the sweep
            tracking.end_if_running(self._client, run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "KILLED")
        # Not from the latest checkpoint yet: a driver killed before its next snapshot resumes the trial from it.
        drop_resume_state(trial.path, keep_latest=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "_client": None}


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


# ------------------------------------------------------------------------------------------------ leaderboard
def best_feasible(evaluations: pd.DataFrame, threshold: float) -> pd.Series | None:
    """The most accurate evaluation with ASR <= threshold (earliest step on ties), or None."""
    feasible = evaluations[evaluations[ASR] <= threshold]
    if feasible.empty:
        return None
    ordered = feasible.sort_values([TOP1, "step"], ascending=[False, True], kind="stable")
    return ordered.iloc[0]


def leaderboard(trials: list[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """Rank trials by their best feasible evaluation over ALL their evaluations (not their last result).

    Args:
        trials: One dict per trial: `trial_id`, `status`, `params` (dict), `evaluations` (DataFrame with `step`,
            `epoch`, `zeroshot_top1`, `asr_top1`), optional `checkpoints` (step -> path), `run_id`.
        threshold: ASR threshold of the sweep.

    Returns:
        One row per trial, feasible trials first by accuracy, then the others by their lowest ASR: `rank`,
        `trial_id`, `status`, `feasible`, `zeroshot_top1`, `asr_top1`, `step`, `epoch`, `checkpoint`,
        `evaluations`, `min_asr_top1`, `last_zeroshot_top1`, `last_asr_top1`, `config` (JSON of the params).
    """
    rows = []
    for t in trials:
        ev = t["evaluations"]
        ev = ev.dropna(subset=[TOP1, ASR]).drop_duplicates("step", keep="last").sort_values("step")
        best = best_feasible(ev, threshold) if not ev.empty else None
        last = ev.iloc[-1] if not ev.empty else None
        row = {"trial_id": t["trial_id"], "status": t.get("status", ""), "feasible": best is not None,
               TOP1: float(best[TOP1]) if best is not None else math.nan,
               ASR: float(best[ASR]) if best is not None else math.nan,
               "step": int(best["step"]) if best is not None else -1,
               "epoch": float(best["epoch"]) if best is not None and "epoch" in best else math.nan,
               "checkpoint": (t.get("checkpoints") or {}).get(int(best["step"])) if best is not None else None,
               "evaluations": len(ev), MIN_ASR: float(ev[ASR].min()) if not ev.empty else math.nan,
               f"last_{TOP1}": float(last[TOP1]) if last is not None else math.nan,
               f"last_{ASR}": float(last[ASR]) if last is not None else math.nan,
               "run_id": t.get("run_id"), "config": json.dumps(t.get("params", {}), sort_keys=True, default=str)}
        rows.append(row)
    columns = ["trial_id", "status", "feasible", TOP1, ASR, "step", "epoch", "checkpoint", "evaluations", MIN_ASR,
               f"last_{TOP1}", f"last_{ASR}", "run_id", "config"]
    board = pd.DataFrame(rows, columns=columns)
    if board.empty:
        return board.assign(rank=pd.Series(dtype=int))
    board["_key"] = board[TOP1].where(board["feasible"], -board[MIN_ASR].fillna(math.inf) - 1.0)
    board = board.sort_values(["_key", "trial_id"], ascending=[False, True], kind="stable").drop(columns="_key")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)


def format_leaderboard(board: pd.DataFrame, fmt: str = "table", top_k: int = 10) -> str:
    """The best feasible trial and the top-k as a text table, CSV or JSON."""
    top = board.head(top_k)
    if fmt == "csv":
        return top.to_csv(index=False)
    if fmt == "json":
        best = board[board["feasible"]].head(1)
        return json.dumps({"best": _records(best)[0] if len(best) else None, "top": _records(top)}, indent=2)
    if top.empty:
        return "no trials yet"
    lines = []
    feasible = board[board["feasible"]]
    if feasible.empty:
        lines.append("no feasible evaluation (ASR <= threshold) in any trial")
    else:
        b = feasible.iloc[0]
        lines.append(f"best feasible: trial {b['trial_id']}  top1 {b[TOP1]:.4f}  asr {b[ASR]:.4f}  step {b['step']} "
                     f"(epoch {b['epoch']:g})  config {b['config']}")
        lines.append(f"  checkpoint: {b['checkpoint'] or 'not kept'}")
    shown = top[["rank", "trial_id", "status", "feasible", TOP1, ASR, "step", "epoch", MIN_ASR, "evaluations",
                 "config"]]
    lines.append(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}", max_colwidth=70))
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    out = json.loads(frame.to_json(orient="records"))
    for rec in out:
        rec["config"] = json.loads(rec["config"]) if rec.get("config") else {}
    return out


def _tune_trials(grid: tune.ResultGrid) -> list[dict[str, Any]]:
    """Leaderboard input from Tune's own records (every reported result of every trial, best checkpoints)."""
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        cols = [c for c in ("step", "epoch", TOP1, ASR) if frame is not None and c in frame]
        evaluations = frame[cols].copy() if frame is not None and {TOP1, ASR, "step"} <= set(cols) else \
            pd.DataFrame(columns=["step", "epoch", TOP1, ASR])
        checkpoints = {int(m["step"]): ckpt.path for ckpt, m in (result.best_checkpoints or []) if "step" in m}
        trials.append({"trial_id": trial_id, "status": "ERROR" if result.error else "TERMINATED",
                       "params": trial_params(result.config or {}), "evaluations": evaluations,
                       "checkpoints": checkpoints})
    return trials


# ------------------------------------------------------------------------------------------------ driver
def search(cfg: SearchConfig, *, name: str, workdir: Path, space_file: Path | None = None,
           storage_path: Path | None = None, num_samples: int | None = None, address: str | None = None,
           resume: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) cleaning sweep `name` and return its leaderboard.

    Args:
        cfg: A checked `SearchConfig` (`spaces.load`).
        name: Sweep name (Tune experiment folder, MLflow parent run).
        workdir: Holds presets' cache, the default storage (`sweeps/`) and the default MLflow database.
        space_file: The YAML the config came from (kept as an artifact).
        storage_path: Tune storage folder; default `cfg.storage_path` or `<workdir>/sweeps`.
        num_samples: Override `search.num_samples`.
        address: Ray cluster address; default `cfg.address`, else a local Ray.
        resume: Continue an interrupted sweep of this name (without it an existing name is an error).
        echo: Where progress lines go.

    Returns:
        `{"name", "leaderboard" (DataFrame), "best" (row dict or None), "sweep_dir", "parent_run_id",
        "tracking_uri", "seconds", "start"}`.
    """
    started = time.monotonic()
    workdir = Path(workdir).resolve()
    sweep_dir = Path(storage_path or cfg.storage_path or workdir / "sweeps").resolve() / name
    _check_sweep_name(sweep_dir, name, resume, in_mlflow=False)
    if num_samples is None and resume:  # a resume without --num-samples keeps the one the sweep started with
        num_samples = json.loads((sweep_dir / "sweep.json").read_text())["config"]["search"]["num_samples"]
    if num_samples is not None:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": num_samples})})
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, workdir)
    client = tracking.open_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment)
    _check_sweep_name(sweep_dir, name, resume, tracking.find_sweep_run(client, experiment_id, name) is not None)

    start = resolve_start_model(cfg, workdir, echo=echo)
    base = spaces.base_train_dict(cfg, data=start["data"], init=start["init"], model_name=start["model_name"],
                                  defaults=start["defaults"])
    _check_inputs(base)
    if start["metrics"] is not None and not card_measures_sweep(start["card"], base):
        start["metrics"] = None  # measured on other evaluation data or another trigger: evaluate it here
    _open_sweep_dir(sweep_dir, cfg, name, space_file, resume)

    parent = tracking.start_sweep(client, experiment_id, name, params=_sweep_params(cfg, start))
    if space_file is not None and not resume:
        parent.log_artifact(sweep_dir / "space.yaml")
    own_ray = _init_ray(address or cfg.address, echo)
    try:
        check_trial_resources(cfg.resources.cpu, cfg.resources.gpu, ray.nodes())
        if start["metrics"] is None:
            start["metrics"] = evaluate_start(base)
        parent.log_metrics({f"start_{k}": v for k, v in start["metrics"].items()}, step=0)
        # Snapshot the experiment every second: a resume redoes at most one evaluation per trial (reliability notes).
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        # ...which is deliberate, so Tune's "snapshotting may become a bottleneck" warning is noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Tune's default TensorBoard logger duplicates what MLflow holds, per result, on the driver's CPU: only the
        # CSV and JSON loggers (its `ResultGrid` reads them) are added, in `run_stage`.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        ctx = TrialContext(sweep=name, stage="main", base=base, tracking_uri=uri, experiment_id=experiment_id,
                           parent_run_id=parent.run_id, threshold=cfg.objective.threshold, gpu=cfg.resources.gpu,
                           scratch=scratch.name(sweep_dir))
        if cfg.preselect is not None:
            chosen = run_preselect(cfg, ctx, sweep_dir, resume, echo)
            ctx = TrialContext(**{**ctx.__dict__, "base": deep_update(base, chosen)})
        grid = run_stage(cfg, ctx, sweep_dir, resume)
        board = leaderboard(_tune_trials(grid), cfg.objective.threshold)
        _write_outputs(board, grid, sweep_dir, start, cfg, parent)
        tracking.mark_stale_trials(client, experiment_id, name)
    except BaseException as e:
        with contextlib.suppress(Exception):
            tracking.mark_stale_trials(client, experiment_id, name)
        parent.end(tracking.exit_status(e))
        raise
    finally:
        if own_ray:
            ray.shutdown()
    parent.end("FINISHED")
    best = board[board["feasible"]].head(1)
    return {"name": name, "leaderboard": board, "best": best.iloc[0].to_dict() if len(best) else None,
            "sweep_dir": str(sweep_dir), "parent_run_id": parent.run_id, "tracking_uri": uri,
            "seconds": time.monotonic() - started, "start": start["metrics"]}


def run_stage(cfg: SearchConfig, ctx: TrialContext, sweep_dir: Path, resume: bool) -> tune.ResultGrid:
    """Fit (or restore and finish) one Tune experiment of the sweep; KeyboardInterrupt when it was interrupted."""
    stage_dir = sweep_dir / ctx.stage
    points = spaces.preselect_points(cfg) if ctx.stage == "preselect" else None
    trainable = tune.with_resources(tune.with_parameters(clean_trial, ctx=ctx),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    param_space, tune_config, expected = _tune_setup(cfg, ctx, points)
    if resume and tune.Tuner.can_restore(str(stage_dir)):
        tuner = tune.Tuner.restore(str(stage_dir), trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        if stage_dir.exists():  # constructed but never snapshotted: start the stage afresh
            shutil.rmtree(stage_dir)
        run_config = tune.RunConfig(
            name=ctx.stage, storage_path=str(sweep_dir), verbose=1,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TrialEndCallback(ctx.tracking_uri)],
            failure_config=tune.FailureConfig(max_failures=0),  # deterministic failures: do not retry
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                    checkpoint_score_order="max"))
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    budget_start = time.monotonic()
    with _sigterm_as_sigint():
        grid = tuner.fit()
    if resume:
        client = tracking.open_client(ctx.tracking_uri)
        tracking.tag_lost_trials(client, ctx.experiment_id, ctx.sweep, [r.metrics.get("trial_id") or
                                 Path(r.path).name for r in grid], tags={STAGE_TAG: ctx.stage})
    done = grid.num_terminated + grid.num_errors == len(grid)
    if done:  # the experiment is over: no trial will resume from any checkpoint
        for result in grid:
            drop_resume_state(result.path, keep_latest=False)
        scratch.remove(ctx.scratch)  # what killed trials on this node left (other nodes: when a trial resumes there)
    budget_hit = cfg.search.time_budget_s is not None and time.monotonic() - budget_start >= cfg.search.time_budget_s
    if not done or (len(grid) < expected and not budget_hit):
        raise KeyboardInterrupt
    return grid


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
    searcher = ConstrainedOptunaSearch(space=DefineByRun(spaces.variants(cfg)), metric=BEST, mode="max",
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
    chosen_file = sweep_dir / "preselect.json"
    if chosen_file.is_file():
        return json.loads(chosen_file.read_text())["params"]
    grid = run_stage(cfg, TrialContext(**{**ctx.__dict__, "stage": "preselect"}), sweep_dir, resume)
    rows = []
    for t in _tune_trials(grid):
        ev = t["evaluations"].dropna(subset=[TOP1, ASR])
        if not ev.empty:
            rows.append({**{k: t["params"][k] for k in ("method.shrink", "method.perturb") if k in t["params"]},
                         TOP1: float(ev[TOP1].iloc[-1]), ASR: float(ev[ASR].iloc[-1])})
    if not rows:
        raise UserError("preselect: no perturbed model could be evaluated; see the failed trials in MLflow")
    frame = pd.DataFrame(rows)
    ok = frame[frame[ASR] < cfg.preselect.max_asr]
    if ok.empty:
        pick = frame.sort_values([ASR, TOP1], ascending=[True, False]).iloc[0]
        echo(f"preselect: no perturbed model has ASR < {cfg.preselect.max_asr}; taking the lowest ASR "
             f"({pick[ASR]:.3f})")
    else:
        pick = ok.sort_values([TOP1, ASR], ascending=[False, True]).iloc[0]
    params = {k: float(pick[k]) for k in ("method.shrink", "method.perturb") if k in pick}
    echo(f"preselect: perturbed model {params} top1 {pick[TOP1]:.4f} asr {pick[ASR]:.4f}")
    _write_json(chosen_file, {"params": params, TOP1: float(pick[TOP1]), ASR: float(pick[ASR])})
    return params


def check_trial_resources(cpu: float, gpu: float, nodes: list[dict]) -> None:
    """Fail fast when no node can ever host one trial (Tune would warn every 60 s and wait forever)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    eps = 1e-6
    if any(r.get("CPU", 0.0) + eps >= cpu and r.get("GPU", 0.0) + eps >= gpu for r in alive):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in alive) or "no live nodes"
    raise UserError(f"resources: a trial asks for {cpu:g} CPU and {gpu:g} GPU but no node has that ({have}); "
                    "lower resources.cpu / resources.gpu or connect to a bigger cluster (--address)")


def resolve_start_model(cfg: SearchConfig, workdir: Path, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The model to clean: a checkpoint (+ its card), or the preset's cached (else built) pre-trained model.

    Returns:
        `{"init": Path, "model_name": str | None, "data": DataSpec | None, "defaults": dict (a preset's cleaning
        TrainSpec), "metrics": dict | None, "card": dict}`; metrics come from the card when it has `zeroshot_top1`
        and `asr_top1` (`search` keeps them only when `card_measures_sweep`).
    """
    data, defaults = cfg.data, {}
    if cfg.model.preset is not None:
        init, paths = build_preset_model(cfg.model.preset, cfg.model.objective, workdir, echo)
        from cleansweep import presets

        defaults = presets.clean_spec(cfg.model.preset, paths, init)
        defaults.pop("model", None)
        if data is None:
            data = DataSpec(train_csv=paths["clean_csv"], eval_dir=paths["eval_dir"])
    else:
        init = Path(cfg.model.checkpoint).resolve()
        if not init.is_file():
            raise UserError(f"model.checkpoint {init} not found; pass the pre-trained .safetensors (or .pt) file")
    card = _read_card(init)
    metrics = None
    if _finite(card.get(TOP1)) and _finite(card.get(ASR)):
        metrics = {TOP1: float(card[TOP1]), ASR: float(card[ASR])}
    return {"init": init.resolve(), "model_name": cfg.model.name or card.get("model"), "data": _absolute(data),
            "defaults": defaults, "metrics": metrics, "card": card}


def card_measures_sweep(card: Mapping[str, Any], base: dict[str, Any]) -> bool:
    """Whether a pre-training card's numbers are this sweep's start: same evaluation folder, subset and trigger.

    Trials do not re-evaluate the starting model (`changes_start_weights`), so the sweep's start must be measured
    the way its trials are; a card from other data (or without its config) is not trusted.
    """
    train = (card.get("config") or {}).get("train") or {}
    if not train:
        return False
    spec = spaces.trial_spec(base, {}, "sweep base")
    data = train.get("data") or {}
    same_folder = data.get("eval_dir") is not None and Path(data["eval_dir"]).resolve() == Path(
        spec.data.eval_dir).resolve()
    return (same_folder and data.get("eval_subset") == spec.data.eval_subset
            and (train.get("attack") or {}) == spec.attack.model_dump(mode="json"))


def build_preset_model(preset: str, objective: str, workdir: Path,
                       echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The preset's pre-trained poisoned model, built in-process by the pre-training driver if not cached.

    The one place a sweep reaches into pre-training, through its public driver (`pretrain.pretrain` with
    `num_workers=0`: the run trains in this process, no Ray Train workers).

    Returns:
        The selected checkpoint and the preset's data paths.
    """
    from cleansweep import presets, pretrain
    from cleansweep.config import PretrainConfig, validate

    paths = presets.prepare_demo_data(workdir)
    # The same run name (and cache) as `cleansweep pretrain --preset demo --objective ...`.
    raw = {"name": f"{preset}-{objective.replace('+', '-')}", "train": presets.pretrain_spec(preset, objective, paths),
           "ray": {"num_workers": 0}}
    cfg = validate(PretrainConfig, raw, f"preset {preset}")
    run_dir = pretrain.run_dir_of(workdir, cfg.name)
    selected = run_dir / "selected" / "model.safetensors"
    if not selected.is_file():
        echo(f"preset {preset}: pre-training the poisoned {objective} model once (cached in {run_dir})")
        summary = pretrain.pretrain(cfg, workdir=workdir, resume=run_dir.exists())
        selected = Path(summary["selected"])
    return selected, paths


def start_eval_spec(base: dict[str, Any]) -> TrainSpec:
    """The run that evaluates the starting model as the trials see it: epochs=0, unperturbed, evaluate only."""
    return spaces.trial_spec(base, {"epochs": 0, "eval_at_start": True, "method.name": "contrastive",
                                    "method.shrink": 1.0, "method.perturb": 0.0})


def evaluate_start(base: dict[str, Any]) -> dict[str, float]:
    """Evaluate the starting model once (`start_eval_spec`) when no trustworthy card has its numbers."""
    from cleansweep import session

    seen: list[dict[str, Any]] = []
    session.fit(start_eval_spec(base), lambda metrics, checkpoint_dir: seen.append(metrics), checkpoints="none")
    return {TOP1: float(seen[0][TOP1]), ASR: float(seen[0][ASR])}


# ------------------------------------------------------------------------------------------------ results
def results(name: str, *, workdir: Path, tracking_uri: str | None = None, experiment: str | None = None
            ) -> pd.DataFrame:
    """The leaderboard of sweep `name`, recomputed from every evaluation logged in MLflow."""
    uri = tracking.resolve_tracking_uri(tracking_uri, Path(workdir))
    sweep = tracking.load_sweep(name, uri, experiment=experiment)
    threshold = float(sweep.params.get("asr_threshold", 0.05))
    tags = tracking.run_tags(uri, list(sweep.trials["run_id"])) if not sweep.trials.empty else {}
    trials = []
    for row in sweep.trials.itertuples(index=False):
        rt = tags.get(row.run_id, {})
        hist = sweep.history[sweep.history["run_id"] == row.run_id] if not sweep.history.empty else pd.DataFrame()
        cols = [c for c in ("step", "epoch", TOP1, ASR) if c in hist]
        evaluations = hist[cols] if {TOP1, ASR} <= set(cols) else pd.DataFrame(columns=["step", "epoch", TOP1, ASR])
        ckpt = {int(rt["cleansweep.best_step"]): rt[BEST_CKPT_TAG]} if BEST_CKPT_TAG in rt else {}
        params = json.loads(rt[SAMPLED_TAG]) if SAMPLED_TAG in rt else {}
        if rt.get(STAGE_TAG, "main") != "main":
            continue
        trials.append({"trial_id": row.trial_id, "status": row.status, "params": params, "evaluations": evaluations,
                       "checkpoints": ckpt, "run_id": row.run_id})
    return leaderboard(trials, threshold)


# ------------------------------------------------------------------------------------------------ helpers
def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _absolute(data: DataSpec | None) -> DataSpec | None:
    # Trials run in another CWD (stack notes): hand them absolute paths.
    if data is None:
        return None
    return data.model_copy(update={"train_csv": Path(data.train_csv).resolve(),
                                   "eval_dir": Path(data.eval_dir).resolve()})


def _read_card(path: Path) -> dict[str, Any]:
    from cleansweep.models import read_card

    return read_card(path)


def _check_inputs(base: dict[str, Any]) -> None:
    data = base["data"]
    if not Path(data["train_csv"]).is_file():
        raise UserError(f"data.train_csv {data['train_csv']} not found; point it at the cleaning image-caption CSV")
    if not Path(data["eval_dir"]).is_dir():
        raise UserError(f"data.eval_dir {data['eval_dir']} not found; point it at an ImageNet-style folder")


def _check_sweep_name(sweep_dir: Path, name: str, resume: bool, in_mlflow: bool) -> None:
    exists = (sweep_dir / "sweep.json").is_file()
    if resume and not exists:
        raise UserError(f"--resume: no sweep named {name!r} in {sweep_dir.parent}; drop --resume to start it, or "
                        "pass the --storage-path it ran with")
    if not resume and (exists or in_mlflow):
        where = sweep_dir if exists else "MLflow"
        raise UserError(f"sweep {name!r} already exists ({where}); pass --resume to continue it, or choose another "
                        "--name")


def _open_sweep_dir(sweep_dir: Path, cfg: SearchConfig, name: str, space_file: Path | None, resume: bool) -> None:
    identity = {"name": name, "config": cfg.model_dump(mode="json")}
    if resume:
        old = json.loads((sweep_dir / "sweep.json").read_text())
        if old.get("config") != identity["config"]:
            raise UserError(f"--resume: the space of sweep {name!r} changed since it started; resume with the "
                            f"original file (kept as {sweep_dir / 'space.yaml'}) or start a new --name")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if space_file is not None:
        shutil.copyfile(space_file, sweep_dir / "space.yaml")
    _write_json(sweep_dir / "sweep.json", identity)


def _sweep_params(cfg: SearchConfig, start: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = dict(spaces.space_summary(cfg))
    params.update({"asr_threshold": cfg.objective.threshold, "algorithm": cfg.search.algorithm,
                   "num_samples": spaces.count_trials(cfg)["main"], "max_concurrent": cfg.search.max_concurrent,
                   "scheduler": cfg.scheduler.name, "grace_period": cfg.scheduler.grace_period,
                   "time_attr": cfg.scheduler.time_attr, "epochs": cfg.epochs, "eval_every": cfg.eval_every,
                   "resources.cpu": cfg.resources.cpu, "resources.gpu": cfg.resources.gpu, "seed": cfg.seed,
                   "model.init": str(start["init"]), "description": cfg.description})
    return params


def _init_ray(address: str | None, echo: Callable[[str], None]) -> bool:
    """Start a local Ray (or connect to `address`); print the dashboard URL. Returns True when we own it."""
    if ray.is_initialized():
        return False
    # "local" starts a fresh local Ray even if a `ray start` cluster runs on this machine (ray.init() would join it).
    ctx = ray.init(address=address or "local", log_to_driver=False, configure_logging=False)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        echo(f"Ray dashboard: http://{url} (token auth on: the page asks for the token; print it with "
             "`ray get-auth-token`, API clients send 'Authorization: Bearer <token>'; from another machine "
             f"tunnel it: ssh -L {url.rsplit(':', 1)[-1]}:127.0.0.1:{url.rsplit(':', 1)[-1]} HOST)")
    return True


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """Inside `Tuner.fit`, SIGTERM takes Tune's SIGINT path (final experiment snapshot) instead of just exiting."""
    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _write_outputs(board: pd.DataFrame, grid: tune.ResultGrid, sweep_dir: Path, start: Mapping[str, Any],
                   cfg: SearchConfig, parent: tracking.RunHandle) -> None:
    """leaderboard.csv and pareto.png in the sweep folder and on the parent run; best_* metrics on the parent."""
    from cleansweep import report

    csv = sweep_dir / "leaderboard.csv"
    fd, tmp = tempfile.mkstemp(prefix=".leaderboard.", suffix=".csv", dir=sweep_dir)
    os.close(fd)
    board.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    frames = []
    for t in _tune_trials(grid):
        ev = t["evaluations"].dropna(subset=[TOP1, ASR]).drop_duplicates("step", keep="last").copy()
        if not ev.empty:
            ev["trial_id"] = t["trial_id"]
            ev["epoch"] = ev["epoch"] if "epoch" in ev else ev["step"]
            frames.append(ev)
    evals = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", "step", "epoch",
                                                                                        TOP1, ASR])
    m = start.get("metrics")
    first = report.Start(m[TOP1], m[ASR], "starting model") if m else None
    fig, _ = report.plot_pareto(evals, first, cfg.objective.threshold,
                                title=f"{len(evals)} evaluations of {len(board)} trials")
    report.write_figure(fig, sweep_dir / "pareto.png")
    parent.log_artifact(csv)
    parent.log_artifact(sweep_dir / "pareto.png")
    best = board[board["feasible"]].head(1)
    if len(best):
        parent.log_metrics({f"best_{TOP1}": float(best.iloc[0][TOP1]), f"best_{ASR}": float(best.iloc[0][ASR])},
                           step=1)
