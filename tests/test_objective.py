"""Feasibility and the running best-feasible tracker (the metric the searcher optimises)."""

from __future__ import annotations

import json
import math

import pytest

from cleansweep import objective
from cleansweep.objective import BestFeasible, is_feasible


def test_metric_names():
    assert (objective.TOP1, objective.TOP5, objective.ASR, objective.BEST, objective.FEASIBLE) == (
        "zeroshot_top1", "zeroshot_top5", "asr_top1", "best_feasible_top1", "feasible")


@pytest.mark.parametrize("asr,feasible", [(0.0, True), (0.05, True), (0.0500001, False), (1.0, False),
                                          (math.nan, False)])
def test_is_feasible_is_inclusive_and_nan_is_not(asr, feasible):
    assert is_feasible(asr, 0.05) is feasible


def _ev(step, top1, asr):
    return {"step": step, "zeroshot_top1": top1, "asr_top1": asr}


def test_tracker_follows_a_trajectory():
    tracker = BestFeasible(0.05)
    # The paper's stopping point in miniature: the best feasible evaluation is mid-trajectory.
    trajectory = [_ev(0, 0.88, 0.37), _ev(10, 0.80, 0.04), _ev(20, 0.85, 0.14), _ev(30, 0.83, 0.05),
                  _ev(40, 0.90, math.nan), _ev(50, 0.79, 0.01)]
    got = [tracker.update(m) for m in trajectory]
    assert [g["feasible"] for g in got] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [g["best_feasible_top1"] for g in got] == [0.0, 0.80, 0.80, 0.83, 0.83, 0.83]
    assert [g["best_feasible_step"] for g in got] == [-1, 10, 10, 30, 30, 30]


def test_first_feasible_zero_accuracy_sets_the_step():
    tracker = BestFeasible(0.05)
    assert tracker.update(_ev(3, 0.0, 0.0)) == {"feasible": 1.0, "best_feasible_top1": 0.0, "best_feasible_step": 3}


def test_state_round_trip_through_json():
    tracker = BestFeasible(0.1)
    tracker.update(_ev(5, 0.6, 0.02))
    state = json.loads(json.dumps(tracker.state_dict()))
    resumed = BestFeasible(0.1)
    resumed.load_state_dict(state)
    assert resumed.update(_ev(6, 0.5, 0.0)) == {"feasible": 1.0, "best_feasible_top1": 0.6, "best_feasible_step": 5}
    fresh = BestFeasible(0.1)
    fresh.load_state_dict(BestFeasible(0.1).state_dict())
    assert fresh.update(_ev(1, 0.2, 0.5))["best_feasible_top1"] == 0.0
