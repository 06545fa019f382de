"""Pure analysis of a sweep's evaluations: DataFrame in, DataFrame out (no files, no MLflow, no plotting).

The numbers behind the paper's Table 2 (starting model vs the best evaluation with ASR <= threshold, relative
change) and its stopping-criterion argument (per trial: best feasible evaluation vs the last one), the Pareto front,
and the hyperparameters a sweep sampled. `cleansweep.results.report` writes them; the notebook and the tests call them
directly on `cleansweep.tracking.load_sweep(...)` output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from cleansweep.tracking import SweepRecord

from cleansweep.objective import ASR, EPOCH, MIN_ASR, STEP, TOP1

TRUE_ASR = "true_asr_top1"  # in a proxy-ASR sweep's evaluations: the known trigger's ASR (asr_top1 is the proxy)

PERTURB_KEYS = ("method.shrink", "method.perturb")  # what two-stage shrink-and-perturb preselects
DEFAULT_THRESHOLD = 0.05  # the paper's success criterion: ASR <= 5%


@dataclass(frozen=True)
class Start:
    """The model before cleaning: its accuracy, ASR, and where the numbers came from."""

    top1: float
    asr: float
    source: str


# ------------------------------------------------------------------------------------------------ ranking
# The one ranking of a sweep: `results`, the sweep's leaderboard.csv, the report's tables and the study all use it.
# Evaluations: the most accurate feasible one first; equal accuracy -> the lower trial id, then the earlier step.
# A FAILED trial is never feasible (its evaluations are not results: an error, a diverged model whose garbage still
# evaluates, a worker killed mid-trial) and comes after every trial that ran.
# Trials: feasible ones by their best feasible accuracy, then the others by their lowest ASR; ties -> trial id.
def _failed(frame: pd.DataFrame) -> pd.Series | bool:
    """Which rows belong to a FAILED trial (MLflow's word; Tune's is ERROR); False without a status column."""
    return frame["status"].isin(["FAILED", "ERROR"]) if "status" in frame else False


def best_feasible(evals: pd.DataFrame, threshold: float) -> pd.Series | None:
    """The most accurate evaluation with ASR <= threshold (ties: lower trial id, then earlier step), or None.

    Args:
        evals: Evaluations with `zeroshot_top1`, `asr_top1`, `step` (and `trial_id` when several trials).
        threshold: ASR threshold of a feasible evaluation.
    """
    feasible = _feasible(evals, threshold)
    if feasible.empty:
        return None
    keys = [TOP1, *(["trial_id"] if "trial_id" in feasible else []), STEP]
    ordered = feasible.sort_values(keys, ascending=[False] + [True] * (len(keys) - 1), kind="stable")
    return ordered.iloc[0]


def _feasible(evals: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The evaluations with ASR <= threshold, none of a FAILED trial."""
    ok = evals[ASR] <= threshold
    return evals[ok & ~_failed(evals)] if "status" in evals else evals[ok]


def _trial_row(trial: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    ev = trial["evaluations"].dropna(subset=[TOP1, ASR]).drop_duplicates(STEP, keep="last").sort_values(STEP)
    failed = trial.get("status", "") in ("FAILED", "ERROR")
    best = best_feasible(ev, threshold) if not ev.empty and not failed else None
    last = ev.iloc[-1] if not ev.empty else None

    def pick(row: pd.Series | None, key: str) -> float:
        return float(row[key]) if row is not None and key in row else math.nan

    return {"trial_id": trial["trial_id"], "status": trial.get("status", ""),
            "stopped_early": bool(trial.get("stopped_early", False)), "feasible": best is not None,
            TOP1: pick(best, TOP1), ASR: pick(best, ASR), TRUE_ASR: pick(best, TRUE_ASR),
            STEP: int(best[STEP]) if best is not None else -1,
            EPOCH: pick(best, EPOCH),
            "checkpoint": (trial.get("checkpoints") or {}).get(int(best[STEP])) if best is not None else None,
            "evaluations": len(ev), MIN_ASR: float(ev[ASR].min()) if not ev.empty else math.nan,
            f"last_{TOP1}": pick(last, TOP1), f"last_{ASR}": pick(last, ASR), "run_id": trial.get("run_id"),
            "config": json.dumps(trial.get("params", {}), sort_keys=True, default=str)}


LEADERBOARD_COLUMNS = ["rank", "trial_id", "status", "stopped_early", "feasible", TOP1, ASR, TRUE_ASR, STEP, EPOCH,
                       "checkpoint", "evaluations", MIN_ASR, f"last_{TOP1}", f"last_{ASR}", "run_id", "config"]


def leaderboard(trials: Sequence[Mapping[str, Any]], threshold: float, *, constraint: str = ASR) -> pd.DataFrame:
    """Rank trials by their best feasible evaluation over ALL their evaluations (not their last result).

    Args:
        trials: One mapping per trial: `trial_id`, `status`, `params` (dict), `evaluations` (DataFrame with `step`,
            `epoch`, `zeroshot_top1`, `asr_top1`), optional `checkpoints` (step -> path), `run_id`.
        threshold: ASR threshold of the sweep.
        constraint: The ASR the evaluations' `asr_top1` holds (`evaluations(constraint=...)`); it names the columns.

    Returns:
        One row per trial in ranking order (`LEADERBOARD_COLUMNS`; FAILED trials last): its best feasible
        evaluation (`zeroshot_top1`, `asr_top1`, `step`, `epoch`, `checkpoint`; NaN / -1 / None when never
        feasible), `evaluations`, `min_asr_top1`, the last evaluation, `run_id` and `config` (JSON of the params).
        A proxy-ASR sweep's board names what it ranked on `proxy_asr_top1` (`min_proxy_asr_top1`,
        `last_proxy_asr_top1`) and has the known trigger's ASR at the same evaluation as `asr_top1` (NaN when
        the trigger is unknown); `true_asr_top1` exists only inside this module.
    """
    board = pd.DataFrame([_trial_row(t, threshold) for t in trials], columns=LEADERBOARD_COLUMNS[1:])
    if board.empty:
        return _named(board.assign(rank=pd.Series(dtype=int))[LEADERBOARD_COLUMNS], constraint)
    key = board[TOP1].where(board["feasible"], -board[MIN_ASR].fillna(math.inf) - 1.0)
    # A FAILED trial (an error, a diverged model whose garbage still evaluates) never outranks one that ran.
    board = board.assign(_key=key, _failed=_failed(board))
    board = board.sort_values(["_failed", "_key", "trial_id"], ascending=[True, False, True], kind="stable")
    board.insert(0, "rank", range(1, len(board) + 1))
    return _named(board.drop(columns=["_key", "_failed"]).reset_index(drop=True), constraint)


def _named(board: pd.DataFrame, constraint: str) -> pd.DataFrame:
    """The leaderboard's ASR columns under the names of the metrics they hold (a proxy is never called ASR)."""
    if constraint == ASR:
        return board.drop(columns=[TRUE_ASR])
    return board.rename(columns={ASR: constraint, MIN_ASR: f"min_{constraint}", f"last_{ASR}": f"last_{constraint}",
                                 TRUE_ASR: ASR})


def trials_of(evals: pd.DataFrame, trials: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """`leaderboard` input from a sweep's evaluations (`evaluations`) and, optionally, its trial table
    (`SweepRecord.trials`: status, sampled params, best checkpoint); without it, one bare entry per trial id."""
    if trials is None or trials.empty:
        rows: list[dict[str, Any]] = [{"trial_id": t} for t in dict.fromkeys(evals["trial_id"])]
    else:
        rows = trials.to_dict("records")
    out = []
    for row in rows:
        step, checkpoint = row.get("best_step"), row.get("best_checkpoint")
        out.append({"trial_id": row["trial_id"], "status": row.get("status", ""), "params": row.get("sampled") or {},
                    "stopped_early": bool(row.get("stopped_early") or False),
                    "evaluations": evals[evals["trial_id"] == row["trial_id"]], "run_id": row.get("run_id"),
                    "checkpoints": {int(step): checkpoint} if isinstance(checkpoint, str) and pd.notna(step) else {}})
    return out


def rank_of(evals: pd.DataFrame, threshold: float) -> list[str]:
    """Trial ids in ranking order (the leaderboard's)."""
    return list(leaderboard(trials_of(evals), threshold)["trial_id"]) if not evals.empty else []


def sweep_leaderboard(sweep: SweepRecord, threshold: float | None = None) -> pd.DataFrame:
    """The leaderboard of a sweep as MLflow holds it: its main-stage trials, every evaluation, the sweep's threshold
    unless one is given. `cleansweep results`, the sweep's leaderboard.csv and the study read it from here."""
    threshold = threshold_from_params(sweep.params) if threshold is None else threshold
    trials, history = main_stage(sweep)
    constraint = constraint_from_params(sweep.params)
    evals = evaluations(history, trials, constraint=constraint)
    return leaderboard(trials_of(evals, trials), threshold, constraint=constraint)


def preselect_choice(sweep: SweepRecord, max_asr: float) -> dict[str, Any] | None:
    """Stage 1 of two-stage shrink-and-perturb: the most accurate perturbed model with ASR < max_asr (else the
    lowest ASR), from the preselect trials' evaluations. None when no perturbed model was evaluated."""
    trials = sweep.trials[sweep.trials["stage"] == "preselect"] if "stage" in sweep.trials else sweep.trials[:0]
    evals = evaluations(sweep.history, trials) if not sweep.history.empty else evaluations(sweep.history)
    rows = []
    for trial in trials.to_dict("records"):
        ev = evals[evals["run_id"] == trial["run_id"]]
        if not ev.empty:
            params = {k: float(v) for k, v in (trial["sampled"] or {}).items() if k in PERTURB_KEYS}
            rows.append({"params": params, TOP1: float(ev[TOP1].iloc[-1]), ASR: float(ev[ASR].iloc[-1])})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    ok = frame[frame[ASR] < max_asr]
    ordered = (ok.sort_values([TOP1, ASR], ascending=[False, True], kind="stable") if not ok.empty else
               frame.sort_values([ASR, TOP1], ascending=[True, False], kind="stable"))
    pick = ordered.iloc[0]
    return {"params": pick["params"], TOP1: float(pick[TOP1]), ASR: float(pick[ASR]), "below_max_asr": not ok.empty}


def in_rank_order(table: pd.DataFrame, ranking: Sequence[str]) -> pd.DataFrame:
    """`table` (one row per trial, a `trial_id` column) reordered as `ranking` (trial ids) lists the trials."""
    order = {t: i for i, t in enumerate(ranking)}
    return table.sort_values("trial_id", key=lambda ids: ids.map(order).fillna(len(order)), kind="stable",
                             ignore_index=True)


# ------------------------------------------------------------------------------------------------ tables
def evaluations(history: pd.DataFrame, trials: pd.DataFrame | None = None, *, constraint: str = ASR) -> pd.DataFrame:
    """Every evaluation of every trial that has both an accuracy and an ASR.

    Args:
        history: One row per (run, step) with metric columns (`SweepRecord.history`).
        trials: Optional trial table (`SweepRecord.trials`); adds each evaluation's trial `status`.
        constraint: The ASR the sweep was constrained on. For a proxy-ASR sweep (`proxy_asr_top1`) that column
            becomes `asr_top1`, what every table and figure ranks and plots, and the known trigger's ASR (if
            measured) moves to `true_asr_top1`.

    Returns:
        Rows sorted by trial and step with `trial_id`, `run_id`, `step`, `epoch` (the step when no epoch was
        logged), `zeroshot_top1`, `asr_top1`, the other metric columns, and `status` when `trials` is given.
    """
    if constraint != ASR and constraint in history:
        history = history.rename(columns={ASR: TRUE_ASR}).rename(columns={constraint: ASR})
    if history.empty or TOP1 not in history or ASR not in history:
        cols = ["trial_id", "run_id", "step", EPOCH, TOP1, ASR]
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("trial_id", "run_id") else float) for c in cols})
    evals = history.dropna(subset=[TOP1, ASR]).copy()
    if EPOCH not in evals:
        evals[EPOCH] = np.nan
    evals[EPOCH] = evals[EPOCH].fillna(evals["step"].astype(float))
    if trials is not None and not trials.empty:
        evals = evals.merge(trials[["run_id", "status"]], on="run_id", how="left")
    return evals.sort_values(["trial_id", "step"], kind="stable", ignore_index=True)


def starting_point(parent_metrics: Mapping[str, float], evals: pd.DataFrame, *, constraint: str = ASR
                   ) -> Start | None:
    """The starting model: the parent run's `start_*` metrics, else the mean step-0 evaluation of the trials.

    Args:
        parent_metrics: Metrics of the sweep's parent run.
        evals: Output of `evaluations`.

    Returns:
        A `Start`, or None when neither source exists.
    """
    top1, asr = parent_metrics.get(f"start_{TOP1}"), parent_metrics.get(f"start_{constraint}")
    if top1 is not None and asr is not None:
        return Start(float(top1), float(asr), "parent run metrics")
    first = evals[evals["step"] == 0]
    if first.empty:
        return None
    return Start(float(first[TOP1].mean()), float(first[ASR].mean()), f"mean of {len(first)} step-0 evaluations")


def constraint_from_params(params: Mapping[str, str]) -> str:
    """The ASR metric a sweep was constrained on (its parent param `constraint`; sweeps before it: `asr_top1`)."""
    return params.get("constraint", ASR)


def threshold_from_params(params: Mapping[str, str], default: float = DEFAULT_THRESHOLD) -> float:
    """The sweep's ASR threshold from its parent params (any key named or ending in `asr_threshold`)."""
    for key, value in params.items():
        if key == "asr_threshold" or key.endswith(".asr_threshold"):
            return float(value)
    return default


def pareto_front(evals: pd.DataFrame) -> pd.DataFrame:
    """Evaluations not dominated by another (higher accuracy at lower or equal ASR), sorted by ASR."""
    ordered = evals.sort_values([ASR, TOP1], ascending=[True, False], kind="stable")
    best_so_far = ordered[TOP1].cummax().shift(fill_value=-math.inf)
    return ordered[ordered[TOP1] > best_so_far].reset_index(drop=True)


def summary_table(evals: pd.DataFrame, start: Start | None, threshold: float, *, sweep: str = "") -> pd.DataFrame:
    """Table 2 of the paper for one sweep: start, best accuracy with ASR <= threshold, relative change.

    Args:
        evals: Output of `evaluations`.
        start: The starting model (None leaves its columns NaN).
        threshold: ASR threshold of a successful cleaning (0.05 in the paper).
        sweep: Sweep name for the first column.

    Returns:
        One row: `sweep`, `trials`, `evaluations`, `feasible_evaluations`, `start_top1`, `start_asr`, `best_top1`,
        `best_asr`, `best_trial`, `best_epoch`, `best_step`, `relative_change` ((best - start) / start). The `best_*`
        columns are NaN when no evaluation is feasible.
    """
    feasible = _feasible(evals, threshold)
    row: dict[str, Any] = {
        "sweep": sweep, "trials": int(evals["trial_id"].nunique()), "evaluations": len(evals),
        "feasible_evaluations": len(feasible), "asr_threshold": threshold,
        "start_top1": start.top1 if start else np.nan, "start_asr": start.asr if start else np.nan,
        "best_top1": np.nan, "best_asr": np.nan, "best_trial": None, "best_epoch": np.nan, "best_step": np.nan,
        "relative_change": np.nan,
    }
    best = best_feasible(evals, threshold)
    if best is not None:
        row.update(best_top1=float(best[TOP1]), best_asr=float(best[ASR]), best_trial=best["trial_id"],
                   best_epoch=float(best[EPOCH]), best_step=int(best["step"]))
        if start and start.top1 > 0:
            row["relative_change"] = (row["best_top1"] - start.top1) / start.top1
    return pd.DataFrame([row])


def stopping_table(evals: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per trial: the best feasible evaluation vs the last one (what "clean until the end" would hand you).

    Args:
        evals: Output of `evaluations`.
        threshold: ASR threshold of a feasible evaluation.

    Returns:
        One row per trial, best feasible accuracy first: `trial_id`, `evaluations`, `best_feasible_top1`,
        `best_feasible_asr`, `best_feasible_epoch` (NaN when the trial never was feasible), `last_top1`, `last_asr`,
        `last_epoch`, `last_feasible`, `best_is_mid_trajectory` (an earlier evaluation beats the last one: the last is
        infeasible, or feasible but less accurate) and `top1_given_up` (best feasible accuracy minus the accuracy
        kept by stopping at the end, where an infeasible last model keeps nothing).
    """
    rows = []
    for trial_id, t in evals.groupby("trial_id", sort=False):
        t = t.sort_values("step", kind="stable")
        last = t.iloc[-1]
        best = best_feasible(t, threshold)
        last_feasible = not _feasible(t.iloc[[-1]], threshold).empty
        best_top1 = float(best[TOP1]) if best is not None else np.nan
        rows.append({
            "trial_id": trial_id, "evaluations": len(t),
            "best_feasible_top1": best_top1,
            "best_feasible_asr": float(best[ASR]) if best is not None else np.nan,
            "best_feasible_epoch": float(best[EPOCH]) if best is not None else np.nan,
            "last_top1": float(last[TOP1]), "last_asr": float(last[ASR]), "last_epoch": float(last[EPOCH]),
            "last_feasible": last_feasible,
            "best_is_mid_trajectory": bool(best is not None and (not last_feasible or best_top1 > last[TOP1])),
            "top1_given_up": best_top1 - (float(last[TOP1]) if last_feasible else 0.0) if best is not None else np.nan,
        })
    cols = ["trial_id", "evaluations", "best_feasible_top1", "best_feasible_asr", "best_feasible_epoch", "last_top1",
            "last_asr", "last_epoch", "last_feasible", "best_is_mid_trajectory", "top1_given_up"]
    return in_rank_order(pd.DataFrame(rows, columns=cols), rank_of(evals, threshold))


def stopping_summary(stopping: pd.DataFrame, *, sweep: str = "") -> pd.DataFrame:
    """One row condensing `stopping_table`: how many trials end feasible, and what stopping at the end costs.

    Returns:
        `sweep`, `trials`, `trials_feasible_anywhere`, `trials_feasible_at_end`, `trials_best_mid_trajectory`,
        `best_feasible_top1_any` (best over all evaluations), `best_feasible_top1_at_end` (best over last
        evaluations that are feasible; NaN when none is).
    """
    at_end = stopping.loc[stopping["last_feasible"], "last_top1"]
    return pd.DataFrame([{
        "sweep": sweep, "trials": len(stopping),
        "trials_feasible_anywhere": int(stopping["best_feasible_top1"].notna().sum()),
        "trials_feasible_at_end": int(stopping["last_feasible"].sum()),
        "trials_best_mid_trajectory": int(stopping["best_is_mid_trajectory"].sum()),
        "best_feasible_top1_any": float(stopping["best_feasible_top1"].max()),
        "best_feasible_top1_at_end": float(at_end.max()) if not at_end.empty else np.nan,
    }])


def varying_params(trials: pd.DataFrame, *, among: Sequence[str] | None = None) -> list[str]:
    """Dotted names of the params that differ between trials (the sampled hyperparameters, in practice).

    Args:
        trials: `SweepRecord.trials` (params as `params.<name>` columns).
        among: Restrict to these names (e.g. the keys of the search space); None = every param.
    """
    names = [c.removeprefix("params.") for c in trials.columns if c.startswith("params.")]
    if among is not None:
        names = [n for n in names if n in set(among)]
    return sorted(n for n in names if trials[f"params.{n}"].nunique(dropna=False) > 1)


def sampled_params(trials: pd.DataFrame) -> list[str]:
    """Dotted names of the sampled hyperparameters: the keys of each trial's `sampled` params, else the params that
    differ between trials."""
    if "sampled" not in trials or not any(trials["sampled"]):
        return varying_params(trials)
    keys: set[str] = set()
    for sampled in trials["sampled"]:
        keys.update(sampled or {})
    return sorted(k for k in keys if f"params.{k}" in trials)


def main_stage(sweep: SweepRecord) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep's trials and history without its preselect stage (two-stage shrink-and-perturb)."""
    trials = sweep.trials
    if "stage" in trials:
        trials = trials[trials["stage"].fillna("main") == "main"].reset_index(drop=True)
    history = sweep.history
    if not history.empty:
        history = history[history["run_id"].isin(trials["run_id"])].reset_index(drop=True)
    return trials, history
