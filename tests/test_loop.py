"""The training loop on a toy task: report schedule, lr, clamping, NaN, resume determinism."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cleansweep import loop
from cleansweep.errors import UserError
from cleansweep.optim import create_optimizer, lr_at


class Points(Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "text": self.y[i], "index": torch.tensor(i)}


class Toy(nn.Module):
    """A task with the contract's shape: `.model` holds `logit_scale`; forward returns loss + parts."""

    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.linear = nn.Linear(3, 1)
        self.model.logit_scale = nn.Parameter(torch.tensor(4.5))
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, batch):
        self.calls += 1
        pred = self.model.linear(batch["image"])[:, 0] + 0.0 * self.model.logit_scale
        mse = ((pred - batch["text"]) ** 2).mean()
        # Pushes logit_scale up, so the clamp has work to do.
        push = -10.0 * self.model.logit_scale
        mse = mse + 0.01 * torch.randn(())  # consumes the global RNG: resume must restore it
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            mse = mse * float("nan")
        return {"loss": mse + push, "mmcl_loss": mse.detach(), "l2_init_loss": push.detach()}


def _loader(batch_size: int = 4, seed: int = 0) -> DataLoader:
    ds = Points()
    sampler = loop.ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: creating an iterator mid-epoch on resume must not draw from the global RNG.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def _metrics_from_step():
    # A fake evaluation: accuracy rises, ASR falls below 5% from the 3rd evaluation on.
    state = {"n": 0}

    def evaluate_fn():
        state["n"] += 1
        return {"zeroshot_top1": 0.1 * state["n"], "asr_top1": 0.5 if state["n"] < 3 else 0.01}

    return evaluate_fn


def _run(task, *, epochs=2, every=6.0, at_start=True, start_step=0, reports=None, save=None, tracker_state=None,
         evaluate_fn=None, base_lr=0.05, loader=None, checkpoints="every"):
    loader = loader or _loader()
    total = epochs * len(loader)
    opt = create_optimizer(task, lr=base_lr, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    if save is not None and save.get("optimizer") is not None:
        opt.load_state_dict(save["optimizer"])

    def lr_fn(step):
        return lr_at(step, base_lr=base_lr, warmup_steps=3, total_steps=total, schedule="cosine")

    def save_state(d, resumable):
        torch.save({"task": task.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
                   Path(d) / "toy.pt")

    reports = reports if reports is not None else []
    summary = loop.run(task, loader, opt, lr_fn, epochs=epochs, eval_every_steps=every, eval_at_start=at_start,
                       evaluate_fn=evaluate_fn or _metrics_from_step(),
                       report=lambda m, d: reports.append((m, d, sorted(p.name for p in Path(d).iterdir())
                                                           if d else [])),
                       start_step=start_step, save_state=save_state, tracker_state=tracker_state,
                       checkpoints=checkpoints)
    return summary, reports, lr_fn


def test_reports_at_every_eval_step_and_at_start() -> None:
    summary, reports, lr_fn = _run(Toy(), epochs=2, every=6.0)
    assert [m["step"] for m, _, _ in reports] == [0, 6, 12]
    assert [m["epoch"] for m, _, _ in reports] == [0.0, 1.0, 2.0]
    assert summary["step"] == 12 and summary["steps_per_epoch"] == 6
    assert all(files == ["loop.json", "toy.pt"] for _, _, files in reports)
    assert "mmcl_loss" not in reports[0][0]  # nothing trained before step 0
    assert {"loss", "mmcl_loss", "l2_init_loss", "lr", "feasible", "best_feasible_top1"} <= set(reports[1][0])


def test_needed_checkpoints_are_the_best_feasible_and_the_latest_trained_state() -> None:
    # Evaluations at steps 0, 3, ..., 12; ASR feasible from the 3rd (step 6) on, accuracy rising, so each feasible
    # evaluation is the new best; then an evaluation that is neither best nor followed by more training.
    _, reports, _ = _run(Toy(), epochs=2, every=3.0, checkpoints="needed")
    saved = {m["step"] for m, d, _ in reports if d is not None}
    assert [m["step"] for m, _, _ in reports] == [0, 3, 6, 9, 12]
    assert saved == {3, 6, 9, 12}  # no step 0 (infeasible start); 12 is final but the best feasible
    assert all(files == ["loop.json", "toy.pt"] for _, d, files in reports if d is not None)

    def falling():  # feasible from the start, accuracy falls: only step 0 is ever the best
        n = iter(range(100))
        return lambda: {"zeroshot_top1": 0.9 - 0.1 * next(n), "asr_top1": 0.0}

    _, reports, _ = _run(Toy(), epochs=2, every=3.0, checkpoints="needed", evaluate_fn=falling())
    assert {m["step"] for m, d, _ in reports if d is not None} == {0, 3, 6, 9}  # final 12: not best, run over
    # A resumed run (start_step 6) does not re-save the state it resumed from; every=3 from there: 9 then 12.
    assert not loop.needs_checkpoint("needed", step=6, start_step=6, total_steps=12, metrics={"feasible": 0.0})
    assert loop.needs_checkpoint("needed", step=9, start_step=6, total_steps=12, metrics={"feasible": 0.0})
    assert loop.needs_checkpoint("every", step=12, start_step=0, total_steps=12, metrics={"feasible": 0.0})


def test_only_the_last_checkpoint_is_not_resumable() -> None:
    task = Toy()
    opt = create_optimizer(task, lr=0.01, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    saved: list[bool] = []
    loop.run(task, _loader(), opt, lambda s: 0.01, epochs=2, eval_every_steps=3.0, eval_at_start=True,
             evaluate_fn=_metrics_from_step(), report=lambda m, d: None,
             save_state=lambda d, resumable: saved.append(resumable))
    assert saved == [True, True, True, True, False]  # steps 0, 3, 6, 9 resume; 12 ends the run


def test_checkpoint_directories_live_in_the_scratch_folder_and_are_removed(tmp_path: Path) -> None:
    task = Toy()
    opt = create_optimizer(task, lr=0.01, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    seen: list[Path] = []
    loop.run(task, _loader(), opt, lambda s: 0.01, epochs=1, eval_every_steps=3.0, eval_at_start=False,
             evaluate_fn=_metrics_from_step(), report=lambda m, d: seen.append(Path(d)),
             save_state=lambda d, resumable: (Path(d) / "w").write_text("x"), scratch_dir=tmp_path)
    assert len(seen) == 2 and all(d.parent == tmp_path for d in seen)  # steps 3 and 6
    assert list(tmp_path.iterdir()) == []  # each removed once reported


def test_fractional_eval_every_and_final_evaluation() -> None:
    # 1/4 epoch of 6 steps = 1.5 steps: evaluations at the first step at or after each multiple of 1.5.
    _, reports, _ = _run(Toy(), epochs=2, every=1.5, at_start=False)
    expected = sorted({math.ceil(k * 1.5 - 1e-9) for k in range(1, 9)})
    assert [m["step"] for m, _, _ in reports] == expected == [2, 3, 5, 6, 8, 9, 11, 12]
    # A schedule that does not land on the last step still evaluates there.
    _, reports, _ = _run(Toy(), epochs=1, every=4, at_start=False)
    assert [m["step"] for m, _, _ in reports] == [4, 6]


def test_lr_logit_scale_and_loss_means() -> None:
    _, reports, lr_fn = _run(Toy(), epochs=2, every=1)
    for metrics, _, _ in reports[1:]:
        assert metrics["lr"] == pytest.approx(lr_fn(metrics["step"] - 1))  # lr of the step just taken
    assert reports[0][0]["lr"] == pytest.approx(lr_fn(0))
    assert [lr_at(s, base_lr=0.05, warmup_steps=3, total_steps=12) for s in (0, 2, 3)] == pytest.approx(
        [0.05 / 3, 0.05, 0.05])


def test_logit_scale_is_clamped_after_every_step() -> None:
    task = Toy()
    _run(task, epochs=1, every=6, base_lr=1.0)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100))


def test_best_feasible_tracker_is_carried() -> None:
    _, reports, _ = _run(Toy(), epochs=2, every=3, at_start=True)
    feasible = [m["feasible"] for m, _, _ in reports]
    best = [m["best_feasible_top1"] for m, _, _ in reports]
    assert feasible == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert best == pytest.approx([0.0, 0.0, 0.3, 0.4, 0.5])
    assert reports[-1][0]["best_feasible_step"] == 12


def test_nan_loss_raises_with_the_step() -> None:
    with pytest.raises(loop.NonFiniteLoss, match="step 4"):
        _run(Toy(nan_at_call=5), epochs=2, every=6)
    assert not issubclass(loop.NonFiniteLoss, UserError)  # a failed trial, not a user input error


def test_resume_continues_from_the_saved_step_and_matches(tmp_path: Path) -> None:
    full_task = Toy()  # seeds the global RNG (the loss draws noise from it)
    _, full_reports, _ = _run(full_task, epochs=2, every=2, at_start=True)
    # Keep the checkpoint of step 4 (mid-epoch 0 of 6 steps) as a driver would.
    saved = tmp_path / "ckpt"
    keep = []

    def keep_step_4(metrics, d, files):
        if metrics["step"] == 4:
            shutil.copytree(d, saved)
        keep.append(metrics)

    task = Toy()
    reports = []
    loader = _loader()
    opt = create_optimizer(task, lr=0.05, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    total = 12

    def lr_fn(step):
        return lr_at(step, base_lr=0.05, warmup_steps=3, total_steps=total)

    with pytest.raises(KeyboardInterrupt):
        def stop_after_4(metrics, d):
            keep_step_4(metrics, d, None)
            if metrics["step"] == 4:
                raise KeyboardInterrupt

        loop.run(task, loader, opt, lr_fn, epochs=2, eval_every_steps=2, eval_at_start=True,
                 evaluate_fn=_metrics_from_step(), report=stop_after_4,
                 save_state=lambda d, resumable: torch.save({"task": task.state_dict(), "optimizer": opt.state_dict(),
                                                  "rng": torch.get_rng_state()}, Path(d) / "toy.pt"))
    state = torch.load(saved / "toy.pt", weights_only=True)
    loop_state = json.loads((saved / "loop.json").read_text())
    assert loop_state["step"] == 4
    resumed = Toy()
    resumed.load_state_dict(state["task"])
    torch.set_rng_state(state["rng"])
    evaluate_fn = _metrics_from_step()
    for _ in range(3):  # the evaluations already done (steps 0, 2, 4)
        evaluate_fn()
    _, reports, _ = _run(resumed, epochs=2, every=2, start_step=4, save={"optimizer": state["optimizer"]},
                         tracker_state=loop_state["tracker"], evaluate_fn=evaluate_fn)
    assert [m["step"] for m, _, _ in reports] == [6, 8, 10, 12]  # nothing re-reported
    for a, b in zip(resumed.parameters(), full_task.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (m, _, _), (f, _, _) in zip(reports, full_reports[-4:], strict=True):
        assert m["loss"] == pytest.approx(f["loss"], abs=0) and m["best_feasible_top1"] == f["best_feasible_top1"]


def test_resumable_sampler_skips_by_index() -> None:
    ds = Points(10)
    sampler = loop.ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    sampler.set_epoch(3)
    order = list(sampler)
    sampler.set_epoch(3)
    sampler.skip(4)
    assert len(sampler) == 6 and list(sampler) == order[4:]
    assert list(sampler) == order  # the skip applies to one iteration only
    g = torch.Generator().manual_seed(5 + 3)
    assert order == torch.randperm(10, generator=g).tolist()  # DistributedSampler's (seed + epoch) order


def test_is_eval_step_with_thirds() -> None:
    every = 10 / 3  # eval_every 1/3 epoch of 10 steps
    assert [s for s in range(1, 21) if loop.is_eval_step(s, every)] == [4, 7, 10, 14, 17, 20]


def test_progress_reports_steps_and_the_mean_loss_since_the_last_call() -> None:
    # progress_every_s=0: a call after every step (and one at each evaluation), each with that step's loss.
    task, calls = Toy(), []
    loader = _loader()
    opt = create_optimizer(task, lr=0.05, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    reports = []
    loop.run(task, loader, opt, lambda s: 0.01, epochs=1, eval_every_steps=3.0, eval_at_start=False,
             evaluate_fn=_metrics_from_step(), report=lambda m, d: reports.append(m), progress=calls.append,
             progress_every_s=0.0)
    steps = [c["step"] for c in calls]
    assert steps == sorted(steps) and steps[-1] == len(loader) and all(c["total_steps"] == len(loader) for c in calls)
    assert calls[-1]["epoch"] == 1.0 and calls[-1]["epochs"] == 1.0 and calls[0]["seconds"] >= 0
    # The loss a progress call carries is the mean of the batches since the previous call: here one batch each,
    # whose mean over an evaluation interval is what the evaluation reports.
    by_step = {c["step"]: c["loss"] for c in calls if math.isfinite(c["loss"])}
    first_interval = [by_step[s] for s in (1, 2, 3)]
    assert reports[0]["loss"] == pytest.approx(sum(first_interval) / 3)


def test_pretrain_progress_line_numbers() -> None:
    from cleansweep.pretrain.worker import ProgressLine

    line = ProgressLine("demo-mmcl")
    assert "no evaluation yet" in line.render({"step": 10, "total_steps": 200, "epoch": 0.25, "loss": 3.5,
                                              "seconds": 5.0, "start_step": 0})
    line.last_eval = {"zeroshot_top1": 0.8123, "asr_top1": 0.95, "epoch": 1.0}
    text = line.render({"step": 60, "total_steps": 240, "epoch": 1.5, "epochs": 6.0, "loss": 3.21, "seconds": 20.0,
                        "start_step": 20})
    # 40 steps in 20 s since this process started at step 20 -> 2 steps/s; 180 steps left -> 90 s.
    assert text.startswith("[pretrain demo-mmcl] epoch 1.50/6 step 60/240 loss 3.2100")
    assert "last eval top1 0.812 asr 0.950 (epoch 1.00)" in text and "2.00 steps/s, ETA 00:01:30" in text
