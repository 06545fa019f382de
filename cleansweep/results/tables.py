"""Tables of a sweep's analysis as shown to people: the trials table, a study's side-by-side table, markdown."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from cleansweep.results.analysis import in_rank_order

PERCENT_COLUMNS = ("asr_threshold", "start_top1", "start_asr", "best_top1", "best_asr", "relative_change",
                   "best_feasible_top1", "best_feasible_asr", "last_top1", "last_asr", "top1_given_up",
                   "best_feasible_top1_any", "best_feasible_top1_at_end", "final_top1", "final_asr")


def trials_table(trials: pd.DataFrame, stopping: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """Each trial's status and hyperparameters next to its best feasible and final evaluation, in the order of
    `stopping` (the ranking)."""
    cols = ["trial_id", "status", *(f"params.{p}" for p in params)]
    board = trials[[c for c in cols if c in trials]].rename(columns=lambda c: c.removeprefix("params."))
    keep = stopping[["trial_id", "evaluations", "best_feasible_top1", "best_feasible_asr", "best_feasible_epoch",
                     "last_top1", "last_asr"]].rename(columns={"last_top1": "final_top1", "last_asr": "final_asr"})
    return in_rank_order(board.merge(keep, on="trial_id", how="left"), list(stopping["trial_id"]))


def study_table(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 2 across pre-training objectives: one summary row per objective, `objective` first."""
    rows = [s.assign(objective=label) for label, s in summaries.items()]
    table = pd.concat(rows, ignore_index=True)
    return table[["objective", *[c for c in table.columns if c != "objective"]]]


def markdown_table(frame: pd.DataFrame, *, percent: Sequence[str] = PERCENT_COLUMNS, digits: int = 2) -> str:
    """A GitHub Markdown table; accuracy/ASR fractions shown as percentages, missing values as '-'."""
    shown = frame.copy()
    for col in shown.columns:
        if col in percent:
            shown[col] = [("-" if pd.isna(v) else f"{100 * v:+.{digits}f}%" if col == "relative_change"
                           else f"{100 * v:.{digits}f}%") for v in shown[col]]
        elif pd.api.types.is_float_dtype(shown[col]):
            shown[col] = ["-" if pd.isna(v) else f"{v:g}" for v in shown[col]]
        else:
            shown[col] = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                          for v in shown[col]]
    return shown.to_markdown(index=False)
