"""What a finished sweep leaves behind: the leaderboard over every evaluation MLflow holds, its CSV and Pareto plot
(in the sweep folder and on the parent run), the best feasible metrics on the parent run, and the best model in the
MLflow Model Registry once its checkpoint is known to load (`delivery`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from cleansweep import tracking
from cleansweep.objective import ASR, TOP1, best_metric
from cleansweep.results import analysis, figures
from cleansweep.runtime import atomic, layout, storage
from cleansweep.sweep import delivery
from cleansweep.sweep.config import SearchConfig
from cleansweep.sweep.trial import TrialContext, finite


def write_outputs(cfg: SearchConfig, ctx: TrialContext, sweep_dir: storage.Location, start: Any,
                  parent: tracking.RunHandle) -> dict[str, Any]:
    """The leaderboard (from every evaluation MLflow holds), its CSV and Pareto plot in the sweep folder and on the
    parent run, the best feasible metrics on the parent, and the best model in the Model Registry."""
    staging = storage.local_staging("outputs") if storage.is_remote(sweep_dir) else None
    try:
        return _write_outputs(cfg, ctx, sweep_dir, staging or Path(sweep_dir), start, parent)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _write_outputs(cfg: SearchConfig, ctx: TrialContext, sweep_dir: storage.Location, local_dir: Path, start: Any,
                   parent: tracking.RunHandle) -> dict[str, Any]:
    """`write_outputs`, its files written in `local_dir` (the sweep folder, or a staging folder for object storage
    whence they are uploaded to the sweep's URI)."""
    record = tracking.load_sweep(ctx.sweep, ctx.tracking_uri, experiment=cfg.mlflow.experiment)
    board = analysis.sweep_leaderboard(record, cfg.objective.threshold)
    csv = atomic.write_atomic(local_dir / layout.LEADERBOARD_FILE, lambda p: board.to_csv(p, index=False))
    trials, history = analysis.main_stage(record)
    evals = analysis.evaluations(history, trials, constraint=ctx.constraint)
    first = analysis.Start(start.metrics[TOP1], start.metrics[ctx.constraint], "starting model")
    fig, _ = figures.plot_pareto(evals, first, cfg.objective.threshold,
                                 title=f"{len(evals)} evaluations of {len(board)} trials")
    png = atomic.write_atomic(local_dir / layout.PARETO_FILE, lambda p: fig.savefig(p, format="png"))
    if storage.is_remote(sweep_dir):
        for local in (csv, png):
            storage.upload(local, storage.join(sweep_dir, local.name))
    parent.log_artifact(csv)
    parent.log_artifact(png)
    best = board[board["feasible"]].head(1)
    best_model = problem = None
    if len(best):
        row = best.iloc[0]
        # Under their own names: a proxy-ASR sweep's best has `best_proxy_asr_top1`, and `best_asr_top1` only when
        # the trigger is known (the leaderboard's `asr_top1` is then the true ASR of the same evaluation).
        asrs = {best_metric(k): float(row[k]) for k in dict.fromkeys((ctx.constraint, ASR)) if finite(row[k])}
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
    weights = storage.join(storage.parse_location(checkpoint), layout.MODEL_FILE) if isinstance(checkpoint, str) \
        else None
    if weights is None or not storage.is_file(weights):
        return None
    remote = storage.is_remote(weights)
    if remote:
        staging = storage.local_staging("best-model")
    else:
        staging = Path(checkpoint).parent / f".best-model-{row['trial_id']}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        if remote:
            delivery.fetch_weights(weights, staging)
        else:
            for part in (weights, weights.with_suffix(".json")):
                if part.is_file():
                    shutil.copy2(part, staging / part.name)
        return tracking.register_best_model(
            parent, staging, sweep=sweep,
            description=f"best feasible evaluation: top-1 {row[TOP1]:.4f}, {constraint} {row[constraint]:.4f}, trial "
                        f"{row['trial_id']} step {int(row['step'])} (epoch {row['epoch']:g})",
            tags={"trial_id": row["trial_id"], TOP1: row[TOP1], constraint: row[constraint],
                  **({ASR: row[ASR]} if finite(row[ASR]) else {}), "step": int(row["step"]),
                  "config": row["config"], "checkpoint": checkpoint})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
