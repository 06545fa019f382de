"""The task contract: a training objective wrapped around a CLIP model.

A task is an `nn.Module` whose `forward(batch)` returns ``{"loss": total, <part>: value, ...}``: the total is a
weighted sum of small named losses (SLIP's `losses.py` style), and the loop logs every part without extra code.
Two optional hooks, no-ops here: `prepare(generator)` runs once before the first step of a fresh run (never on
resume: the checkpoint already holds the prepared weights), `on_epoch_start(epoch, embed_loader, device)` runs at
the start of every epoch that starts from its first batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cleansweep.config import MethodSpec


class Task(nn.Module):
    """Base class of every method: holds the CLIP model and the method's hyperparameters.

    Args:
        model: An open_clip CLIP model (`encode_image`, `encode_text`, `logit_scale` as the log inverse temperature).
        spec: The method's hyperparameters.
        distributed: Gather features across ranks before the contrastive losses (torch DDP).
    """

    def __init__(self, model: nn.Module, spec: MethodSpec, *, distributed: bool = False) -> None:
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
