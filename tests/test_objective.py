"""Feasibility and the running best-feasible tracker (the metric the searcher optimises)."""

from __future__ import annotations

import json
import math
import random

import pytest

from cleansweep import objective
from cleansweep.objective import BestFeasible, is_feasible


def _independent_best(trajectory: list[tuple[int, float, float]], threshold: float) -> tuple[float, int]:
    """Best top-1 over evaluations with ASR <= threshold (NaN never feasible), earliest step on ties; (0.0, -1)."""
    feasible = [(top1, -step) for step, top1, asr in trajectory if asr == asr and asr <= threshold]
    if not feasible:
        return 0.0, -1
    top1, neg_step = max(feasible)
    return top1, -neg_step


def test_tracker_and_checkpoint_score_agree_with_an_independent_selection():
    # The paper's model selection (best accuracy among evaluations with ASR <= threshold) recomputed from scratch on
    # random trajectories with ties, NaNs and ASRs exactly at the threshold, after every evaluation.
    rng = random.Random(0)
    for _ in range(300):
        threshold = rng.choice([0.0, 0.05, 0.5])
        asrs = [math.nan, 0.0, threshold]
        trajectory = [(10 * i, rng.choice([0.0, 0.5, 0.8, round(rng.random(), 2)]),
                       rng.choice([*asrs, round(rng.random(), 2)])) for i in range(rng.randint(1, 8))]
        tracker = BestFeasible(threshold)
        for n, (step, top1, asr) in enumerate(trajectory, start=1):
            got = tracker.update({objective.STEP: step, objective.TOP1: top1, objective.ASR: asr})
            best, best_step = _independent_best(trajectory[:n], threshold)
            assert (got[objective.BEST], got[objective.BEST_STEP]) == (best, best_step)
            assert got[objective.FEASIBLE] == float(asr == asr and asr <= threshold)
        # Tune keeps the checkpoint with the highest score: it must be the evaluation the tracker names.
        scored = [(objective.checkpoint_score(top1, asr, threshold, step), step) for step, top1, asr in trajectory
                  if asr == asr]
        if best_step >= 0:
            assert max(scored)[1] == best_step


def test_the_proxy_constraint_judges_feasibility_on_the_proxy_asr():
    tracker = BestFeasible(0.05, constraint=objective.PROXY_ASR)
    got = tracker.update({objective.STEP: 4, objective.TOP1: 0.7, objective.ASR: 0.9, objective.PROXY_ASR: 0.01})
    assert got == {"feasible": 1.0, "best_feasible_top1": 0.7, "best_feasible_step": 4}
    assert BestFeasible(0.05).update({objective.STEP: 4, objective.TOP1: 0.7, objective.ASR: 0.9})["feasible"] == 0.0


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
