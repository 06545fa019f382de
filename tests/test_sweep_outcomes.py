"""A sweep's answer is never silently wrong, lost or left unfinishable: the best checkpoint is the one reported and
still loads at the end, a failed trial carries its cause and is never feasible, an interrupted trial resumes to its
end. Fast tests on real MLflow (sqlite) and real analysis tables; integration tests run real sweeps on Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray.exceptions import ActorDiedError, RayActorError
from test_search import _kill_group, _mlflow_trials, _space_file, sweep_env  # noqa: F401 (sweep_env: a fixture)

from cleansweep import analysis, delivery, layout, report, search, tracking
from cleansweep.models import create_model, save_checkpoint

TOP1, ASR = "zeroshot_top1", "asr_top1"


# ------------------------------------------------------------------------------------------------ failed trials
def _evals(rows: list[tuple[int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", TOP1, ASR]).assign(epoch=lambda f: f["step"] / 10)


def test_a_failed_trial_is_never_feasible():
    # The killed trial's evaluations were feasible and the most accurate; FAILED, none of them may be an answer.
    trials = [{"trial_id": "killed", "status": "FAILED", "evaluations": _evals([(10, 0.95, 0.01), (20, 0.97, 0.02)])},
              {"trial_id": "ok", "status": "FINISHED", "evaluations": _evals([(10, 0.60, 0.04), (20, 0.70, 0.30)])}]
    board = analysis.leaderboard(trials, threshold=0.05)
    assert list(board["trial_id"]) == ["ok", "killed"]
    assert board.set_index("trial_id")["feasible"].to_dict() == {"ok": True, "killed": False}
    assert board.iloc[0][TOP1] == 0.60 and pd.isna(board.iloc[1][TOP1])
    evals = pd.concat([t["evaluations"].assign(trial_id=t["trial_id"], status=t["status"]) for t in trials])
    best = analysis.best_feasible(evals, 0.05)
    assert (best["trial_id"], best[TOP1]) == ("ok", 0.60)
    summary = analysis.summary_table(evals, None, 0.05)
    assert summary.iloc[0]["feasible_evaluations"] == 1 and summary.iloc[0]["best_top1"] == 0.60
    stopping = analysis.stopping_table(evals, 0.05).set_index("trial_id")
    assert not stopping.loc["killed", "last_feasible"] and pd.isna(stopping.loc["killed", "best_feasible_top1"])
    # Alone, a failed trial still is no answer.
    alone = analysis.leaderboard(trials[:1], threshold=0.05)
    assert not alone.iloc[0]["feasible"] and analysis.best_feasible(evals[evals["trial_id"] == "killed"], 0.05) is None


def test_a_dead_worker_is_named_as_the_cause_on_the_failed_run(tmp_path):
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "cleansweep")
    parent = tracking.start_sweep(client, exp, "s")
    killed = tracking.start_trial(client, exp, sweep="s", trial_id="t1", parent_run_id=parent.run_id, params={})
    raised = tracking.start_trial(client, exp, sweep="s", trial_id="t2", parent_run_id=parent.run_id, params={})
    tracking.record_error(raised, FloatingPointError("evaluation metric zeroshot_top1 is nan; the model diverged"))
    raised.end("FAILED")
    assert tracking.find_trial_run(client, exp, "s", "t1") == killed.run_id
    assert tracking.find_trial_run(client, exp, "s", "t9") is None
    cause = search.failure_cause(ActorDiedError())
    assert cause.startswith("trial worker died: ActorDiedError: The actor died unexpectedly")
    assert "\n" not in cause and search.failure_cause(None) == "trial failed; Tune recorded no error"
    assert search.failure_cause(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert isinstance(ActorDiedError(), RayActorError)
    for run in (killed, raised):
        tracking.fail_trial(client, run.run_id, cause)
    got = {r.run_id: client.get_run(r.run_id) for r in (killed, raised)}
    assert {r.info.status for r in got.values()} == {"FAILED"}
    assert got[killed.run_id].data.tags[tracking.ERROR_TAG] == cause
    # The trial's own error is the better cause: kept.
    assert got[raised.run_id].data.tags[tracking.ERROR_TAG].startswith("FloatingPointError: evaluation metric")
    record = tracking.load_sweep("s", client.tracking_uri)
    assert record.trials.set_index("trial_id")["error"]["t1"] == cause


# ------------------------------------------------------------------------------------------------ best checkpoint
def test_the_best_checkpoint_is_checked_before_it_is_delivered(tmp_path):
    good = tmp_path / "checkpoint_000003"
    save_checkpoint(good / layout.MODEL_FILE, create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    assert delivery.best_checkpoint_problem("t1", str(good)) is None
    gone = tmp_path / "checkpoint_000002"
    assert delivery.best_checkpoint_problem("t1", str(gone)) == \
        f"best trial t1: its best checkpoint {gone / layout.MODEL_FILE} is missing"
    for nothing in (None, float("nan"), ""):
        assert "no checkpoint of its best feasible evaluation was recorded" in \
            delivery.best_checkpoint_problem("t1", nothing)
    broken = tmp_path / "checkpoint_000004"
    broken.mkdir()
    (broken / layout.MODEL_FILE).write_bytes(b"\x00" * 64)
    assert "does not load" in delivery.best_checkpoint_problem("t1", str(broken))
    other = tmp_path / "checkpoint_000005"  # loads as a file, but its card names a model it does not fit
    save_checkpoint(other / layout.MODEL_FILE, create_model("tiny-rn", seed=0).model, {"model": "tiny-vit"})
    assert "does not load" in delivery.best_checkpoint_problem("t1", str(other))


def test_best_checkpoint_tags_name_the_path_and_step(tmp_path):
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "cleansweep")
    parent = tracking.start_sweep(client, exp, "s")
    run = tracking.start_trial(client, exp, sweep="s", trial_id="t1", parent_run_id=parent.run_id, params={})
    tracking.record_best_checkpoint(client, run.run_id, "/a/checkpoint_000001", 10)
    tracking.record_best_checkpoint(client, run.run_id, "/a/checkpoint_000002", 20)
    trials = tracking.load_sweep("s", client.tracking_uri).trials
    assert (trials.iloc[0]["best_checkpoint"], trials.iloc[0]["best_step"]) == ("/a/checkpoint_000002", 20)
