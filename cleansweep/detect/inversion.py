"""Trigger inversion without knowing the trigger (DECREE, Feng et al., CVPR 2023): the math, on tensors only.

DECREE's observation: a backdoored image encoder maps every image that carries its trigger to (nearly) one
embedding, so a *small* trigger that collapses the embeddings of clean images exists; for a clean encoder the
smallest such trigger has to cover much of the image. The scan optimises a mask m (1, H, W) and a pattern p
(3, H, W), both in [0, 1] through a sigmoid, so that triggered images x' = (1 - m) * x + m * p have a high mean
pairwise cosine similarity, while an L1 penalty on m, whose weight adapts as in DECREE's code, keeps the mask small.

Reported: the mask's normalised L1 norm |m|_1 / (H * W) (DECREE's PL1-norm, small = backdoor-like), the similarity
reached, the zero-shot class the inverted trigger sends non-target images to (the suspected target) with that share
(a proxy attack success rate), and, against a clean reference model, the ratio of the two PL1-norms.
No files and no command here: `cleansweep.detect.proxy` stores an inversion, `cleansweep.detect.scan` runs it on a
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleansweep.errors import UserError
from cleansweep.evaluate import EvalMode, evaluate, normalizer, unwrap
from cleansweep.objective import ASR

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]]
Trigger = Callable[[Tensor, torch.Generator], Tensor]

PL1_THRESHOLD = 0.1  # DECREE's rule: an encoder whose PL1-norm is below 0.1 is flagged
# Measured on tiny-rn twins (32 px, 5 seeds): backdoored / clean PL1 0.35-0.49, clean / clean (other seed) >= 0.83.
RATIO_THRESHOLD = 0.6


# ------------------------------------------------------------------------------------------------ pure math
def apply_trigger(raw: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """Triggered images (1 - m) * x + m * p.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        mask: (1, H, W) in [0, 1].
        pattern: (3, H, W) in [0, 1].
    """
    return (1 - mask) * raw + mask * pattern


def mean_pairwise_cosine(features: Tensor) -> Tensor:
    """Mean cosine similarity over all ordered pairs i != j of the rows of `features` (N >= 2), as DECREE measures."""
    n = features.shape[0]
    unit = F.normalize(features, dim=-1)
    sims = unit @ unit.T
    return (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))


def pl1_norm(mask: Tensor) -> float:
    """DECREE's PL1-norm |m|_1 / (H * W) of a (1, H, W) mask in [0, 1]."""
    return float(mask.abs().sum() / (mask.shape[-1] * mask.shape[-2]))


class PenaltyWeight:
    """The adaptive weight of the L1 mask penalty, as DECREE's code adapts it.

    After more than `patience` consecutive steps at or above the similarity target the weight is multiplied by
    `factor` (shrink the mask while the collapse holds), after more than `patience` below it divided by `factor`,
    kept within [minimum, maximum]. DECREE: factor 5, patience 5.
    """

    def __init__(self, init: float = 1.0, *, factor: float = 5.0, patience: int = 5, minimum: float = 1e-3,
                 maximum: float = 1e3) -> None:
        self.value, self.factor, self.patience = init, factor, patience
        self.minimum, self.maximum = minimum, maximum
        self.above = self.below = 0

    def update(self, reached: bool) -> float:
        """Count one step (`reached`: the similarity target was met) and return the weight for the next step."""
        self.above, self.below = (self.above + 1, 0) if reached else (0, self.below + 1)
        if self.above > self.patience:
            self.value, self.above = min(self.value * self.factor, self.maximum), 0
        elif self.below > self.patience:
            self.value, self.below = max(self.value / self.factor, self.minimum), 0
        return self.value


# ------------------------------------------------------------------------------------------------ model helpers
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def _encode_all(module: nn.Module, images: Tensor, norm: Callable[[Tensor], Tensor], batch_size: int,
                trigger: Trigger | None = None, seed: int = 0) -> Tensor:
    device, generator, out = _device_of(module), torch.Generator().manual_seed(seed), []
    for start in range(0, len(images), batch_size):
        raw = images[start:start + batch_size]
        raw = trigger(raw, generator) if trigger is not None else raw
        out.append(module.encode_image(norm(raw.to(device))).float())
    return torch.cat(out)


def embedding_similarity(model: nn.Module, images: Tensor, normalize: Normalize, *, trigger: Trigger | None = None,
                         batch_size: int = 64) -> float:
    """Mean pairwise cosine similarity of the image embeddings of `images` (optionally triggered), no gradients."""
    module = unwrap(model)
    with EvalMode(module):
        return float(mean_pairwise_cosine(_encode_all(module, images, normalizer(normalize), batch_size, trigger)))


def predict_classes(model: nn.Module, classifier: Tensor, images: Tensor, normalize: Normalize, *,
                    trigger: Trigger | None = None, seed: int = 0, batch_size: int = 64) -> Tensor:
    """Zero-shot top-1 class of each image (after `trigger(raw, generator)` when given), (N,) long on CPU."""
    module = unwrap(model)
    with EvalMode(module):
        features = _encode_all(module, images, normalizer(normalize), batch_size, trigger, seed)
    return (F.normalize(features, dim=-1) @ classifier.to(features)).argmax(dim=-1).cpu()


# ------------------------------------------------------------------------------------------------ inversion
@dataclass
class Inversion:
    """An inverted trigger and how it was found.

    Attributes:
        mask: (1, H, W) in [0, 1], on CPU.
        pattern: (3, H, W) in [0, 1], on CPU.
        pl1_norm: |mask|_1 / (H * W).
        similarity: mean pairwise cosine similarity of all triggered images' embeddings.
        clean_similarity: the same for the images without trigger (the baseline the trigger raised).
        reached: whether a step met the similarity target (the kept trigger is then the smallest such mask).
        step: the optimisation step the kept trigger comes from.
        history: per step `similarity` (of the batch), `pl1_norm`, `weight` (the L1 weight used).
        settings: the inversion settings, seed included.
    """

    mask: Tensor
    pattern: Tensor
    pl1_norm: float
    similarity: float
    clean_similarity: float
    reached: bool
    step: int
    history: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The numbers and settings, JSON-ready (no tensors)."""
        return {k: v for k, v in asdict(self).items() if k not in ("mask", "pattern")}


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"trigger inversion needs raw images (N, 3, H, W), got shape {tuple(images.shape)}; "
                        "pass a batch of RGB images")
    if len(images) < 2:
        raise UserError(f"trigger inversion needs at least 2 images, got {len(images)}; pass more images")
    if images.min() < 0 or images.max() > 1:
        raise UserError("trigger inversion needs raw images in [0, 1] (before normalisation); pass raw images")


def _init_logits(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    # DECREE starts from a uniformly random mask and pattern; clamped so the logits stay finite.
    start = torch.rand(shape, generator=generator).clamp(0.01, 0.99)
    return torch.logit(start).to(device).requires_grad_()


def _invert_step(module: nn.Module, batch: Tensor, logits: tuple[Tensor, Tensor], norm: Callable[[Tensor], Tensor],
                 weight: float, optimizer: torch.optim.Optimizer) -> tuple[float, Tensor, Tensor]:
    """One Adam step on the mask and pattern logits; returns the batch similarity and the (mask, pattern) it had."""
    mask, pattern = torch.sigmoid(logits[0]), torch.sigmoid(logits[1])
    similarity = mean_pairwise_cosine(module.encode_image(norm(apply_trigger(batch, mask, pattern))).float())
    loss = -similarity + weight * mask.mean()
    # autograd.grad w.r.t. the logits only: the model's parameters and their .grad stay untouched.
    grads = torch.autograd.grad(loss, logits)
    for logit, grad in zip(logits, grads, strict=True):
        logit.grad = grad
    optimizer.step()
    return similarity.item(), mask.detach(), pattern.detach()


def invert_trigger(model: nn.Module, images: Tensor, normalize: Normalize, *, steps: int = 300, lr: float = 0.5,
                   batch_size: int = 32, threshold: float = 0.99, init_weight: float = 1.0, seed: int = 0,
                   device: str | torch.device | None = None) -> Inversion:
    """Find the smallest mask-and-pattern trigger that collapses the image embeddings (DECREE).

    Loss per step: -mean pairwise cosine of the triggered batch's embeddings + weight * |m|_1 / (H * W), Adam with
    betas (0.5, 0.9) on the logits of m and p (DECREE's optimiser), the weight adapted by `PenaltyWeight`. The kept
    trigger is the smallest mask among the steps whose batch similarity reached `threshold`, else the last one.

    Args:
        model: a CLIP model with `encode_image` (its mode is restored; its weights are not changed).
        images: (N, 3, H, W) raw clean images in [0, 1], N >= 2, at the model resolution (stay on the CPU).
        normalize: callable on raw batches, or `(mean, std)` per channel.
        steps: optimisation steps.
        lr: Adam learning rate on the logits (DECREE: 0.5; converged fastest of 0.1, 0.2, 0.5 on tiny-rn).
        batch_size: images per step, drawn without replacement (all of them when N is smaller).
        threshold: the similarity target (DECREE: 0.99).
        init_weight: first weight of the PL1-norm penalty.
        seed: seeds the initial mask and pattern and the batch draws (no global RNG is used).
        device: where to compute; default: where the model is.

    Returns:
        The `Inversion`; its similarities are re-measured on all images without gradients.
    """
    _check_images(images)
    if steps < 1 or batch_size < 2 or lr <= 0:
        raise UserError(f"inversion needs steps >= 1, batch_size >= 2 and lr > 0 (got {steps}, {batch_size}, {lr}); "
                        "fix the settings")
    module, norm = unwrap(model), normalizer(normalize)
    device = torch.device(device) if device is not None else _device_of(module)
    generator = torch.Generator().manual_seed(seed)
    _, _, h, w = images.shape
    logits = (_init_logits((1, h, w), generator, device), _init_logits((3, h, w), generator, device))
    optimizer = torch.optim.Adam(logits, lr=lr, betas=(0.5, 0.9))
    weight = PenaltyWeight(init_weight)
    history: dict[str, list[float]] = {"similarity": [], "pl1_norm": [], "weight": []}
    best: tuple[float, int, Tensor, Tensor] | None = None
    with EvalMode(module):
        for step in range(steps):
            pick = torch.randperm(len(images), generator=generator)[:batch_size]
            used = weight.value
            similarity, mask, pattern = _invert_step(module, images[pick].to(device), logits, norm, used, optimizer)
            size, reached = pl1_norm(mask), similarity >= threshold
            if reached and (best is None or size < best[0]):
                best = (size, step, mask.clone(), pattern.clone())
            weight.update(reached)
            for key, value in (("similarity", similarity), ("pl1_norm", size), ("weight", used)):
                history[key].append(value)
    reached = best is not None
    if best is None:
        best = (pl1_norm(mask), steps - 1, mask, pattern)
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "threshold": threshold,
                "init_weight": init_weight, "seed": seed, "optimizer": "Adam(betas=(0.5, 0.9))",
                "weight_factor": weight.factor, "weight_patience": weight.patience}
    return _finish(module, images, norm, best, history, settings, reached=reached)


def _finish(module: nn.Module, images: Tensor, norm: Callable[[Tensor], Tensor],
            best: tuple[float, int, Tensor, Tensor], history: dict[str, list[float]], settings: dict[str, Any], *,
            reached: bool) -> Inversion:
    size, step, mask, pattern = best
    mask, pattern = mask.cpu(), pattern.cpu()
    trigger = inverted_trigger(mask, pattern)
    batch = settings["batch_size"]
    return Inversion(mask=mask, pattern=pattern, pl1_norm=size, reached=reached, step=step, history=history,
                     similarity=embedding_similarity(module, images, norm, trigger=trigger, batch_size=batch),
                     clean_similarity=embedding_similarity(module, images, norm, batch_size=batch),
                     settings=settings)


def inverted_trigger(mask: Tensor, pattern: Tensor) -> Trigger:
    """The inverted trigger as a `cleansweep.attacks.registry` trigger: `fn(raw (B, 3, H, W), generator) -> raw`.

    Deterministic (the generator is accepted and unused), so `evaluate(..., trigger=...)` measures a proxy ASR.
    """
    mask, pattern = checked_trigger(mask, pattern, "inverted trigger")

    def trigger(raw: Tensor, generator: torch.Generator) -> Tensor:
        if tuple(raw.shape[-2:]) != tuple(mask.shape[-2:]):
            raise UserError(f"the inverted trigger is {mask.shape[-2]}x{mask.shape[-1]} but the images are "
                            f"{raw.shape[-2]}x{raw.shape[-1]}; scan the model at the resolution it is evaluated at")
        return apply_trigger(raw, mask.to(raw), pattern.to(raw))

    return trigger


def checked_trigger(mask: Tensor, pattern: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """(mask, pattern) detached as float when they are a (1, H, W) and a (3, H, W) in [0, 1]; UserError naming
    `what` otherwise."""
    if mask.ndim != 3 or mask.shape[0] != 1 or tuple(pattern.shape) != (3, *mask.shape[1:]):
        raise UserError(f"{what}: mask must be (1, H, W) and pattern (3, H, W), got {tuple(mask.shape)} and "
                        f"{tuple(pattern.shape)}; pass a mask and pattern from `invert_trigger`")
    for name, t in (("mask", mask), ("pattern", pattern)):
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise UserError(f"{what}: {name} values must lie in [0, 1]; pass a mask and pattern from `invert_trigger`")
    return mask.detach().float(), pattern.detach().float()


# ------------------------------------------------------------------------------------------------ target, proxy ASR
def suspected_target(model: nn.Module, classifier: Tensor, images: Tensor, labels: Tensor, trigger: Trigger,
                     normalize: Normalize, *, seed: int = 0, batch_size: int = 64) -> tuple[int, float]:
    """The class the trigger sends the most images of *other* classes to, and that share (a proxy ASR).

    For each class c: share_c = #(triggered prediction == c and label != c) / #(label != c); the suspected target is
    argmax_c share_c (the lowest index on ties).

    Args:
        model: a CLIP model with `encode_image`.
        classifier: (D, C) from `zeroshot_classifier`.
        images: (N, 3, H, W) raw images in [0, 1].
        labels: (N,) true classes.
        trigger: `trigger(raw, generator) -> raw`, e.g. `inverted_trigger(mask, pattern)`.
        normalize: callable on raw batches, or `(mean, std)` per channel.
        seed: seeds the trigger's generator.
        batch_size: images per forward pass.

    Returns:
        (class index, share in [0, 1]).
    """
    labels = torch.as_tensor(labels).cpu()
    pred = predict_classes(model, classifier, images, normalize, trigger=trigger, seed=seed, batch_size=batch_size)
    classes = torch.arange(classifier.shape[1])
    others = labels[None, :] != classes[:, None]  # (C, N)
    hits = ((pred[None, :] == classes[:, None]) & others).sum(dim=1)
    shares = hits / others.sum(dim=1).clamp(min=1)
    best = int(shares.argmax())
    return best, float(shares[best])


def proxy_asr(model: nn.Module, loader: Any, classifier: Tensor, trigger: Trigger, *, normalize: Normalize,
              target_index: int, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """ASR of an inverted trigger on the suspected target: `cleansweep.evaluate.evaluate(..., trigger=trigger)`.

    Args:
        model, loader, classifier, normalize, seed, device: as for `evaluate`.
        trigger: `inverted_trigger(mask, pattern)`.
        target_index: the suspected target class (`suspected_target`, or the card's `target_index`).
    """
    return float(evaluate(model, loader, classifier, normalize=normalize, target_index=target_index,
                          trigger=trigger, seed=seed, device=device)[ASR])



# ------------------------------------------------------------------------------------------------ verdict
def verdict(pl1: float, reference_pl1: float | None = None, *, pl1_threshold: float = PL1_THRESHOLD,
            ratio_threshold: float = RATIO_THRESHOLD) -> dict[str, Any]:
    """Backdoored or not, with the rule that decided it.

    With a clean reference model: backdoored when PL1 / PL1_reference < `ratio_threshold`. Without one: when
    PL1 < `pl1_threshold` (DECREE's rule for 224 px encoders). Small, low-resolution models are not robust: a clean
    tiny-rn at 32 px is collapsed by a mask of PL1 0.05-0.10 and its backdoored twin by 0.02-0.04 (measured, 60-200
    steps), both under 0.1, so at that scale only the ratio against a clean reference separates them.
    """
    if reference_pl1 is not None:
        ratio = pl1 / reference_pl1 if reference_pl1 > 0 else float("inf")
        return {"backdoored": bool(ratio < ratio_threshold), "ratio": ratio, "confidence": "reference",
                "rule": f"pl1_norm / reference pl1_norm = {ratio:.3f} < {ratio_threshold:g}"}
    return {"backdoored": bool(pl1 < pl1_threshold), "ratio": None, "confidence": "low",
            "rule": f"pl1_norm = {pl1:.4f} < {pl1_threshold:g} (no reference model: clean low-resolution models also "
                    "fall below it; pass --reference CLEAN_CKPT for a verdict that separates them)"}

