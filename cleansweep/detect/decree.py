"""DECREE's search schedule, term by term as its official code has it (github.com/GiantSeaweed/DECREE, `main.py`;
docs/fidelity.md): the tanh parametrisation of mask and pattern, the lr schedule, the adaptive weight lambda of the
mask penalty and the early stop. Pure Python and tensors; `cleansweep.detect.inversion` runs the search with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-7  # DECREE's epsilon (utils.py): keeps tanh's image inside (0, 1) and arctanh finite


@dataclass(frozen=True)
class Regime:
    """DECREE's settings per encoder kind (official `main.py` 29-43, 228-237).

    Attributes:
        lr_milestones: epochs at which the lr becomes 0.1, then 0.05.
        lambda_min: below it lambda is no longer divided, and after `reset_patience` reached steps it is reset.
        early_stop_patience: steps without a smaller kept mask before an epoch may end the search.
    """

    lr_milestones: tuple[int, int]
    lambda_min: float
    early_stop_patience: int


SMALL_ENCODER = Regime((30, 50), 1e-5, 10)  # the official CIFAR10 / STL10 encoders, 32 px
CLIP_ENCODER = Regime((200, 500), 1e-7, 35)  # the official CLIP / ImageNet encoders, 224 px


def regime_for(image_size: int) -> Regime:
    """The official regime for a resolution: CLIP's from 224 px up, the 32 px encoders' below."""
    return CLIP_ENCODER if image_size >= 224 else SMALL_ENCODER


def to_unit(param: Tensor) -> Tensor:
    """DECREE's parametrisation: tanh(a) / (2 - eps) + 0.5, clipped to [0, 1]."""
    return (torch.tanh(param) / (2 - EPS) + 0.5).clamp(0, 1)


def from_unit(value: Tensor) -> Tensor:
    """The inverse of `to_unit` on (0, 1): arctanh((v - 0.5) * (2 - eps)) (DECREE's initialisation)."""
    return torch.atanh((value - 0.5) * (2 - EPS))


def decree_lr(epoch: int, lr: float, milestones: tuple[int, int]) -> float:
    """DECREE's lr schedule: `lr` before the first milestone epoch, 0.1 before the second, 0.05 after."""
    return lr if epoch < milestones[0] else 0.1 if epoch < milestones[1] else 0.05


class PenaltyWeight:
    """lambda, the weight of the mask's L1 penalty, adapted step by step as DECREE's code does.

    Per step, with `reached` = the batch similarity exceeded the target: while lambda < `minimum` and reached, a
    counter grows and after more than `reset_patience` such steps lambda is reset to `init` (both adapt counters
    cleared); any other step clears that counter. Then more than `patience` consecutive reached steps multiply lambda
    by `factor` (only while lambda < `cap`), more than `patience` consecutive missed steps divide it (only while
    lambda >= `minimum`). DECREE: init 1e-3, factor 5, patience 5, reset_patience 10, cap 1e5.
    """

    def __init__(self, init: float = 1e-3, *, minimum: float = SMALL_ENCODER.lambda_min, factor: float = 5.0,
                 patience: int = 5, reset_patience: int = 10, cap: float = 1e5) -> None:
        self.init, self.value, self.minimum, self.factor, self.cap = init, init, minimum, factor, cap
        self.patience, self.reset_patience = patience, reset_patience
        self.up = self.down = self.low = 0

    def update(self, reached: bool) -> float:
        """Count one step and return lambda for the next step."""
        if self.value < self.minimum and reached:
            self.low += 1
            if self.low > self.reset_patience:
                self.value, self.up, self.down = self.init, 0, 0
        else:
            self.low = 0
        self.up, self.down = (self.up + 1, 0) if reached else (0, self.down + 1)
        if self.up > self.patience:
            self.value, self.up = self.value * self.factor if self.value < self.cap else self.value, 0
        elif self.down > self.patience:
            self.value, self.down = self.value / self.factor if self.value >= self.minimum else self.value, 0
        return self.value


class EarlyStop:
    """DECREE's early stop: once a trigger was kept, count the steps that did not shrink the kept L1; an epoch whose
    mean batch similarity exceeds the target ends the search when that count exceeds `patience`."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.count = patience, math.inf, 0

    def update(self, kept_l1: float | None) -> None:
        """Count one step; `kept_l1` is the smallest 3-channel mask L1 kept so far (None: none yet)."""
        if kept_l1 is not None:
            self.count = self.count + 1 if kept_l1 >= self.best else 0
            self.best = min(self.best, kept_l1)

    def stop(self, epoch_similarity: float, threshold: float) -> bool:
        """Whether the epoch that ended with this mean batch similarity ends the search."""
        return epoch_similarity > threshold and self.count > self.patience
