"""Command line: `cleansweep <command>`. The only place that exits.

`main(argv) -> int` is a plain function (tests call it in-process). Every expected problem surfaces as a
`UserError` and becomes one line on stderr with exit code 2; nothing here prints a traceback for bad input.
Each subcommand has an `_add_<name>(sub)` that declares its flags and a `_cmd_<name>(args)` that calls the library.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from cleansweep import __version__
from cleansweep.errors import UserError


def default_workdir() -> Path:
    """Where presets cache data, models and sweeps: $CLEANSWEEP_WORKDIR or ./cleansweep-runs."""
    return Path(os.environ.get("CLEANSWEEP_WORKDIR", "cleansweep-runs")).resolve()


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code and the one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see '{self.prog} --help'")


# ---------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="materialise datasets (the built-in demo world)")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    demo = dsub.add_parser("demo", help="write the synthetic demo world (train/clean CSV + eval folder)")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-train", type=int, default=None, help="training pairs (default: the demo preset's)")
    demo.add_argument("--n-clean", type=int, default=None, help="clean cleaning pairs")
    demo.add_argument("--n-eval", type=int, default=None, help="evaluation images")
    demo.add_argument("--image-size", type=int, default=None, help="image side in pixels")
    demo.set_defaults(func=_cmd_data_demo)


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from cleansweep.data import make_demo_world

    knobs = {k: v for k, v in {"n_train": args.n_train, "n_clean": args.n_clean, "n_eval": args.n_eval,
                               "image_size": args.image_size}.items() if v is not None}
    info = make_demo_world(args.out, seed=args.seed, **knobs)
    print(json.dumps(info, indent=2, default=str))
    return 0


# -------------------------------------------------------------------------------------------------- poison
def _add_poison(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("poison", help="poison an image-caption CSV (or contaminate a clean set)")
    p.add_argument("--csv", type=Path, required=True, help="input image-caption CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder (CSV, images, manifest.json)")
    p.add_argument("--attack", default="badnet", help="trigger: badnet, blended, sig, wanet")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-poison", type=int, help="number of rows to poison")
    g.add_argument("--fraction", type=float, help="fraction of rows to poison (0..1)")
    p.add_argument("--target", default="banana", help="target label written into poisoned captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224, help="resize to this before the trigger (model resolution)")
    p.add_argument("--label-consistent", action="store_true", help="trigger only rows whose caption names the target")
    p.add_argument("--contaminate", action="store_true",
                   help="add N poisoned copies of rows to a clean cleaning set instead of replacing rows")
    p.add_argument("--patch-size", type=int, default=None, help="BadNet patch side (default 16 at 224 px, scaled)")
    p.add_argument("--location", choices=["random", "fixed"], default="random", help="BadNet patch position")
    p.add_argument("--patch", choices=["fresh", "fixed"], default="fresh", help="BadNet patch: per image or per run")
    p.add_argument("--image-key", default="image", help="CSV image column")
    p.add_argument("--caption-key", default="caption", help="CSV caption column")
    p.set_defaults(func=_cmd_poison)


def _cmd_poison(args: argparse.Namespace) -> int:
    from cleansweep import poison

    params = {"patch_size": args.patch_size, "location": args.location, "patch": args.patch}
    fn = poison.contaminate if args.contaminate else poison.poison_csv
    manifest = fn(args.csv, args.out, attack=args.attack, target=args.target, num_poison=args.num_poison,
                  fraction=args.fraction, seed=args.seed, image_size=args.image_size,
                  label_consistent=args.label_consistent, image_key=args.image_key, caption_key=args.caption_key,
                  **params)
    summary = {k: v for k, v in manifest.items() if k != "poisoned_rows"}
    summary["num_poisoned"] = len(manifest.get("poisoned_rows", []))
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot accuracy and attack success rate of a checkpoint (JSON)")
    p.add_argument("checkpoint", type=Path, help=".safetensors or .pt checkpoint (never unpickled as code)")
    p.add_argument("--eval-data", type=Path, required=True, help="ImageNet-style folder (one subfolder per class)")
    p.add_argument("--model", default=None, help="model config name (default: from the checkpoint's card)")
    p.add_argument("--attack", default="badnet")
    p.add_argument("--target", default="banana")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--subset", type=int, default=None, help="evaluate a fixed seeded subset of N images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cleansweep.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.eval_data, model_name=args.model, attack=args.attack,
                                  target=args.target, patch_size=args.patch_size, subset=args.subset,
                                  batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------- main
_ADDERS = [_add_data, _add_poison, _add_evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleansweep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cleansweep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _ADDERS:
        add(sub)
    return parser


def _sigterm_as_interrupt(signum, frame):  # noqa: ANN001
    # Kubernetes sends SIGTERM; Tune only snapshots on SIGINT, so treat both alike (reliability notes).
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (0 ok, 2 user error, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything reported so far is saved; re-run with --resume to continue", file=sys.stderr)
        return 130


def entrypoint() -> None:
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    sys.exit(main())
