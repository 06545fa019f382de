"""The searcher and scheduler of a sweep's main stage: Optuna (TPE or random) told the ASR constraint, and ASHA.

The searcher and ASHA rank trials on the monotone `best_feasible_top1`: Ray's `OptunaSearch.on_trial_complete` tells
Optuna a trial's *last* result only (ray/tune/search/optuna/optuna_search.py), so an accuracy that peaked mid-trial
would otherwise be lost. Optuna sees the ASR constraint itself through `trial.set_constraint`.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from cleansweep.objective import BEST, MIN_ASR
from cleansweep.sweep import space
from cleansweep.sweep.config import SearchConfig
from cleansweep.sweep.trial import finite


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the ASR constraint and marks failed trials FAIL.

    Optuna 5 reads constraints from `trial.set_constraint(key, value)` (feasible when <= 0); Ray's OptunaSearch
    never sets them, so this sets `min_asr_top1 - threshold` on the trial before `super()` tells the value
    (`_ot_trials` is a private attribute of ray 2.60: pinned in pyproject, unit-tested with real Optuna).
    A trial that errored, or whose value is missing or not finite, is told FAIL: Ray's version tells Optuna a NaN,
    which Optuna refuses (Ray only logs the refusal), so the trial would stay RUNNING and the sampler never learn
    from it.
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
        if error or not finite(value):
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return None
        asr = (result or {}).get(self._constraint_metric)
        if finite(asr):
            ot_trial.set_constraint(self._constraint_metric, float(asr) - self._threshold)
        return super().on_trial_complete(trial_id, result, error)


def constrained_searcher(cfg: SearchConfig, study_name: str) -> ConstrainedOptunaSearch:
    """The main stage's searcher over the sweep's define-by-run space: TPE (`optuna`) or `random`, seeded."""
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.search.n_startup_trials,
                                          constant_liar=True)
               if cfg.search.algorithm == "optuna" else optuna.samplers.RandomSampler(seed=cfg.seed))
    return ConstrainedOptunaSearch(space=space.DefineByRun(space.variants(cfg)), metric=BEST, mode="max",
                                   sampler=sampler, study_name=study_name, threshold=cfg.objective.threshold)


def trial_scheduler(cfg: SearchConfig) -> ASHAScheduler | FIFOScheduler:
    """ASHA on `best_feasible_top1` as the sweep's `scheduler` says, or FIFO (`none`)."""
    s = cfg.scheduler
    if s.name == "none":
        return FIFOScheduler()
    max_t = cfg.epochs if s.time_attr == "epoch" else max(1, round(cfg.epochs / cfg.eval_every))
    # An explicit counter, not wall time: Tune's experiment snapshot keeps the trials and the searcher, not the
    # scheduler (ray/tune/execution/experiment_state.py), and the counter comes back with each trial's results.
    # Grace must cover the epochs cleaning needs before ASR drops.
    return ASHAScheduler(time_attr=s.time_attr, metric=BEST, mode="max", max_t=max(max_t, 1),
                         grace_period=min(s.grace_period, max(max_t, 1)), reduction_factor=s.reduction_factor)
