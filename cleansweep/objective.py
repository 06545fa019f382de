"""The search objective: maximise zero-shot top-1 subject to ASR <= threshold (the paper's model selection).

Metric names are constants so every module logs and reads the same keys. `BestFeasible` turns a trajectory of
evaluations into the monotone metric the searcher optimises: Ray Tune tells a searcher only a trial's last result
(`TuneController.stop_trial` passes `trial.last_result` to `OptunaSearch.on_trial_complete`, which hands that one
value to `study.tell`; ray/tune/execution/tune_controller.py, ray 2.60), so the last result must carry the best
feasible accuracy so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TOP1 = "zeroshot_top1"
TOP5 = "zeroshot_top5"
ASR = "asr_top1"
PROXY_ASR = "proxy_asr_top1"  # share of non-target images the inverted trigger (`cleansweep scan`) sends to its target
BEST = "best_feasible_top1"
BEST_STEP = "best_feasible_step"
FEASIBLE = "feasible"
MIN_ASR = "min_asr_top1"  # running minimum of ASR over a trial: its constraint value for Optuna
SCORE = "checkpoint_score"  # top-1 when feasible, else -ASR: what Tune keeps the best checkpoint by
EVALUATION = "evaluation"  # explicit evaluation counter (a time_attr restored with the trial, unlike wall time)
EPOCH = "epoch"
STEP = "step"


def start_metric(name: str) -> str:
    """Name of a metric of the model before cleaning, logged once per sweep (`start_zeroshot_top1`)."""
    return f"start_{name}"


def best_metric(name: str) -> str:
    """Name of a metric of a sweep's best feasible evaluation, logged on its parent run (`best_zeroshot_top1`)."""
    return f"best_{name}"


def checkpoint_score(top1: float, asr: float, threshold: float, step: int) -> float:
    """Feasible evaluations outrank infeasible ones (by accuracy, then lower ASR); on equal accuracy the earlier step
    wins, as in the leaderboard and `BestFeasible`, so the kept checkpoint is the one the leaderboard names."""
    return (top1 if is_feasible(asr, threshold) else -asr) - 1e-9 * step


def is_feasible(asr: float, threshold: float) -> bool:
    """True when the attack success rate is at most `threshold`; NaN (not measured) is infeasible."""
    return not math.isnan(asr) and asr <= threshold


class BestFeasible:
    """Running best zero-shot top-1 over the feasible evaluations of one run.

    Args:
        threshold: largest feasible ASR (inclusive).
        constraint: the metric feasibility is judged on (`asr_top1`, or `proxy_asr_top1` without a known trigger).
    """

    def __init__(self, threshold: float, constraint: str = ASR) -> None:
        self.threshold = threshold
        self.constraint = constraint
        self.best = 0.0
        self.best_step: int | None = None

    def update(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Fold one evaluation into the tracker.

        Args:
            metrics: has the constraint metric, `zeroshot_top1` and optionally `step` (the global optimizer step).

        Returns:
            `feasible` (1.0 or 0.0, loggable as a metric), `best_feasible_top1` (0.0 before any feasible
            evaluation) and `best_feasible_step` (-1 before any).
        """
        feasible = is_feasible(float(metrics[self.constraint]), self.threshold)
        top1 = float(metrics[TOP1])
        if feasible and (self.best_step is None or top1 > self.best):
            self.best = top1
            self.best_step = int(metrics.get("step", 0))
        return {FEASIBLE: float(feasible), BEST: self.best,
                BEST_STEP: -1 if self.best_step is None else self.best_step}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the tracker (JSON-serialisable)."""
        return {"threshold": self.threshold, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a tracker saved by `state_dict` (the threshold stays the one this tracker was built with)."""
        self.best = float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
