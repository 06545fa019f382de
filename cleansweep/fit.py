"""The one place that wires a training run: pre-training workers and cleaning trials both call `fit`.

Order (the reference's bug 1 fixed by construction): seed -> model -> init weights -> task (+ prepare) ->
optimizer with the *user's* hyperparameters (re-applied after a resumed optimizer state) -> loop. The effective
configuration is reported once, under `params`, in the first report of a run.

Distributed (torch.distributed initialised, e.g. by Ray Train): the task is DDP-wrapped, every rank trains on its
shard (per-rank batch = global batch / world size), evaluation runs on rank 0 only and its metrics are broadcast,
so every rank calls `report` with identical metrics (Ray Train's report is a barrier). Only rank 0 writes
checkpoints; other ranks report `checkpoint_dir=None`.

Checkpoint directory layout (written by `save_state`, read by `fit(resume_from=...)` and the drivers):
`model.safetensors` + `model.json` (the CLIP weights and card: usable directly as `model.init` or by
`cleansweep evaluate`), `state.pt` (optimizer, task extras such as l2-init anchors or pseudo-labels, RNG states;
loaded with weights_only=True; not in a run's final checkpoint, which nothing resumes), `loop.json` (step,
best-feasible tracker; written by the loop).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cleansweep import loop, train_data
from cleansweep.attacks.registry import attack_trigger
from cleansweep.config import validate
from cleansweep.data import EvalFolder, collate_skip
from cleansweep.errors import UserError
from cleansweep.evaluate import NO_ATTACK, evaluate, zeroshot_classifier
from cleansweep.methods import Task, create_task
from cleansweep.methods.base import BaseMethodSpec
from cleansweep.models import (
    ModelBundle,
    checkpoint_model_name,
    create_model,
    file_sha256,
    load_state_dict_file,
    load_weights,
    model_image_size,
    save_checkpoint,
)
from cleansweep.objective import PROXY_ASR
from cleansweep.optim import apply_hyperparameters, create_optimizer, lr_at
from cleansweep.rng import rng_state, seed_everything, set_rng_state
from cleansweep.runtime import layout
from cleansweep.train_config import TrainSpec

MODEL_FILE, STATE_FILE = layout.MODEL_FILE, layout.STATE_FILE  # the checkpoint directory (module docstring)
Report = Callable[[dict[str, Any], str | None], None]


def resolve_device(name: str) -> torch.device:
    """'auto' -> the current CUDA device when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; use device 'auto' or 'cpu'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _evaluator(spec: TrainSpec, bundle: ModelBundle, device: torch.device, rank: int = 0,
               world: int = 1) -> Callable[[], dict[str, Any]]:
    """Zero-shot accuracy + ASR (+ the proxy ASR of an inverted trigger) of the current model; the classifier is
    rebuilt each time (the text tower trains). With several ranks each evaluates every world-th batch and the counts
    are summed, so all ranks get the whole set's metrics at 1/world of the cost."""
    folder = EvalFolder(spec.data.eval_dir, bundle.image_size, subset=spec.data.eval_subset, seed=spec.seed)
    a = spec.attack
    known = a.name != NO_ATTACK  # a defender who does not know the trigger measures the proxy ASR only
    target = folder.class_index(a.target) if known else 0
    trigger = attack_trigger(a, bundle.image_size) if known else None
    extra = {}
    if spec.proxy is not None:
        from cleansweep.detect.proxy import load_proxy

        extra[PROXY_ASR] = load_proxy(spec.proxy, folder.classnames)
    loader = DataLoader(folder, batch_size=spec.data.eval_batch_size, shuffle=False, num_workers=spec.data.workers)
    model = bundle.model

    def evaluate_fn() -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            classifier = zeroshot_classifier(model, bundle.tokenizer, folder.classnames, folder.templates, device)
            return evaluate(model, loader, classifier, normalize=(bundle.mean, bundle.std), target_index=target,
                            trigger=trigger, seed=a.seed, device=device, extra_triggers=extra, amp=spec.amp,
                            rank=rank, world=world)
        finally:
            model.train(was_training)

    return evaluate_fn


def _save_state_fn(task: Task, optimizer: torch.optim.Optimizer, spec: TrainSpec) -> loop.SaveState:
    def save_state(directory: str, resumable: bool) -> None:
        path = Path(directory)
        # The attack rides along so `cleansweep evaluate` of any checkpoint measures ASR with the right trigger.
        save_checkpoint(path / MODEL_FILE, task.model, {"model": spec.model.name, "seed": spec.seed,
                                                        "method": spec.method.name,
                                                        "attack": spec.attack.model_dump(mode="json")})
        if resumable:  # the final checkpoint of a run keeps weights only: no training is left to resume
            extras = {k: v for k, v in task.state_dict().items() if not k.startswith("model.")}
            torch.save({"optimizer": optimizer.state_dict(), "task": extras, "rng": rng_state()}, path / STATE_FILE)

    return save_state


def _restore(directory: Path, task: Task) -> dict[str, Any]:
    """Load model weights and task extras from a checkpoint dir; return the optimizer/RNG state and loop state.

    A checkpoint without `state.pt` (a run's final one, or one a finished sweep pruned) restores weights and loop
    state only; `fit` accepts it only where no training is left.
    """
    for name in (MODEL_FILE, loop.LOOP_STATE):
        if not (directory / name).is_file():
            raise UserError(f"{directory} is not a cleansweep checkpoint (no {name}); pass a directory a run wrote")
    load_weights(task.model, load_state_dict_file(directory / MODEL_FILE))
    state: dict[str, Any] = {}
    if (directory / STATE_FILE).is_file():
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        result = task.load_state_dict(state["task"], strict=False)
        if result.unexpected_keys:
            raise UserError(f"{directory}: checkpoint holds state of another method ({result.unexpected_keys[0]}); "
                            f"resume with the method '{task.spec.name}' was saved with")
    state["loop"] = json.loads((directory / loop.LOOP_STATE).read_text())
    return state


def fit(spec: TrainSpec | dict[str, Any], report: Report, *, resume_from: str | Path | None = None,
        checkpoints: loop.CheckpointPolicy | Literal["none"] = "every", scratch_dir: str | Path | None = None,
        progress: loop.Progress | None = None) -> dict[str, Any]:
    """Train (pre-train or clean) one model as `spec` says, reporting every evaluation.

    Args:
        spec: The run's configuration (a dict is validated into a `TrainSpec`).
        report: ``report(metrics, checkpoint_dir)``; the first call's metrics carry `params` (effective config).
        resume_from: A checkpoint directory written by an earlier call's `report`; training continues from its step
            (no `prepare`, no re-reported step).
        checkpoints: Which evaluations come with a checkpoint directory: "every", "needed" (`loop.needs_checkpoint`:
            what resume and the best feasible result use) or "none" (`report` always gets None).
        scratch_dir: Folder for the checkpoint directories `report` gets (`loop.run`); default the temp folder.
        progress: Called every few seconds of training with the step, epoch and recent loss (`loop.run`).

    Returns:
        ``{"step", "steps_per_epoch", "last" (final metrics), "best_feasible_top1", "best_feasible_step",
        "feasible", "params"}``.

    Raises:
        UserError: Bad paths, CSVs, eval folders, checkpoints, batch sizes (from the lower modules too).
        loop.NonFiniteLoss: The loss diverged.
    """
    if isinstance(spec, dict):
        spec = validate(TrainSpec, spec, "train spec")
    rank, world = _world()
    seed_everything(spec.seed)
    run = _build(spec, rank, world)
    resumed = _restore(Path(resume_from), run.task) if resume_from is not None else None
    if resumed is None:
        run.task.prepare(torch.Generator().manual_seed(spec.seed))
    trained: nn.Module = run.task
    if world > 1:
        trained = DistributedDataParallel(run.task, device_ids=[run.device] if run.device.type == "cuda" else None)
    steps_per_epoch = len(run.train_loader)
    total_steps = spec.epochs * steps_per_epoch
    optimizer = _optimizer(spec, run.task, resumed, total_steps, resume_from)
    o = spec.optim

    def lr_fn(step: int) -> float:
        return lr_at(step, base_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=total_steps, schedule=o.schedule)

    def on_epoch_start(epoch: int) -> None:
        run.task.on_epoch_start(epoch, run.embed_loader, run.device)
        for p in run.task.fresh_parameters():
            optimizer.state.pop(p, None)  # a re-initialised head starts with fresh AdamW moments

    params = _effective_params(spec, run, optimizer, world, steps_per_epoch, resume_from)
    loop_state = resumed["loop"] if resumed is not None else {"step": 0, "tracker": None}
    if resumed is not None and "rng" in resumed:
        set_rng_state(resumed["rng"])
    summary = loop.run(
        trained, run.train_loader, optimizer, lr_fn, epochs=spec.epochs,
        eval_every_steps=spec.eval_every * steps_per_epoch, eval_at_start=spec.eval_at_start and resumed is None,
        evaluate_fn=_evaluator(spec, run.bundle, run.device, rank, world),
        report=_with_params(report, params), start_step=int(loop_state["step"]), device=run.device, amp=spec.amp,
        grad_clip=o.grad_clip, logit_scale_max=spec.logit_scale_max,
        save_state=_save_state_fn(run.task, optimizer, spec) if rank == 0 and checkpoints != "none" else None,
        on_epoch_start=on_epoch_start, asr_threshold=spec.asr_threshold, constraint=spec.constraint,
        tracker_state=loop_state["tracker"],
        checkpoints="every" if checkpoints == "none" else checkpoints, scratch_dir=scratch_dir, progress=progress,
    )
    return {**summary, "params": params}


@dataclass
class _Run:
    """What `fit` builds before training: the model bundle, the task around it, its data and where it runs."""

    bundle: ModelBundle
    device: torch.device
    task: Task
    method: BaseMethodSpec  # the spec's method as it runs on this data (`for_rows`)
    train_rows: int
    train_loader: DataLoader
    embed_loader: DataLoader
    init_sha: str | None


def _build(spec: TrainSpec, rank: int, world: int) -> _Run:
    """Model (+ init weights), task, training and embedding loaders, on the spec's device."""
    device = resolve_device(spec.device)
    bundle = create_model(spec.model.name, seed=spec.seed)
    init_sha = None
    if spec.model.init is not None:
        checkpoint_model_name(spec.model.init, spec.model.name, model_flag="model.name")  # a card that disagrees
        load_weights(bundle.model, load_state_dict_file(spec.model.init))
        init_sha = file_sha256(spec.model.init)
    plain_ds, training_set = train_data.datasets(spec, bundle.preprocess_val, bundle.tokenizer, rank, world)
    method = spec.method.for_rows(len(plain_ds))
    task = create_task(method, bundle.model, distributed=world > 1)
    train_ds = training_set(task.needs_ssl_views)
    train_loader = train_data.train_loader(spec, train_ds, rank, world, device.type == "cuda")
    embed_loader = DataLoader(plain_ds, batch_size=spec.data.eval_batch_size, shuffle=False,
                              collate_fn=collate_skip, num_workers=spec.data.workers)
    task.to(device)
    return _Run(bundle, device, task, method, len(plain_ds), train_loader, embed_loader, init_sha)


def _optimizer(spec: TrainSpec, task: Task, resumed: dict[str, Any] | None, total_steps: int,
               resume_from: str | Path | None) -> torch.optim.Optimizer:
    """AdamW with the spec's hyperparameters, re-applied over a resumed state (the reference's bug 1)."""
    o = spec.optim
    hyper = {"lr": o.lr, "weight_decay": o.weight_decay, "betas": (o.beta1, o.beta2), "eps": o.eps}
    optimizer = create_optimizer(task, **hyper)
    if resumed is not None and "optimizer" in resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        # The saved state carries the old run's hyperparameters; the spec's are the effective ones.
        apply_hyperparameters(optimizer, **hyper)
    elif resumed is not None and int(resumed["loop"]["step"]) < total_steps:
        raise UserError(f"{resume_from} has no {STATE_FILE} (a final or pruned checkpoint) but step "
                        f"{resumed['loop']['step']} of {total_steps} is not the end; resume from the run's latest "
                        "checkpoint, or use its model.safetensors as model.init of a new run")
    return optimizer


def _effective_params(spec: TrainSpec, run: _Run, optimizer: torch.optim.Optimizer, world: int,
                      steps_per_epoch: int, resume_from: str | Path | None) -> dict[str, Any]:
    """The resolved configuration a run really used, logged once by the drivers: read back from the optimizer after
    any checkpoint was loaded (CleanCLIP's src/main.py restores the checkpoint's optimizer state, and with it the
    saved weight decay, betas and eps, over the requested ones; torch's `Optimizer.load_state_dict` keeps the saved
    param_groups' hyperparameters)."""
    decay = next((g for g in optimizer.param_groups if g.get("name") == "decay"), optimizer.param_groups[0])
    # The method's own fields only (its Spec has no others), as run on this data.
    return {**flatten({**spec.model_dump(mode="json"), "method": run.method.model_dump(mode="json")}),
            "effective.weight_decay": decay["weight_decay"], "effective.betas": list(decay["betas"]),
            "effective.eps": decay["eps"], "device": str(run.device), "world_size": world,
            "num_params": sum(p.numel() for p in run.task.parameters()), "steps_per_epoch": steps_per_epoch,
            "per_rank_batch_size": spec.data.batch_size // world, "train_rows": run.train_rows,
            "init_sha256": run.init_sha, "resumed_from": str(resume_from) if resume_from else None}


def _with_params(report: Report, params: dict[str, Any]) -> Report:
    """`report` whose first call's metrics also carry the effective configuration under `params`."""
    first = [True]

    def report_with_params(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if first[0]:
            metrics = {**metrics, "params": params}
            first[0] = False
        report(metrics, checkpoint_dir)

    return report_with_params


def preflight(spec: TrainSpec | dict[str, Any]) -> TrainSpec:
    """Check, without training or building a model, what would fail a run in its first seconds.

    The drivers call it before any cluster starts (a sweep's base and starting evaluation, a pre-training run):
    the model name (`TrainSpec` has checked the method), the init checkpoint, the training CSV (columns, rows, one
    batch), the evaluation folder and its target class, the trigger for the model's resolution.

    Raises:
        UserError: the first problem found, in one line.
    """
    if isinstance(spec, dict):
        spec = validate(TrainSpec, spec, "train spec")
    size = model_image_size(spec.model.name)  # unknown model -> one-line error
    if spec.model.init is not None and not Path(spec.model.init).is_file():
        raise UserError(f"init checkpoint not found: {spec.model.init}; pass an existing .safetensors or .pt file")
    if spec.model.init is not None:
        checkpoint_model_name(spec.model.init, spec.model.name, model_flag="model.name")
    if spec.data.train_csv is not None and not Path(spec.data.train_csv).is_file():
        raise UserError(f"training CSV not found: {spec.data.train_csv}; point data.train_csv (--train-csv) at an "
                        "existing image-caption CSV")
    if not Path(spec.data.eval_dir).is_dir():
        raise UserError(f"evaluation folder not found: {spec.data.eval_dir}; point data.eval_dir (--eval-data) at a "
                        "folder with one subfolder per class")
    rows = train_data.train_pairs(spec.data)
    if rows < spec.data.batch_size and spec.epochs > 0:
        raise UserError(f"{spec.data.train_source} has {rows} pairs, fewer than one batch of {spec.data.batch_size}; "
                        "lower data.batch_size or add pairs")
    folder = EvalFolder(spec.data.eval_dir, size, subset=spec.data.eval_subset, seed=spec.seed)
    if spec.attack.name != NO_ATTACK:
        folder.class_index(spec.attack.target)
        attack_trigger(spec.attack, size)
    elif spec.proxy is None:
        raise UserError("attack.name 'none' (the trigger is unknown) leaves nothing to constrain; set objective.asr: "
                        "proxy (the sweep scans the model first) or name the trigger")
    if spec.proxy is not None:
        from cleansweep.detect.proxy import load_proxy

        load_proxy(spec.proxy, folder.classnames)
    return spec
