"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule as a pure function of the step.

The reference implementations loaded the pre-training optimizer state into every cleaning run, silently replacing
the requested weight decay, betas and eps; `apply_hyperparameters` re-applies the user's values after any
`optimizer.load_state_dict`. Their schedule was also off by one epoch (no warm-up, lr rising again in the last
epoch); `lr_at` is tested at its endpoints.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn
from torch.optim import AdamW, Optimizer

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: norm layers, biases, logit_scale and any other 1-d/scalar tensor.

    The reference (CleanCLIP, open_clip's training script) matches 'bn'/'ln'/'bias'/'logit_scale' in the name or
    ndim < 2; module types are used here so a future weight named e.g. 'kiln' is not excluded by accident.
    """
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORMS):
            names.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith("bias") or name.split(".")[-1] in ("logit_scale", "logit_bias"):
            names.add(name)
    return names


def create_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                     eps: float) -> AdamW:
    """AdamW over the trainable parameters of `model`, in two groups.

    Args:
        model: any module (a CLIP model or a task wrapping one with extra heads).
        lr: initial learning rate (the schedule sets it every step).
        weight_decay: decoupled weight decay of the `decay` group; the `no_decay` group always has 0.
        betas, eps: AdamW's.

    Returns:
        AdamW whose param_groups carry `name` ("decay" / "no_decay") so `apply_hyperparameters` can tell them apart.
    """
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def apply_hyperparameters(optimizer: Optimizer, *, lr: float, weight_decay: float, betas: tuple[float, float],
                          eps: float) -> None:
    """Set the user's hyperparameters on every group, e.g. after `optimizer.load_state_dict` restored saved ones.

    Groups named "no_decay" keep weight decay 0; every other group gets `weight_decay`.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else weight_decay
        group["betas"] = tuple(betas)
        group["eps"] = eps


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
          schedule: Literal["cosine", "constant"] = "cosine") -> float:
    """Learning rate of optimizer step `step` (0 is the first step).

    Linear warm-up base_lr * (step + 1) / warmup_steps (so step warmup_steps - 1 runs at base_lr), then either
    constant base_lr or a half cosine from base_lr at step warmup_steps to 0 at step total_steps (the first step
    that is never taken), as open_clip's `cosine_lr`. Never rises after the warm-up; 0 beyond total_steps.

    Args:
        step: global optimizer step, >= 0.
        base_lr: peak learning rate.
        warmup_steps: number of warm-up steps (0 = none).
        total_steps: steps of the whole run (warm-up included).
        schedule: "cosine" or "constant".
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose from: cosine, constant")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr
