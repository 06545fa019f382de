"""`cleansweep evaluate` (accuracy and ASR of a checkpoint) and `cleansweep scan` (is this model backdoored?)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from cleansweep import limits
from cleansweep.cli.parser import add_workdir, print_json, workdir_of
from cleansweep.runtime import layout, storage

# str, not Path: Path folds the `//` of a URI (`runtime.storage`).
CHECKPOINT_HELP = (".safetensors or .pt checkpoint (never unpickled as code), or an s3:// / gs:// URI of one or of "
                   "the folder holding model.safetensors")


@contextlib.contextmanager
def local_checkpoint(given: str) -> Iterator[Path]:
    """The checkpoint as a local file for the block: the path itself, or a copy of a URI's weights and card in a temp
    folder removed afterwards (`storage.fetch_checkpoint`)."""
    location = storage.parse_location(given)
    if not storage.is_remote(location):
        yield Path(location)
        return
    storage.check_storage(location)
    staging = storage.local_staging("checkpoint")
    try:
        yield storage.fetch_checkpoint(str(location), staging, layout.MODEL_FILE, "checkpoint")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot accuracy and attack success rate of a checkpoint (JSON)")
    p.add_argument("checkpoint", type=str, help=CHECKPOINT_HELP)
    p.add_argument("--eval-data", type=Path, required=True, help="ImageNet-style folder (one subfolder per class)")
    p.add_argument("--model", default=None, help="model config name (default: from the checkpoint's card)")
    t = p.add_argument_group("trigger", "default: the trigger the checkpoint's card records, or --poison-manifest's; "
                             "a flag given overrides that one setting")
    t.add_argument("--poison-manifest", type=Path, default=None,
                   help="manifest.json (or its folder) from `cleansweep poison` of the model's training data")
    t.add_argument("--attack", default=None, help="trigger name (cleansweep.attacks.registry.TRIGGERS)")
    t.add_argument("--target", default=None, help="target class of the backdoor (e.g. banana)")
    t.add_argument("--patch-size", type=limits.image_side, default=None)
    t.add_argument("--location", choices=["random", "fixed"], default=None)
    t.add_argument("--patch", choices=["fresh", "fixed"], default=None)
    t.add_argument("--trigger-seed", type=limits.seed, default=None, help="seed of the trigger's per-run parts")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other trigger parameter (repeatable), e.g. --param alpha=0.2")
    p.add_argument("--subset", type=limits.count, default=None, help="evaluate a fixed seeded subset of N images")
    p.add_argument("--batch-size", type=limits.batch, default=256)
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cleansweep.attacks.registry import parse_trigger_param
    from cleansweep.evaluate import evaluate_checkpoint

    with local_checkpoint(args.checkpoint) as checkpoint:
        metrics = evaluate_checkpoint(checkpoint, args.eval_data, model_name=args.model, attack=args.attack,
                                      target=args.target, patch_size=args.patch_size, location=args.location,
                                      patch=args.patch, trigger_seed=args.trigger_seed,
                                      params=dict(parse_trigger_param(item) for item in args.param),
                                      manifest=args.poison_manifest, subset=args.subset, batch_size=args.batch_size,
                                      seed=args.seed, device=args.device)
    if storage.is_remote(storage.parse_location(args.checkpoint)):
        metrics["checkpoint"] = str(storage.parse_location(args.checkpoint))  # not the temp copy's path
    print_json(metrics)
    return 0


def add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="is this model backdoored? trigger inversion without knowing the trigger (JSON + "
                       "PNG)")
    p.add_argument("checkpoint", type=str, help=CHECKPOINT_HELP)
    p.add_argument("--eval-data", type=Path, required=True, help="ImageNet-style folder of clean images")
    p.add_argument("--reference", type=Path, default=None, help="a clean model to compare with (same inversion)")
    p.add_argument("--out", type=str, default=None,  # str: Path folds the `//` of an s3:// or gs:// URI
                   help="output folder or s3:// / gs:// URI (default: <workdir>/scans/<checkpoint>)")
    p.add_argument("--model", default=None, help="model config name (default: from the checkpoint's card)")
    p.add_argument("--reference-model", default=None, help="model config of --reference (default: its card's)")
    p.add_argument("--subset", type=limits.int_in(0, limits.MAX_COUNT), default=500,
                   help="clean images used (a seeded subset; 0 = all)")
    p.add_argument("--steps", type=limits.steps, default=300, help="optimisation steps of the mask and pattern")
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_workdir(p)
    p.set_defaults(func=_cmd_scan)


def _cmd_scan(args: argparse.Namespace) -> int:
    from cleansweep.detect.scan import scan_checkpoint

    stem = Path(urlsplit(args.checkpoint).path if storage.is_remote(args.checkpoint) else args.checkpoint).stem
    out = storage.parse_location(args.out) if args.out else workdir_of(args) / "scans" / stem
    storage.check_storage(out)  # before the inversion's minutes, not after
    with local_checkpoint(args.checkpoint) as checkpoint:
        result = scan_checkpoint(checkpoint, args.eval_data, out_dir=out, reference=args.reference,
                                 model_name=args.model, reference_model=args.reference_model,
                                 subset=args.subset or None, steps=args.steps, seed=args.seed, device=args.device)
    print_json(result)
    return 0
