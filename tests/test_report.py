"""Report: tables agree with MLflow re-read independently, plots draw every point, CLI writes and logs the files.

The store is a real sqlite MLflow store written with MlflowClient (tests/sweep_store.py: numbers chosen by hand);
the integration test in test_study.py covers a sweep written by Ray Tune.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sweep_store import PRESELECT, RELOGGED, START, SWEEP, THRESHOLD, TRIALS, make_sweep

from cleansweep import tracking
from cleansweep.cli import main
from cleansweep.errors import UserError
from cleansweep.results import report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = make_sweep(uri)
    make_sweep(uri, "no-start", start_metrics=False)
    return uri, parent


def _independent_evaluations(uri: str, parent_id: str) -> dict[str, list[tuple[int, float, float]]]:
    """Main-stage trial id -> [(step, top1, asr)] re-read with MlflowClient, newest value per step."""
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    out = {}
    for run in children:
        if run.data.tags.get("cleansweep.stage") != "main":
            continue
        latest = {}
        for key in ("zeroshot_top1", "asr_top1"):
            for m in client.get_metric_history(run.info.run_id, key):
                if (m.step, key) not in latest or m.timestamp >= latest[m.step, key][0]:
                    latest[m.step, key] = (m.timestamp, m.value)
        steps = sorted({s for s, _ in latest})
        out[run.data.tags["cleansweep.trial_id"]] = [(s, latest[s, "zeroshot_top1"][1], latest[s, "asr_top1"][1])
                                                     for s in steps]
    return out


def test_load_sweep_reads_the_layout(store):
    uri, parent = store
    sweep = tracking.load_sweep(SWEEP, uri)
    assert sweep.parent_run_id == parent
    assert sweep.metrics["start_zeroshot_top1"] == START["zeroshot_top1"]
    assert set(sweep.trials["trial_id"]) == set(TRIALS) | {PRESELECT[0]}
    assert dict(zip(sweep.trials["trial_id"], sweep.trials["status"], strict=True)) == {
        **{t: v[0] for t, v in TRIALS.items()}, PRESELECT[0]: "FINISHED"}
    # the re-logged step counts once
    assert len(sweep.history) == sum(len(v[3]) for v in TRIALS.values()) + len(PRESELECT[1])
    assert set(sweep.trials["tags.cleansweep.stage"]) == {"main", "preselect"}
    trial, epoch, _ = RELOGGED
    row = sweep.history[(sweep.history["trial_id"] == trial) & (sweep.history["step"] == 10 * epoch)]
    assert row["asr_top1"].item() == TRIALS[trial][3][epoch][2]  # the newer value wins


def test_load_sweep_unknown_name_lists_known(store):
    uri, _ = store
    with pytest.raises(UserError, match=r"no sweep named 'nope'.*toy-sweep"):
        tracking.load_sweep("nope", uri)


def test_tables_agree_with_mlflow(store, tmp_path):
    uri, parent = store
    result = report.build_report(tracking.load_sweep(SWEEP, uri), tmp_path)
    truth = _independent_evaluations(uri, parent)
    flat = [(t, s, a1, asr) for t, pts in truth.items() for s, a1, asr in pts]
    feasible = [p for p in flat if p[3] <= THRESHOLD]
    best = max(feasible, key=lambda p: p[2])

    s = result.summary.iloc[0]
    assert result.threshold == THRESHOLD
    assert (s["trials"], s["evaluations"], s["feasible_evaluations"]) == (len(truth), len(flat), len(feasible))
    assert (s["start_top1"], s["start_asr"]) == (START["zeroshot_top1"], START["asr_top1"])
    assert (s["best_trial"], s["best_step"], s["best_top1"], s["best_asr"]) == best
    assert s["relative_change"] == pytest.approx((best[2] - START["zeroshot_top1"]) / START["zeroshot_top1"])
    assert (s["best_trial"], s["best_top1"]) == ("t0", 0.81)  # the hand-chosen numbers, for the reader
    assert PRESELECT[0] not in set(result.evaluations["trial_id"])  # preselect evaluations are not cleaning results

    stop = result.stopping.set_index("trial_id")
    for trial, pts in truth.items():
        last = pts[-1]
        feas = [p for p in pts if p[2] <= THRESHOLD]
        row = stop.loc[trial]
        assert (row["last_top1"], row["last_asr"], row["evaluations"]) == (last[1], last[2], len(pts))
        assert row["last_feasible"] == (last[2] <= THRESHOLD)
        if feas:
            b = max(feas, key=lambda p: p[1])
            assert row["best_feasible_top1"] == b[1]
            assert row["best_is_mid_trajectory"] == (b[0] < last[0])
        else:
            assert math.isnan(row["best_feasible_top1"])
    assert stop.loc["t1", "best_is_mid_trajectory"] and stop.loc["t1", "top1_given_up"] == pytest.approx(0.72)
    ss = result.stopping_summary.iloc[0]
    assert (ss["trials_feasible_anywhere"], ss["trials_feasible_at_end"], ss["trials_best_mid_trajectory"]) == (
        sum(any(p[2] <= THRESHOLD for p in pts) for pts in truth.values()),
        sum(pts[-1][2] <= THRESHOLD for pts in truth.values()), 1)

    csv = pd.read_csv(tmp_path / "summary.csv")
    assert csv.loc[0, "best_top1"] == best[2] and csv.loc[0, "best_trial"] == best[0]
    assert "| toy-sweep |" in (tmp_path / "summary.md").read_text()
    assert "81.00%" in (tmp_path / "summary.md").read_text()
    assert len(pd.read_csv(tmp_path / "evaluations.csv")) == len(flat)
    board = pd.read_csv(tmp_path / "trials.csv")
    assert list(board["trial_id"][:2]) == ["t0", "t1"]  # best feasible first
    assert {"optim.lr", "method.ssl_weight"} <= set(board.columns)  # the hyperparameters that varied


def test_plots_draw_every_point(store, tmp_path):
    uri, _ = store
    sweep = tracking.load_sweep(SWEEP, uri)
    evals = report.evaluations(*report.main_stage(sweep)[::-1])
    start = report.starting_point(sweep.metrics, evals)
    n = sum(len(v[3]) for v in TRIALS.values())
    fig, count = report.plot_pareto(evals, start, THRESHOLD)
    points = next(c for c in fig.axes[0].collections if c.get_gid() == "evaluations")
    assert count == n == len(points.get_offsets())
    np.testing.assert_allclose(sorted(points.get_offsets()[:, 0]), sorted(100 * evals["asr_top1"]))
    fig, count = report.plot_trajectories(evals, start, THRESHOLD, max_trials=2)
    assert count == len(TRIALS["t0"][3]) + len(TRIALS["t1"][3])  # the two best trials
    fig, counts = report.plot_study_pareto({"MMCL": (evals, start), "MMCL+SSL": (evals.iloc[:5], None)}, THRESHOLD)
    panels = [[c for c in ax.collections if c.get_gid() == "evaluations"] for ax in fig.axes]
    assert counts == {"MMCL": n, "MMCL+SSL": 5}
    assert [len(c[0].get_offsets()) for c in panels if c] == [n, 5]  # two panels (+ the shared colorbar)


def test_start_falls_back_to_step_zero(store):
    uri, _ = store
    sweep = tracking.load_sweep("no-start", uri)
    evals = report.evaluations(*report.main_stage(sweep)[::-1])
    start = report.starting_point(sweep.metrics, evals)
    assert start.top1 == pytest.approx(np.mean([v[3][0][1] for v in TRIALS.values()]))
    assert "step-0" in start.source


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    evals = pd.DataFrame({"zeroshot_top1": rng.random(60).round(2), "asr_top1": rng.random(60).round(2)})
    front = report.pareto_front(evals)
    dominated = [any((o.zeroshot_top1 >= e.zeroshot_top1 and o.asr_top1 <= e.asr_top1) and
                     (o.zeroshot_top1 > e.zeroshot_top1 or o.asr_top1 < e.asr_top1) for o in evals.itertuples())
                 for e in evals.itertuples()]
    expected = evals[~np.array(dominated)].drop_duplicates()
    assert sorted(map(tuple, front[["asr_top1", "zeroshot_top1"]].to_numpy())) == sorted(
        map(tuple, expected[["asr_top1", "zeroshot_top1"]].to_numpy()))


def test_summary_without_feasible_evaluations():
    evals = pd.DataFrame({"trial_id": ["a", "a"], "step": [0, 1], "epoch": [0.0, 1.0],
                          "zeroshot_top1": [0.5, 0.6], "asr_top1": [0.9, 0.5]})
    s = report.summary_table(evals, report.Start(0.5, 0.9, "given"), 0.05).iloc[0]
    assert s["feasible_evaluations"] == 0 and math.isnan(s["best_top1"]) and math.isnan(s["relative_change"])
    assert "| -" in report.markdown_table(report.summary_table(evals, None, 0.05))
    ss = report.stopping_summary(report.stopping_table(evals, 0.05)).iloc[0]
    assert ss["trials_feasible_at_end"] == 0 and math.isnan(ss["best_feasible_top1_at_end"])


def test_threshold_from_params():
    assert report.threshold_from_params({"search.asr_threshold": "0.1"}) == 0.1
    assert report.threshold_from_params({"optim.lr": "x"}) == report.DEFAULT_THRESHOLD


def test_cli_report_writes_and_logs(store, tmp_path, capsys):
    uri, parent = store
    out = tmp_path / "rep"
    assert main(["report", SWEEP, "--tracking-uri", uri, "--out", str(out)]) == 0
    for name in ("pareto.png", "trajectories.png", "summary.csv", "summary.md", "stopping.csv", "stopping.md",
                 "trials.csv", "report.md", "evaluations.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(parent, "report")}
    assert {"report/pareto.png", "report/summary.md", "report/stopping.csv"} <= logged
    printed = capsys.readouterr().out
    assert "81.00%" in printed and "1 of 4 trials end feasible" in printed
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cli_report_errors(store, tmp_path, capsys):
    uri, _ = store
    assert main(["report", "missing", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    assert "no sweep named 'missing'" in capsys.readouterr().err
    assert main(["report", SWEEP, "--tracking-uri", uri, "--threshold", "5"]) == 2
    assert "--threshold: 5 is out of range; pass a finite number [0, 1]" in capsys.readouterr().err


def test_report_modules_never_import_mlflow():
    # MLflow stays behind cleansweep.tracking: the tables and figures load without it (fresh interpreter).
    import subprocess
    import sys

    code = ("import sys, cleansweep.results.report, cleansweep.results.analysis, cleansweep.results.figures; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'ray', 'optuna', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
