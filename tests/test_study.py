"""Study: the paper's pipeline end to end on a tiny poisoned world (integration), and its configuration (fast).

The integration test runs the real thing (Ray Train pre-training x2, Ray Tune + Optuna sweeps x2, MLflow in sqlite)
on the smallest settings, then checks Table 2 against MLflow re-read independently and that a re-run skips every
stage.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from mlflow import MlflowClient

from cleansweep.cli import main
from cleansweep.errors import UserError
from cleansweep.experiments import study
from cleansweep.pretrain.selection import selected_card
from cleansweep.runtime import layout


# ------------------------------------------------------------------------------------------------ fast
def test_paper_presets_name_every_missing_path(tmp_path, capsys):
    assert main(["study", "cc3m", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'cc3m' needs your data paths")
    for flag in ("--train-csv", "--clean-csv", "--eval-dir"):
        assert flag in err
    (tmp_path / "train.csv").write_text("image,caption\n")
    with pytest.raises(UserError, match=r"missing clean_csv, eval_dir"):
        study.resolve_data("cc6m", tmp_path, {"train_csv": tmp_path / "train.csv"})
    with pytest.raises(UserError, match=r"eval_dir .*nowhere does not exist"):
        study.resolve_data("cc6m", tmp_path, {"train_csv": tmp_path / "train.csv", "clean_csv": tmp_path / "train.csv",
                                              "eval_dir": tmp_path / "nowhere"})


def test_unknown_preset_and_bad_flags(tmp_path, capsys):
    assert main(["study", "cc9m", "--workdir", str(tmp_path)]) == 2
    assert "unknown study 'cc9m'; choose from: toy, cc3m, cc6m" in capsys.readouterr().err
    assert main(["study", "toy", "--workdir", str(tmp_path), "--num-samples", "0"]) == 2
    assert "--num-samples: 0 is out of range" in capsys.readouterr().err


def test_paper_sweep_uses_the_appendix_grid_on_user_data(tmp_path):
    files = {k: tmp_path / n for k, n in (("train_csv", "t.csv"), ("clean_csv", "c.csv"))}
    for f in files.values():
        f.write_text("image,caption\n")
    (tmp_path / "val").mkdir()
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    data = {**{k: str(v) for k, v in files.items()}, "eval_dir": str(tmp_path / "val")}
    cfg = study.sweep_config("cc3m", "mmcl+ssl", data, str(ckpt), tracking_uri=None)
    grid = study.read_yaml(study.SPACES_DIR / "paper_D02.yaml")["space"]["optim.lr"]["grid"]
    assert cfg.space["optim.lr"].grid == [float(x) for x in grid] and len(grid) == 13
    assert cfg.data.train_csv == files["clean_csv"] and cfg.model.checkpoint == ckpt and cfg.model.name is None
    assert cfg.epochs == 20 and cfg.objective.threshold == 0.05
    assert cfg.base["method"]["ssl_weight"] == 1 and cfg.base["optim"]["warmup_steps"] == 50

    pre = study.pretrain_config("cc3m", "mmcl+ssl", data, name="x", tracking_uri=None, reference_top1=0.1704)
    assert (pre.selection, pre.reference_top1) == ("closest_top1", 0.1704)  # matched accuracies, as the paper
    assert pre.train.method.ssl_weight == 1 and pre.train.model.name == "RN50"
    assert study.pretrain_config("cc3m", "mmcl", data, name="y", tracking_uri=None, reference_top1=None
                                 ).selection == "best_top1"


def test_table2_rows_per_objective():
    def analysis(name, start, best, at_end):
        summary = pd.DataFrame([{"sweep": name, "start_top1": start, "start_asr": 0.99, "best_top1": best,
                                 "best_asr": 0.01, "best_trial": "t2", "best_epoch": 6.0,
                                 "relative_change": (best - start) / start, "trials": 4}])
        stop = pd.DataFrame([{"trials_feasible_anywhere": 3, "trials_feasible_at_end": at_end,
                              "trials_best_mid_trajectory": 3 - at_end}])
        per_trial = pd.DataFrame({"trial_id": ["t1", "t2"], "best_is_mid_trajectory": [at_end == 3, at_end != 3]})
        return {"summary": summary, "stopping_summary": stop, "stopping": per_trial}

    table = study.table2({"MMCL": analysis("a", 0.2376, 0.2404, 3), "MMCL+SSL": analysis("b", 0.2386, 0.1305, 0)},
                         {"MMCL": {"epoch": 30.0}})
    assert list(table["objective"]) == ["MMCL", "MMCL+SSL"]
    assert table.loc[1, "relative_change"] == pytest.approx(-0.4531, abs=1e-4)  # the paper's CC6M drop, ~45%
    assert table.loc[0, "pretrain_epoch"] == 30.0 and table.loc[1, "trials_feasible_at_end"] == 0
    # where the best sits: its epoch, and whether it came before its trial's last evaluation (trial t2's row)
    assert list(table["best_epoch"]) == [6.0, 6.0] and list(table["best_mid_trajectory"]) == [False, True]


def _user_data(tmp_path):
    for name in ("t.csv", "c.csv"):
        (tmp_path / name).write_text("image,caption\n")
    (tmp_path / "val").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    return {"train_csv": str(tmp_path / "t.csv"), "clean_csv": str(tmp_path / "c.csv"),
            "eval_dir": str(tmp_path / "val")}, str(tmp_path / "model.safetensors")


SCALE = {"workers": 4, "gpus_per_worker": 1, "cpus_per_worker": 6.0, "loader_workers": 12, "trial_cpus": 3.0,
         "trial_gpus": 0.5}


def test_scale_reaches_the_pretrain_and_sweep_configs(tmp_path):
    data, ckpt = _user_data(tmp_path)
    pre = study.pretrain_config("cc6m", "mmcl", data, name="x", tracking_uri=None, reference_top1=None, scale=SCALE)
    assert (pre.ray.num_workers, pre.ray.use_gpu, pre.ray.cpus_per_worker) == (4, True, 6.0)
    assert pre.train.data.workers == 12
    for objective in layout.OBJECTIVES:
        cfg = study.sweep_config("cc6m", objective, data, ckpt, tracking_uri=None, scale=SCALE)
        assert (cfg.resources.cpu, cfg.resources.gpu, cfg.data.workers) == (3.0, 0.5, 12)
    # A partial scale keeps the rest of the preset's: 2 CPU-only workers, loader workers and trials as before.
    pre = study.pretrain_config("cc3m", "mmcl", data, name="x", tracking_uri=None, reference_top1=None,
                                scale={"workers": 2, "gpus_per_worker": 0, "trial_gpus": None})
    assert (pre.ray.num_workers, pre.ray.use_gpu, pre.ray.cpus_per_worker, pre.train.data.workers) == (2, False, 8, 8)


def test_scale_defaults_are_the_presets_and_the_spaces(tmp_path):
    data, ckpt = _user_data(tmp_path)
    pre = study.pretrain_config("cc3m", "mmcl+ssl", data, name="x", tracking_uri=None, reference_top1=None)
    assert (pre.ray.num_workers, pre.ray.use_gpu, pre.ray.cpus_per_worker, pre.train.data.workers) == (1, True, 8, 8)
    for objective, space in (("mmcl", "paper_D01.yaml"), ("mmcl+ssl", "paper_D02.yaml")):
        yaml = study.read_yaml(study.SPACES_DIR / space)
        cfg = study.sweep_config("cc3m", objective, data, ckpt, tracking_uri=None)
        assert (cfg.resources.cpu, cfg.resources.gpu) == (yaml["resources"]["cpu"], yaml["resources"]["gpu"])
        assert cfg.data.workers == yaml["data"]["workers"] == 8
    # toy: as before the flags existed (1 CPU worker, no loader workers, 1 CPU per trial).
    toy = study.pretrain_config("toy", "mmcl", data, name="t", tracking_uri=None, reference_top1=None)
    assert (toy.ray.num_workers, toy.ray.use_gpu, toy.ray.cpus_per_worker, toy.train.data.workers) == (1, False, 1, 0)
    cfg = study.sweep_config("toy", "mmcl", data, ckpt, tracking_uri=None)
    assert (cfg.resources.cpu, cfg.resources.gpu, cfg.data.workers) == (1, 0, 0)


def test_scale_flags_are_recorded_in_study_json(tmp_path, capsys):
    flags = ["--workers", "4", "--gpus-per-worker", "1", "--cpus-per-worker", "6", "--loader-workers", "12",
             "--trial-cpus", "3", "--trial-gpus", "0.5"]
    assert main(["study", "cc3m", "--workdir", str(tmp_path), *flags]) == 2  # no data paths: refused after the record
    assert "needs your data paths" in capsys.readouterr().err
    log = json.loads((tmp_path / "study" / "cc3m" / "study.json").read_text())
    assert log["complete"] is False
    assert log["scale"]["pretrain"] == {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 6.0,
                                        "loader_workers": 12}
    assert log["scale"]["clean"] == {o: {"cpu": 3.0, "gpu": 0.5, "loader_workers": 12} for o in layout.OBJECTIVES}


@pytest.mark.parametrize("flags,message", [
    (["--gpus-per-worker", "2"], "--gpus-per-worker: 2 is out of range; pass an integer in 0..1"),
    (["--gpus-per-worker", "0.5"], "--gpus-per-worker: '0.5' is not an integer"),
    (["--workers", "-1"], "--workers: -1 is out of range"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker: 0 is out of range"),
    (["--loader-workers", "many"], "--loader-workers: 'many' is not an integer"),
    (["--trial-cpus", "0"], "--trial-cpus: 0 is out of range"),
    (["--trial-gpus", "-0.5"], "--trial-gpus: -0.5 is out of range"),
    (["--workers", "0"], "0 Ray Train workers run pre-training in the driver process"),
])
def test_bad_scale_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["study", "cc3m", "--workdir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "study").exists()  # refused before anything is written


def test_bad_scale_values_are_refused_by_the_library():
    with pytest.raises(UserError, match=r"gpus_per_worker 2 must be 0 or 1"):
        study.scale_plan("cc3m", {"gpus_per_worker": 2})
    with pytest.raises(UserError, match=r"unknown scale key 'gpus'; choose from: workers, "):
        study.scale_plan("toy", {"gpus": 1})
    with pytest.raises(UserError, match=r"loader_workers -1 must be an integer in 0\.\.1024"):
        study.scale_plan("toy", {"loader_workers": -1})
    with pytest.raises(UserError, match=r"cpus_per_worker"):
        study.scale_plan("toy", {"cpus_per_worker": 0})
    with pytest.raises(UserError, match=r"resources"):
        study.scale_plan("cc6m", {"trial_cpus": -1})
    assert study.scale_plan("cc3m", {"workers": 0, "gpus_per_worker": 0})["pretrain"]["num_workers"] == 0


# ------------------------------------------------------------------------------------------------ integration
def _mlflow_truth(uri: str, sweep: str) -> dict:
    client = MlflowClient(tracking_uri=uri)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`cleansweep.sweep` = '{sweep}' and tags.`cleansweep.kind` = 'sweep'")[0]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    points = []
    for run in children:
        if run.data.tags.get("cleansweep.stage", "main") != "main":
            continue
        top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "zeroshot_top1")}
        asr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "asr_top1")}
        points += [(top1[s], asr[s]) for s in top1 if s in asr]
    return {"start": (parent.data.metrics["start_zeroshot_top1"], parent.data.metrics["start_asr_top1"]),
            "points": points, "threshold": float(parent.data.params["asr_threshold"])}


@pytest.mark.integration
def test_toy_study_end_to_end_and_rerun_skips(tmp_path, monkeypatch, capsys):
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray's auth token goes here, not to ~/.ray
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "work"
    world = make_demo_world(tmp_path / "world", seed=0, n_train=256, n_clean=128, n_eval=60, image_size=32,
                            num_classes=6)
    manifest = poison_csv(world["train_csv"], tmp_path / "poisoned", attack="badnet", target="banana",
                          fraction=0.05, seed=0, image_size=32, patch_size=4)
    argv = ["study", "toy", "--workdir", str(work), "--train-csv", str(tmp_path / "poisoned" / manifest["output_csv"]),
            "--clean-csv", world["clean_csv"], "--eval-dir", world["eval_dir"], "--pretrain-epochs", "2",
            "--clean-epochs", "2", "--num-samples", "2"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    out = work / "study" / "toy"
    log = json.loads((out / "study.json").read_text())
    assert log["complete"] and set(log["stages"]) == {"data", "pretrain mmcl", "pretrain mmcl+ssl", "sweep mmcl",
                                                      "sweep mmcl+ssl", "report"}
    assert not any(s["skipped"] for s in log["stages"].values())
    assert all(s["seconds"] >= 0 for s in log["stages"].values())
    for name in ("table2.csv", "table2.md", "figure2.png", "mmcl/pareto.png", "mmcl-ssl/trajectories.png"):
        assert (out / name).stat().st_size > 0, name

    uri = f"sqlite:///{work / 'mlflow.db'}"
    table = pd.read_csv(out / "table2.csv").set_index("objective")
    cards = {o: selected_card(work, n["pretrain"]) for o, n in study.run_names("toy").items()}
    assert cards["mmcl+ssl"]["selection"] == "closest_top1"
    assert cards["mmcl+ssl"]["reference_top1"] == pytest.approx(cards["mmcl"]["zeroshot_top1"])
    for objective, label in ((o, layout.objective_label(o)) for o in layout.OBJECTIVES):
        truth = _mlflow_truth(uri, study.run_names("toy")[objective]["sweep"])
        row = table.loc[label]
        assert (row["start_top1"], row["start_asr"]) == pytest.approx(truth["start"])
        assert row["start_top1"] == pytest.approx(cards[objective]["zeroshot_top1"])  # the selected model
        feasible = [t for t, a in truth["points"] if a <= truth["threshold"]]
        if feasible:
            assert row["best_top1"] == pytest.approx(max(feasible))
        else:
            assert math.isnan(row["best_top1"])
        assert log["stages"]["report"]["figure_points"][label] == len(truth["points"])
        assert row["trials"] == 2

    assert main(argv) == 0  # everything exists: no stage runs again
    again = json.loads((out / "study.json").read_text())
    assert again["complete"]
    assert all(again["stages"][s]["skipped"] for s in ("pretrain mmcl", "pretrain mmcl+ssl", "sweep mmcl",
                                                        "sweep mmcl+ssl"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "table2.csv").set_index("objective"), table)  # same numbers
