"""The task contract: a training objective wrapped around a CLIP model.

A task is an `nn.Module` whose `forward(batch)` returns ``{"loss": total, <part>: value, ...}``: the total is a
weighted sum of small named losses (SLIP's `losses.py` style), and the loop logs every part without extra code.
Two optional hooks, no-ops here: `prepare(generator)` runs once before the first step of a fresh run (never on
resume: the checkpoint already holds the prepared weights), `on_epoch_start(epoch, embed_loader, device)` runs at
the start of every epoch that starts from its first batch.

Every method has its own pydantic Spec (a `BaseMethodSpec` with `name: Literal["<method>"]`) holding only the
fields that method reads; `cleansweep.methods.MethodSpec` is their union, told apart by `name`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from cleansweep.config import Strict


class BaseMethodSpec(Strict):
    """The hyperparameters of one method: `name` (a `Literal` of the method's registry name) and its own fields."""

    name: str
    # Whether `prepare` can move the weights away from the starting model (its settings decide whether it does:
    # `changes_start_weights`); a two-stage sweep (`preselect:`) evaluates such perturbed models before training.
    perturbs_start: ClassVar[bool] = False

    def changes_start_weights(self) -> bool:
        """Whether `prepare` moves the weights away from the starting model (a sweep then evaluates each trial's own
        start instead of reusing the sweep's one evaluation of the starting model)."""
        return False

    def for_rows(self, rows: int) -> BaseMethodSpec:
        """This spec as it runs on a training set of `rows` rows (a method may cap a setting to the data)."""
        return self


class ContrastiveWeights(BaseMethodSpec):
    """Weights of the MMCL and in-modal SSL losses, shared by every method built on `Contrastive`.

    A field `<part>_weight` weights the loss part `<part>_loss` of the task's output; `loss_weights` names the parts
    that can carry the objective (at least one of them must be > 0).
    """

    mmcl_weight: float = Field(1.0, ge=0, description="Weight of the multimodal CLIP loss (eq. 1).")
    ssl_weight: float = Field(0.0, ge=0, description="Weight of the in-modal self-supervised loss (eq. 2).")

    def loss_weights(self) -> dict[str, float]:
        """The weights of which at least one must be > 0 (field name -> value)."""
        return {"mmcl_weight": self.mmcl_weight, "ssl_weight": self.ssl_weight}

    @model_validator(mode="after")
    def _some_loss(self) -> ContrastiveWeights:
        weights = self.loss_weights()
        if all(w == 0 for w in weights.values()):
            *first, last = weights
            raise ValueError(f"all loss weights are 0; set {', '.join(first)} or {last} > 0")
        return self


class Task(nn.Module):
    """Base class of every method: holds the CLIP model and the method's hyperparameters.

    Args:
        model: An open_clip CLIP model (`encode_image`, `encode_text`, `logit_scale` as the log inverse temperature).
        spec: The method's hyperparameters (an instance of the class's `spec_class`).
        distributed: Gather features across ranks before the contrastive losses (torch DDP).
    """

    spec_class: ClassVar[type[BaseMethodSpec]] = BaseMethodSpec

    def __init__(self, model: nn.Module, spec: BaseMethodSpec, *, distributed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.distributed = distributed

    @property
    def needs_ssl_views(self) -> bool:
        """Whether batches must carry the augmented views `image_aug` and `text_aug`."""
        return False

    def prepare(self, generator: torch.Generator) -> None:
        """Modify the model once before training (fresh runs only). Default: nothing."""

    def on_epoch_start(self, epoch: int, embed_loader: Any, device: torch.device) -> None:
        """Per-epoch hook, e.g. recomputing pseudo-labels on `embed_loader` (unshuffled, no augmentation)."""

    def fresh_parameters(self) -> list[nn.Parameter]:
        """Parameters re-initialised by `on_epoch_start`; the caller drops their optimizer state."""
        return []

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def weighted_total(parts: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """Combine named loss parts into ``{"loss": sum(w * part), part: detached value}``.

    Args:
        parts: Unweighted scalar losses by name.
        weights: The weight of each part (same keys).

    Returns:
        The output dict of `Task.forward`: the differentiable total under "loss", the parts detached.
    """
    total = sum(weights[name] * value for name, value in parts.items())
    return {"loss": total, **{name: value.detach() for name, value in parts.items()}}
