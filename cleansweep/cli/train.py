"""`cleansweep pretrain`: its flags, handed to `pretrain.options.pretrain_config`, then `pretrain.driver.pretrain`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cleansweep import limits
from cleansweep.cli.parser import add_workdir, tracking_store, workdir_of
from cleansweep.runtime import layout, storage

if TYPE_CHECKING:  # imported when used: `cleansweep --help` stays quick
    from cleansweep.train_config import PretrainConfig

# Flag -> dotted key in PretrainConfig (flags override the YAML, which overrides the preset).
FLAG_KEYS = {
    "name": "name", "model": "train.model.name", "init": "train.model.init", "train_csv": "train.data.train_csv",
    "eval_data": "train.data.eval_dir", "attack": "train.attack.name", "target": "train.attack.target",
    "epochs": "train.epochs", "batch_size": "train.data.batch_size", "lr": "train.optim.lr",
    "warmup_steps": "train.optim.warmup_steps", "eval_every": "train.eval_every", "seed": "train.seed",
    "num_workers": "ray.num_workers", "use_gpu": "ray.use_gpu", "cpus_per_worker": "ray.cpus_per_worker",
    "address": "ray.address", "selection": "selection", "reference_top1": "reference_top1",
    "storage_path": "storage_path",
}


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train CLIP on (poisoned) data with Ray Train, logging to MLflow")
    p.add_argument("config", nargs="?", type=Path, help="PretrainConfig YAML (flags override it)")
    p.add_argument("--preset", help="demo: build + poison the synthetic world if absent, then train; cc3m, cc6m: the "
                   "paper's settings on your --train-csv/--eval-data")
    p.add_argument("--objective", choices=sorted(layout.OBJECTIVES), help="pre-training loss: mmcl or mmcl+ssl")
    p.add_argument("--name", help="run name: folder <workdir>/pretrain/NAME (or --storage-path/NAME) and the MLflow "
                   "run name")
    p.add_argument("--model", help="model config name (cleansweep.models.list_models())")
    p.add_argument("--train-csv", type=Path, help="image-caption CSV to train on")
    p.add_argument("--eval-data", type=Path, help="ImageNet-style evaluation folder")
    p.add_argument("--attack", help="trigger for the ASR evaluation: badnet, blended, sig, wanet")
    p.add_argument("--target", help="target class name of the backdoor")
    p.add_argument("--init", type=Path, help="checkpoint to start from (.safetensors or .pt)")
    # 0 epochs would "pre-train" nothing and select the untrained model: `cleansweep evaluate` measures a model.
    p.add_argument("--epochs", type=limits.int_in(1, limits.MAX_STEPS, " (to measure a model without training: "
                                                 "cleansweep evaluate CKPT)"))
    p.add_argument("--batch-size", type=limits.int_in(2, limits.MAX_BATCH),
                   help="global batch size (split across workers)")
    p.add_argument("--lr", type=limits.float_in(0, low_open=True))
    p.add_argument("--warmup-steps", type=limits.int_in(0, limits.MAX_COUNT))
    p.add_argument("--eval-every", type=limits.float_in(0, limits.MAX_STEPS, low_open=True),
                   help="evaluate every this many epochs (1/3 = the short paper)")
    p.add_argument("--seed", type=limits.seed)
    p.add_argument("--num-workers", type=limits.int_in(0, limits.MAX_WORKERS),
                   help="Ray Train workers (0 = run in this process)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=limits.float_in(0, limits.MAX_WORKERS, low_open=True))
    p.add_argument("--address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--selection", choices=["best_top1", "closest_top1", "last"],
                   help="checkpoint handed to cleaning: best accuracy, accuracy closest to --reference-top1, last")
    p.add_argument("--reference-top1", type=limits.fraction, help="target accuracy for --selection closest_top1")
    # str, not Path: Path folds the `//` of a URI (`runtime.storage`).
    p.add_argument("--storage-path", type=str, help="where run NAME lives: a folder, s3://BUCKET/PREFIX or "
                   "gs://BUCKET/PREFIX (default: <workdir>/pretrain; a URI needs --num-workers 1 or more)")
    p.add_argument("--resume", action="store_true", help="continue run NAME from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set train.optim.weight_decay=0.2 (repeatable; YAML values)")
    add_workdir(p)
    p.set_defaults(func=_cmd_pretrain)


def pretrain_config(args: argparse.Namespace, workdir: Path) -> PretrainConfig:
    """The run's PretrainConfig from the parsed flags (the demo preset's data is built here when needed)."""
    from cleansweep.pretrain.options import pretrain_config as build

    return build(workdir, preset=args.preset, objective=args.objective, config_file=args.config,
                 flags={key: getattr(args, attr) for attr, key in FLAG_KEYS.items()}, sets=args.set)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    workdir = workdir_of(args)
    cfg = pretrain_config(args, workdir)
    storage.check_storage(cfg.storage_path)  # one line now, before the MLflow store or Ray
    tracking_store(cfg.mlflow.tracking_uri, workdir)
    from cleansweep.pretrain.driver import pretrain

    summary = pretrain(cfg, workdir=workdir, resume=args.resume)
    asr = summary.get("asr_top1")
    print(f"selected checkpoint: {summary['selected']}")
    print(f"  step {summary['step']:.0f} (epoch {summary['epoch']:.2f}), zeroshot_top1 {summary['zeroshot_top1']:.4f}, "
          f"asr_top1 {'n/a' if asr is None else f'{asr:.4f}'}, {summary['minutes']:.1f} min; "
          f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")
    return 0
