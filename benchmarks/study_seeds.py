"""`cleansweep study toy` over several seeds: the mean and spread of its Table 2 (README's study table).

Each seed builds its own world, poisons, two pre-trainings (MMCL, MMCL+SSL) and two cleaning sweeps, in its own
workdir (`DIR/seed-N`; a finished study is reused, an interrupted one resumed). Then, per pre-training objective:
mean, standard deviation and range over the seeds of the start (top-1, ASR), the best feasible top-1 and its ASR,
trials feasible (anywhere / at the end), and in how many seeds the best feasible model sits mid-trajectory.

    python benchmarks/study_seeds.py --root DIR [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

NUMBERS = ["start_top1", "start_asr", "best_top1", "best_asr", "best_epoch", "trials_feasible_anywhere",
           "trials_feasible_at_end"]


def run_seed(root: Path, seed: int) -> tuple[pd.DataFrame, float]:
    """Run (or reuse) `cleansweep study toy --seed SEED`; its Table 2 rows and the study's wall seconds."""
    workdir = root / f"seed-{seed}"
    study_json = workdir / "study" / "toy" / "study.json"
    started = time.monotonic()
    if not (study_json.is_file() and json.loads(study_json.read_text()).get("complete")):
        subprocess.run([sys.executable, "-m", "cleansweep", "study", "toy", "--seed", str(seed),
                        "--workdir", str(workdir)], check=True)
    data = json.loads(study_json.read_text())
    rows = pd.DataFrame(data["table2"]).assign(seed=seed)
    seconds = sum(stage["seconds"] for stage in data["stages"].values()) or time.monotonic() - started
    return rows, seconds


def spread_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per objective and number: 'mean +- std (min..max)' over the seeds."""
    out = []
    for objective, group in rows.groupby("objective", sort=False):
        row = {"objective": objective, "seeds": len(group)}
        for col in NUMBERS:
            v = pd.to_numeric(group[col], errors="coerce")
            row[col] = (f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f} ({v.min():.3f}..{v.max():.3f})"
                        if v.notna().any() else "-")
        mid = group["best_mid_trajectory"].dropna()
        row["best_mid_trajectory"] = f"{int(mid.astype(bool).sum())} of {len(mid)}"
        out.append(row)
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="one workdir per seed under it")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    frames, seconds = [], {}
    for seed in (int(s) for s in args.seeds.split(",")):
        rows, seconds[seed] = run_seed(args.root, seed)
        frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    cols = ["seed", "objective", "pretrain_epoch", *NUMBERS, "best_mid_trajectory", "trials"]
    print(rows[[c for c in cols if c in rows]].to_markdown(index=False, floatfmt=".3f"))
    print()
    print(spread_table(rows).to_markdown(index=False))
    print("\nstudy wall seconds per seed:", {k: round(v) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
