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
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from cleansweep.objective import BestFeasible
from cleansweep.runtime import layout

LOOP_STATE = layout.LOOP_STATE
Report = Callable[[dict[str, Any], str | None], None]
Progress = Callable[[dict[str, Any]], None]
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
    constraint: str = "asr_top1",
    tracker_state: dict[str, Any] | None = None,
    check_every: int = 50,
    checkpoints: CheckpointPolicy = "every",
    scratch_dir: str | Path | None = None,
    progress: Progress | None = None,
    progress_every_s: float = 10.0,
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
        constraint: The metric the tracker judges feasibility on (`asr_top1` or `proxy_asr_top1`).
        tracker_state: `BestFeasible.state_dict()` to restore on resume.
        check_every: Check for a non-finite loss every this many steps (and at every evaluation).
        checkpoints: Which evaluations get a checkpoint when `save_state` is given (`needs_checkpoint`).
        scratch_dir: Where the checkpoint directories handed to `report` are written (default: the system temp
            folder); a process killed mid-report leaves its directory there.
        progress: ``progress(info)`` every `progress_every_s` seconds of training (and at every evaluation) with
            `step`, `total_steps`, `epoch`, `epochs`, `loss` (mean since the last call), `seconds` (since the run
            started).
        progress_every_s: Seconds between progress calls.

    Returns:
        Summary: final `step`, `steps_per_epoch`, the `last` reported metrics and the tracker's best feasible keys.

    Raises:
        NonFiniteLoss: The loss became NaN/inf (the message names the step).
    """
    device = torch.device(device)
    steps_per_epoch = len(train_loader)
    if epochs > 0 and steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches; use more rows or a smaller batch size")
    state = _Training(task, optimizer, lr_fn, report, evaluate_fn, save_state, checkpoints, scratch_dir,
                      steps_per_epoch=steps_per_epoch, total_steps=epochs * steps_per_epoch, start_step=start_step,
                      device=device, tracker=BestFeasible(asr_threshold, constraint), progress=progress,
                      progress_every_s=progress_every_s)
    if tracker_state:
        state.tracker.load_state_dict(tracker_state)
    if start_step == 0 and (eval_at_start or state.total_steps == 0):
        state.evaluate_and_report()
    task.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    clip_model = getattr(unwrap(task), "model", unwrap(task))
    for epoch in range(start_step // steps_per_epoch if steps_per_epoch else 0, epochs):
        skip = state.step - epoch * steps_per_epoch
        if skip == 0 and on_epoch_start is not None:
            on_epoch_start(epoch)
        for batch in _iterate_epoch(train_loader, epoch, skip):
            state.train_step(batch, autocast, clip_model, grad_clip, logit_scale_max)
            if state.step % check_every == 0:
                state.meter.check_finite()
            if is_eval_step(state.step, eval_every_steps) or state.step == state.total_steps:
                state.evaluate_and_report()
            if state.step >= (epoch + 1) * steps_per_epoch:
                break
    state.meter.check_finite()
    keys = ("feasible", "best_feasible_top1", "best_feasible_step")
    return {"step": state.step, "steps_per_epoch": steps_per_epoch, "last": state.last,
            **{k: state.last[k] for k in keys if k in state.last}}


class _Training:
    """The state of one `run`: step, learning rate, loss meter, best-feasible tracker, and what it calls."""

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, lr_fn: Callable[[int], float],
                 report: Report, evaluate_fn: Callable[[], dict[str, Any]], save_state: SaveState | None,
                 checkpoints: CheckpointPolicy, scratch_dir: str | Path | None, *, steps_per_epoch: int,
                 total_steps: int, start_step: int, device: torch.device, tracker: BestFeasible,
                 progress: Progress | None, progress_every_s: float) -> None:
        self.task, self.optimizer, self.lr_fn, self.report = task, optimizer, lr_fn, report
        self.evaluate_fn, self.save_state, self.checkpoints, self.scratch_dir = (evaluate_fn, save_state,
                                                                                checkpoints, scratch_dir)
        self.steps_per_epoch, self.total_steps, self.start_step = steps_per_epoch, total_steps, start_step
        self.device, self.tracker, self.meter = device, tracker, _LossMeter()
        self.step, self.lr, self.last = start_step, lr_fn(max(start_step - 1, 0)), {}
        self.progress, self.progress_every_s = progress, progress_every_s
        self.started = self.last_progress = time.monotonic()
        self.progress_loss: list[Tensor] = []

    def train_step(self, batch: dict[str, Any], autocast: Any, clip_model: nn.Module, grad_clip: float | None,
                   logit_scale_max: float) -> None:
        """One optimizer step (a batch whose images were all unreadable still counts as a step of the schedule)."""
        self.lr = self.lr_fn(self.step)
        self.meter.skipped += int(batch.get("skipped", 0))
        if "image" in batch:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            with autocast:
                out = self.task(_to_device(batch, self.device))
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.task.parameters(), grad_clip)
            self.optimizer.step()
            with torch.no_grad():
                # Clamp to [0, ln 100] after every step, as CLIP does.
                clip_model.logit_scale.clamp_(0, logit_scale_max)
            self.meter.add(out, self.step)
            self.progress_loss.append(out["loss"].detach())
        self.step += 1
        if self.progress is not None and time.monotonic() - self.last_progress >= self.progress_every_s:
            self.call_progress()

    def call_progress(self) -> None:
        """Tell `progress` where training is (one host sync for the mean loss since the last call)."""
        losses = self.progress_loss
        loss = float(torch.stack(losses).float().mean()) if losses else math.nan
        self.progress_loss, self.last_progress = [], time.monotonic()
        self.progress({"step": self.step, "total_steps": self.total_steps, "loss": loss,
                       "epochs": self.total_steps / self.steps_per_epoch if self.steps_per_epoch else 0.0,
                       "epoch": self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0,
                       "seconds": self.last_progress - self.started, "start_step": self.start_step})

    def evaluate_and_report(self) -> None:
        """Evaluate, fold the result into the tracker, report it with a checkpoint where the policy wants one."""
        losses = self.meter.pop_means()
        step = self.step
        metrics = {**self.evaluate_fn(), **losses, "lr": self.lr, "step": step,
                   "epoch": step / self.steps_per_epoch if self.steps_per_epoch else 0.0}
        metrics |= self.tracker.update(metrics)
        if self.save_state is None or not needs_checkpoint(self.checkpoints, step=step, start_step=self.start_step,
                                                           total_steps=self.total_steps, metrics=metrics):
            self.report(metrics, None)
        else:
            with tempfile.TemporaryDirectory(prefix="cleansweep-ckpt-", dir=self.scratch_dir) as tmp:
                self.save_state(tmp, step < self.total_steps)
                state = {"step": step, "tracker": self.tracker.state_dict()}
                (Path(tmp) / LOOP_STATE).write_text(json.dumps(state))
                self.report(metrics, tmp)
        self.last = metrics
        if self.progress is not None:
            self.call_progress()
