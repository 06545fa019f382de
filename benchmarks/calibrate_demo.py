"""Calibrate the demo preset: pre-train tiny CLIPs on the poisoned synthetic world, then CleanCLIP-clean one.

Reproduces the table in `cleansweep/experiments/presets.py`. For each pre-training objective it reports wall time,
zero-shot top-1 and ASR after every epoch; for cleaning a pre-trained model it reports, per learning rate, the
trajectory and the best accuracy among evaluations with ASR <= 5%. Runs through `fit.fit` with a printing report
adapter (no Ray).

    python benchmarks/calibrate_demo.py --workdir /tmp/calib                # the preset as shipped
    python benchmarks/calibrate_demo.py --workdir /tmp/calib --fraction 0.01 --epochs 12 --objectives mmcl+ssl
    python benchmarks/calibrate_demo.py --workdir /tmp/calib --skip-pretrain --clean-lrs 1e-3 3e-3

The table's rows (one workdir per row; at most two at once on 2 cores, each with --threads 1):

    python benchmarks/calibrate_demo.py --workdir W1 --objectives mmcl --threads 1 --clean-lrs 3e-4 1e-3 3e-3
    python benchmarks/calibrate_demo.py --workdir W2 --objectives mmcl+ssl --threads 1 --clean-lrs 3e-4 1e-3 3e-3 \
        --clean-objective mmcl+ssl
    python benchmarks/calibrate_demo.py --workdir W3 --objectives mmcl+ssl --threads 1 --fraction 0.15 --clean-lrs
    # MMCL+SSL at other rates and with the paper's trigger (random position, fresh values)
    python benchmarks/calibrate_demo.py --workdir W4 --objectives mmcl+ssl --threads 1 --fraction 0.025 --clean-lrs
    python benchmarks/calibrate_demo.py --workdir W5 --objectives mmcl+ssl --threads 1 --clean-lrs
    python benchmarks/calibrate_demo.py --workdir W6 --objectives mmcl+ssl --threads 1 --fraction 0.10 \
        --location random --patch fresh --clean-lrs
    # the clean set with every class (the shift's effect): reuse W1's model
    python benchmarks/calibrate_demo.py --workdir W1 --skip-pretrain --knob clean_classes=0 --clean-lrs 1e-3

Timing on a shared machine is noisy: the table prints wall seconds and the thread count used.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cleansweep import fit as session
from cleansweep.attacks.poison import poison_csv
from cleansweep.data import make_demo_world
from cleansweep.experiments import presets
from cleansweep.runtime import layout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    demo = presets.get_preset("demo")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--objectives", nargs="*", default=list(layout.OBJECTIVES), choices=list(layout.OBJECTIVES))
    p.add_argument("--fraction", type=float, default=demo["poison"]["fraction"], help="poisoned fraction of train")
    p.add_argument("--patch-size", type=int, default=8, help="BadNet patch side (--attack badnet)")
    p.add_argument("--patch", default="fixed", choices=["fresh", "fixed"],
                   help="BadNet patch values: fresh per image or one per run")
    p.add_argument("--location", default="fixed", choices=["random", "fixed"],
                   help="BadNet patch position: random or bottom-right")
    p.add_argument("--attack", default=demo["poison"]["attack"], help="trigger (default: the preset's)")
    p.add_argument("--param", action="append", default=[],
                   help="trigger parameter NAME=VALUE (JSON value) of a non-BadNet --attack; repeatable "
                        "(default: the preset's parameters when --attack is the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the preset's)")
    p.add_argument("--n-train", type=int, default=demo["world"]["n_train"])
    p.add_argument("--n-clean", type=int, default=demo["world"]["n_clean"], help="clean pairs for cleaning")
    p.add_argument("--knob", action="append", default=[], help="world knob NAME=VALUE (JSON value); repeatable")
    p.add_argument("--model", default=demo["model"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-pretrain", action="store_true", help="reuse the pre-trained checkpoints in --workdir")
    p.add_argument("--clean-lrs", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--clean-epochs", type=int, default=demo["clean"]["epochs"])
    p.add_argument("--clean-objective", default="mmcl", choices=list(layout.OBJECTIVES),
                   help="which pre-trained model to clean")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_data(args: argparse.Namespace) -> dict[str, str]:
    demo = presets.get_preset("demo")
    w = demo["world"]
    knobs = {**w["knobs"], **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.knob)}}
    tag = f"n{args.n_train}-c{args.n_clean}-" + "-".join(f"{k}{v}" for k, v in sorted(knobs.items()))
    world = make_demo_world(args.workdir / f"world-{tag}", seed=args.seed, n_train=args.n_train,
                            n_clean=args.n_clean, n_eval=w["n_eval"], image_size=w["image_size"], **knobs)
    p = demo["poison"]
    params = trigger_params(args)
    out = args.workdir / (f"poison-{tag}-f{args.fraction}-{args.attack}-"
                          + "-".join(f"{k}{v}" for k, v in sorted(params.items())))
    manifest = poison_csv(world["train_csv"], out, attack=args.attack, target=p["target"], fraction=args.fraction,
                          seed=args.seed, image_size=w["image_size"], **params)
    return {"train_csv": str(out / manifest["output_csv"]), "clean_csv": world["clean_csv"],
            "eval_dir": world["eval_dir"], "num_poison": str(len(manifest.get("poisoned_rows", [])))}


def trigger_params(args: argparse.Namespace) -> dict[str, Any]:
    """The trigger's parameters: BadNet's patch flags, or the --param values of another --attack."""
    if args.attack == "badnet":
        return {"patch_size": args.patch_size, "location": args.location, "patch": args.patch}
    poison = presets.get_preset("demo")["poison"]
    if not args.param and args.attack == poison["attack"]:
        return dict(poison["params"])
    return {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.param)}


def attack_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted TrainSpec overrides that evaluate the ASR with the trigger the data was poisoned with."""
    target = presets.get_preset("demo")["poison"]["target"]
    return {"attack": presets.attack_spec(args.attack, target, trigger_params(args))}


class Printer:
    """Report adapter: prints each evaluation, keeps the history and the last checkpoint's weights."""

    def __init__(self, label: str, keep: Path | None = None) -> None:
        self.label, self.keep, self.history = label, keep, []
        self.start = time.perf_counter()

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        row = {k: metrics.get(k) for k in ("step", "epoch", "zeroshot_top1", "asr_top1", "loss", "lr",
                                           "best_feasible_top1")}
        row["seconds"] = round(time.perf_counter() - self.start, 1)
        self.history.append(row)
        print(f"[{self.label}] step {row['step']:5d} epoch {row['epoch']:5.2f} top1 {row['zeroshot_top1']:.3f} "
              f"asr {row['asr_top1']:.3f} loss {row['loss'] if row['loss'] is None else round(row['loss'], 3)} "
              f"t {row['seconds']}s", flush=True)
        if self.keep is not None and checkpoint_dir:
            shutil.copy(Path(checkpoint_dir) / session.MODEL_FILE, self.keep)


def pretrain(args: argparse.Namespace, paths: dict[str, str], objective: str) -> dict[str, Any]:
    overrides = {"model.name": args.model, "device": args.device, "seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    spec = presets.pretrain_spec("demo", objective, paths, **overrides)
    spec["attack"] = attack_overrides(args)["attack"]
    ckpt = args.workdir / f"pretrained-{objective}.safetensors"  # one configuration per workdir
    printer = Printer(objective, keep=ckpt)
    session.fit(spec, printer)
    last = printer.history[-1]
    return {"objective": objective, "epochs": spec["epochs"], "seconds": last["seconds"],
            "top1": last["zeroshot_top1"], "asr": last["asr_top1"], "checkpoint": str(ckpt),
            "trajectory": [(r["epoch"], round(r["zeroshot_top1"], 3), round(r["asr_top1"], 3))
                           for r in printer.history]}


def clean(args: argparse.Namespace, paths: dict[str, str], lr: float) -> dict[str, Any]:
    init = args.workdir / f"pretrained-{args.clean_objective}.safetensors"
    spec = presets.clean_spec("demo", paths, init, **{"model.name": args.model, "device": args.device,
                                                      "optim.lr": lr, "epochs": args.clean_epochs,
                                                      "seed": args.seed})
    spec["attack"] = attack_overrides(args)["attack"]
    printer = Printer(f"clean lr={lr:g}")
    session.fit(spec, printer)
    h = printer.history
    return {"lr": lr, "seconds": h[-1]["seconds"], "start": (round(h[0]["zeroshot_top1"], 3),
                                                            round(h[0]["asr_top1"], 3)),
            "final": (round(h[-1]["zeroshot_top1"], 3), round(h[-1]["asr_top1"], 3)),
            "min_asr": round(min(r["asr_top1"] for r in h), 3), "best_feasible_top1": h[-1]["best_feasible_top1"],
            "trajectory": [(r["epoch"], round(r["zeroshot_top1"], 3), round(r["asr_top1"], 3)) for r in h]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_data(args)
    print(f"data ready in {time.perf_counter() - t0:.1f}s: {paths['num_poison']} poisons "
          f"({args.fraction:.1%}, {args.attack} {trigger_params(args)}); threads {torch.get_num_threads()}", flush=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "pretrain": [], "clean": []}
    if not args.skip_pretrain:
        for objective in args.objectives:
            results["pretrain"].append(pretrain(args, paths, objective))
    for lr in args.clean_lrs:
        results["clean"].append(clean(args, paths, lr))
    print("\n| poisons | objective | epochs | wall s | top1 | ASR |\n|---|---|---|---|---|---|")
    for r in results["pretrain"]:
        print(f"| {args.fraction:.2%} ({paths['num_poison']}) | {r['objective']} | {r['epochs']} | "
              f"{r['seconds']:.0f} | {r['top1']:.3f} | {r['asr']:.3f} |")
    if results["clean"]:
        print(f"\nCleanCLIP on the {args.clean_objective} model ({args.clean_epochs} epochs, "
              f"{args.n_clean} clean pairs):\n"
              "| lr | wall s | start top1/ASR | final top1/ASR | min ASR | best feasible top1 |\n"
              "|---|---|---|---|---|---|")
        for r in results["clean"]:
            print(f"| {r['lr']:g} | {r['seconds']:.0f} | {r['start'][0]:.3f} / {r['start'][1]:.3f} | "
                  f"{r['final'][0]:.3f} / {r['final'][1]:.3f} | {r['min_asr']:.3f} | {r['best_feasible_top1']:.3f} |")
    out = args.workdir / f"calibration-{int(time.time())}.json"
    out.write_text(json.dumps(results, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                              else str(x)))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
