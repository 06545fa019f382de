"""A sweep, read back from MLflow, as the paper's figures and tables on disk (and on the sweep's parent run).

`build_report` writes Figure 2 (`pareto.png`), Figure 5 (`trajectories.png`), Table 2 (`summary.csv/.md`), the
stopping-criterion analysis (`stopping*.csv/.md`), the trial leaderboard, every evaluation and a one-page
`report.md`; `report_sweep` reads the sweep with `cleansweep.tracking.load_sweep` and logs the files under `report/`
on the parent run. The numbers come from `cleansweep.results.analysis` (pure tables) and the figures from
`cleansweep.results.figures`; their public names are re-exported here. MLflow stays in `cleansweep.tracking`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from matplotlib.figure import Figure

from cleansweep.errors import UserError
from cleansweep.objective import PROXY_ASR
from cleansweep.results.analysis import (
    ASR,
    DEFAULT_THRESHOLD,
    EPOCH,
    MIN_ASR,
    TOP1,
    TRUE_ASR,
    Start,
    best_feasible,
    constraint_from_params,
    evaluations,
    leaderboard,
    main_stage,
    pareto_front,
    sampled_params,
    starting_point,
    stopping_summary,
    stopping_table,
    summary_table,
    sweep_leaderboard,
    threshold_from_params,
    varying_params,
)
from cleansweep.results.figures import draw_pareto, plot_pareto, plot_study_pareto, plot_trajectories
from cleansweep.results.tables import PERCENT_COLUMNS, markdown_table, study_table, trials_table
from cleansweep.runtime.atomic import write_atomic

if TYPE_CHECKING:
    from cleansweep.tracking import SweepRecord

__all__ = ["ASR", "DEFAULT_THRESHOLD", "EPOCH", "MIN_ASR", "PERCENT_COLUMNS", "TOP1", "Start", "SweepReport",
           "UserError", "analyse", "best_feasible", "build_report", "draw_pareto", "evaluations",
           "format_leaderboard", "leaderboard", "main_stage", "markdown_table", "pareto_front", "plot_pareto",
           "plot_study_pareto", "plot_trajectories", "report_sweep", "results", "sampled_params", "starting_point",
           "stopping_summary", "stopping_table", "study_table", "summary_table", "sweep_leaderboard",
           "threshold_from_params", "trials_table", "varying_params", "write_figure", "write_table"]


def write_table(frame: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """Write `stem.csv` (raw fractions) and `stem.md` (percentages) atomically; return both paths."""
    csv, md = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_atomic(csv, lambda p: frame.to_csv(p, index=False))
    write_atomic(md, lambda p: p.write_text(markdown_table(frame) + "\n"))
    return [csv, md]


def write_figure(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG atomically."""
    write_atomic(path, lambda p: fig.savefig(p, format="png"))
    return path


@dataclass(frozen=True)
class SweepReport:
    """What `build_report` computed and wrote."""

    out_dir: Path
    files: list[Path]
    threshold: float
    start: Start | None
    evaluations: pd.DataFrame
    summary: pd.DataFrame
    stopping: pd.DataFrame
    stopping_summary: pd.DataFrame
    trials: pd.DataFrame
    pareto_points: int
    trajectory_points: int


def analyse(sweep: SweepRecord, *, threshold: float | None = None) -> dict[str, Any]:
    """All tables of one sweep (no files): threshold, start, evaluations, summary, stopping, trials, params.

    Only main-stage trials count (a two-stage sweep's preselect evaluations are not cleaning results).
    """
    threshold = threshold_from_params(sweep.params) if threshold is None else threshold
    constraint = constraint_from_params(sweep.params)
    trials, history = main_stage(sweep)
    evals = evaluations(history, trials, constraint=constraint)
    start = starting_point(sweep.metrics, evals, constraint=constraint)
    stopping = stopping_table(evals, threshold)
    params = sampled_params(trials)
    return {"threshold": threshold, "start": start, "evaluations": evals, "params": params, "trial_runs": trials,
            "summary": summary_table(evals, start, threshold, sweep=sweep.name), "stopping": stopping,
            "stopping_summary": stopping_summary(stopping, sweep=sweep.name),
            "trials": trials_table(trials, stopping, params) if not trials.empty else trials, "constraint": constraint}


def named_for(frame: pd.DataFrame, constraint: str) -> pd.DataFrame:
    """A table's ASR columns under the name of what they hold: in a proxy-ASR sweep the analysis runs on the proxy
    (kept under `asr` while computing), so every `asr` column is written `proxy_asr`, and the known trigger's ASR
    (`true_asr_top1`, where the trigger is known) as `asr_top1`. A proxy is never shown as the ASR."""
    if constraint == ASR:
        return frame
    renamed = {c: c.replace("asr", "proxy_asr") for c in frame.columns if "asr" in c and c != TRUE_ASR}
    return frame.rename(columns={**renamed, TRUE_ASR: ASR})


def build_report(sweep: SweepRecord, out_dir: str | Path, *, threshold: float | None = None,
                 max_trajectories: int = 8) -> SweepReport:
    """Write the figures and tables of one sweep to `out_dir`.

    Files: `pareto.png` (Figure 2), `trajectories.png` (Figure 5), `summary.csv/.md` (Table 2),
    `stopping.csv/.md` (per trial) and `stopping_summary.csv/.md`, `trials.csv/.md` (leaderboard),
    `evaluations.csv` (every point) and `report.md` (all of it on one page).

    Args:
        sweep: The sweep as read by `cleansweep.tracking.load_sweep`.
        out_dir: Output folder (created).
        threshold: ASR threshold; None = the sweep's own (`asr_threshold` param, else 0.05).
        max_trajectories: Most trials drawn in the trajectory figure.

    Returns:
        A `SweepReport` with the tables, the point counts and the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = analyse(sweep, threshold=threshold)
    evals, start, thr = a["evaluations"], a["start"], a["threshold"]
    if evals.empty:
        raise UserError(f"sweep {sweep.name!r} has no evaluations with {TOP1} and {ASR} yet; "
                        "wait for its trials to report, then re-run the report")
    fig, n_pareto = plot_pareto(evals, start, thr, title=f"{sweep.name}: accuracy vs attack success, "
                                f"{len(evals)} evaluations of {evals['trial_id'].nunique()} trials")
    files = [write_figure(fig, out / "pareto.png")]
    fig, n_traj = plot_trajectories(evals, start, thr, trials=a["trial_runs"], params=a["params"],
                                    max_trials=max_trajectories)
    files.append(write_figure(fig, out / "trajectories.png"))
    for stem in ("summary", "stopping", "stopping_summary", "trials"):
        files += write_table(named_for(a[stem], a["constraint"]), out, stem)
    eval_csv = out / "evaluations.csv"
    write_atomic(eval_csv, lambda p: named_for(evals, a["constraint"]).to_csv(p, index=False))
    files.append(eval_csv)
    page = out / "report.md"
    write_atomic(page, lambda p: p.write_text(_report_page(sweep.name, a)))
    files.append(page)
    return SweepReport(out_dir=out, files=files, threshold=thr, start=start, evaluations=evals,
                       summary=a["summary"], stopping=a["stopping"], stopping_summary=a["stopping_summary"],
                       trials=a["trials"], pareto_points=n_pareto, trajectory_points=n_traj)


def _report_page(name: str, a: Mapping[str, Any]) -> str:
    s, ss = a["summary"].iloc[0], a["stopping_summary"].iloc[0]
    start = a["start"]
    verdict = ("no evaluation reached the feasible region" if pd.isna(s["best_top1"]) else
               f"best feasible accuracy {100 * s['best_top1']:.2f}% (trial {s['best_trial']}, epoch "
               f"{s['best_epoch']:g})")
    def named(frame: pd.DataFrame) -> pd.DataFrame:
        return named_for(frame, a["constraint"])

    asr = "ASR" if a["constraint"] == ASR else "proxy ASR (the ASR of the trigger a scan inverted)"
    return "\n".join([
        f"# Sweep `{name}`", "",
        f"Feasible: {asr} <= {100 * a['threshold']:g}%. Starting model: "
        + (f"{100 * start.top1:.2f}% accuracy, {100 * start.asr:.2f}% {asr.split(' (')[0]} ({start.source})."
           if start else "unknown."),
        f"Result: {verdict}.", "",
        "![Pareto](pareto.png)", "", "## Summary (Table 2)", "", markdown_table(named(a["summary"])), "",
        "## Stopping criterion", "",
        f"{ss['trials_feasible_at_end']} of {ss['trials']} trials end feasible; "
        f"{ss['trials_feasible_anywhere']} are feasible somewhere; in {ss['trials_best_mid_trajectory']} the best "
        "feasible model is mid-trajectory, which stopping at the last epoch would miss.", "",
        markdown_table(named(a["stopping_summary"])), "", markdown_table(named(a["stopping"])), "",
        "![Trajectories](trajectories.png)", "", "## Trials", "", markdown_table(named(a["trials"])), "",
    ])


def report_sweep(name: str, *, tracking_uri: str, experiment: str | None = None, out_dir: str | Path,
                 threshold: float | None = None, log_artifacts: bool = True) -> SweepReport:
    """Read sweep `name` from MLflow, write its report to `out_dir`, and log the files on the sweep's parent run.

    Args:
        name: Sweep name.
        tracking_uri: Resolved MLflow tracking URI.
        experiment: MLflow experiment to look in (None = all).
        out_dir: Output folder.
        threshold: ASR threshold override.
        log_artifacts: Also upload the files under `report/` on the parent run.

    Returns:
        The `SweepReport`.
    """
    from cleansweep import tracking

    sweep = tracking.load_sweep(name, tracking_uri, experiment=experiment)
    result = build_report(sweep, out_dir, threshold=threshold)
    if log_artifacts:
        tracking.log_report_artifacts(sweep.parent_run_id, result.out_dir, tracking_uri)
    return result


# ------------------------------------------------------------------------------------------------ results
def results(name: str, *, tracking_uri: str, experiment: str | None = None) -> pd.DataFrame:
    """The leaderboard of sweep `name`, recomputed from every evaluation logged in MLflow (`cleansweep results`)."""
    from cleansweep import tracking

    return sweep_leaderboard(tracking.load_sweep(name, tracking_uri, experiment=experiment))


def format_leaderboard(board: pd.DataFrame, fmt: str = "table", top_k: int = 10) -> str:
    """The best feasible trial and the top-k as a text table, CSV or JSON."""
    top = board.head(top_k)
    if fmt == "csv":
        return top.to_csv(index=False)
    if fmt == "json":
        best = board[board["feasible"]].head(1)
        return json.dumps({"best": _records(best)[0] if len(best) else None, "top": _records(top)}, indent=2)
    if top.empty:
        return "no trials yet"
    lines = []
    feasible = board[board["feasible"]]
    ranked = PROXY_ASR if PROXY_ASR in board else ASR  # a proxy-ASR sweep ranks on the proxy, shows the true ASR too
    if feasible.empty:
        lines.append(f"no feasible evaluation ({ranked} <= threshold) in any trial")
    else:
        b = feasible.iloc[0]
        true = f"  asr {b[ASR]:.4f}" if ranked != ASR and pd.notna(b[ASR]) else ""
        lines.append(f"best feasible: trial {b['trial_id']}  top1 {b[TOP1]:.4f}  {ranked.removesuffix('_top1')} "
                     f"{b[ranked]:.4f}{true}  step {b['step']} (epoch {b['epoch']:g})  config {b['config']}")
        lines.append(f"  checkpoint: {b['checkpoint'] or 'not kept'}")
    asr_columns = [ranked, ASR] if ranked != ASR else [ASR]
    shown = top[["rank", "trial_id", "status", "feasible", TOP1, *asr_columns, "step", "epoch", f"min_{ranked}",
                 "evaluations", "config"]].assign(status=[f"{s} (stopped early)" if stopped else s for s, stopped in
                                           zip(top["status"], top.get("stopped_early", [False] * len(top)),
                                               strict=True)])
    lines.append(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}", max_colwidth=70))
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    out = json.loads(frame.to_json(orient="records"))
    for rec in out:
        rec["config"] = json.loads(rec["config"]) if rec.get("config") else {}
    return out
