"""Training-step throughput: cleansweep's loop vs a plain open_clip training loop, side by side in one process.

Both train the same architecture from the same initial weights on the same prepared batches (random images and
tokens in memory, so data loading is out of the picture) with the same batch size, AdamW parameter groups, cosine
schedule and logit-scale clamp. cleansweep's side is what a pre-training worker or cleaning trial runs:
`methods.create_task` + `optim.create_optimizer` + `loop.run` (evaluation, reporting and checkpointing switched off,
since they are not per-step costs). The plain side is the loop of open_clip's training script: `model(image, text)`,
`open_clip.ClipLoss`, backward, step, clamp. Repeats alternate between the two so machine noise hits both alike.

    python benchmarks/train_throughput.py [--models tiny-rn,RN50] [--batch-size 64] [--steps 20] [--repeats 5]

Prints, per model, images/s for each (median over repeats) and the ratio cleansweep / plain (target >= 0.97 on
CPU). `--device cuda` runs the same comparison on a GPU; `--amp` adds bf16 autocast there to both loops (the
training forward pass and loss, as `TrainSpec.amp` does; ignored on CPU, as in cleansweep).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import nullcontext

import open_clip
import torch

from cleansweep import loop
from cleansweep.methods import create_task
from cleansweep.methods.contrastive import ContrastiveSpec
from cleansweep.models import create_model
from cleansweep.optim import create_optimizer, lr_at

LR, WD, BETAS, EPS, WARMUP = 1e-3, 0.1, (0.9, 0.999), 1e-8, 5


def prepared_batches(n: int, batch_size: int, image_size: int, context: int, seed: int = 0) -> list[dict]:
    """`n` training batches held in memory (the same tensors feed both loops)."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch_size, 3, image_size, image_size, generator=g),
             "text": torch.randint(1, 49407, (batch_size, context), generator=g),
             "index": torch.arange(batch_size)} for _ in range(n)]


class _Stream(list):
    """A list of batches with the `len()` and `batch_size` a DataLoader has (loop.run needs no more)."""

    def __init__(self, batches: list[dict]):
        super().__init__(batches)
        self.batch_size = batches[0]["image"].shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleansweep_steps(model: torch.nn.Module, batches: list[dict], amp: bool = False) -> float:
    """Seconds for one epoch over `batches` through cleansweep's task + optimizer + loop."""
    task = create_task(ContrastiveSpec(mmcl_weight=1.0, ssl_weight=0.0), model)
    optimizer = create_optimizer(task, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    total = len(batches)

    def lr_fn(step: int) -> float:
        return lr_at(step, base_lr=LR, warmup_steps=WARMUP, total_steps=total, schedule="cosine")

    device = batches[0]["image"].device
    _sync(device)
    start = time.perf_counter()
    loop.run(task, _Stream(batches), optimizer, lr_fn, epochs=1, eval_every_steps=float(total + 1),
             eval_at_start=False, evaluate_fn=lambda: {"zeroshot_top1": 0.0, "asr_top1": 1.0},
             report=lambda metrics, checkpoint: None, device=device, amp=amp)
    _sync(device)
    return time.perf_counter() - start


def plain_open_clip_steps(model: torch.nn.Module, batches: list[dict], amp: bool = False) -> float:
    """Seconds for one epoch over `batches` with open_clip's training-script loop."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD},
         {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS)
    loss_fn = open_clip.ClipLoss()
    total = len(batches)
    model.train()
    device = batches[0]["image"].device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    _sync(device)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if step < WARMUP:
            lr = LR * (step + 1) / WARMUP
        else:
            lr = 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, total - WARMUP))) * LR
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:  # open_clip's script: forward and loss under autocast, backward and step outside
            out = model(batch["image"], batch["text"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    _sync(device)
    return time.perf_counter() - start


def compare(model_name: str, *, batch_size: int, steps: int, repeats: int, device: torch.device,
            amp: bool = False, echo=print) -> dict[str, float]:
    """Median images/s of cleansweep's loop and the plain loop for one model, and their ratio.

    Returns:
        `cleansweep`, `open_clip` (images/s, medians over `repeats`) and `ratio` (cleansweep / open_clip).
    """
    bundle = create_model(model_name, seed=0)
    bundle.model.to(device)
    init = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    context = bundle.model.context_length
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in prepared_batches(steps, batch_size, bundle.image_size, context)]
    plain = open_clip.create_model(model_name, output_dict=True).to(device)
    plain.load_state_dict(init)

    def fresh(model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(init)  # every repeat starts from the same weights
        return model

    # Warm-up (allocator, kernels) outside the timings.
    cleansweep_steps(fresh(bundle.model), batches[:3], amp)
    plain_open_clip_steps(fresh(plain), batches[:3], amp)
    ours, theirs = [], []
    for r in range(repeats):
        pair = [(bundle.model, cleansweep_steps, ours), (plain, plain_open_clip_steps, theirs)]
        for model, fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(len(batches) * batch_size / fn(fresh(model), batches, amp))
        echo(f"{model_name} repeat {r}: cleansweep {ours[-1]:9.2f} img/s   open_clip {theirs[-1]:9.2f} img/s")
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"cleansweep": a, "open_clip": b, "ratio": a / b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-rn", help="comma-separated model names, e.g. tiny-rn,RN50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (the target) or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (both loops)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {name: compare(name, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, device=device,
                             amp=args.amp) for name in args.models.split(",")}
    precision = "bf16 autocast" if args.amp and device.type == "cuda" else "fp32"
    print(f"batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, device {device}, {precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, r in results.items():
        print(f"P1 {name}: cleansweep {r['cleansweep']:.2f} images/s   plain open_clip {r['open_clip']:.2f} images/s"
              f"   ratio {r['ratio']:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
