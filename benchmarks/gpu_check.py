"""Steps of `benchmarks/gpu_check.sh` that need Python: the shared-GPU sweep, evaluation throughput, and the
summary of the `nvidia-smi` samples. Each prints its report lines (they start with SWEEP, EVAL or GPU).

    python benchmarks/gpu_check.py sweep WORKDIR --model RN50 --trials 4 --gpu 0.25 --device cuda
    python benchmarks/gpu_check.py eval --model RN50 --images 512 --device cuda
    python benchmarks/gpu_check.py util SAMPLES.csv
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch


def sweep(workdir: Path, *, model: str, trials: int, gpu: float, cpu: float, device: str, pairs: int, batch: int,
          image_size: int, classes: int, eval_images: int) -> None:
    """`cleansweep search` with `trials` trials at once, each asking for `gpu` of a GPU (Ray packs 1/gpu of them
    onto one device), cleaning a random-init `model` on `pairs` synthetic pairs; prints one SWEEP line."""
    from cleansweep.data import make_demo_world
    from cleansweep.models import create_model, save_checkpoint

    world = make_demo_world(workdir / "world", seed=0, n_train=classes, n_clean=pairs, n_eval=eval_images,
                            image_size=image_size, num_classes=classes)
    checkpoint = save_checkpoint(workdir / "start" / "model.safetensors", create_model(model, seed=0).model, {})
    space = workdir / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: {model}}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: {batch},
                eval_batch_size: {eval_images}}}
        attack: {{name: badnet, location: fixed, patch: fixed}}
        epochs: 2
        eval_every: 1
        objective: {{threshold: 1.0}}
        base: {{optim.warmup_steps: 1, method.ssl_weight: 0.0, device: {device}}}
        space:
          optim.lr: {{loguniform: [1.0e-5, 1.0e-4]}}
        search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: {trials}}}
        resources: {{cpu: {cpu}, gpu: {gpu}}}
        """))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cleansweep", "search", str(space), "--name", "gpu-check",
                           "--workdir", str(workdir)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (workdir / "search.log").write_text(proc.stdout + proc.stderr)
    finished = _finished_trials(workdir)
    print(f"SWEEP {model} {image_size} px: {finished} of {trials} trials FINISHED at resources.gpu {gpu} "
          f"(device {device}), {seconds:.1f} s, exit {proc.returncode}; log {workdir / 'search.log'}")
    if proc.returncode != 0:
        sys.exit(1)


def _finished_trials(workdir: Path) -> int:
    import pandas as pd

    board = workdir / "sweeps" / "gpu-check" / "leaderboard.csv"
    return int((pd.read_csv(board)["status"] == "FINISHED").sum()) if board.is_file() else 0


def eval_throughput(*, model: str, images: int, batch: int, device: str, repeats: int) -> None:
    """Images/s of `cleansweep.evaluate.evaluate` (top-1 + ASR pass) with amp off and on, on synthetic images;
    prints one EVAL line per precision and the speed-up."""
    from cleansweep.attacks.registry import attack_trigger
    from cleansweep.config import AttackSpec
    from cleansweep.evaluate import evaluate, zeroshot_classifier

    bundle = create_bundle(model, device)
    g = torch.Generator().manual_seed(0)
    size = bundle.image_size
    loader = [(torch.rand(min(batch, images - i), 3, size, size, generator=g),
               torch.randint(0, 10, (min(batch, images - i),), generator=g)) for i in range(0, images, batch)]
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, [f"class {c}" for c in range(10)],
                                     ["a photo of a {}."], device)
    trigger = attack_trigger(AttackSpec(name="badnet"), size)
    speeds = {}
    for amp in (False, True):
        evaluate(bundle.model, loader[:1], classifier, normalize=(bundle.mean, bundle.std), target_index=0,
                 trigger=trigger, device=device, amp=amp)  # warm-up: kernels, autocast caches
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = evaluate(bundle.model, loader, classifier, normalize=(bundle.mean, bundle.std), target_index=0,
                           trigger=trigger, device=device, amp=amp)
            _sync(device)
            times.append(time.perf_counter() - start)
        speeds[amp] = out["num_images"] / statistics.median(times)
        label = "bf16" if amp and torch.device(device).type == "cuda" else "fp32"
        print(f"EVAL {model} amp={amp} ({label}): {speeds[amp]:.1f} images/s over {out['num_images']} images "
              f"(+ their triggered copies), batch {batch}, median of {repeats}")
    print(f"EVAL {model} speed-up amp=True / amp=False: {speeds[True] / speeds[False]:.2f}")


def create_bundle(model: str, device: str):
    """The model bundle on `device` (random init: throughput does not depend on the weights)."""
    from cleansweep.models import create_model

    bundle = create_model(model, seed=0)
    bundle.model.to(device)
    return bundle


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def util_summary(samples: Path) -> None:
    """Mean and max GPU utilisation and max memory of `nvidia-smi --query-gpu=utilization.gpu,memory.used
    --format=csv -l 1` output (header and unit suffixes tolerated); prints one GPU line."""
    util, memory = [], []
    for line in samples.read_text().splitlines():
        parts = [p.strip().split()[0] for p in line.split(",") if p.strip()]
        if len(parts) == 2 and all(p.replace(".", "", 1).isdigit() for p in parts):
            util.append(float(parts[0]))
            memory.append(float(parts[1]))
    if not util:
        print(f"GPU utilisation: no samples in {samples}")
        return
    print(f"GPU utilisation during the sweep: mean {statistics.fmean(util):.1f}% max {max(util):.0f}%, memory "
          f"max {max(memory):.0f} MiB ({len(util)} samples, 1 s apart)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("workdir", type=Path)
    s.add_argument("--model", default="RN50")
    s.add_argument("--trials", type=int, default=4)
    s.add_argument("--gpu", type=float, default=0.25)
    s.add_argument("--cpu", type=float, default=2.0)
    s.add_argument("--device", default="cuda")
    s.add_argument("--pairs", type=int, default=512)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--eval-images", type=int, default=200)
    e = sub.add_parser("eval")
    e.add_argument("--model", default="RN50")
    e.add_argument("--images", type=int, default=512)
    e.add_argument("--batch", type=int, default=128)
    e.add_argument("--device", default="cuda")
    e.add_argument("--repeats", type=int, default=3)
    u = sub.add_parser("util")
    u.add_argument("samples", type=Path)
    args = parser.parse_args()
    if args.step == "sweep":
        sweep(args.workdir, model=args.model, trials=args.trials, gpu=args.gpu, cpu=args.cpu, device=args.device,
              pairs=args.pairs, batch=args.batch, image_size=args.image_size, classes=args.classes,
              eval_images=args.eval_images)
    elif args.step == "eval":
        eval_throughput(model=args.model, images=args.images, batch=args.batch, device=args.device,
                        repeats=args.repeats)
    else:
        util_summary(args.samples)


if __name__ == "__main__":
    main()
