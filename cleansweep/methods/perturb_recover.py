"""Perturb and Recover (Singh, Croce, Hein 2024): CLIP loss minus a capped push away from the poisoned model.

Each training batch, as the official code does (github.com/nmndeep/PerturbAndRecover: `utils.py` builds the
augmentation, `train.py` the forward pass, `losses.py` the loss; docs/fidelity.md gives the line ranges):

1. Trigger-free augmentation of the images (`par_augment`), used by *both* terms: each image, with probability 0.5,
   gets half-rectified Gaussian noise on its [0, 1] pixels, ``clip(x + clip(n, 0, 1), 0, 1)`` with n ~ N(0, 0.2^2);
   then, with probability 0.5, a square of 0.5-1% of its area is erased to 0 in normalised space, i.e. to the
   dataset's mean colour (torchvision `RandomErasing`). Captions are not augmented. Only in train mode.
2. ``loss = mmcl - par_weight * (push(image) + push(text))`` (+ `ssl_weight` * SSL if asked; the paper uses none),
   where ``push(m) = mean_i (1 - cos(f(x_i), f0(x_i)))`` over the batch (all ranks) when that mean is <= `par_cap`,
   else 0 with no gradient (`capped_batch_distance`). f0 is a frozen copy of the model taken at `prepare` time (the
   poisoned model the cleaning starts from), always in eval mode, as the official frozen model is.
3. The CLIP temperature is fixed: the official code passes ``logit_scale.exp().item()``, a constant, so
   `logit_scale` never trains. Here it enters with a zero gradient (still in the graph, so DDP sees it used).

With unit embeddings ||f - f0||^2 = 2 (1 - cos), so the official 0.5 * squared L2 per modality and threshold tau 2.15
are par_weight 1.0 and par_cap 1.075 here. No trigger knowledge is used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from pydantic import Field
from torch import Tensor, nn
from torchvision import transforms

from cleansweep.losses import gather_features, mmcl_loss, ssl_loss
from cleansweep.methods.base import ContrastiveWeights, weighted_total
from cleansweep.methods.contrastive import Contrastive

NOISE_STD = 0.2  # AddGaussianNoise(0, 0.2) of the official code
NOISE_P = 0.5  # its RandomApply probability
ERASE_P = 0.5  # its RandomErasing probability
ERASE_SCALE = (0.005, 0.01)  # erased fraction of the area; ratio (1, 1): a square; value 0 after Normalize


def half_rectified_noise(raw: Tensor, noise: Tensor) -> Tensor:
    """``clip(raw + clip(noise, 0, 1), 0, 1)``: the official AddGaussianNoise, which clips the noise itself to [0, 1]
    before adding it (so pixels only brighten) and then the image; `raw` in [0, 1] pixel space."""
    return (raw + noise.clamp(0, 1)).clamp(0, 1)


def par_augment(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The official trigger-free augmentation of a normalised batch (B, 3, H, W); draws from the global RNG.

    Per image: with probability `NOISE_P`, `half_rectified_noise` with N(0, NOISE_STD^2) on the de-normalised
    pixels; then `RandomErasing(p=ERASE_P, scale=ERASE_SCALE, ratio=(1, 1), value=0)` on the normalised image.
    """
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    raw = images * s + m
    noisy = half_rectified_noise(raw, torch.randn_like(raw) * NOISE_STD)
    chosen = torch.rand((raw.shape[0], 1, 1, 1), device=raw.device) < NOISE_P
    x = (torch.where(chosen, noisy, raw) - m) / s
    eraser = transforms.RandomErasing(p=ERASE_P, scale=ERASE_SCALE, ratio=(1.0, 1.0), value=0)
    return torch.stack([eraser(image) for image in x])


def capped_batch_distance(features: Tensor, reference: Tensor, cap: float,
                          gather: Callable[[Tensor], Tensor] = lambda x: x) -> Tensor:
    """The official PAR push of one modality: mean_i (1 - cos(f_i, r_i)), or 0 when that batch mean exceeds `cap`.

    Above the cap the whole term is the constant 0 (no gradient): the official `threshold_tensor` replaces the
    batch-mean squared L2 distance by 0 when it is > tau. The decision uses the mean over all ranks (`gather`, the
    official code all-gathers); the value and gradient are the local mean, which DDP's gradient averaging turns into
    the gradient of the global mean.

    Args:
        features: (N, D) L2-normalised embeddings of the model being trained.
        reference: (N, D) L2-normalised embeddings of the same inputs from the frozen model (detached here).
        cap: threshold on the batch mean of 1 - cos (half the official tau on squared L2).
        gather: all-gathers per-row values across ranks (identity in one process).
    """
    distance = 1 - (features * reference.detach()).sum(dim=-1)
    over = gather(distance.detach()).mean() > cap
    return torch.where(over, torch.zeros_like(distance[0]), distance.mean())


class PerturbRecoverSpec(ContrastiveWeights):
    name: Literal["perturb_recover"] = "perturb_recover"
    par_weight: float = Field(
        1.0, ge=0, description="Perturb-and-Recover: weight of the capped push away from the frozen starting model's "
        "image + text embeddings (1.0 = the PAR paper's 0.5 x (image + text) squared L2)."
    )
    par_cap: float = Field(
        1.075, gt=0, le=2, description="Perturb-and-Recover: cap on the batch mean of 1 - cos(f, f0) per modality; "
        "above it the push is 0 (no gradient), as the official threshold; 2 = uncapped (1.075 = the official tau "
        "2.15 on squared L2)."
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that never trains: no gradients, eval mode (BatchNorm running statistics, no dropout),
    as the official frozen model (`t_model`, put in eval mode on loading and never switched back)."""
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    for p in frozen.parameters():
        p.grad = None
    return frozen.eval()


class PerturbRecover(Contrastive):
    """CLIP loss on augmented images minus `par_weight` * the capped push of image and text embeddings from the
    frozen start (see the module docstring)."""

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

    def normalization(self) -> tuple[Sequence[float], Sequence[float]]:
        """(mean, std) the batch images were normalised with: the model's preprocess config, else CLIP's."""
        visual = getattr(self.model, "visual", self.model)
        return getattr(visual, "image_mean", OPENAI_DATASET_MEAN), getattr(visual, "image_std", OPENAI_DATASET_STD)

    @torch.no_grad()
    def _frozen_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """f0's normalised features of the batch's (augmented) images and captions, in eval mode."""
        frozen = self.frozen
        if frozen is None:
            raise RuntimeError("perturb_recover: prepare() was not called and no checkpoint restored the frozen model")
        frozen.eval()
        return {"image": frozen.encode_image(batch["image"], normalize=True),
                "text": frozen.encode_text(batch["text"], normalize=True)}

    def losses(self, batch: dict[str, Tensor], feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        logit_scale = self.model.logit_scale
        scale = logit_scale.detach() + 0 * logit_scale  # the official constant temperature: zero gradient
        g = self._gather
        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if self.spec.mmcl_weight > 0:
            parts["mmcl_loss"] = mmcl_loss(g(feats["image"]), g(feats["text"]), scale)
            weights["mmcl_loss"] = self.spec.mmcl_weight
        if self.needs_ssl_views:
            parts["ssl_loss"] = (ssl_loss(g(feats["image"]), g(feats["image_aug"]), scale)
                                 + ssl_loss(g(feats["text"]), g(feats["text_aug"]), scale)) / 2
            weights["ssl_loss"] = self.spec.ssl_weight
        ref = self._frozen_features(batch)
        cap, gather = self.spec.par_cap, (gather_features if self.distributed else (lambda x: x))
        # float32: under bf16 autocast, 1 - cos of nearby unit vectors would round to 0.
        parts["par_loss"] = (capped_batch_distance(feats["image"].float(), ref["image"].float(), cap, gather)
                             + capped_batch_distance(feats["text"].float(), ref["text"].float(), cap, gather))
        weights["par_loss"] = -self.spec.par_weight
        return parts, weights

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.training:
            batch = {**batch, "image": par_augment(batch["image"], *self.normalization())}
        feats = self.encode(batch)
        parts, weights = self.losses(batch, feats)
        return weighted_total(parts, weights)
