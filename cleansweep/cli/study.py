"""`cleansweep study` (the paper's experiment end to end) and `cleansweep matrix` (every attack x every method)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cleansweep import limits
from cleansweep.cli.parser import add_tracking_uri, add_workdir, names_list, tracking_store, workdir_of
from cleansweep.errors import UserError

DEPRECATED_MATRIX = "note: `cleansweep study matrix` is deprecated; run `cleansweep matrix` (same flags)"


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags `study` and `matrix` share: where, which Ray, and the budget overrides."""
    add_workdir(p)
    add_tracking_uri(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--pretrain-epochs", type=limits.steps, default=None,
                   help="override the preset's pre-training epochs")
    p.add_argument("--clean-epochs", type=limits.steps, default=None, help="override the cleaning epochs per trial")
    p.add_argument("--num-samples", type=limits.count, default=None,
                   help="override the trials per sweep (grid: repeats)")


def _add_matrix_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attacks", default=None, help="comma-separated subset of the attacks (default all)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods (default all)")


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """Workers and resources of a study's stages (`experiments.scale.SCALE_KEYS`); default: the study's own."""
    most = limits.MAX_WORKERS
    g = p.add_argument_group("scale", "workers and resources (default: the study's; study.json records the values)")
    g.add_argument("--workers", type=limits.int_in(0, most, " Ray Train workers"), default=None,
                   help="Ray Train workers of pre-training (0: train in the driver process; toy 1, cc3m/cc6m 1)")
    whole_gpu = limits.int_in(0, 1, " (a Ray Train worker gets one whole GPU or none)")
    g.add_argument("--gpus-per-worker", type=whole_gpu, default=None,
                   help="0 or 1 GPU per Ray Train worker (toy 0, cc3m/cc6m 1)")
    g.add_argument("--cpus-per-worker", type=limits.float_in(0, most, low_open=True), default=None,
                   help="CPUs reserved per Ray Train worker (toy 1, cc3m/cc6m 8)")
    g.add_argument("--loader-workers", type=limits.int_in(0, most, " DataLoader workers"), default=None,
                   help="DataLoader worker processes per training process, pre-training and cleaning (toy 0, "
                        "cc3m/cc6m 8)")
    g.add_argument("--trial-cpus", type=limits.float_in(0, most, low_open=True), default=None,
                   help="CPUs per cleaning trial (default: the cleaning space's resources.cpu)")
    g.add_argument("--trial-gpus", type=limits.float_in(0, most), default=None,
                   help="GPUs per cleaning trial, fractions share a GPU (default: the space's resources.gpu)")


def _scale(args: argparse.Namespace) -> dict[str, float | int]:
    """The scale flags given (None = not given)."""
    from cleansweep.experiments.scale import SCALE_KEYS

    return {k: getattr(args, k) for k in SCALE_KEYS if getattr(args, k, None) is not None}


def add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="the paper's experiment: poison, pre-train MMCL and MMCL+SSL, clean both, compare")
    p.add_argument("preset", help="toy (built-in world, CPU), cc3m or cc6m (the paper's settings on your data); "
                   "matrix: deprecated name of `cleansweep matrix`")
    _add_run_flags(p)
    p.add_argument("--train-csv", type=Path, default=None, help="poisoned pre-training image-caption CSV (cc3m/cc6m)")
    p.add_argument("--clean-csv", type=Path, default=None, help="clean cleaning image-caption CSV (cc3m/cc6m)")
    p.add_argument("--eval-dir", type=Path, default=None, help="ImageNet-style validation folder (cc3m/cc6m)")
    p.add_argument("--seed", type=limits.seed, default=0, help="seed of the built-in world and its poisoning")
    _add_scale_flags(p)
    _add_matrix_flags(p)  # for `study matrix` only
    p.set_defaults(func=_cmd_study)


def add_matrix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("matrix", help="every attack x every cleaning method on the built-in world: which method "
                       "removes which backdoor")
    _add_run_flags(p)
    _add_matrix_flags(p)
    p.set_defaults(func=_cmd_matrix)


def _cmd_study(args: argparse.Namespace) -> int:
    from cleansweep.experiments.study import run_study
    from cleansweep.results import report

    if args.preset == "matrix":
        print(DEPRECATED_MATRIX, file=sys.stderr)
        if _scale(args):
            raise UserError("--workers / --gpus-per-worker / --cpus-per-worker / --loader-workers / --trial-cpus / "
                            "--trial-gpus belong to the toy, cc3m and cc6m studies; drop them for the matrix")
        return _cmd_matrix(args)
    tracking_store(args.tracking_uri, workdir_of(args))
    if args.attacks or args.methods:
        raise UserError("--attacks / --methods belong to `cleansweep matrix`; drop them for this study")
    paths = {"train_csv": args.train_csv, "clean_csv": args.clean_csv, "eval_dir": args.eval_dir}
    pre = {"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}
    sweep = {k: v for k, v in {"epochs": args.clean_epochs, "search.num_samples": args.num_samples}.items() if v}
    result = run_study(args.preset, workdir=workdir_of(args), paths={k: v for k, v in paths.items() if v},
                       tracking_uri=args.tracking_uri, pretrain_overrides=pre, sweep_overrides=sweep, seed=args.seed,
                       address=args.address, scale=_scale(args))
    print(report.markdown_table(result["table2"]))
    print(f"\nwrote {result['out_dir']}: table2.csv/.md, figure2.png, study.json, one report per objective")
    return 0


def _cmd_matrix(args: argparse.Namespace) -> int:
    from cleansweep.experiments.matrix import MATRIX_METHODS, markdown_matrix, run_matrix

    tracking_store(args.tracking_uri, workdir_of(args))
    kwargs = {k: v for k, v in {"clean_epochs": args.clean_epochs, "num_samples": args.num_samples}.items() if v}
    result = run_matrix(workdir=workdir_of(args), attacks=names_list(args.attacks), methods=names_list(args.methods),
                        tracking_uri=args.tracking_uri, pretrain_epochs=args.pretrain_epochs, address=args.address,
                        **kwargs)
    print(markdown_matrix(result["table"], names_list(args.methods) or list(MATRIX_METHODS)))
    print(f"\nwrote {result['out_dir']}: matrix.csv/.md, calibration.csv, matrix.json")
    return 0
