"""The ONE training loop: pre-training (Ray Train workers) and every cleaning trial (Ray Tune) run it.

It imports no driver: evaluation, reporting and checkpoint writing arrive as callables. At every evaluation it
reports ``evaluate_fn()`` merged with the mean loss parts since the previous evaluation, ``lr``, ``epoch`` (float),
``step`` and the running best-feasible keys (`objective.BestFeasible`), together with a temporary checkpoint
directory written by ``save_state`` (plus ``loop.json``: the step and the tracker state), valid during the call only,
or ``None`` at evaluations the checkpoint policy skips (`needs_checkpoint`).
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from cleansweep.objective import BestFeasible

LOOP_STATE = "loop.json"
Report = Callable[[dict[str, Any], str | None], None]
CheckpointPolicy = Literal["every", "needed"]
SaveState = Callable[[str, bool], None]  # save_state(directory, resumable): resumable=False at the run's last step


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run (trial) failed; it is not a user input error."""


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (order seeded by (seed, epoch)) that can skip the batches a resumed epoch already did.

    Works without a process group when `num_replicas` and `rank` are given (1 and 0 in a single process), so one
    code path serves both. `skip(n)` drops the first `n` indices of the next iteration only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self._skip


def unwrap(module: nn.Module) -> nn.Module:
    """The task inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


def is_eval_step(step: int, every: float) -> bool:
    """Whether optimizer step `step` (1-based count of steps done) crosses a multiple of `every` steps.

    `every` may be fractional (eval_every = 1/3 epoch): evaluations fall on the first step at or after each
    multiple, so they never drift and an epoch boundary that is a multiple is hit exactly.
    """
    eps = 1e-9  # absorbs float error such as 3 * (10/3) = 9.999999999999998
    return math.floor((step + eps) / every) > math.floor((step - 1 + eps) / every)


def needs_checkpoint(policy: CheckpointPolicy, *, step: int, start_step: int, total_steps: int,
                     metrics: dict[str, Any]) -> bool:
    """Whether the evaluation at `step` writes a checkpoint.

    "every": always (pre-training: each evaluation is a selectable model). "needed" (cleaning trials): only what
    resume or the result can use: the new best feasible evaluation (the trial's answer), and the latest trained
    state while training goes on. Skipped: the starting model when infeasible (a resume redoes that evaluation in
    seconds) and the final evaluation unless it is the best (the run is over; a resume after a crash right there
    redoes one interval from the previous checkpoint). On CPU trials of a few seconds the writes were a third of the
    trial (benchmarks/sweep_overhead.py).
    """
    if policy == "every":
        return True
    best = bool(metrics.get("feasible")) and int(metrics.get("best_feasible_step", -1)) == step
    return best or start_step < step < total_steps


def _iterate_epoch(loader: Any, epoch: int, skip_batches: int) -> Iterator[dict[str, Tensor]]:
    sampler = getattr(loader, "sampler", None)
    for part in (sampler, getattr(loader, "dataset", None)):
        if hasattr(part, "set_epoch"):  # the sampler's order and the dataset's augmentation draw
            part.set_epoch(epoch)
    if skip_batches and isinstance(sampler, ResumableSampler):
        # Skip by index, without loading the images, so augmentation RNG use matches the uninterrupted run.
        sampler.skip(skip_batches * loader.batch_size)
        return iter(loader)
    return itertools.islice(iter(loader), skip_batches, None)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


class _LossMeter:
    """Sums loss parts as tensors (no host sync per batch); `.item()` only when an evaluation asks for means."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.skipped = 0
        self.first_bad_step: Tensor | None = None

    def add(self, out: dict[str, Tensor], step: int) -> None:
        for name, value in out.items():
            v = value.detach().float()
            self.sums[name] = self.sums[name] + v if name in self.sums else v
        self.count += 1
        bad = ~torch.isfinite(out["loss"].detach())
        step_t = torch.tensor(step, device=bad.device)
        if self.first_bad_step is None:
            self.first_bad_step = torch.full_like(step_t, -1)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step_t, self.first_bad_step)

    def check_finite(self) -> None:
        if self.first_bad_step is not None and (bad := int(self.first_bad_step)) >= 0:
            raise NonFiniteLoss(f"non-finite training loss at step {bad}; lower the learning rate or loss weights")

    def pop_means(self) -> dict[str, float]:
        self.check_finite()
        means = {name: float(total / self.count) for name, total in self.sums.items()} if self.count else {}
        means["skipped_images"] = self.skipped
        self.sums, self.count, self.skipped = {}, 0, 0
        return means


def run(
    task: nn.Module,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    lr_fn: Callable[[int], float],
    *,
    epochs: int,
    eval_every_steps: float,
    eval_at_start: bool,
    evaluate_fn: Callable[[], dict[str, Any]],
    report: Report,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    grad_clip: float | None = None,
    logit_scale_max: float = math.log(100),
    save_state: SaveState | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    asr_threshold: float = 0.05,
    tracker_state: dict[str, Any] | None = None,
    check_every: int = 50,
    checkpoints: CheckpointPolicy = "every",
    scratch_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train `task` for `epochs` epochs, evaluating and reporting on a step schedule.

    Args:
        task: The method (possibly DDP-wrapped); ``task(batch)`` returns ``{"loss": ..., <parts>}``.
        train_loader: Yields training batches; its sampler's order per epoch is seeded by (seed, epoch).
        optimizer: AdamW over the task's parameters.
        lr_fn: Learning rate of optimizer step `step` (0-based), set on every param group before each step.
        epochs: Number of epochs (0 = evaluate only).
        eval_every_steps: Evaluate after every this many optimizer steps (fractions allowed).
        eval_at_start: Evaluate the starting model at step 0 (fresh runs only).
        evaluate_fn: Returns the evaluation metrics (zeroshot_top1, asr_top1, ...).
        report: ``report(metrics, checkpoint_dir)``; the directory exists only during the call.
        start_step: Optimizer steps already done (resume); earlier batches of the epoch are skipped.
        device: Where batches go.
        amp: bf16 autocast; used only on CUDA.
        grad_clip: Clip the global gradient norm to this value.
        logit_scale_max: Clamp `logit_scale` to [0, this] after every step (ln 100, as CLIP).
        save_state: ``save_state(directory, resumable)`` writes a checkpoint; ``resumable`` is False at the last
            step (weights suffice: no training is left to resume).
        on_epoch_start: Called with the epoch index at the start of every epoch that starts from its first batch.
        asr_threshold: Feasibility threshold of the running best-feasible tracker.
        tracker_state: `BestFeasible.state_dict()` to restore on resume.
        check_every: Check for a non-finite loss every this many steps (and at every evaluation).
        checkpoints: Which evaluations get a checkpoint when `save_state` is given (`needs_checkpoint`).
        scratch_dir: Where the checkpoint directories handed to `report` are written (default: the system temp
            folder); a process killed mid-report leaves its directory there.

    Returns:
        Summary: final `step`, `steps_per_epoch`, the `last` reported metrics and the tracker's best feasible keys.

    Raises:
        NonFiniteLoss: The loss became NaN/inf (the message names the step).
    """
    device = torch.device(device)
    inner = unwrap(task)
    clip_model = getattr(inner, "model", inner)
    steps_per_epoch = len(train_loader)
    if epochs > 0 and steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches; use more rows or a smaller batch size")
    total_steps = epochs * steps_per_epoch
    tracker = BestFeasible(asr_threshold)
    if tracker_state:
        tracker.load_state_dict(tracker_state)
    meter = _LossMeter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    step = start_step
    last: dict[str, Any] = {}
    lr = lr_fn(max(step - 1, 0))

    def evaluate_and_report() -> None:
        nonlocal last
        losses = meter.pop_means()
        metrics = {**evaluate_fn(), **losses, "lr": lr, "step": step,
                   "epoch": step / steps_per_epoch if steps_per_epoch else 0.0}
        metrics |= tracker.update(metrics)
        if save_state is None or not needs_checkpoint(checkpoints, step=step, start_step=start_step,
                                                      total_steps=total_steps, metrics=metrics):
            report(metrics, None)
        else:
            with tempfile.TemporaryDirectory(prefix="cleansweep-ckpt-", dir=scratch_dir) as tmp:
                save_state(tmp, step < total_steps)
                state = {"step": step, "tracker": tracker.state_dict()}
                (Path(tmp) / LOOP_STATE).write_text(json.dumps(state))
                report(metrics, tmp)
        last = metrics

    if step == 0 and (eval_at_start or total_steps == 0):
        evaluate_and_report()
    task.train()
    for epoch in range(step // steps_per_epoch if steps_per_epoch else 0, epochs):
        skip = step - epoch * steps_per_epoch
        if skip == 0 and on_epoch_start is not None:
            on_epoch_start(epoch)
        for batch in _iterate_epoch(train_loader, epoch, skip):
            lr = lr_fn(step)
            meter.skipped += int(batch.get("skipped", 0))
            if "image" in batch:  # a batch whose images were all unreadable still counts as a step of the schedule
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    out = task(_to_device(batch, device))
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(task.parameters(), grad_clip)
                optimizer.step()
                with torch.no_grad():
                    # Clamp to [0, ln 100] after every step, as CLIP does.
                    clip_model.logit_scale.clamp_(0, logit_scale_max)
                meter.add(out, step)
            step += 1
            if step % check_every == 0:
                meter.check_finite()
            if is_eval_step(step, eval_every_steps) or step == total_steps:
                evaluate_and_report()
            if step >= (epoch + 1) * steps_per_epoch:
                break
    meter.check_finite()
    keys = ("feasible", "best_feasible_top1", "best_feasible_step")
    return {"step": step, "steps_per_epoch": steps_per_epoch, "last": last,
            **{k: last[k] for k in keys if k in last}}
