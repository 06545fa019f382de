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
                                 "best_asr": 0.01, "relative_change": (best - start) / start, "trials": 4}])
        stop = pd.DataFrame([{"trials_feasible_anywhere": 3, "trials_feasible_at_end": at_end,
                              "trials_best_mid_trajectory": 3 - at_end}])
        return {"summary": summary, "stopping_summary": stop}

    table = study.table2({"MMCL": analysis("a", 0.2376, 0.2404, 3), "MMCL+SSL": analysis("b", 0.2386, 0.1305, 0)},
                         {"MMCL": {"epoch": 30.0}})
    assert list(table["objective"]) == ["MMCL", "MMCL+SSL"]
    assert table.loc[1, "relative_change"] == pytest.approx(-0.4531, abs=1e-4)  # the paper's CC6M drop, ~45%
    assert table.loc[0, "pretrain_epoch"] == 30.0 and table.loc[1, "trials_feasible_at_end"] == 0


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
