"""Cleaning sweeps: the constrained Optuna searcher with real Optuna, the leaderboard over all evaluations, driver
guards (fast); a demo sweep end to end, resume after kill -9, failing trials (integration: real Ray, Optuna, MLflow).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import TINY_PATCH

from cleansweep import cli, tracking
from cleansweep.errors import UserError
from cleansweep.objective import BEST, MIN_ASR
from cleansweep.results import analysis, report
from cleansweep.runtime import scratch
from cleansweep.sweep import driver
from cleansweep.sweep import space as spaces
from cleansweep.sweep import start as start_model
from cleansweep.sweep.config import Domain
from cleansweep.sweep.console import TrialTable
from cleansweep.sweep.lifecycle import RESUME_STATE, drop_resume_state
from cleansweep.sweep.optuna import ConstrainedOptunaSearch
from cleansweep.sweep.trial import TrialContext, changes_start_weights, trial_params

TOP1, ASR = "zeroshot_top1", "asr_top1"


# ------------------------------------------------------------------------------------------------ searcher
def _searcher(seed: int = 0) -> ConstrainedOptunaSearch:
    variants = {"cleanclip": {"optim.lr": Domain(loguniform=(1e-4, 1e-2)), "method.name": "contrastive"},
                "sp": {"method.shrink": Domain(uniform=(0.1, 1.0)), "method.name": "shrink_perturb"}}
    return ConstrainedOptunaSearch(space=spaces.DefineByRun(variants), metric=BEST, mode="max",
                                          sampler=optuna.samplers.TPESampler(seed=seed), study_name="t",
                                          threshold=0.05)


def test_constrained_searcher_tells_optuna_the_constraint_and_failures():
    s = _searcher()
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(5)}
    for cfg in configs.values():
        label = cfg["variant"]
        assert cfg["method.name"] == ("contrastive" if label == "cleanclip" else "shrink_perturb")
        assert ("optim.lr" in cfg) == (label == "cleanclip") and ("method.shrink" in cfg) == (label == "sp")
    s.on_trial_complete("t0", {BEST: 0.80, MIN_ASR: 0.01})  # feasible somewhere
    s.on_trial_complete("t1", {BEST: 0.0, MIN_ASR: 0.50})  # never feasible
    s.on_trial_complete("t2", None, error=True)  # raised
    s.on_trial_complete("t3", {BEST: float("nan"), MIN_ASR: 0.5})  # NaN: FAIL, not RUNNING forever
    trials = {t.number: t for t in s._ot_study.get_trials()}
    st = optuna.trial.TrialState
    assert [trials[i].state for i in range(4)] == [st.COMPLETE, st.COMPLETE, st.FAIL, st.FAIL]
    assert trials[0].constraints == {MIN_ASR: pytest.approx(0.01 - 0.05)} and trials[0].values == [0.80]
    assert trials[1].constraints == {MIN_ASR: pytest.approx(0.50 - 0.05)}
    assert trials[4].state == st.RUNNING  # t4 still running
    # Optuna's own feasibility view agrees: only t0 is feasible, so it is the best trial.
    assert s._ot_study.best_trial.number == 0


def test_constrained_searcher_survives_save_and_restore(tmp_path):
    s = _searcher()
    for i in range(3):
        s.suggest(f"t{i}")
    s.on_trial_complete("t0", {BEST: 0.5, MIN_ASR: 0.02})
    s.save(str(tmp_path / "searcher.pkl"))
    restored = ConstrainedOptunaSearch(constraint_metric=MIN_ASR, threshold=0.05)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t1", {BEST: 0.0, MIN_ASR: 0.3})
    restored.on_trial_complete("t0", {BEST: 0.5, MIN_ASR: 0.02})  # repeated: ignored
    trials = restored._ot_study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert trials[1].constraints == {MIN_ASR: pytest.approx(0.25)}


def _late_feasible_picks(threshold: float) -> int:
    # 1-D problem: accuracy rises with x everywhere, but only x < 0.3 has ASR below 5%.
    s = ConstrainedOptunaSearch(
        space=spaces.DefineByRun({"a": {"x": Domain(uniform=(0.0, 1.0))}}), metric=BEST, mode="max",
        sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=8), study_name="tpe", threshold=threshold)
    picks = 0
    for i in range(40):
        x = s.suggest(f"t{i}")["x"]
        s.on_trial_complete(f"t{i}", {BEST: x, MIN_ASR: 0.01 if x < 0.3 else 0.5})
        picks += i >= 20 and x < 0.3
    return picks


def test_tpe_uses_the_constraint():
    # With the constraint TPE keeps sampling the feasible region; told nothing (threshold 10) it chases x -> 1.
    assert _late_feasible_picks(threshold=0.05) >= 7
    assert _late_feasible_picks(threshold=10.0) <= 3


@pytest.mark.parametrize(("entry", "stage", "count"), [(6, "main", 85), (11, "main", 72), (13, "preselect", 255),
                                                     (13, "main", 9)])
def test_tune_generates_the_paper_grids(entry, stage, count):
    # Tune's own variant generator expands the param_space we hand it to exactly the paper's configurations.
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg = spaces.load(Path(spaces.__file__).resolve().parents[2] / "search_spaces" / f"paper_D{entry:02d}.yaml")
    ctx = TrialContext(sweep="x", stage=stage, base={}, tracking_uri="sqlite:////x.db", experiment_id="0",
                              parent_run_id="p", threshold=0.05, scratch="x")
    points = spaces.preselect_points(cfg) if stage == "preselect" else None
    param_space, tune_config, expected = driver._tune_setup(cfg, ctx, points)
    gen = BasicVariantGenerator()
    gen.add_configurations([Experiment("x", lambda config: None, config=param_space,
                                       num_samples=tune_config.num_samples)])
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(trial_params(trial.config))
    assert len(configs) == expected == count
    assert configs == (points or spaces.grid_points(cfg))  # same points, same order, duplicates kept


# ------------------------------------------------------------------------------------------------ leaderboard
def _evals(rows):
    return pd.DataFrame(rows, columns=["step", "epoch", TOP1, ASR])


def test_leaderboard_uses_every_evaluation_not_the_last():
    trials = [
        {"trial_id": "mid", "params": {"optim.lr": 1e-3}, "status": "FINISHED", "checkpoints": {20: "/c/mid20"},
         "evaluations": _evals([(0, 0, 0.8, 0.9), (10, 1, 0.7, 0.10), (20, 2, 0.75, 0.04), (30, 3, 0.79, 0.20)])},
        {"trial_id": "end", "params": {"optim.lr": 3e-3}, "status": "FINISHED",
         "evaluations": _evals([(0, 0, 0.8, 0.9), (10, 1, 0.6, 0.05), (20, 2, 0.72, 0.03)])},
        {"trial_id": "tie", "params": {}, "status": "KILLED",
         "evaluations": _evals([(0, 0, 0.8, 0.9), (10, 1, 0.72, 0.01), (20, 2, 0.72, 0.02)])},
        {"trial_id": "never", "params": {}, "status": "FINISHED",
         "evaluations": _evals([(0, 0, 0.8, 0.9), (10, 1, 0.8, 0.30)])},
        {"trial_id": "worse", "params": {}, "status": "FAILED", "evaluations": _evals([(0, 0, 0.8, 0.9)])},
        {"trial_id": "empty", "params": {}, "status": "FAILED", "evaluations": _evals([])},
    ]
    board = analysis.leaderboard(trials, threshold=0.05)
    assert list(board["trial_id"]) == ["mid", "end", "tie", "never", "worse", "empty"]
    best = board.iloc[0]
    assert (best[TOP1], best[ASR], best["step"], best["epoch"], best["checkpoint"]) == (0.75, 0.04, 20, 2.0,
                                                                                       "/c/mid20")
    assert best["last_zeroshot_top1"] == 0.79 and best["last_asr_top1"] == 0.20  # the last one is infeasible
    tie = board.set_index("trial_id").loc["tie"]
    assert tie["step"] == 10  # equal accuracy: the earlier evaluation
    assert not board.set_index("trial_id").loc["never", "feasible"]
    assert math.isnan(board.set_index("trial_id").loc["empty", TOP1])
    out = json.loads(report.format_leaderboard(board, "json", top_k=3))
    assert out["best"]["trial_id"] == "mid" and out["best"]["config"] == {"optim.lr": 1e-3} and len(out["top"]) == 3
    assert report.format_leaderboard(board, "csv", top_k=2).count("\n") == 3
    table = report.format_leaderboard(board, "table")
    assert table.splitlines()[0].startswith("best feasible: trial mid") and "/c/mid20" in table


def test_finished_trials_drop_resume_state_but_keep_weights(tmp_path):
    from cleansweep import fit as session

    assert RESUME_STATE == session.STATE_FILE
    for i in range(3):
        d = tmp_path / f"checkpoint_{i:06d}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"w" * 10)
        (d / RESUME_STATE).write_bytes(b"s" * 20)
    # Completed trial, snapshot maybe not yet written: the latest checkpoint keeps its resume state.
    assert drop_resume_state(str(tmp_path), keep_latest=True) == 40
    assert [p.parent.name for p in tmp_path.rglob(RESUME_STATE)] == ["checkpoint_000002"]
    assert drop_resume_state(str(tmp_path), keep_latest=False) == 20
    assert not list(tmp_path.rglob(RESUME_STATE)) and len(list(tmp_path.rglob("model.safetensors"))) == 3
    assert drop_resume_state(None, keep_latest=False) == 0
    assert drop_resume_state("s3://bucket/trial", keep_latest=False) == 0


def test_start_metrics_come_from_a_card_only_when_measured_like_the_trials(tmp_path):
    attack = {"name": "badnet", "target": "banana", "patch_size": 8, "location": "fixed", "patch": "fixed", "seed": 0}
    base = {"data": {"train_csv": str(tmp_path / "clean.csv"), "eval_dir": str(tmp_path / "eval")},
            "attack": {"patch_size": 8, "location": "fixed", "patch": "fixed"}}
    card = {"zeroshot_top1": 0.9, "asr_top1": 0.97,
            "config": {"train": {"data": {"eval_dir": str(tmp_path / "eval"), "eval_subset": None}, "attack": attack}}}
    assert start_model.card_measures_sweep(card, base)
    other_folder = {"config": {"train": {**card["config"]["train"], "data": {"eval_dir": str(tmp_path / "val")}}}}
    other_trigger = {"config": {"train": {**card["config"]["train"], "attack": {**attack, "patch_size": 16}}}}
    subset = {"config": {"train": {**card["config"]["train"], "data": {"eval_dir": str(tmp_path / "eval"),
                                                                       "eval_subset": 100}}}}
    for bad in (other_folder, other_trigger, subset, {"zeroshot_top1": 0.9, "asr_top1": 0.97}):
        assert not start_model.card_measures_sweep(bad, base)


def test_only_shrink_and_perturb_trials_re_evaluate_the_start():
    def spec(**method):
        return spaces.trial_spec({"data": {"train_csv": "c.csv", "eval_dir": "e"}, "method": method}, {})

    assert not changes_start_weights(spec(name="contrastive", ssl_weight=1.0))
    assert not changes_start_weights(spec(name="shrink_perturb", shrink=1.0, perturb=0.0))
    assert changes_start_weights(spec(name="shrink_perturb", shrink=0.9, perturb=0.0))
    assert changes_start_weights(spec(name="shrink_perturb", shrink=1.0, perturb=1e-3))


def test_trial_params_and_resource_preflight():
    assert trial_params({"point": {"optim.lr": 1e-3, "variant": "a"}}) == {"optim.lr": 1e-3, "variant": "a"}
    assert trial_params({"optim.lr": 2e-3}) == {"optim.lr": 2e-3}
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    driver.check_trial_resources(1, 0, nodes)
    driver.check_trial_resources(2, 0, nodes)
    with pytest.raises(UserError, match="resources.gpu"):
        driver.check_trial_resources(1, 0.5, nodes)
    with pytest.raises(UserError, match="2 CPU/0 GPU"):
        driver.check_trial_resources(3, 0, nodes)


def _space_file(tmp_path: Path, checkpoint: Path, world: dict, extra: str = "") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: tiny-rn}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16,
                eval_batch_size: 64}}
        attack: {{name: badnet, patch_size: {PATCH}, location: fixed, patch: fixed}}
        """) + textwrap.dedent(extra))
    return path


def test_reusing_a_name_needs_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "eval").mkdir()
    (tmp_path / "clean.csv").write_text("image,caption\n")
    (tmp_path / "m.safetensors").write_bytes(b"")
    space = _space_file(tmp_path, tmp_path / "m.safetensors",
                        {"clean_csv": tmp_path / "clean.csv", "eval_dir": tmp_path / "eval"})
    store = tmp_path / "store"
    (store / "taken").mkdir(parents=True)
    (store / "taken" / "sweep.json").write_text("{}")
    base = ["search", str(space), "--storage-path", str(store), "--workdir", str(tmp_path / "w")]
    assert cli.main([*base, "--name", "taken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep 'taken' already exists") and "--resume" in err and "\n" not in err
    assert not (tmp_path / "w" / "mlflow.db").exists()  # refused before anything was created
    assert cli.main([*base, "--name", "fresh", "--resume"]) == 2
    assert "no sweep named 'fresh'" in capsys.readouterr().err
    assert cli.main([*base, "--name", "bad/name"]) == 2
    assert "--name" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    ("attack: {name: nosuch}", "unknown attack 'nosuch'"),
    ("attack: {target: durian}", "'durian'"),
    ("model: {name: tiny-rnn}", "unknown model 'tiny-rnn'"),
    ("data: {batch_size: 4096}", "fewer than one batch"),
])
def test_a_bad_space_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch, tiny_world, extra, message):
    # Values the schema accepts but the data, model or trigger cannot serve used to surface only after Ray started
    # (in the driver's starting evaluation or in every trial). Now: one line, nothing created, no cluster.
    from cleansweep.models import create_model, save_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    key, _, value = extra.partition(": ")
    space = tmp_path / "space.yaml"
    base = {"model": {"checkpoint": str(ckpt), "name": "tiny-rn"},
            "data": {"train_csv": tiny_world["clean_csv"], "eval_dir": tiny_world["eval_dir"], "batch_size": 16},
            "attack": {"name": "badnet", "patch_size": 4}, "epochs": 1,
            "space": {"optim.lr": {"loguniform": [1e-4, 1e-3]}}}
    import yaml

    base[key] = {**base[key], **yaml.safe_load(value)}
    space.write_text(yaml.safe_dump(base))
    work = tmp_path / "w"
    assert cli.main(["search", str(space), "--name", "bad", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err
    assert not (work / "sweeps" / "bad").exists() and not (work / "mlflow.db").exists()


def test_trial_table_speaks_mlflow_words_and_shows_the_sampled_values():
    from types import SimpleNamespace

    def trial(tid, status, epoch, lr, best):
        return SimpleNamespace(trial_id=tid, status=status, config={"optim.lr": lr, "variant": "contrastive"},
                               last_result={"epoch": epoch, TOP1: 0.9, ASR: 0.01, BEST: best})

    table = TrialTable(["optim.lr"], epochs=6).render(
        [trial("a", "TERMINATED", 6.0, 1e-3, 0.91), trial("b", "TERMINATED", 2.0, 2e-3, 0.0),
         trial("c", "ERROR", 1.0, 3e-3, 0.0), trial("d", "RUNNING", 3.0, 4e-3, 0.5)])
    lines = table.splitlines()
    assert lines[0].startswith("trials: ") and "2 FINISHED" not in lines[0]
    header = lines[1].split()
    assert {"optim.lr", BEST, TOP1, ASR, "status"} <= set(header)
    assert "TERMINATED" not in table and "ERROR" not in table
    rows = {line.split()[0]: line for line in lines[2:]}
    assert "FINISHED" in rows["a"] and "stopped early" not in rows["a"] and "0.91" in rows["a"]
    assert "stopped early" in rows["b"] and "FAILED" in rows["c"] and "RUNNING" in rows["d"]
    assert "0.001" in rows["a"] and "0.004" in rows["d"]


def test_trial_table_pickles_after_ray_train_patched_print(monkeypatch):
    import builtins
    import pickle

    lines = []
    table = TrialTable(["optim.lr"], epochs=6, echo=print)
    # What a Ray Train worker in this process does: builtins.print becomes another function.
    monkeypatch.setattr(builtins, "print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    restored = pickle.loads(pickle.dumps(table))
    restored.report([], done=True)
    assert restored.params == ["optim.lr"] and restored.epochs == 6 and lines == ["trials: "]


# ------------------------------------------------------------------------------------------------ integration
@pytest.fixture
def sweep_env(tmp_path, monkeypatch):
    """Token-auth Ray with its token in a temp HOME, sqlite MLflow in the workdir, a 1 s experiment snapshot.

    RAY_AUTH_MODE stays unset: a local ray.init then turns token auth on and writes the token to ~/.ray (the temp
    HOME). Setting it after `import ray` (pytest imports this module first) leaves Ray's cached config disabled
    and the GCS dies without a token.
    """
    from ray._raylet import AuthenticationTokenLoader

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Ray caches the token of the first cluster this process saw; a later test's cluster has a new HOME and token.
    AuthenticationTokenLoader.instance().reset_cache()
    yield tmp_path
    AuthenticationTokenLoader.instance().reset_cache()


PATCH = TINY_PATCH


def _mlflow_trials(workdir: Path, name: str, experiment: str = "cleansweep"):
    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    exp = client.get_experiment_by_name(experiment)
    parent = client.search_runs([exp.experiment_id], filter_string=f"tags.`cleansweep.key` = 'sweep/{name}'")
    assert len(parent) == 1
    children = client.search_runs([exp.experiment_id], max_results=10_000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    out = []
    for run in children:
        hist = {k: {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, k)} for k in (TOP1, ASR)}
        steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, TOP1)]
        out.append({"run": run, "steps": steps, "hist": hist})
    return parent[0], out


def _best_from_mlflow(children, threshold):
    """Best feasible accuracy over every evaluation of every child run, and every (trial, step, asr) reaching it."""
    points = [(c["hist"][TOP1][step], c["hist"][ASR][step], step, c["run"].data.tags["cleansweep.trial_id"])
              for c in children for step in c["steps"] if c["hist"][ASR][step] <= threshold]
    if not points:
        return None, set()
    best = max(p[0] for p in points)
    return best, {(trial, step, asr) for top1, asr, step, trial in points if top1 == best}


DEMO_EXTRA = """
epochs: 3
eval_every: 1
objective: {threshold: THRESH}
base: {optim.warmup_steps: 2, method.ssl_weight: 0.0}
space:
  optim.lr: {loguniform: [1.0e-4, 3.0e-2]}
  optim.weight_decay: {choice: [0.0, 0.1, 1.0]}
search: {algorithm: optuna, num_samples: 8, max_concurrent: 2, n_startup_trials: 4}
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
resources: {cpu: 1}
"""


@pytest.mark.integration
def test_sweep_end_to_end_best_matches_mlflow(sweep_env, tiny_checkpoint, capsys):
    threshold = _threshold_for(tiny_checkpoint)
    space = _space_file(sweep_env, tiny_checkpoint["checkpoint"], tiny_checkpoint["world"],
                        DEMO_EXTRA.replace("THRESH", str(threshold)))
    workdir = sweep_env / "work"
    assert cli.main(["search", str(space), "--name", "e2e", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    parent, children = _mlflow_trials(workdir, "e2e")
    assert len(children) == 8 and parent.info.status == "FINISHED"
    # Completed and ASHA-stopped trials are FINISHED (KILLED is for interrupts only); the tag says which.
    assert {c["run"].info.status for c in children} == {"FINISHED"}
    stopped = {c["run"].data.tags["cleansweep.stopped_early"] for c in children}
    assert stopped <= {"true", "false"} and "false" in stopped
    for c in children:  # stopped early exactly when the trial has fewer evaluations than the sweep's 3 epochs
        assert (c["run"].data.tags["cleansweep.stopped_early"] == "true") == (len(c["steps"]) < 3)
    for c in children:
        assert len(c["steps"]) == len(set(c["steps"])) >= 1
        assert min(c["steps"]) > 0  # no shrink-and-perturb: the start is the parent's evaluation, not re-done per trial
        assert "optim.lr" in c["run"].data.params and "effective.weight_decay" in c["run"].data.params
    assert {"start_zeroshot_top1", "start_asr_top1"} <= set(parent.data.metrics)
    best_top1, reaching = _best_from_mlflow(children, threshold)
    assert reaching, "no feasible evaluation: recalibrate the threshold"
    board = report.results("e2e", tracking_uri=tracking.resolve_tracking_uri(None, workdir, env={}))  # from MLflow
    best = board.iloc[0]
    assert best["feasible"] and best[ASR] <= threshold and best[TOP1] == best_top1
    assert (best["trial_id"], int(best["step"]), best[ASR]) in reaching
    assert f"best feasible: trial {best['trial_id']}" in printed
    # Tune's live table in our words: its last print counts every trial FINISHED, with the sampled values.
    head, header = printed[printed.rindex("trials: "):].splitlines()[:2]
    counts = {status: int(n) for n, status in re.findall(r"(\d+) ([A-Z][^,]*)", head.removeprefix("trials: "))}
    assert sum(counts.values()) == 8 and set(counts) <= {"FINISHED", "FINISHED (stopped early)"}, head
    assert {"optim.lr", "optim.weight_decay", BEST, "status"} <= set(header.split())
    sweep_dir = workdir / "sweeps" / "e2e"
    end_board = pd.read_csv(sweep_dir / "leaderboard.csv")  # written at the end from Tune's records
    end = end_board.iloc[0]
    assert end[TOP1] == best_top1 and (end["trial_id"], int(end["step"]), end[ASR]) in reaching
    assert Path(best["checkpoint"], "model.safetensors").is_file()
    assert Path(end["checkpoint"], "model.safetensors").is_file()
    assert (sweep_dir / "pareto.png").stat().st_size > 0
    assert not list((sweep_dir / "main").rglob(RESUME_STATE))  # finished sweep: resume-only state dropped
    trial_dirs = [d for d in (sweep_dir / "main").iterdir() if d.is_dir() and (d / "params.json").is_file()]
    assert trial_dirs and all((d / "result.json").is_file() and (d / "progress.csv").is_file() for d in trial_dirs)
    assert not list((sweep_dir / "main").rglob("events.out.tfevents*"))  # MLflow holds the curves, not TensorBoard
    arts = {a.path for a in tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
            .list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "leaderboard.csv", "pareto.png", "best_model"} <= arts
    # The best trial's model is in MLflow, not only a local path: weights + card on the parent, a registry version.
    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    name, version = client.get_run(parent.info.run_id).data.tags["cleansweep.best_model"].split("/")
    registered = client.get_model_version(name, version)
    assert name == "cleansweep-e2e" and registered.tags["trial_id"] == best["trial_id"]
    assert float(registered.tags["zeroshot_top1"]) == best_top1 and registered.run_id == parent.info.run_id
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "best_model")}
    assert files == {"best_model/model.safetensors", "best_model/model.json"}
    local = client.download_artifacts(parent.info.run_id, "best_model/model.safetensors", str(sweep_env / "dl"))
    from cleansweep.models import file_sha256

    assert file_sha256(local) == file_sha256(Path(best["checkpoint"], "model.safetensors"))
    assert cli.main(["results", "e2e", "--workdir", str(workdir), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["trial_id"] == best["trial_id"]


def _threshold_for(tiny: dict) -> float:
    # Below the starting model's ASR, so the start itself is infeasible and cleaning has to lower the ASR.
    start = float(tiny["metrics"][ASR])
    assert start >= 0.3, f"the tiny model did not take the backdoor (ASR {start}); recalibrate its pre-training"
    return round(0.6 * start, 3)


@pytest.mark.integration
def test_failing_trials_are_failed_and_the_sweep_goes_on(sweep_env, tiny_checkpoint):
    extra = """
    epochs: 1
    base: {optim.warmup_steps: 2, method.name: shrink_perturb}
    space:
      method.perturb: {choice: [0.0, 1.0e+30]}
    search: {algorithm: optuna, num_samples: 4, max_concurrent: 2, n_startup_trials: 4}
    scheduler: {name: none}
    """
    space = _space_file(sweep_env, tiny_checkpoint["checkpoint"], tiny_checkpoint["world"], extra)
    workdir = sweep_env / "work"
    out_code = cli.main(["search", str(space), "--name", "nan", "--workdir", str(workdir)])
    assert out_code == 0
    _, children = _mlflow_trials(workdir, "nan")
    by_perturb = {}
    for c in children:
        by_perturb.setdefault(float(c["run"].data.params["method.perturb"]), set()).add(c["run"].info.status)
    assert by_perturb.get(1e30) == {"FAILED"}, by_perturb
    assert by_perturb.get(0.0, {"FINISHED"}) == {"FINISHED"}
    state = sorted((workdir / "sweeps" / "nan" / "main").glob("searcher-state-*.pkl"))[-1]
    with open(state, "rb") as f:  # our own file, written by this test's sweep
        searcher = pickle.load(f)
    study = _find_study(searcher)
    for t in study.get_trials():
        expected = "FAIL" if t.params.get("method.perturb") == 1e30 else "COMPLETE"
        assert t.state.name == expected, (t.params, t.state)


def _find_study(obj):
    seen = [obj]
    while seen:
        o = seen.pop()
        if isinstance(o, optuna.Study):
            return o
        if isinstance(o, ConstrainedOptunaSearch):
            return o._ot_study
        if isinstance(o, dict):  # Tune saves the searcher as a dict of its attributes
            seen.extend(o.values())
            continue
        seen.extend(v for v in getattr(o, "__dict__", {}).values() if hasattr(v, "__dict__"))
    raise AssertionError("no Optuna study in the searcher state")


@pytest.mark.integration
def test_resume_after_kill_9(sweep_env, tiny_checkpoint):
    extra = """
    epochs: 4
    eval_every: 1
    base: {optim.warmup_steps: 2}
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search: {algorithm: optuna, num_samples: 6, max_concurrent: 2}
    scheduler: {name: none}
    """
    space = _space_file(sweep_env, tiny_checkpoint["checkpoint"], tiny_checkpoint["world"], extra)
    workdir = sweep_env / "work"
    argv = [sys.executable, "-m", "cleansweep", "search", str(space), "--name", "rk", "--workdir", str(workdir)]
    env = {**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1"}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(sweep_env / "first.log", "w"))
    finished_before: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(2)
            done = _finished_trials(workdir, "rk")
            if len(done) >= 2:
                finished_before = done
                break
        assert finished_before, "no trial finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)
    second = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    parent, children = _mlflow_trials(workdir, "rk")
    # Trials created in the last ~1 s before the kill are not in Tune's snapshot: Tune re-suggests replacements and
    # their runs are tagged lost (and not RUNNING). Every other run is one of the 6 trials Tune knows, once each.
    lost = [c for c in children if tracking.LOST_TAG in c["run"].data.tags]
    assert all(c["run"].info.status != "RUNNING" for c in lost)
    children = [c for c in children if tracking.LOST_TAG not in c["run"].data.tags]
    ids = [c["run"].data.tags["cleansweep.trial_id"] for c in children]
    tune_ids = {p.name for p in (workdir / "sweeps" / "rk" / "main").iterdir() if (p / "params.json").is_file()}
    assert len(ids) == len(set(ids)) == 6 and set(ids) <= tune_ids  # one run per trial, none repeated, none lost
    assert not {c["run"].data.tags["cleansweep.trial_id"] for c in lost} & set(ids)
    record = tracking.load_sweep("rk", tracking.resolve_tracking_uri(None, workdir, env={}))
    assert sorted(record.trials["trial_id"]) == sorted(ids)  # readers (report, notebook) skip lost runs
    assert all(c["run"].info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    # In-flight checkpoints of the killed trials do not pile up in the temp folder (~100 MB each).
    assert not (Path(tempfile.gettempdir()) / scratch.name(workdir / "sweeps" / "rk")).exists()
    for c in children:
        # evaluations after epochs 1..4 (the start is the parent's), none logged twice
        assert len(c["steps"]) == len(set(c["steps"])) == 4 and min(c["steps"]) > 0
    for trial_id, n in finished_before.items():
        run = next((c for c in children if c["run"].data.tags["cleansweep.trial_id"] == trial_id), None)
        assert run is None or len(run["steps"]) == n  # a completed trial was not run again


def _finished_trials(workdir: Path, name: str) -> dict[str, int]:
    uri = tracking.resolve_tracking_uri(None, workdir, env={})
    if not (workdir / "mlflow.db").exists():
        return {}
    try:
        client = tracking.open_client(uri)
        exp = client.get_experiment_by_name("cleansweep")
        if exp is None:
            return {}
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED' and "
                                  f"tags.`cleansweep.sweep` = '{name}' and tags.`cleansweep.kind` = 'trial'")
        return {r.data.tags["cleansweep.trial_id"]: len(client.get_metric_history(r.info.run_id, TOP1))
                for r in runs}
    except Exception:  # the database is being written by the sweep; try again
        return {}


def _kill_group(pid: int) -> None:
    # The killed driver's Ray processes were started in its session (start_new_session): end them by that group id.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_space_files_reference_real_trial_fields():
    # Every shipped space loads with the registered methods, and the first candidate of each variant becomes a
    # TrainSpec that carries the sampled values under their dotted names (what a trial of that file would train).
    from functools import reduce

    from cleansweep.methods import list_methods

    files = sorted(Path(spaces.__file__).resolve().parents[2].joinpath("search_spaces").glob("*.yaml"))
    assert {"demo.yaml", "cleanclip.yaml"} <= {p.name for p in files}
    for path in files:
        cfg = spaces.load(path, known_methods=list_methods())
        base = spaces.base_train_dict(cfg)
        for label, params in spaces.variants(cfg).items():
            point = {k: getattr(d, d.kind)[0] if isinstance(d, Domain) else d for k, d in params.items()}
            spec = spaces.trial_spec(base, point, f"{path.name}: {label}")
            assert spec.method.name in list_methods(), (path.name, label)
            for key, value in point.items():
                assert reduce(getattr, key.split("."), spec) == value, (path.name, label, key)


def test_failed_trials_never_outrank_trials_that_ran():
    # A diverged model (weights ~1e30) still evaluates: chance accuracy, ASR 0 -> "feasible". It must not win.
    trials = [{"trial_id": "ok", "status": "FINISHED", "evaluations": _evals([(10, 1, 0.10, 0.04)])},
              {"trial_id": "nan", "status": "FAILED", "evaluations": _evals([(0, 0, 0.17, 0.0)])},
              {"trial_id": "never", "status": "FINISHED", "evaluations": _evals([(10, 1, 0.9, 0.5)])}]
    board = analysis.leaderboard(trials, threshold=0.05)
    assert list(board["trial_id"]) == ["ok", "never", "nan"]
    evals = pd.concat([t["evaluations"].assign(trial_id=t["trial_id"], status=t["status"]) for t in trials])
    assert analysis.best_feasible(evals, 0.05)["trial_id"] == "ok"  # the one ranking, also across evaluations


def test_a_trial_that_finished_before_a_kill_is_not_trained_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.open_client(uri)
    exp = tracking.get_or_create_experiment(client, "cleansweep")
    parent = tracking.start_sweep(client, exp, "s")
    run = tracking.start_trial(client, exp, sweep="s", trial_id="t1", parent_run_id=parent.run_id, params={})
    run.log_metrics({TOP1: 0.8, ASR: 0.02, BEST: 0.8}, step=10)
    assert tracking.finished_trial(client, exp, "s", "t1") is None  # still running: a resume continues it
    run.end("KILLED")
    assert tracking.finished_trial(client, exp, "s", "t1") is None  # interrupted: a resume continues it
    tracking.finish_trial(client, run.run_id, stopped_early=False)
    done = tracking.finished_trial(client, exp, "s", "t1")
    assert done[BEST] == 0.8 and done["step"] == 10 and done["mlflow_run_id"] == run.run_id


@pytest.mark.integration
def test_impossible_resources_leave_no_sweep_behind(sweep_env, tiny_world, capsys):
    from cleansweep.models import create_model, save_checkpoint

    ckpt = save_checkpoint(sweep_env / "m.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    space = _space_file(sweep_env, ckpt, tiny_world, "epochs: 1\nresources: {cpu: 64}\n"
                        "space: {optim.lr: {choice: [0.001]}}\nsearch: {num_samples: 1}\n")
    work = sweep_env / "w"
    assert cli.main(["search", str(space), "--name", "big", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: resources: a trial asks for 64 CPU") and "\n" not in err
    assert not (work / "sweeps" / "big").exists()
    client = tracking.open_client(tracking.resolve_tracking_uri(None, work, env={}))
    exp = client.get_experiment_by_name("cleansweep")
    assert exp is None or tracking.find_sweep_run(client, exp.experiment_id, "big") is None  # the name stays free


def test_resume_reads_a_config_recorded_before_a_setting_existed_as_its_default(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model: {preset: demo}\nspace: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    current = spaces.load(path).model_dump(mode="json")
    recorded = json.loads(json.dumps(current))
    for section, key in (("attack", "manifest"), ("attack", "override"), ("search", "max_grid_points")):
        assert key in recorded[section]  # settings added by issue 17: a sweep started before it lacks them
        del recorded[section][key]
    assert driver._same_config(recorded, current)
    changed = json.loads(json.dumps(recorded))
    changed["space"]["optim.lr"]["loguniform"] = [1.0e-4, 1.0e-1]
    assert not driver._same_config(changed, current)
    assert not driver._same_config({"not": "a config"}, current)
