"""Search efficiency: trial-epochs constrained Optuna + ASHA needs to match an exhaustive grid's best feasible model.

Two real sweeps of CleanCLIP cleaning on the same starting model (the demo preset's poisoned model, built and cached
on first use; `--world tiny` uses a tiny world instead, for a quick smoke run):

1. grid: every (learning rate, SSL weight) of a log-spaced grid, every trial trained for all epochs. Its best feasible
   accuracy (ASR <= threshold, over all evaluations) is the reference; its cost is trials x epochs.
2. Optuna TPE (told the ASR constraint) + ASHA over the same ranges.

Walking Optuna's evaluations in the order they were logged, count the trial-epochs spent until an evaluation is
feasible and within `--tolerance` (1 point) of the grid's best. Figure of merit: that count / the grid's trial-epochs
(target <= 0.2). Every evaluation of both sweeps is read back from MLflow.

    python benchmarks/search_efficiency.py [--world demo|tiny] [--lrs 12] [--ssl 0.5,1,2] [--epochs 8]
                                           [--samples 24] [--seeds 0,1,2] [--workdir DIR]

The paper-shaped grid of benchmarks/README.md (P2): 20 learning rates x SSL weight 1 x 10 epochs, against Optuna
with three sampler seeds (each Optuna sweep is measured against the same grid):

    python benchmarks/search_efficiency.py --lrs 20 --lr-range 2e-4,5e-3 --ssl 1 --epochs 10 --samples 16 \
        --seeds 0,1,2 --grace-period 2 --reduction-factor 3 --startup 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cleansweep import tracking
from cleansweep.sweep import driver
from cleansweep.sweep import space as spaces
from cleansweep.sweep import start as start_model


def tiny_lines(root: Path) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from sweep_overhead import tiny_model

    w, ckpt = tiny_model(root)
    return textwrap.dedent(f"""
        model: {{checkpoint: {ckpt}, name: tiny-rn}}
        data: {{train_csv: {w['clean_csv']}, eval_dir: {w['eval_dir']}, batch_size: 16, eval_batch_size: 64}}
        attack: {{patch_size: 4}}
        """)


def write_space(path: Path, head: str, body: str) -> Path:
    path.write_text(head + textwrap.dedent(body))
    return path


def evaluations(uri: str, name: str) -> pd.DataFrame:
    """Every evaluation of every trial of sweep `name`, with its log time, from MLflow."""
    sweep = tracking.load_sweep(name, uri)
    client = tracking.open_client(uri)
    rows = []
    for run_id, trial_id in zip(sweep.trials["run_id"], sweep.trials["trial_id"], strict=True):
        hist = {key: {m.step: (m.timestamp, m.value) for m in client.get_metric_history(run_id, key)}
                for key in ("zeroshot_top1", "asr_top1", "epoch")}
        for step, (ts, top1) in hist["zeroshot_top1"].items():
            rows.append({"trial_id": trial_id, "step": step, "time": ts, "zeroshot_top1": top1,
                         "asr_top1": hist["asr_top1"][step][1], "epoch": hist["epoch"].get(step, (0, 0.0))[1]})
    return pd.DataFrame(rows).sort_values(["time", "trial_id", "step"], ignore_index=True)


def epochs_to_reach(evals: pd.DataFrame, target: float, threshold: float) -> tuple[float | None, float]:
    """Trial-epochs spent (in log order) until a feasible evaluation reaches `target`; and the total spent."""
    spent, last_epoch = 0.0, {}
    for row in evals.itertuples(index=False):
        spent += max(0.0, row.epoch - last_epoch.get(row.trial_id, 0.0))
        last_epoch[row.trial_id] = row.epoch
        if row.asr_top1 <= threshold and row.zeroshot_top1 >= target:
            return spent, float(sum(last_epoch.values()))
    return None, float(sum(last_epoch.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=["demo", "tiny"], default="demo")
    ap.add_argument("--lrs", type=int, default=12, help="grid learning rates (log-spaced over --lr-range)")
    ap.add_argument("--lr-range", default="2e-4,5e-3")
    ap.add_argument("--ssl", default="0.5,1,2", help="grid SSL weights (Optuna: the same as a choice)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples", type=int, default=24, help="Optuna trials")
    ap.add_argument("--seeds", default="0", help="Optuna sweeps, one per seed (the grid runs once)")
    ap.add_argument("--grid-sweep", default=None, help="reuse this finished grid sweep of --workdir (its name)")
    ap.add_argument("--grace-period", type=int, default=3, help="ASHA grace period (epochs)")
    ap.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor")
    ap.add_argument("--startup", type=int, default=6, help="Optuna's random startup trials")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy gap to the grid's best (1 point)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    root.mkdir(parents=True, exist_ok=True)
    head = "model: {preset: demo, objective: mmcl}\n" if args.world == "demo" else tiny_lines(root)
    lo, hi = (float(x) for x in args.lr_range.split(","))
    lrs = [float(f"{v:.3g}") for v in np.geomspace(lo, hi, args.lrs)]
    ssl = [float(x) for x in args.ssl.split(",")]
    common = f"""
        objective: {{threshold: {args.threshold}}}
        epochs: {args.epochs}
        eval_every: 1
        base: {{method.name: contrastive, method.mmcl_weight: 1}}
        resources: {{cpu: 1}}
        """
    grid = write_space(root / "grid.yaml", head, common + f"""
        space:
          optim.lr: {{grid: {lrs}}}
          method.ssl_weight: {{grid: {ssl}}}
        search: {{algorithm: grid, max_concurrent: 2}}
        scheduler: {{name: none}}
        """)
    stamp = int(time.time())
    work = root / "work"
    t0 = time.monotonic()
    g_cfg = spaces.load(grid)
    if args.grid_sweep:  # a finished grid of the same shape, measured earlier in this workdir
        g = {"tracking_uri": tracking.resolve_tracking_uri(None, work), "name": args.grid_sweep}
    else:
        g = driver.search(g_cfg, start_model.resolve(g_cfg, work), name=f"eff-grid-{stamp}", workdir=work,
                          echo=lambda s: None)
    g_evals = evaluations(g["tracking_uri"], g["name"])
    feasible = g_evals[g_evals["asr_top1"] <= args.threshold]
    grid_epochs = float(g_evals.groupby("trial_id")["epoch"].max().sum())
    result: dict = {"grid_trials": int(g_evals["trial_id"].nunique()), "grid_trial_epochs": grid_epochs,
                    "grid_wall_s": round(time.monotonic() - t0, 1), "target": 0.1,
                    "grid_best_feasible_top1": float(feasible["zeroshot_top1"].max()) if len(feasible) else None,
                    "grid_feasible_trials": int(feasible["trial_id"].nunique()), "optuna": []}
    if feasible.empty:
        result["note"] = "the grid found no feasible evaluation; widen the lr range or add epochs"
        print(json.dumps(result, indent=2))
        return
    for seed in (int(x) for x in args.seeds.split(",")):
        tpe = write_space(root / f"optuna-{seed}.yaml", head, textwrap.dedent(common) + textwrap.dedent(f"""
            seed: {seed}
            space:
              optim.lr: {{loguniform: [{lo}, {hi}]}}
              method.ssl_weight: {{choice: {ssl}}}
            search: {{algorithm: optuna, num_samples: {args.samples}, max_concurrent: 2,
                      n_startup_trials: {args.startup}}}
            scheduler: {{name: asha, grace_period: {args.grace_period}, reduction_factor: {args.reduction_factor}}}
            """))
        result["optuna"].append(optuna_run(tpe, work, f"eff-optuna-{stamp}-s{seed}", seed, grid_epochs,
                                           result["grid_best_feasible_top1"], args))
    print(json.dumps(result, indent=2))


def optuna_run(space_file: Path, work: Path, name: str, seed: int, grid_epochs: float, best: float,
               args: argparse.Namespace) -> dict:
    """One Optuna + ASHA sweep, measured against the grid's best feasible accuracy."""
    t0 = time.monotonic()
    cfg = spaces.load(space_file)
    o = driver.search(cfg, start_model.resolve(cfg, work), name=name, workdir=work, echo=lambda s: None)
    o_evals = evaluations(o["tracking_uri"], o["name"])
    spent, total = epochs_to_reach(o_evals, best - args.tolerance, args.threshold)
    o_feasible = o_evals[o_evals["asr_top1"] <= args.threshold]
    return {"seed": seed, "trials": int(o_evals["trial_id"].nunique()), "wall_s": round(time.monotonic() - t0, 1),
            "best_feasible_top1": float(o_feasible["zeroshot_top1"].max()) if len(o_feasible) else None,
            "trial_epochs_total": total, "trial_epochs_to_reach": spent,
            "fraction_of_grid": None if spent is None else round(spent / grid_epochs, 3)}


if __name__ == "__main__":
    main()
