"""L2-to-initial-weights regularisation: contrastive loss + weight * ||theta - theta_0||^2.

The reference code's "heavy regularization" was AdamW weight decay only, which pulls weights toward zero; this
method pulls them toward the weights the cleaning started from (theta_0 = the model at `prepare` time), as a
distinct, named method.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from cleansweep.losses import l2_to_init
from cleansweep.methods.base import ContrastiveWeights
from cleansweep.methods.contrastive import Contrastive


class L2InitSpec(ContrastiveWeights):
    name: Literal["l2_init"] = "l2_init"
    l2_init_weight: float = Field(0.0, ge=0, description="Weight of the L2 pull toward the initial weights.")


class L2Init(Contrastive):
    """Contrastive objective plus `l2_init_weight * l2_to_init(params, params at prepare time)`."""

    spec_class = L2InitSpec
    spec: L2InitSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Plain tensors saved through get/set_extra_state, not buffers: DDP would broadcast buffers every step.
        self._anchors: list[Tensor] | None = None

    def _params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def prepare(self, generator: torch.Generator) -> None:
        self._anchors = [p.detach().clone() for p in self._params()]

    def get_extra_state(self) -> dict[str, Tensor]:
        return {} if self._anchors is None else {str(i): a.cpu() for i, a in enumerate(self._anchors)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._anchors = None
            return
        params = self._params()
        self._anchors = [state[str(i)].to(p.device, p.dtype) for i, p in enumerate(params)]

    def losses(self, batch: dict[str, Tensor], feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        parts, weights = super().losses(batch, feats)
        if self._anchors is None:
            raise RuntimeError("l2_init: prepare() was not called and no checkpoint restored the initial weights")
        parts["l2_init_loss"] = l2_to_init(self._params(), self._anchors)
        weights["l2_init_loss"] = self.spec.l2_init_weight
        return parts, weights
