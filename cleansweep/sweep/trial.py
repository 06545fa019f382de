"""One cleaning trial inside Ray Tune: `clean_trial` runs `fit.fit` with the trial's parameters, logged to its own
MLflow child run, and reports every evaluation to Tune through `TrialReporter`.

Every report carries `zeroshot_top1`, the constraint's ASR, `feasible`, the monotone `best_feasible_top1` (kept by
the loop) and the running minimum ASR the searcher judges feasibility on. Trials checkpoint at every evaluation a
resume or the result needs (`loop.needs_checkpoint`) and find their MLflow run again by tag on a resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from cleansweep import tracking
from cleansweep.objective import ASR, EPOCH, EVALUATION, MIN_ASR, SCORE, TOP1, checkpoint_score
from cleansweep.runtime import diskguard, layout, scratch
from cleansweep.sweep import space
from cleansweep.sweep.lifecycle import AlreadyFailed
from cleansweep.train_config import TrainSpec

POINT = "point"  # grid sweeps: Tune grid-searches over whole points (method-conditional grids, duplicates kept)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (passed once through `tune.with_parameters`)."""

    sweep: str
    stage: str
    base: dict[str, Any]
    # Absolute: Tune moves each trial into its own trial folder (`ray.tune.Trainable`'s docstring,
    # `RAY_CHDIR_TO_TRIAL_DIR`), where a relative sqlite path would name another database.
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    threshold: float
    scratch: str  # `scratch.name(sweep_dir)`: this sweep's folder for in-flight checkpoints in each node's temp
    # The trial's GPU fraction: Ray only books a fractional GPU, keeping within the share is the task's job (Ray docs,
    # "Fractional Accelerators"), so the trial caps its own memory (`_cap_gpu_memory`).
    gpu: float = 0.0
    constraint: str = ASR  # the ASR feasibility is judged on: asr_top1, or proxy_asr_top1 (unknown trigger)


def finite(value: Any) -> bool:
    """Whether `value` is a real, finite number (not a bool, None, NaN or infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters under dotted names (grid trials carry theirs under `point`)."""
    params = dict(config.get(POINT, config))
    return {k: v for k, v in params.items() if not isinstance(v, dict)}


class TrialReporter:
    """`report(metrics, checkpoint_dir)` for `fit.fit` inside a Tune trial: MLflow batch + `tune.report`."""

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
            if not finite(scalars.get(key)):
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
    """One cleaning trial: `fit.fit` with this trial's parameters, logged to its own MLflow child run."""
    from cleansweep import fit  # imported in the trial process only: the driver never loads torch models

    trial_id = tune.get_context().get_trial_id()
    params = trial_params(config)
    spec = space.trial_spec(ctx.base, params, f"trial {trial_id}")
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
    if failed is not None:  # a failed trial a resume restored as unfinished (`records`): it stays failed
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
                fit.fit(spec, reporter, checkpoints="needed", scratch_dir=in_flight)
            else:
                with checkpoint.as_directory() as resume_dir:
                    reporter.load(Path(resume_dir))
                    fit.fit(spec, reporter, resume_from=resume_dir, checkpoints="needed", scratch_dir=in_flight)
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


def _cap_gpu_memory(fraction: float) -> None:
    if 0 < fraction < 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(fraction)
