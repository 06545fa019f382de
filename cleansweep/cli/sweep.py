"""`cleansweep search` (a cleaning sweep), `results` (its leaderboard) and `report` (its figures and tables)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cleansweep import limits
from cleansweep.cli.parser import add_tracking_uri, add_workdir, tracking_store, workdir_of
from cleansweep.runtime import layout, storage


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="cleaning sweep on Ray Tune + Optuna: max zero-shot top-1 s.t. ASR <= threshold")
    p.add_argument("space", type=Path, help="search-space YAML (see search_spaces/)")
    p.add_argument("--name", default=None, help="sweep name (default: the YAML's name, else its file stem)")
    # str, not Path: Path folds the `//` of a URI; `storage.parse_location` makes a local one a Path.
    p.add_argument("--storage-path", type=str, default=None,
                   help="Tune storage: a folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (default: <workdir>/sweeps)")
    p.add_argument("--num-samples", type=limits.count, default=None, help="trials (optuna/random) or grid repeats")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep of this --name")
    add_workdir(p, "cache, sweeps and MLflow database (default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs)")
    p.add_argument("--top-k", type=limits.count, default=10, help="rows of the leaderboard printed at the end")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from cleansweep.methods import list_methods
    from cleansweep.sweep import space as spaces

    cfg = spaces.load(args.space, known_methods=list_methods())
    if args.num_samples is not None:  # grid repeats count toward search.max_grid_points too
        search_spec = cfg.search.model_copy(update={"num_samples": args.num_samples})
        spaces.check_grid_size(cfg.model_copy(update={"search": search_spec}), f"{args.space} with --num-samples")
    from cleansweep.results import report
    from cleansweep.sweep import delivery, names
    from cleansweep.sweep import driver as search
    from cleansweep.sweep import start as start_model

    name = args.name or cfg.name or args.space.stem
    workdir = workdir_of(args)
    # Everything that can be refused is refused here, before a model is pre-trained or Ray starts.
    storage_path = storage.parse_location(args.storage_path) if args.storage_path is not None else None
    sweep_dir = search.sweep_location(cfg, name, workdir, storage_path)
    storage.check_storage(sweep_dir)  # credentials, endpoint and bucket: one line now, not a Ray traceback later
    names.check_sweep_name(name, sweep_dir, resume=args.resume)
    tracking_store(cfg.mlflow.tracking_uri, workdir)
    start = start_model.resolve(cfg, workdir)
    out = search.search(cfg, start, name=name, workdir=workdir, space_file=args.space,
                        storage_path=storage_path, num_samples=args.num_samples, address=args.address,
                        resume=args.resume)
    print(report.format_leaderboard(out["leaderboard"], "table", args.top_k))
    registered = f"; best model registered as {out['best_model']['name']} v{out['best_model']['version']}" \
        if out.get("best_model") else ""
    print(f"sweep {name}: {len(out['leaderboard'])} trials in {out['seconds'] / 60:.1f} min; {out['sweep_dir']}; "
          f"MLflow parent run {out['parent_run_id']} at {out['tracking_uri']}{registered}")
    if out.get("best_model_problem"):  # the sweep ran but cannot hand over its answer: never exit 0 (delivery.py)
        print(f"error: {out['best_model_problem']}; nothing was registered", file=sys.stderr)
        return delivery.EXIT_BEST_MODEL_LOST
    return 0


def add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="leaderboard of a sweep from MLflow: best feasible trial and the top-k")
    p.add_argument("name", help="sweep name")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--top-k", type=limits.count, default=10, help="rows to show")
    add_tracking_uri(p)
    p.add_argument("--experiment", default=None, help="MLflow experiment holding the sweep (default: all)")
    add_workdir(p, "where the default MLflow database lives")
    p.set_defaults(func=_cmd_results)


def _cmd_results(args: argparse.Namespace) -> int:
    from cleansweep.results import report

    uri = tracking_store(args.tracking_uri, workdir_of(args), must_exist=True)
    board = report.results(args.name, tracking_uri=uri, experiment=args.experiment)
    print(report.format_leaderboard(board, args.format, args.top_k))
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Pareto plot, trajectories, Table 2 and stopping analysis of a sweep (MLflow)")
    p.add_argument("name", help="sweep name (the parent run's cleansweep.sweep tag)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <workdir>/reports/NAME)")
    add_tracking_uri(p)
    p.add_argument("--experiment", default=None, help="MLflow experiment holding the sweep (default: all)")
    p.add_argument("--threshold", type=limits.fraction, default=None,
                   help="ASR threshold of a successful cleaning, 0..1 (default: the sweep's own, else 0.05)")
    p.add_argument("--no-log", action="store_true", help="do not upload the files to the sweep's parent run")
    add_workdir(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from cleansweep.results import report

    workdir = workdir_of(args)
    uri = tracking_store(args.tracking_uri, workdir, must_exist=True)
    out = args.out or layout.report_dir(workdir, args.name)
    result = report.report_sweep(args.name, tracking_uri=uri, experiment=args.experiment, out_dir=out,
                                 threshold=args.threshold, log_artifacts=not args.no_log)
    ss = result.stopping_summary.iloc[0]
    print(report.markdown_table(result.summary))
    print(f"\nstopping: {ss['trials_feasible_at_end']} of {ss['trials']} trials end feasible, "
          f"{ss['trials_feasible_anywhere']} are feasible somewhere, {ss['trials_best_mid_trajectory']} have their "
          "best feasible model mid-trajectory")
    logged = "" if args.no_log else " (also logged under report/ on the sweep's parent run)"
    print(f"wrote {len(result.files)} files to {result.out_dir}{logged}")
    return 0
