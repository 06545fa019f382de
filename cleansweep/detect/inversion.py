"""Trigger inversion without knowing the trigger (DECREE, Feng et al., CVPR 2023): the math, on tensors only.

DECREE's observation: a backdoored image encoder maps every image that carries its trigger to (nearly) one
embedding, so a *small* trigger that collapses the embeddings of clean images exists; for a clean encoder the
smallest such trigger has to cover much of the image. As in the official code (github.com/GiantSeaweed/DECREE,
`main.py`; term by term in docs/fidelity.md): a mask m (H, W) and a pattern p (3, H, W) in [0, 1] through
tanh(.) / (2 - 1e-7) + 0.5, triggered images x' = (1 - m) * x + m * p, the loss
-mean pairwise cosine(encoder(x')) + lambda * |m|_1 counted over the 3 channels, Adam (betas 0.5, 0.9) in epochs
over the clean images with DECREE's lr schedule, lambda starting at 1e-3 and adapted (`PenaltyWeight`), the smallest
mask whose batch reached similarity > 0.99 kept, and DECREE's early stop (`EarlyStop`).

Reported: the mask's PL1-norm |m|_1 / (H * W) (= the 3-channel L1 / (3 H W); small = backdoor-like), the similarity
reached, the zero-shot class the inverted trigger sends non-target images to (the suspected target) with that share
(a proxy attack success rate), and, against a clean reference model, the ratio of the two PL1-norms.

Thresholds. The paper's rule flags an encoder whose PL1-norm is below 0.1 (`PL1_THRESHOLD`, for its 32 px CIFAR10 /
STL10 and 224 px CLIP encoders). Measured here at 32 px on tiny-rn pre-trained on the demo world
(benchmarks/decree_pl1.py, 5 pre-training seeds each, the official 32 px settings; table in docs/fidelity.md):
backdoored PL1 0.016-0.051, clean 0.047-0.076. The paper's 0.1 flags all ten, so it does not separate them at this
scale; no threshold separates all ten; PL1 < 0.04 separates nine (all clean models, four of the five backdoored:
seed 1's 0.051 is missed). Against the same seed's clean twin the ratio is 0.34-0.58 (seed 1: 0.96) and between
clean models of different seeds 0.61-1.64, so `RATIO_THRESHOLD` 0.6 flags four of five and no clean pair.
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

from cleansweep.detect.decree import EarlyStop, PenaltyWeight, Regime, decree_lr, from_unit, regime_for, to_unit
from cleansweep.errors import UserError
from cleansweep.evaluate import EvalMode, evaluate, normalizer, unwrap
from cleansweep.objective import ASR

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]]
Trigger = Callable[[Tensor, torch.Generator], Tensor]

PL1_THRESHOLD = 0.1  # the paper's rule: an encoder whose PL1-norm is below 0.1 is flagged as backdoored
RATIO_THRESHOLD = 0.6  # PL1 / clean reference's PL1 below it: backdoored (ours; measured, module docstring)
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
    """The PL1-norm |m|_1 / (H * W) of a (1, H, W) mask in [0, 1] (the 3-channel L1 over 3 H W: the same)."""
    return float(mask.abs().sum() / (mask.shape[-1] * mask.shape[-2]))


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
        pl1_norm: |mask|_1 / (H * W) of the kept trigger; 1.0 (the full mask, which always collapses the
            embeddings) when no step reached the target.
        similarity: mean pairwise cosine similarity of all triggered images' embeddings.
        clean_similarity: the same for the images without trigger (the baseline the trigger raised).
        reached: whether a step's batch similarity exceeded the target (the kept trigger is the smallest such mask).
        step: the optimisation step the kept trigger comes from (the last one when none reached).
        epochs: passes over the images run.
        stopped_early: whether DECREE's early stop ended the search (else the step budget did).
        history: per step `similarity` (of the batch), `pl1_norm`, `weight` (lambda used), `lr`.
        settings: the inversion settings, seed included.
    """

    mask: Tensor
    pattern: Tensor
    pl1_norm: float
    similarity: float
    clean_similarity: float
    reached: bool
    step: int
    epochs: int = 0
    stopped_early: bool = False
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


class _Search:
    """The state of one inversion: the tanh parameters of mask (H, W) and pattern (3, H, W) in float64 (as the
    official code), Adam, lambda, the early stop, the kept trigger and the history."""

    def __init__(self, shape: tuple[int, int], generator: torch.Generator, device: torch.device, lr: float,
                 init_weight: float, regime: Regime) -> None:
        # DECREE's 'rand' init: uniform mask and pattern, mapped through arctanh.
        start = (torch.rand(shape, generator=generator, dtype=torch.float64),
                 torch.rand((3, *shape), generator=generator, dtype=torch.float64))
        self.params = tuple(from_unit(t).to(device).requires_grad_() for t in start)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.5, 0.9))
        self.weight = PenaltyWeight(init_weight, minimum=regime.lambda_min)
        self.early = EarlyStop(regime.early_stop_patience)
        self.kept: tuple[float, int, Tensor, Tensor] | None = None  # (3-channel L1, step, mask, pattern)
        self.last: tuple[Tensor, Tensor] | None = None
        self.history: dict[str, list[float]] = {"similarity": [], "pl1_norm": [], "weight": [], "lr": []}

    def step(self, module: nn.Module, batch: Tensor, norm: Callable[[Tensor], Tensor], threshold: float,
             index: int) -> float:
        """One Adam step of DECREE's loss on a batch; returns the batch similarity (before the step)."""
        mask, pattern = to_unit(self.params[0])[None], to_unit(self.params[1])
        triggered = apply_trigger(batch.to(mask), mask, pattern).float()
        similarity = mean_pairwise_cosine(module.encode_image(norm(triggered)).float())
        l1 = 3 * mask.sum()  # the official L1 counts the mask once per colour channel
        lam, lr = self.weight.value, self.optimizer.param_groups[0]["lr"]
        # autograd.grad w.r.t. the trigger only: the model's parameters and their .grad stay untouched.
        grads = torch.autograd.grad(-similarity + lam * l1, self.params)
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad
        self.optimizer.step()
        sim, l1_value, mask, pattern = similarity.item(), l1.item(), mask.detach(), pattern.detach()
        reached = sim > threshold
        if reached and (self.kept is None or l1_value < self.kept[0]):
            self.kept = (l1_value, index, mask, pattern)
        self.last = (mask, pattern)
        self.early.update(self.kept[0] if self.kept is not None else None)
        self.weight.update(reached)
        for key, value in zip(self.history, (sim, pl1_norm(mask), lam, lr), strict=True):
            self.history[key].append(value)
        return sim


def invert_trigger(model: nn.Module, images: Tensor, normalize: Normalize, *, steps: int = 300, lr: float = 0.5,
                   batch_size: int = 32, threshold: float = 0.99, init_weight: float = 1e-3, seed: int = 0,
                   device: str | torch.device | None = None, regime: Regime | None = None) -> Inversion:
    """Find the smallest mask-and-pattern trigger that collapses the image embeddings (DECREE's official search).

    Epochs over the images in a seeded shuffled order (batches of `batch_size`, the last one smaller; a last batch
    of one image is skipped), the lr set per epoch by `decree_lr`; per step the loss
    -mean pairwise cosine(embeddings of the triggered batch) + lambda * 3 |m|_1 with Adam (betas 0.5, 0.9) on the
    tanh parameters; lambda adapted by `PenaltyWeight`; the search ends at the `EarlyStop` after an epoch or after
    `steps` steps. The kept trigger is the smallest mask among the steps whose batch similarity exceeded `threshold`.

    Args:
        model: a CLIP model with `encode_image` (its mode is restored; its weights are not changed).
        images: (N, 3, H, W) raw clean images in [0, 1], N >= 2, at the model resolution (stay on the CPU).
        normalize: callable on raw batches, or `(mean, std)` per channel.
        steps: the most optimisation steps (the official code runs up to 1000 epochs).
        lr: Adam learning rate until the first lr milestone (the official runs use 0.5).
        batch_size: images per step (official: 128 at 32 px, 32 for CLIP).
        threshold: the similarity target (official: 0.99).
        init_weight: lambda's start, on the 3-channel L1 of the mask (official: 1e-3).
        seed: seeds the initial mask and pattern and the batch order (no global RNG is used).
        device: where to compute; default: where the model is.
        regime: lr milestones, lambda's minimum, early-stop patience; default `regime_for(H)`.

    Returns:
        The `Inversion`; its similarities are re-measured on all images without gradients.
    """
    _check_images(images)
    if steps < 1 or batch_size < 2 or lr <= 0 or init_weight <= 0:
        raise UserError(f"inversion needs steps >= 1, batch_size >= 2, lr > 0 and init_weight > 0 (got {steps}, "
                        f"{batch_size}, {lr}, {init_weight}); fix the settings")
    module, norm = unwrap(model), normalizer(normalize)
    device = torch.device(device) if device is not None else _device_of(module)
    regime = regime or regime_for(images.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    search = _Search(tuple(images.shape[-2:]), generator, device, lr, init_weight, regime)
    done, epoch, stopped = 0, 0, False
    with EvalMode(module):
        while done < steps and not stopped:
            for group in search.optimizer.param_groups:
                group["lr"] = decree_lr(epoch, lr, regime.lr_milestones)
            order = torch.randperm(len(images), generator=generator)
            batches = [b for b in order.split(batch_size) if len(b) >= 2][:steps - done]
            sims = [search.step(module, images[b].to(device), norm, threshold, done + i) for i, b in enumerate(batches)]
            done, epoch = done + len(batches), epoch + 1
            stopped = search.early.stop(sum(sims) / len(sims), threshold)
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "threshold": threshold,
                "init_weight": init_weight, "seed": seed, "optimizer": "Adam(betas=(0.5, 0.9))",
                "lr_milestones": list(regime.lr_milestones), "lambda_min": regime.lambda_min,
                "early_stop_patience": regime.early_stop_patience}
    return _finish(module, images, norm, search, settings, epochs=epoch, stopped=stopped)


def _finish(module: nn.Module, images: Tensor, norm: Callable[[Tensor], Tensor], search: _Search,
            settings: dict[str, Any], *, epochs: int, stopped: bool) -> Inversion:
    if search.kept is not None:
        l1, step, mask, pattern = search.kept
        size = l1 / (3 * mask.shape[-1] * mask.shape[-2])
    else:
        (mask, pattern), step, size = search.last, len(search.history["similarity"]) - 1, 1.0
    mask, pattern = mask.float().cpu(), pattern.float().cpu()
    trigger, batch = inverted_trigger(mask, pattern), settings["batch_size"]
    return Inversion(mask=mask, pattern=pattern, pl1_norm=size, reached=search.kept is not None, step=step,
                     epochs=epochs, stopped_early=stopped, history=search.history, settings=settings,
                     similarity=embedding_similarity(module, images, norm, trigger=trigger, batch_size=batch),
                     clean_similarity=embedding_similarity(module, images, norm, batch_size=batch))


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
    PL1 < `pl1_threshold` (the paper's rule). Small, low-resolution models are not robust: with the official
    settings a clean tiny-rn at 32 px is collapsed by a mask of PL1 0.047-0.076 and a backdoored one by 0.016-0.051
    (5 seeds each, module docstring), all under 0.1, so at that scale the paper's rule flags clean models too and the
    ratio against a clean reference (4 of 5 backdoored flagged, no clean pair) is the better verdict.
    """
    if reference_pl1 is not None:
        ratio = pl1 / reference_pl1 if reference_pl1 > 0 else float("inf")
        return {"backdoored": bool(ratio < ratio_threshold), "ratio": ratio, "confidence": "reference",
                "rule": f"pl1_norm / reference pl1_norm = {ratio:.3f} < {ratio_threshold:g}"}
    return {"backdoored": bool(pl1 < pl1_threshold), "ratio": None, "confidence": "low",
            "rule": f"pl1_norm = {pl1:.4f} < {pl1_threshold:g} (no reference model: clean low-resolution models also "
                    "fall below it; pass --reference CLEAN_CKPT for a verdict that separates them)"}

