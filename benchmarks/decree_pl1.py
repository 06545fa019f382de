"""DECREE's PL1-norm of clean and backdoored tiny CLIPs at 32 px: which threshold separates them here.

For each seed: a tiny-rn pre-trained on the demo world (512 pairs, 6 classes, 32 px) with 20% BadNet poisons (8 px
fixed corner patch, target banana; the evaluation with the highest ASR kept, as tests/conftest.py's
`tiny_checkpoint`) and its clean twin (same seed, the unpoisoned pairs, the last evaluation kept); then
`cleansweep.detect.scan.scan_model` with the official DECREE settings for 32 px encoders (lr 0.5, lambda 1e-3,
threshold 0.99, batch 128, up to 1000 steps with the official early stop; the 36 evaluation images fit one batch,
so an epoch is one step, where the official CIFAR10 run has 8 over its 1,000 images). Reproduces the table in
docs/fidelity.md (DECREE):

    python benchmarks/decree_pl1.py --workdir /tmp/decree --kind bad --seeds 0 1 2 --threads 1 &
    python benchmarks/decree_pl1.py --workdir /tmp/decree --kind clean --seeds 0 1 2 --threads 1
    python benchmarks/decree_pl1.py --workdir /tmp/decree --table

Each (kind, seed) writes `<workdir>/<kind>-<seed>.json`; `--table` prints the rows, the PL1 ranges, the paper's
PL1 < 0.1 rule's hits, the backdoored / clean ratios, and the thresholds that separate the two kinds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cleansweep import fit
from cleansweep.attacks.poison import poison_csv
from cleansweep.data import EvalFolder, make_demo_world
from cleansweep.detect import inversion, scan

ASR = "asr_top1"
PATCH = 8
SCAN = {"steps": 1000, "lr": 0.5, "batch_size": 128, "threshold": 0.99, "init_weight": 1e-3}


def pretrain(workdir: Path, kind: str, seed: int) -> tuple[Path, dict[str, Any], Path]:
    """Pre-train one tiny-rn (`kind` bad: poisoned pairs, best-ASR evaluation kept; clean: last one kept)."""
    world = make_demo_world(workdir / f"world-{kind}-{seed}", seed=0, n_train=512, n_clean=32, n_eval=36,
                            image_size=32, num_classes=6)
    train_csv = world["train_csv"]
    if kind == "bad":
        manifest = poison_csv(train_csv, workdir / f"poisoned-{seed}", attack="badnet", target="banana",
                              fraction=0.2, seed=seed, image_size=32, patch_size=PATCH, location="fixed",
                              patch="fixed")
        train_csv = str(workdir / f"poisoned-{seed}" / manifest["output_csv"])
    spec = {"model": {"name": "tiny-rn"}, "epochs": 6, "device": "cpu", "seed": seed,
            "attack": {"patch_size": PATCH, "location": "fixed", "patch": "fixed"},
            "data": {"train_csv": train_csv, "eval_dir": world["eval_dir"], "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    out, kept = workdir / f"model-{kind}-{seed}", {}

    def report(metrics: dict[str, Any], checkpoint_dir: Any) -> None:
        if checkpoint_dir is not None and (kind == "clean" or metrics[ASR] > kept.get(ASR, -1.0)):
            shutil.copytree(checkpoint_dir, out, dirs_exist_ok=True)
            kept.update(metrics)

    fit.fit(spec, report)
    return out / "model.safetensors", kept, Path(world["eval_dir"])


def measure(workdir: Path, kind: str, seed: int) -> dict[str, Any]:
    """Pre-train and scan one model; the row (PL1, reached, steps, target, pre-training metrics, seconds)."""
    start = time.time()
    checkpoint, metrics, eval_dir = pretrain(workdir, kind, seed)
    trained = time.time()
    bundle = scan.load_model(checkpoint, device="cpu")
    dataset = EvalFolder(eval_dir, bundle.image_size)
    report, inv = scan.scan_model(bundle, dataset, {**SCAN, "seed": seed}, torch.device("cpu"))
    return {"kind": kind, "seed": seed, "pl1_norm": inv.pl1_norm, "reached": inv.reached, "step": inv.step,
            "epochs": inv.epochs, "stopped_early": inv.stopped_early, "similarity": inv.similarity,
            "clean_similarity": inv.clean_similarity, "suspected_target": report["suspected_target"],
            "target_share": report["target_share"], "pretrain_top1": metrics.get("zeroshot_top1"),
            "pretrain_asr": metrics.get(ASR), "pretrain_s": round(trained - start, 1),
            "scan_s": round(time.time() - trained, 1), "settings": SCAN}


def table(workdir: Path) -> None:
    """Print the rows, the PL1 ranges, the paper's rule and the separating thresholds."""
    rows = [json.loads(p.read_text()) for p in sorted(workdir.glob("*-[0-9]*.json"))]
    print("| kind | seed | PL1 | reached | kept at / steps | early stop | target (share) | pre-train top1 / ASR |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['seed']} | {r['pl1_norm']:.4f} | {r['reached']} | {r['step'] + 1}/{r['epochs']} | "
              f"{r['stopped_early']} | {r['suspected_target']} ({r['target_share']:.2f}) | "
              f"{r['pretrain_top1']:.2f} / {r['pretrain_asr']:.2f} |")
    pl1 = {k: sorted(r["pl1_norm"] for r in rows if r["kind"] == k) for k in ("bad", "clean")}
    for kind, values in pl1.items():
        flagged = sum(v < inversion.PL1_THRESHOLD for v in values)
        print(f"{kind}: PL1 {min(values):.4f}-{max(values):.4f}; flagged by the paper's PL1 < 0.1: "
              f"{flagged}/{len(values)}")
    if pl1["bad"] and pl1["clean"] and max(pl1["bad"]) < min(pl1["clean"]):
        print(f"separating PL1 thresholds: ({max(pl1['bad']):.4f}, {min(pl1['clean']):.4f})")
    else:
        print("no PL1 threshold separates the two kinds")
    ratios = [b / c for b, c in itertools.product(pl1["bad"], pl1["clean"])]
    clean_pairs = [a / b for a, b in itertools.permutations(pl1["clean"], 2)]
    if ratios:
        print(f"bad / clean ratios {min(ratios):.3f}-{max(ratios):.3f}; clean / clean "
              f"{min(clean_pairs, default=float('nan')):.3f}-{max(clean_pairs, default=float('nan')):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--kind", choices=["bad", "clean"], default="bad")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the table of the rows written")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.table:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            row = measure(args.workdir, args.kind, seed)
            (args.workdir / f"{args.kind}-{seed}.json").write_text(json.dumps(row, indent=1))
            print(json.dumps(row), flush=True)
    table(args.workdir)


if __name__ == "__main__":
    main()
