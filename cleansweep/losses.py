"""Loss functions: tensors in, a scalar tensor out. No modules, no mode flags (SLIP's losses.py style).

`logit_scale` is always the log of the inverse temperature (scale = exp(logit_scale)), the learned CLIP parameter
initialised at ln(1/0.07). Methods combine these with weights; see `cleansweep.methods`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _scale(logit_scale: Tensor | float) -> Tensor:
    return torch.as_tensor(logit_scale).exp()


def mmcl_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Multimodal contrastive loss, the paper's eq. (1) (CLIP's symmetric InfoNCE).

    Args:
        image_features: (N, D) L2-normalised image embeddings; row i pairs with text row i.
        text_features: (N, D) L2-normalised text embeddings.
        logit_scale: log inverse temperature (scalar).

    Returns:
        (CE(logits, arange) + CE(logits.T, arange)) / 2 with logits = exp(logit_scale) * I @ T.T, mean over rows.
    """
    logits = _scale(logit_scale) * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ssl_loss(features: Tensor, augmented_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """In-modal self-supervised loss of CleanCLIP (paper eq. (2)), one modality, one direction.

    CleanCLIP's SSL term is the mean of this loss on images and on texts, with the same learned scale and no
    projection head.

    Args:
        features: (N, D) L2-normalised embeddings of the original views.
        augmented_features: (N, D) L2-normalised embeddings of the augmented views; row i pairs with row i.
        logit_scale: log inverse temperature (scalar).

    Returns:
        CE(exp(logit_scale) * F @ F_aug.T, arange), mean over rows.
    """
    logits = _scale(logit_scale) * features @ augmented_features.T
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def cluster_loss(logits: Tensor, pseudo_labels: Tensor) -> Tensor:
    """Deep-clustering loss: mean cross-entropy of a classifier head against k-means pseudo-labels.

    Args:
        logits: (N, K) head outputs.
        pseudo_labels: (N,) cluster indices in [0, K).
    """
    return F.cross_entropy(logits, pseudo_labels)


def l2_to_init(params: Iterable[Tensor], init_params: Iterable[Tensor]) -> Tensor:
    """Squared Euclidean distance to the initial weights, sum_i ||theta_i - theta0_i||^2 (no 1/2 factor).

    The method's `l2_init_weight` multiplies this value; the gradient is 2 * (theta - theta0) per parameter.

    Args:
        params: the current parameters.
        init_params: the starting parameters, same order and shapes (detached; no gradient flows into them).
    """
    total: Tensor | None = None
    for p, p0 in zip(params, init_params, strict=True):
        term = (p - p0.detach()).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2_to_init needs at least one parameter")
    return total


def gather_features(x: Tensor) -> Tensor:
    """All-gather a (n, ...) tensor from every rank, keeping the gradient through the local rows only.

    With torch.distributed initialised and world size > 1, every rank gets the global (N, ...) batch in rank order
    and computes the full N x N loss; the gathered copies of other ranks' rows carry no gradient (the reference's
    and open_clip's default, gather_with_grad=False). Ranks may hold different numbers of rows (a batch that lost
    bad images): sizes are exchanged first and rows padded for the collective. Identity otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.detach()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    parts = [part[:n] for part, n in zip(parts, counts, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def capped_distance(features: Tensor, reference: Tensor, cap: float) -> Tensor:
    """Mean over rows of min(1 - cos(f_i, r_i), cap): the capped push of Perturb-and-Recover (PAR).

    1 - cos is half the squared L2 distance of unit vectors, the distance the PAR paper caps (its threshold tau on
    ||f - r||^2 is 2 * cap here). Rows beyond the cap contribute the constant `cap` and no gradient.

    Args:
        features: (N, D) L2-normalised embeddings of the model being trained.
        reference: (N, D) L2-normalised embeddings of the same inputs from a frozen model (detached here).
        cap: the largest per-row distance that still counts, in (0, 2]; 2 caps nothing.

    Returns:
        Scalar in [0, cap].
    """
    distance = 1 - (features * reference.detach()).sum(dim=-1)
    return distance.clamp(max=cap).mean()
