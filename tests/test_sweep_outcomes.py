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
from test_search import (
    _kill_group,
    _mlflow_trials,
    _space_file,
    sweep_env,  # noqa: F401 (the fixture: token-auth Ray, sqlite MLflow, 1 s snapshots)
)

from cleansweep import tracking
from cleansweep.models import create_model, save_checkpoint
from cleansweep.results import analysis, report
from cleansweep.runtime import layout
from cleansweep.sweep import delivery
from cleansweep.sweep import records as tune_records

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
    cause = tune_records.failure_cause(ActorDiedError())
    assert cause.startswith("trial worker died: ActorDiedError: The actor died unexpectedly")
    assert "\n" not in cause and tune_records.failure_cause(None) == "trial failed; Tune recorded no error"
    assert tune_records.failure_cause(ValueError("bad\nsecond line")) == "ValueError: bad"
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


# ------------------------------------------------------------------------------------------------ integration
SLOW_TRIALS = """
epochs: 3
eval_every: 1
objective: {threshold: THRESH}
base: {optim.warmup_steps: 2}
space:
  optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
search: {algorithm: random, num_samples: SAMPLES, max_concurrent: 2}
scheduler: {name: none}
resources: {cpu: 1}
"""


def _sweep_argv(root: Path, tiny: dict, name: str, threshold: float, samples: int) -> list[str]:
    # The 512-pair training CSV: 32 steps an epoch, so a trial runs long enough to be killed or interrupted mid-way.
    world = {**tiny["world"], "clean_csv": tiny["world"]["train_csv"]}
    space = _space_file(root, tiny["checkpoint"], world,
                        SLOW_TRIALS.replace("THRESH", str(threshold)).replace("SAMPLES", str(samples)))
    return [sys.executable, "-m", "cleansweep", "search", str(space), "--name", name, "--workdir", str(root / "work")]


def _results_lines(trial_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # being written
        return []


def _wait_for(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _one_evaluation_in(stage_dir: Path):
    """(trial id, its worker's pid) of a trial that has reported its first of three evaluations, else None."""
    for d in sorted(stage_dir.glob("*/")) if stage_dir.is_dir() else []:
        lines = _results_lines(d)
        if len(lines) == 1 and "pid" in lines[0]:
            return d.name, int(lines[0]["pid"])
    return None


def _best_step(steps: list[int], top1: dict[int, float]) -> int:
    """The most accurate evaluation, the earliest on ties (threshold 1: every evaluation is feasible)."""
    return min(steps, key=lambda s: (-top1[s], s))


@pytest.mark.integration
def test_a_killed_worker_fails_its_trial_and_best_checkpoints_are_the_reported_ones(
        sweep_env, tiny_checkpoint):  # noqa: F811 (the fixture)
    argv = _sweep_argv(sweep_env, tiny_checkpoint, "kw", threshold=1.0, samples=4)
    env = {**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1"}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        victim, pid = _wait_for(lambda: _one_evaluation_in(sweep_env / "work" / "sweeps" / "kw" / "main"),
                                "a trial's first evaluation")
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    parent, children = _mlflow_trials(sweep_env / "work", "kw")
    by_trial = {c["run"].data.tags["cleansweep.trial_id"]: c for c in children}
    killed = by_trial.pop(victim)
    assert killed["run"].info.status == "FAILED"
    assert killed["run"].data.tags[tracking.ERROR_TAG].startswith("trial worker died: "), killed["run"].data.tags
    board = report.results("kw", tracking_uri=tracking.resolve_tracking_uri(None, sweep_env / "work", env={}))
    row = board.set_index("trial_id").loc[victim]
    assert row["status"] == "FAILED" and not row["feasible"] and board.iloc[-1]["trial_id"] == victim
    assert {c["run"].info.status for c in by_trial.values()} == {"FINISHED"} and len(by_trial) == 3
    # Every trial's best-checkpoint tag names the checkpoint of its most accurate evaluation (threshold 1: all are
    # feasible), found by the step the checkpoint itself saved, and that checkpoint still exists.
    last_is_best = 0
    for c in by_trial.values():
        tags, best = c["run"].data.tags, _best_step(c["steps"], c["hist"][TOP1])
        ckpt = Path(tags[tracking.BEST_CKPT_TAG])
        assert int(tags[tracking.BEST_STEP_TAG]) == best and (ckpt / layout.MODEL_FILE).is_file(), (tags, c["hist"])
        assert json.loads((ckpt / layout.LOOP_STATE).read_text())["step"] == best
        last_is_best += best == max(c["steps"])
    print(f"trials whose best evaluation was their last: {last_is_best} of {len(by_trial)}")
    best = board.iloc[0]
    name, version = parent.data.tags["cleansweep.best_model"].split("/")
    assert name == "cleansweep-kw" and best["feasible"] and best["trial_id"] != victim
    assert best["checkpoint"] == by_trial[best["trial_id"]]["run"].data.tags[tracking.BEST_CKPT_TAG]


@pytest.mark.integration
def test_an_interrupted_trial_resumes_to_its_end(sweep_env, tiny_checkpoint):  # noqa: F811
    argv = _sweep_argv(sweep_env, tiny_checkpoint, "ci", threshold=1.0, samples=2)
    env = {**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1"}
    stage = sweep_env / "work" / "sweeps" / "ci" / "main"
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        interrupted, _ = _wait_for(lambda: _one_evaluation_in(stage), "a trial's first evaluation")
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Ray's own processes block SIGINT, the driver gets it
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 130, err[-3000:]
    assert "re-run with --resume" in err
    _, children = _mlflow_trials(sweep_env / "work", "ci")
    run = next(c["run"] for c in children if c["run"].data.tags["cleansweep.trial_id"] == interrupted)
    assert run.info.status == "KILLED" and tracking.STOPPED_TAG not in run.data.tags
    assert tune_records.resumable_trials(stage)  # the snapshot still holds it unfinished
    second = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    parent, children = _mlflow_trials(sweep_env / "work", "ci")
    assert parent.info.status == "FINISHED" and len(children) == 2
    for c in children:  # every trial ran all three evaluations, none twice, and none "stopped early"
        assert c["run"].info.status == "FINISHED" and c["run"].data.tags[tracking.STOPPED_TAG] == "false"
        assert len(c["steps"]) == len(set(c["steps"])) == 3, c["steps"]
    assert tune_records.resumable_trials(stage) == []


# ------------------------------------------------------------------------------------------------ proxy ASR
def test_a_proxy_sweep_never_shows_the_proxy_as_asr(tmp_path):
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "cleansweep")
    known = {"asr_threshold": 0.1, "constraint": "proxy_asr_top1"}
    for name, true_asr in (("known", True), ("unknown", False)):
        parent = tracking.start_sweep(client, exp, name, params=known)
        run = tracking.start_trial(client, exp, sweep=name, trial_id="t1", parent_run_id=parent.run_id, params={})
        for step, top1, proxy, asr in ((10, 0.80, 0.30, 0.60), (20, 0.75, 0.05, 0.20), (30, 0.70, 0.02, 0.01)):
            run.log_metrics({TOP1: top1, "proxy_asr_top1": proxy, **({ASR: asr} if true_asr else {}),
                             "epoch": step / 10}, step=step)
        board = report.sweep_leaderboard(tracking.load_sweep(name, client.tracking_uri))
        row = board.iloc[0]
        # Ranked on the proxy (<= 0.1 from step 20 on; 0.75 is the best feasible top-1), named as the proxy.
        assert (row["feasible"], row[TOP1], row["step"], row["proxy_asr_top1"]) == (True, 0.75, 20, 0.05)
        assert row["min_proxy_asr_top1"] == 0.02 and row["last_proxy_asr_top1"] == 0.02
        assert "min_asr_top1" not in board and "last_asr_top1" not in board and "true_asr_top1" not in board
        if true_asr:  # the known trigger's ASR of the same evaluation, beside it
            assert row[ASR] == 0.20
        else:
            assert pd.isna(row[ASR])
        text = report.format_leaderboard(board)
        assert "proxy_asr 0.0500" in text and (("asr 0.2000" in text) == true_asr)
        assert "proxy_asr_top1" in text.splitlines()[2]  # the table's header
        # The report's tables and page: every column of the proxy named as the proxy, the true ASR as asr_top1.
        out = report.build_report(tracking.load_sweep(name, client.tracking_uri), tmp_path / name).out_dir
        summary = pd.read_csv(out / "summary.csv").iloc[0]
        assert summary["best_proxy_asr"] == 0.05 and "best_asr" not in summary and "start_asr" not in summary
        evals = pd.read_csv(out / "evaluations.csv")
        assert list(evals["proxy_asr_top1"]) == [0.30, 0.05, 0.02]
        assert list(evals[ASR]) == [0.60, 0.20, 0.01] if true_asr else evals.get(ASR, pd.Series()).isna().all()
        assert all("proxy" in c for c in pd.read_csv(out / "stopping.csv").columns if "asr" in c)
        assert "Feasible: proxy ASR (the ASR of the trigger a scan inverted) <= 10%" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ Tune's records
def _toy_trial(config: dict) -> None:
    """Three reports with a checkpoint each; `die` kills its own worker after the second, `interrupt` sends the
    driver SIGINT (Ctrl-C) after the first and then waits to be stopped."""
    import tempfile

    from ray import tune

    for step in range(3):
        folder = tempfile.mkdtemp()
        Path(folder, "x").write_text(str(step))
        tune.report({STEP: step}, checkpoint=tune.Checkpoint.from_directory(folder))
        if config["mode"] == "die" and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if config["mode"] == "interrupt" and step == 0:
            os.kill(config["driver"], signal.SIGINT)
            time.sleep(60)


STEP = "step"


@pytest.mark.integration
def test_what_resume_would_run_is_read_from_tune_and_a_dead_worker_is_named(tmp_path, monkeypatch):
    import ray
    from ray import tune

    monkeypatch.setenv("HOME", str(tmp_path))
    errors: dict[str, str] = {}

    class Causes(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            errors[trial.config["mode"]] = tune_records.failure_cause(tune_records.recorded_error(trial))

    def fit(name: str, modes: list[str]):
        run = tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0, callbacks=[Causes()],
                             failure_config=tune.FailureConfig(max_failures=0))
        space = {"mode": tune.grid_search(modes), "driver": os.getpid()}
        grid = tune.Tuner(_toy_trial, param_space=space, run_config=run,
                          tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True)).fit()
        ids = {r.config["mode"]: r.metrics.get("trial_id") for r in grid}
        return grid, ids

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        grid, ids = fit("died", ["ok", "die"])
        # Tune's snapshot may still hold the dead trial as running (with reused actors it did); the grid knows it
        # errored: nothing to resume.
        assert tune_records.resumable_trials(tmp_path / "died", grid) == []
        assert errors["die"].startswith("trial worker died: ActorDiedError: The actor died unexpectedly"), errors
        grid, ids = fit("ctrl-c", ["interrupt"])
        # The grid calls the interrupted trial TERMINATED, like a finished one; the snapshot has it to resume.
        assert grid.num_terminated == 1 and grid[0].error is None
        assert tune_records.resumable_trials(tmp_path / "ctrl-c", grid) == [ids["interrupt"]]
    finally:
        ray.shutdown()
