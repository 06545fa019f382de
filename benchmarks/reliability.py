"""Reliability: faults a sweep meets in real life, and bad inputs refused cleanly, measured as a user meets them.

Everything runs `cleansweep ...` as a user does (a subprocess, `python -m cleansweep`) with real faults (signals to
real processes, a real tmpfs that fills up, a real `mlflow server` stopped and restarted) and counts from what the
sweep leaves behind: the MLflow store, Tune's trial folders and searcher state, the printed leaderboard. Sections
(`--only`, comma-separated; default all):

- kills (reliability_kill.py): `cleansweep search` on a tiny backdoored model, its process group killed with
  SIGKILL at five observable moments, then `--resume`; counts that should all be 0 (completed trials lost,
  duplicate MLflow runs, RUNNING leftovers in MLflow and Optuna, steps logged twice) and whether `cleansweep results`
  and Tune's leaderboard.csv equal a recomputation from the raw MLflow histories.
- nan (reliability_kill.py): some trials diverge; FAILED / FAIL for exactly those, exit 0.
- disk, ctrlc, worker (reliability_faults.py): the disk holding the workdir fills up mid-sweep (a tmpfs), then
  space is freed and `--resume` runs; Ctrl-C (SIGINT to the foreground process group) mid-trial, then `--resume`;
  one trial's worker process is killed with SIGKILL while the sweep goes on.
- mlflow (reliability_mlflow.py): the sweep logs to a real `mlflow server`, which is stopped for --down-minutes
  (longer than the MLflow client's retry window) and restarted on the same port.
- inputs (reliability_inputs.py and its case modules): >= 120 bad inputs (YAML, every numeric flag of every
  subcommand, CSVs, images, checkpoints, evaluation folders, tracking URIs, names, resumes). Each must exit 2 with
  one stderr line `error: <problem>; <fix>`, no traceback, no secret from the file echoed, nothing written.

    python benchmarks/reliability.py [--only kills,nan,disk,ctrlc,worker,mlflow,inputs] [--workdir DIR]
        [--trials 4] [--epochs 2] [--clean-rows 480] [--points 1,2,3,4,5] [--down-minutes 5] [--case-timeout 60]
        [--match TEXT]

Tables are printed as Markdown; the numbers also go to WORKDIR/reliability-<section>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from reliability_common import bench_env

SECTIONS = ["kills", "nan", "disk", "ctrlc", "worker", "mlflow", "inputs"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--trials", type=int, default=4, help="trials per sweep of the fault sections (2 at a time)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs per trial of the fault sections (an evaluation every half epoch)")
    ap.add_argument("--clean-rows", type=int, default=480, help="cleaning pairs per trial epoch (batch 16)")
    ap.add_argument("--points", default="1,2,3,4,5", help="kill points to run, e.g. 1,4")
    ap.add_argument("--down-minutes", type=float, default=5.0,
                    help="how long the MLflow server stays down (default 5: longer than the client's ~4 min of "
                         "retries, so requests do fail)")
    ap.add_argument("--case-timeout", type=float, default=60,
                    help="seconds before a bad-input command that is still running is killed (it was accepted)")
    ap.add_argument("--match", default=None, help="inputs: only the rows whose area or name contains this text")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def run_section(section: str, root: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    shape = {"trials": args.trials, "epochs": args.epochs, "clean_rows": args.clean_rows}
    if section == "inputs":
        from reliability_inputs import run_inputs

        return run_inputs(root, env, timeout=args.case_timeout, match=args.match)
    if section == "nan":
        from reliability_kill import run_nan

        return run_nan(root, env, args.clean_rows)
    if section == "kills":
        from reliability_kill import run_kill

        return run_kill(root, env, [int(p) for p in args.points.split(",")], **shape)
    if section == "mlflow":
        from reliability_mlflow import run_mlflow_down

        return run_mlflow_down(root, env, down_minutes=args.down_minutes, **shape)
    import reliability_faults

    return getattr(reliability_faults, f"run_{section}")(root, env, **shape)


def main() -> None:
    args = parse_args()
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="reliability-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = bench_env(root)
    for section in [s for s in SECTIONS if s in args.only.split(",")]:
        t0 = time.monotonic()
        print(f"\n## {section} (workdir {root})\n", flush=True)
        out = run_section(section, root, env, args)
        out["minutes"] = round((time.monotonic() - t0) / 60, 1)
        (root / f"reliability-{section}.json").write_text(json.dumps(out, indent=2, default=str))
        print(f"\n{section}: {out['minutes']} min", flush=True)


if __name__ == "__main__":
    main()
