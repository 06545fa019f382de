"""Contrastive objectives: MMCL, in-modal SSL, and their weighted sum.

One class covers MMCL-only (ssl_weight 0), SSL-only (mmcl_weight 0), CleanCLIP finetuning (1, 1 by default; the
paper also sweeps the SSL weight) and the paper's two pre-training objectives (MMCL: 1, 0; MMCL+SSL: 1, 1).
Heavy regularization is this class with a weight-decay search space, not a class of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cleansweep.losses import gather_features, mmcl_loss, ssl_loss
from cleansweep.methods.base import ContrastiveWeights, Task, weighted_total


class ContrastiveSpec(ContrastiveWeights):
    name: Literal["contrastive"] = "contrastive"


class Contrastive(Task):
    """Weighted MMCL (eq. 1) + CleanCLIP in-modal SSL (eq. 2).

    With SSL views, one forward runs over ``cat([orig, aug])`` as the reference implementations do, so BatchNorm
    statistics mix both views.
    """

    spec_class = ContrastiveSpec
    spec: ContrastiveWeights

    @property
    def needs_ssl_views(self) -> bool:
        return self.spec.ssl_weight > 0

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """L2-normalised features of the batch (and of its augmented views when the method uses them)."""
        image, text = batch["image"], batch["text"]
        n = image.shape[0]
        if self.needs_ssl_views:
            image = torch.cat([image, batch["image_aug"]])
            text = torch.cat([text, batch["text_aug"]])
        img = self.model.encode_image(image, normalize=True)
        txt = self.model.encode_text(text, normalize=True)
        feats = {"image": img[:n], "text": txt[:n]}
        if self.needs_ssl_views:
            feats |= {"image_aug": img[n:], "text_aug": txt[n:]}
        return feats

    def _gather(self, x: Tensor) -> Tensor:
        # Every rank computes the full N_global x N_global loss; gradients flow through its local rows only.
        return gather_features(x) if self.distributed else x

    def losses(self, batch: dict[str, Tensor], feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Unweighted loss parts and their weights; subclasses add their own parts to these."""
        scale = self.model.logit_scale
        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if self.spec.mmcl_weight > 0:
            parts["mmcl_loss"] = mmcl_loss(self._gather(feats["image"]), self._gather(feats["text"]), scale)
            weights["mmcl_loss"] = self.spec.mmcl_weight
        if self.needs_ssl_views:
            g = self._gather
            # CleanCLIP: the mean of the image-image and text-text InfoNCE terms, one direction each.
            parts["ssl_loss"] = (
                ssl_loss(g(feats["image"]), g(feats["image_aug"]), scale)
                + ssl_loss(g(feats["text"]), g(feats["text_aug"]), scale)
            ) / 2
            weights["ssl_loss"] = self.spec.ssl_weight
        return parts, weights

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feats = self.encode(batch)
        parts, weights = self.losses(batch, feats)
        return weighted_total(parts, weights)
