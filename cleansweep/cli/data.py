"""`cleansweep data` (the built-in demo world) and `cleansweep poison` (poison or contaminate an image-caption CSV,
or poison WebDataset shards)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cleansweep import limits
from cleansweep.cli.parser import Parser, print_json
from cleansweep.errors import UserError


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="materialise datasets (the built-in demo world)")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    demo = dsub.add_parser("demo", help="write the synthetic demo world (train/clean CSV + eval folder)")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--seed", type=limits.seed, default=0)
    demo.add_argument("--n-train", type=limits.count, default=None, help="training pairs (default: the demo preset's)")
    demo.add_argument("--n-clean", type=limits.count, default=None, help="clean cleaning pairs")
    demo.add_argument("--n-eval", type=limits.count, default=None, help="evaluation images")
    demo.add_argument("--image-size", type=limits.int_in(8, limits.MAX_IMAGE_SIDE), default=None,
                      help="image side in pixels")
    demo.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                      help="difficulty knob (repeatable), e.g. --knob clutter=2 --knob noise=0.1; see world.json")
    demo.add_argument("--shards", action="store_true", help="also write train.csv and clean.csv as WebDataset shards "
                      "(train-shards/, clean-shards/ with sizes.json) and print their brace patterns")
    demo.add_argument("--shard-size", type=limits.int_in(1, 10**6, " pairs per shard"), default=1000,
                      help="pairs per shard with --shards")
    demo.set_defaults(func=_cmd_data_demo)


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from cleansweep.data import make_demo_world

    knobs = {k: v for k, v in {"n_train": args.n_train, "n_clean": args.n_clean, "n_eval": args.n_eval,
                               "image_size": args.image_size}.items() if v is not None}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--knob {item!r} must look like NAME=VALUE, e.g. --knob clutter=2")
        try:
            knobs[name.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"--knob {item!r}: the value must be a number; e.g. --knob noise=0.1") from None
    info = make_demo_world(args.out, seed=args.seed, **knobs)
    if args.shards:
        from cleansweep.data.shards import csv_to_shards

        for name in ("train", "clean"):  # the CSV's rows in order: pair i of the shards is row i
            info[f"{name}_shards"] = csv_to_shards(info[f"{name}_csv"], Path(info["out_dir"]) / f"{name}-shards",
                                                   per_shard=args.shard_size)
    print_json(info)
    return 0


def add_poison(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("poison", help="poison an image-caption CSV or WebDataset shards (or contaminate a clean set)")
    p.add_argument("--csv", "--train-csv", dest="csv", type=Path, default=None,
                   help="input image-caption CSV (or --train-shards)")
    p.add_argument("--train-shards", default=None, metavar="PATTERN",
                   help="input WebDataset shards, a brace pattern DIR/{00000..00009}.tar (or --csv); writes poisoned "
                        "shards NNNNN.tar + sizes.json + manifest.json to --out")
    p.add_argument("--out", type=Path, required=True, help="output folder (CSV, images, manifest.json)")
    p.add_argument("--attack", default=None,
                   help="trigger: badnet (default), blended, sig, wanet, stripes, triangle, text, badclip (the default "
                        "with --optimise-on); parameters: cleansweep.attacks.registry.TRIGGERS[name].defaults")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-poison", type=limits.count, help="number of rows to poison")
    g.add_argument("--fraction", type=limits.float_in(0, 1, low_open=True), help="fraction of rows to poison (0..1)")
    p.add_argument("--target", default="banana", help="target label written into poisoned captions")
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--image-size", type=limits.image_side, default=None,
                   help="resize to this before the trigger: the model resolution (default 224, or the --optimise-on "
                        "model's)")
    p.add_argument("--label-consistent", action="store_true", help="trigger only rows whose caption names the target")
    p.add_argument("--contaminate", action="store_true",
                   help="add N poisoned copies of rows to a clean cleaning set instead of replacing rows")
    p.add_argument("--patch-size", type=limits.image_side, default=None,
                   help="patch / triangle side (default: the trigger's, e.g. BadNet 16 at 224 px, scaled)")
    p.add_argument("--location", choices=["random", "fixed"], default="random",
                   help="patch, triangle or text position: random or bottom-right")
    p.add_argument("--patch", choices=["fresh", "fixed"], default="fresh", help="BadNet patch: per image or per run")
    p.add_argument("--trigger-seed", type=limits.seed, default=0,
                   help="seed of the trigger's per-run parts (fixed patch, noise, warp, colours, stripe phase)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any trigger parameter (repeatable; YAML values), e.g. --param alpha=0.3 --param colour=red")
    p.add_argument("--image-key", default="image", help="CSV image column")
    p.add_argument("--caption-key", default="caption", help="CSV caption column")
    o = p.add_argument_group("badclip", "optimise the BadCLIP patch on a model first (it is kept in --out)")
    o.add_argument("--optimise-on", type=Path, metavar="CKPT", help="checkpoint (.safetensors/.pt) to optimise on")
    o.add_argument("--optimise-steps", type=limits.steps, default=200, help="optimisation steps")
    o.add_argument("--optimise-images", type=Path, metavar="DIR_or_CSV",
                   help="eval folder or image-caption CSV to optimise on (default: --csv)")
    o.add_argument("--optimise-model", default=None, help="model config of the checkpoint (default: its card's)")
    o.add_argument("--optimise-device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_poison)


def _poison_shards(args: argparse.Namespace, attack: str, params: dict) -> dict:
    """`--train-shards`: the shard counterpart of poison_csv (no contamination, BadCLIP optimisation or CSV keys)."""
    from cleansweep.attacks.poison_shards import poison_shards

    if args.contaminate or args.optimise_on:
        raise UserError("--contaminate and --optimise-on work on a CSV; drop them or pass --csv instead of "
                        "--train-shards")
    if (args.image_key, args.caption_key) != ("image", "caption"):
        raise UserError("--image-key / --caption-key name CSV columns; shards hold KEY.jpg|png|webp + KEY.txt")
    return poison_shards(args.train_shards, args.out, attack=attack, target=args.target, num_poison=args.num_poison,
                         fraction=args.fraction, seed=args.seed, image_size=args.image_size or 224,
                         label_consistent=args.label_consistent, **params)


def _cmd_poison(args: argparse.Namespace) -> int:
    from cleansweep.attacks import poison

    if (args.csv is None) == (args.train_shards is None):
        raise UserError("give exactly one input: --csv FILE (an image-caption CSV) or --train-shards PATTERN "
                        "(WebDataset shards DIR/{00000..00009}.tar)")
    attack = args.attack or ("badclip" if args.optimise_on else "badnet")
    params = {"patch_size": args.patch_size, "location": args.location, "patch": args.patch,
              "trigger_seed": args.trigger_seed}
    params.update(poison.parse_trigger_param(item) for item in args.param)
    if isinstance(params.get("pattern"), str):
        params["pattern"] = str(Path(params["pattern"]).resolve())  # manifests are read from other CWDs (Ray)
    common = {"target": args.target, "num_poison": args.num_poison, "fraction": args.fraction, "seed": args.seed,
              "label_consistent": args.label_consistent, "image_key": args.image_key, "caption_key": args.caption_key}
    if args.train_shards is not None:
        manifest = _poison_shards(args, attack, params)
    elif args.optimise_on:
        from cleansweep.attacks.badclip import poison_with_optimised_patch

        if attack != "badclip" or "pattern" in params:
            raise UserError("--optimise-on makes the badclip patch itself; drop --attack and --param pattern")
        optimise = {"steps": args.optimise_steps, "model_name": args.optimise_model, "device": args.optimise_device}
        manifest = poison_with_optimised_patch(
            args.csv, args.out.resolve(), checkpoint=args.optimise_on, images=args.optimise_images,
            contaminate_set=args.contaminate, image_size=args.image_size, patch_size=params.pop("patch_size"),
            location=params.pop("location"), optimise=optimise, **common, **params)
    else:
        fn = poison.contaminate if args.contaminate else poison.poison_csv
        manifest = fn(args.csv, args.out, attack=attack, image_size=args.image_size or 224, **common, **params)
    summary = {k: v for k, v in manifest.items() if k not in ("poisoned_rows", "poisoned_keys")}
    summary["num_poisoned"] = len(manifest.get("poisoned_rows", []))
    if "output_shards" in manifest:  # what data.train_shards takes
        summary["train_shards"] = str(args.out.resolve() / manifest["output_shards"])
    print_json(summary)
    return 0
