"""BadCLIP's patch optimisation (Liang et al., CVPR 2024): its objective, term by term as its official code, and
the loop (`optimise_patch`).

Official code: github.com/LiangSiyuan21/BadCLIP, `src/embeding_optimize_patch.py` (loss and loop) and `src/data.py`
(the data); docs/fidelity.md gives the line ranges and every deviation. Per step, on a batch of non-target images
x_i, each paired with a natural caption t_i of the target class:

- ``infonce``: CLIP's symmetric InfoNCE between the patched images' embeddings and the captions' embeddings, at the
  victim's own temperature exp(logit_scale) (`cleansweep.losses.mmcl_loss`).
- ``triplet``: ``mean_i max(||a_i - p_i|| - ||a_i - n_i|| + margin, 0)`` (torch's `triplet_margin_loss`, Euclidean,
  margin 1.0), anchor a_i = the patched image's embedding, positive p_i = the embedding of a real target-class image
  drawn afresh each step, negative n_i = the same image's clean (unpatched) embedding.
- ``loss = infonce + triplet_weight * triplet`` with triplet_weight 500.

Augmentation: with probability `aug_prob` (0.5) a step's images are AutoAugment-ed (ImageNet policy) before the
patch is pasted; with probability `eda_prob` (0.1) its captions are EDA-ed (`cleansweep.augment.eda`). Every draw
comes from the caller's generator: AutoAugment, which reads torch's global RNG, runs inside a forked, seeded RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn
from torchvision import transforms

from cleansweep.attacks.structured import patch_positions, stamp
from cleansweep.augment import eda
from cleansweep.errors import UserError
from cleansweep.losses import mmcl_loss

Normalize = tuple[Sequence[float], Sequence[float]]

OBJECTIVE = "badclip-infonce-triplet"  # recorded in the patch card; cards without it used the older cosine objective


class Objective(NamedTuple):
    """Weights and augmentation probabilities of the objective; the defaults are the official patch's
    (`tnature_eda_aug_bs64_ep50_16_middle_01_05_pos_neg_tri*500`, the file its README poisons with)."""

    triplet_weight: float = 500.0
    margin: float = 1.0
    eda_prob: float = 0.1
    aug_prob: float = 0.5


def draw(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k indices into n items: without replacement when n >= k (the official `randperm(n)[:k]`), else with."""
    if n >= k:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


def coin(p: float, generator: torch.Generator) -> bool:
    """True with probability p (one draw from `generator`)."""
    return bool(torch.rand((), generator=generator) < p)


def augment_images(raw: Tensor, generator: torch.Generator) -> Tensor:
    """AutoAugment (ImageNet policy) of each image (B, 3, S, S) in [0, 1], on its 8-bit values as the official
    code does on PIL images; the global RNG is forked and seeded from `generator`, so it is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    policy = transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)
    pixels = (raw.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([policy(image) for image in pixels])
    return out.to(raw.device, torch.float32) / 255


def augment_captions(captions: Sequence[str], rng: random.Random) -> list[str]:
    """One EDA operation per caption (synonym replacement, insertion, swap or deletion, alpha 0.1)."""
    return [eda(caption, rng) for caption in captions]


@torch.no_grad()
def encode_captions(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], captions: Sequence[str],
                    device: torch.device) -> Tensor:
    """(N, D) L2-normalised text embeddings (no gradient: only the patch is optimised)."""
    return F.normalize(model.encode_text(tokenizer(list(captions)).to(device)), dim=-1)


@torch.no_grad()
def image_features(model: nn.Module, raw: Tensor, norm: Callable[[Tensor], Tensor], device: torch.device,
                   batch_size: int = 64) -> Tensor:
    """(N, D) L2-normalised image embeddings of raw images in [0, 1] (the caller sets the model's mode)."""
    parts = [F.normalize(model.encode_image(norm(raw[i:i + batch_size].to(device))), dim=-1)
             for i in range(0, len(raw), batch_size)]
    return torch.cat(parts)


def triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """``mean_i max(d(a_i, p_i) - d(a_i, n_i) + margin, 0)``, d Euclidean (torch's TripletMarginLoss, as the
    official code); the negative is detached."""
    return F.triplet_margin_loss(anchor, positive, negative.detach(), margin=margin)


def patch_losses(model: nn.Module, raw: Tensor, patch: Tensor, rows: list[int], cols: list[int], text: Tensor,
                 positives: Tensor | None, norm: Callable[[Tensor], Tensor], logit_scale: float,
                 margin: float) -> dict[str, Tensor]:
    """The terms for one batch: {"infonce": ..., "triplet": ...} (see the module docstring).

    Args:
        model: the victim, in eval mode.
        raw: (B, 3, S, S) images in [0, 1], already augmented if this step augments.
        patch: (3, p, p) the patch being optimised (requires grad).
        rows, cols: top-left corner of the patch in each image.
        text: (B, D) normalised embeddings of the images' captions.
        positives: (B, D) normalised embeddings of target-class images (None: no triplet term).
        norm: the model's input normalisation.
        logit_scale: the victim's log inverse temperature.
        margin: triplet margin.
    """
    patched = F.normalize(model.encode_image(norm(stamp(raw, patch, rows, cols))), dim=-1)
    parts = {"infonce": mmcl_loss(patched, text, logit_scale)}
    if positives is not None:
        with torch.no_grad():
            clean = F.normalize(model.encode_image(norm(raw)), dim=-1)
        parts["triplet"] = triplet(patched, positives, clean, margin)
    return parts


# ------------------------------------------------------------------------------------------------ optimisation
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; its previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def normalizer(normalize: Normalize, device: torch.device) -> Callable[[Tensor], Tensor]:
    """x -> (x - mean) / std on `device`, per channel."""
    mean = torch.tensor(normalize[0], device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalize[1], device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


def initial_patch(patch_size: int, generator: torch.Generator) -> Tensor:
    """The starting patch (3, p, p): N(0.5, 0.25) clipped to [0, 1], BadCLIP's random initialisation."""
    return (0.5 + 0.25 * torch.randn((3, patch_size, patch_size), generator=generator)).clamp(0, 1)


def _positive_features(model: nn.Module, target_images: Tensor | None, norm: Callable[[Tensor], Tensor],
                       device: torch.device, weight: float) -> Tensor | None:
    """Embeddings of the target-class images the triplet term draws its positives from (None: no triplet term)."""
    if not weight:
        return None
    if target_images is None or len(target_images) == 0:
        raise UserError("the BadCLIP triplet term needs target-class images to draw positives from; pass images "
                        "that include the target class (--optimise-images) or triplet_weight=0")
    with eval_mode(model):
        return image_features(model, target_images, norm, device)


def optimise_patch(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], images: Tensor, target: str,
                   templates: Sequence[str], *, patch_size: int, location: str = "random", steps: int = 200,
                   lr: float = 0.05, seed: int = 0, batch_size: int = 64,
                   normalize: Normalize = (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
                   target_images: Tensor | None = None, captions: Sequence[str] | None = None,
                   objective: Objective = Objective(), device: str | torch.device = "cpu") -> Tensor:
    """Optimise a patch with BadCLIP's official objective (the module docstring).

    Each non-target image is paired once with a random target caption (with replacement, as the official data
    file). Each step takes `batch_size` images without replacement, AutoAugments them with probability
    `objective.aug_prob`, EDAs their captions with probability `objective.eda_prob`, pastes the patch (at random
    positions, or the bottom-right corner), draws as many target-image positives, and takes an Adam step on
    ``infonce + triplet_weight * triplet``; the patch is projected onto [0, 1] after every step.

    Args:
        model: CLIP model with `encode_image` / `encode_text` / `logit_scale` (only read; its mode is restored).
        tokenizer: the model's tokenizer.
        images: (N, 3, S, S) raw images in [0, 1] at the model resolution, not of the target class.
        target: target class name ("banana").
        templates: prompt format strings ('a photo of a {}.'): the captions when `captions` is None.
        patch_size: side of the patch in pixels.
        location: "random" (position drawn per image and step) or "fixed" (bottom-right), as the trigger.
        steps: optimisation steps.
        lr: Adam learning rate (on [0, 1] pixel values).
        seed: seeds the initial patch, the pairing, the batches, the augmentations and the positions (no global
            RNG is used).
        batch_size: images per step.
        normalize: the model's (mean, std).
        target_images: (M, 3, S, S) raw target-class images: the triplet positives (needed when its weight > 0).
        captions: natural captions of the target class (default: `templates` filled with `target`).
        objective: the weights and augmentation probabilities.
        device: where to compute.

    Returns:
        The patch, (3, patch_size, patch_size) float32 in [0, 1] on the CPU.

    Raises:
        UserError: no images, a negative step count, no target images for the triplet term, or a patch larger than
            the images.
    """
    if images.ndim != 4 or len(images) == 0:
        raise UserError("optimise_patch needs a batch (N, 3, S, S) of at least one image; pass some images")
    if steps < 0 or lr <= 0:
        raise UserError(f"steps {steps} must be >= 0 and lr {lr} > 0; pass e.g. steps=200, lr=0.05")
    device = torch.device(device)
    generator, norm = torch.Generator().manual_seed(seed), normalizer(normalize, device)
    pool = list(captions) if captions else [t.format(target) for t in templates]
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    positives = _positive_features(model, target_images, norm, device, objective.triplet_weight)
    patch = initial_patch(patch_size, generator).to(device).requires_grad_(True)
    pairing = torch.randint(len(pool), (len(images),), generator=generator)
    optimizer = torch.optim.Adam([patch], lr=lr)
    with eval_mode(model):
        pool_text = encode_captions(model, tokenizer, pool, device)
        for _ in range(steps):
            loss = _step_loss(model, tokenizer, images, patch, pool, pool_text, pairing, positives, location,
                              batch_size, objective, generator, rng, norm)
            # autograd.grad, not backward(): the patch is the only leaf that receives a gradient.
            (patch.grad,) = torch.autograd.grad(loss, [patch])
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
    return patch.detach().float().cpu()


def _step_loss(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], images: Tensor, patch: Tensor,
               pool: list[str], pool_text: Tensor, pairing: Tensor, positives: Tensor | None, location: str,
               batch_size: int, objective: Objective, generator: torch.Generator, rng: random.Random,
               norm: Callable[[Tensor], Tensor]) -> Tensor:
    """`infonce + triplet_weight * triplet` of one step (its batch, augmentations and positives drawn here)."""
    pick = draw(len(images), min(batch_size, len(images)), generator)
    raw = images[pick].to(patch.device)
    if coin(objective.aug_prob, generator):
        raw = augment_images(raw, generator)
    if coin(objective.eda_prob, generator):
        text = encode_captions(model, tokenizer, augment_captions([pool[i] for i in pairing[pick]], rng),
                               patch.device)
    else:
        text = pool_text[pairing[pick].to(patch.device)]
    b, _, h, w = raw.shape
    rows, cols = patch_positions(b, h, w, patch.shape[-2], patch.shape[-1], location, generator)
    chosen = None if positives is None else positives[draw(len(positives), b, generator).to(positives.device)]
    parts = patch_losses(model, raw, patch, rows, cols, text, chosen, norm, float(model.logit_scale.detach()),
                         objective.margin)
    return parts["infonce"] + objective.triplet_weight * parts.get("triplet", 0.0)
