"""Perturb and Recover (Singh, Croce, Hein 2024): contrastive loss minus a capped push away from the poisoned model.

Per batch: ``loss = contrastive - par_weight * (capped(image) + capped(text))`` where ``capped(m)`` is the mean over
samples of ``min(1 - cos(f(x), f0(x)), par_cap)`` (`losses.capped_distance`) and f0 is a frozen copy of the model
taken at `prepare` time (the poisoned model the cleaning starts from). The push moves the embeddings away from the
poisoned ones until the cap, beyond which a sample is no longer pushed; the CLIP loss keeps or recovers accuracy. No
trigger knowledge is used.

Against the paper's code: it caps the *batch mean* of the squared L2 distance and drops the whole term above its
threshold; here every sample is capped on its own. With unit embeddings ||f - f0||^2 = 2 (1 - cos), so its weight
0.5 per modality and tau 2.15 are par_weight 1.0 and par_cap 1.075 here.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cleansweep.losses import capped_distance
from cleansweep.methods.base import ContrastiveWeights
from cleansweep.methods.contrastive import Contrastive


class PerturbRecoverSpec(ContrastiveWeights):
    name: Literal["perturb_recover"] = "perturb_recover"
    par_weight: float = Field(
        1.0, ge=0, description="Perturb-and-Recover: weight of the capped push away from the frozen starting model's "
        "image + text embeddings (1.0 = the PAR paper's 0.5 x (image + text) squared L2)."
    )
    par_cap: float = Field(
        1.075, gt=0, le=2, description="Perturb-and-Recover: cap of the per-sample distance 1 - cos(f, f0) beyond "
        "which there is no push; 2 = uncapped (1.075 = the PAR paper's tau 2.15 on squared L2)."
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that never trains: no gradients, and BatchNorm that never updates its statistics.

    BatchNorm layers are set to `track_running_stats=False`: in train mode they normalise with the batch's
    statistics, like the trained model does, without moving the copy's running statistics (eval mode still uses
    them). So at the start of cleaning f(x) == f0(x) exactly, instead of differing by the train/eval mode gap.
    """
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    for p in frozen.parameters():
        p.grad = None
    for module in frozen.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
    return frozen


class PerturbRecover(Contrastive):
    """Contrastive objective minus `par_weight * capped_distance` of image and text embeddings to the frozen start."""

    spec_class = PerturbRecoverSpec
    spec: PerturbRecoverSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_frozen(None)

    @property
    def frozen(self) -> nn.Module | None:
        """The model as it was at `prepare` time (or as restored from a checkpoint); None before either."""
        return self.__dict__["_frozen"]

    def _set_frozen(self, model: nn.Module | None) -> None:
        # Kept out of the module tree on purpose: parameters(), the optimizer, DDP (which would broadcast its
        # buffers every step) and state_dict's "model." keys never see it; it travels via get/set_extra_state.
        self.__dict__["_frozen"] = model

    def prepare(self, generator: torch.Generator) -> None:
        self._set_frozen(frozen_copy(self.model))

    def get_extra_state(self) -> dict[str, Tensor]:
        if self.frozen is None:
            return {}
        return {k: v.detach().cpu() for k, v in self.frozen.state_dict().items()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._set_frozen(None)
            return
        frozen = frozen_copy(self.model)
        frozen.load_state_dict(state)
        self._set_frozen(frozen)

    @torch.no_grad()
    def _frozen_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """f0's normalised features of the original views, from the same inputs the trained model saw."""
        frozen = self.frozen
        if frozen is None:
            raise RuntimeError("perturb_recover: prepare() was not called and no checkpoint restored the frozen model")
        if frozen.training != self.model.training:
            frozen.train(self.model.training)
        image, text = batch["image"], batch["text"]
        n = image.shape[0]
        # With SSL views the trained model runs on cat([orig, aug]); so does f0, for the same BatchNorm statistics.
        if self.needs_ssl_views:
            image = torch.cat([image, batch["image_aug"]])
            text = torch.cat([text, batch["text_aug"]])
        return {"image": frozen.encode_image(image, normalize=True)[:n],
                "text": frozen.encode_text(text, normalize=True)[:n]}

    def losses(self, batch: dict[str, Tensor], feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        parts, weights = super().losses(batch, feats)
        ref = self._frozen_features(batch)
        cap = self.spec.par_cap
        # float32: under bf16 autocast, 1 - cos of nearby unit vectors would round to 0.
        parts["par_loss"] = (capped_distance(feats["image"].float(), ref["image"].float(), cap)
                             + capped_distance(feats["text"].float(), ref["text"].float(), cap))
        weights["par_loss"] = -self.spec.par_weight
        return parts, weights
