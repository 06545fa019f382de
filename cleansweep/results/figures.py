"""The paper's figures from a sweep's evaluations (matplotlib `Figure`s, no pyplot state, no files).

Figure 2: accuracy vs attack success rate of every evaluation, the starting model as a star, the feasible region
ASR <= threshold shaded (`plot_pareto`, and `plot_study_pareto` with one panel per pre-training objective).
Figure 5: cleaning trajectories, one line per trial, markers growing with the epoch (`plot_trajectories`).
Every function returns the figure and how many evaluation points it drew, so tests can check them.
The scan figure (`plot_inversions`): an inverted trigger's mask, pattern and mask x pattern, one row per model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cleansweep.results.analysis import ASR, EPOCH, TOP1, Start, pareto_front, stopping_table


def _pct(values: Any) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=float)


def _frame_axes(ax: Any, threshold: float, start: Start | None) -> list[Any]:
    """Feasible region, starting star, axis labels; returns legend handles."""
    ax.axvspan(-2, 100 * threshold, color="tab:green", alpha=0.12, lw=0, zorder=0)
    ax.axvline(100 * threshold, color="tab:green", lw=1, ls="--", zorder=1)
    handles = [Patch(color="tab:green", alpha=0.25, label=f"feasible: ASR \u2264 {100 * threshold:g}%")]
    if start is not None:
        ax.scatter([100 * start.asr], [100 * start.top1], marker="*", s=380, c="red", edgecolors="black",
                   linewidths=0.8, zorder=5)
        handles.append(Line2D([], [], marker="*", ls="", color="red", markeredgecolor="black", markersize=15,
                              label=f"start: {100 * start.top1:.1f}% acc, {100 * start.asr:.1f}% ASR"))
    ax.set_xlim(-2, 102)
    ax.set_xlabel("attack success rate (ASR, %)")
    ax.set_ylabel("zero-shot top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    return handles


def draw_pareto(ax: Any, evals: pd.DataFrame, start: Start | None, threshold: float) -> int:
    """Figure 2 on an existing Axes: every evaluation coloured by epoch, the Pareto front, the best feasible point.

    Returns:
        The number of evaluation points drawn (the star and the best-point ring are not counted).
    """
    handles = _frame_axes(ax, threshold, start)
    if evals.empty:
        ax.text(0.5, 0.5, "no evaluations logged yet", transform=ax.transAxes, ha="center", va="center")
        ax.legend(handles=handles, loc="lower left", fontsize=8)
        return 0
    ax.scatter(_pct(evals[ASR]), _pct(evals[TOP1]), c=evals[EPOCH].to_numpy(float), cmap="viridis", s=28,
               alpha=0.85, edgecolors="white", linewidths=0.4, zorder=3, gid="evaluations")
    front = pareto_front(evals)
    ax.step(_pct(front[ASR]), _pct(front[TOP1]), where="post", color="black", lw=1, alpha=0.6, zorder=2)
    handles.append(Line2D([], [], color="black", lw=1, alpha=0.6, label="Pareto front"))
    feasible = evals[evals[ASR] <= threshold]
    if not feasible.empty:
        best = feasible.loc[feasible[TOP1].idxmax()]
        ax.scatter([100 * best[ASR]], [100 * best[TOP1]], s=200, facecolors="none", edgecolors="red",
                   linewidths=2, zorder=4)
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="red",
                              markeredgewidth=2, markersize=12,
                              label=f"best feasible: {100 * best[TOP1]:.1f}% (trial {best['trial_id']})"))
    ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
    return len(evals)


def plot_pareto(evals: pd.DataFrame, start: Start | None, threshold: float, *, title: str = "") -> tuple[Figure, int]:
    """Figure 2: accuracy vs ASR of every evaluation, starting model as a star, feasible region shaded.

    Returns:
        The figure and the number of evaluation points drawn.
    """
    fig = Figure(figsize=(8, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    count = draw_pareto(ax, evals, start, threshold)
    if count:
        points = next(c for c in ax.collections if c.get_gid() == "evaluations")
        fig.colorbar(points, ax=ax, label="cleaning epoch")
    ax.set_title(title or f"{count} evaluations of {evals['trial_id'].nunique()} trials")
    return fig, count


def _label(trial_id: str, row: Mapping[str, Any], params: Sequence[str]) -> str:
    parts = []
    for p in params:
        value = row.get(f"params.{p}")
        try:
            value = f"{float(value):.3g}"
        except (TypeError, ValueError):
            pass
        parts.append(f"{p.rsplit('.', 1)[-1]}={value}")
    status = row.get("status")
    suffix = f" ({status})" if status and status != "FINISHED" else ""
    return (f"{trial_id}: {', '.join(parts)}" if parts else str(trial_id)) + suffix


def plot_trajectories(evals: pd.DataFrame, start: Start | None, threshold: float, *,
                      trials: pd.DataFrame | None = None, params: Sequence[str] = (), max_trials: int = 8,
                      title: str = "") -> tuple[Figure, int]:
    """Figure 5: one cleaning trajectory per trial, markers growing with the epoch.

    Only the `max_trials` trials with the best feasible accuracy (then the best final accuracy) are drawn, so the
    figure stays legible for large sweeps; the title says how many were left out.

    Args:
        evals: Output of `evaluations`.
        start: The starting model (drawn as a star), or None.
        threshold: ASR threshold (feasible region).
        trials: `SweepRecord.trials`, for legend labels with the hyperparameters in `params`.
        params: Dotted param names shown in the legend (e.g. `varying_params(trials)`).
        max_trials: Most trajectories drawn.
        title: Figure title (default: a count of the trials shown).

    Returns:
        The figure and the number of trajectory points drawn (over all trials shown).
    """
    fig = Figure(figsize=(9, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    handles = _frame_axes(ax, threshold, start)
    order = stopping_table(evals, threshold)["trial_id"].tolist()
    shown = order[:max_trials]
    rows = {} if trials is None else {r["trial_id"]: r for r in trials.to_dict("records")}
    max_epoch = max(float(evals[EPOCH].max()), 1e-9) if not evals.empty else 1.0
    count = 0
    for i, trial_id in enumerate(shown):
        t = evals[evals["trial_id"] == trial_id].sort_values("step")
        color = _color(i, len(shown))
        x, y = _pct(t[ASR]), _pct(t[TOP1])
        ax.plot(x, y, color=color, lw=1.2, alpha=0.55, zorder=2)
        sizes = 12 + 140 * (t[EPOCH].to_numpy(float) / max_epoch)
        ax.scatter(x, y, s=sizes, color=color, edgecolors="black", linewidths=0.4, alpha=0.9, zorder=3)
        handles.append(Line2D([], [], color=color, marker="o", label=_label(trial_id, rows.get(trial_id, {}), params)))
        count += len(t)
    handles.append(Line2D([], [], ls="", marker="o", color="grey", markersize=4, label="marker size: epoch"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    n = evals["trial_id"].nunique()
    ax.set_title(title or f"cleaning trajectories: {len(shown)} of {n} trials"
                 + (" (best feasible first)" if len(shown) < n else ""))
    return fig, count


def _color(i: int, n: int) -> Any:
    return f"C{i}" if n <= 10 else colormaps["tab20"](i % 20)


def plot_study_pareto(panels: Mapping[str, tuple[pd.DataFrame, Start | None]], threshold: float, *,
                      title: str = "") -> tuple[Figure, dict[str, int]]:
    """Figure 2 with one panel per pre-training objective, sharing the accuracy axis.

    Args:
        panels: Objective label -> (evaluations, starting model).
        threshold: ASR threshold.
        title: Figure title.

    Returns:
        The figure and the number of evaluation points per panel.
    """
    fig = Figure(figsize=(6.5 * len(panels), 5.5), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    counts = {}
    for ax, (label, (evals, start)) in zip(axes, panels.items(), strict=True):
        counts[label] = draw_pareto(ax, evals, start, threshold)
        ax.set_title(f"pre-trained with {label}: {counts[label]} evaluations")
    for ax in axes[1:]:
        ax.set_ylabel("")
    points = [c for ax in axes for c in ax.collections if c.get_gid() == "evaluations"]
    if points:
        epochs = np.concatenate([p.get_array() for p in points])
        for p in points:  # one colour scale for every panel, so the shared colorbar reads right
            p.set_clim(float(epochs.min()), float(epochs.max()))
        fig.colorbar(points[0], ax=list(axes), label="cleaning epoch")
    if title:
        fig.suptitle(title)
    return fig, counts


def plot_inversions(rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """One row per model (label, mask (1, H, W), pattern (3, H, W), both in [0, 1]): the mask, the pattern and
    mask * pattern side by side (`cleansweep scan`'s inverted_trigger.png)."""
    fig = Figure(figsize=(7.5, 2.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (label, mask, pattern), ax in zip(rows, axes, strict=True):
        panels = [(mask[0], "mask"), (np.transpose(pattern, (1, 2, 0)), "pattern"),
                  (np.transpose(mask * pattern, (1, 2, 0)), "mask x pattern")]
        for a, (image, title) in zip(ax, panels, strict=True):
            a.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            a.set_title(f"{label}: {title}" if title == "mask" else title, fontsize=9)
            a.set_axis_off()
    return fig
