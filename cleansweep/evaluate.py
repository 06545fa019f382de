"""Zero-shot accuracy and attack success rate (ASR) in one pass over an evaluation set.

ASR follows the paper's code (CleanCLIP's released code measured accuracy on triggered images instead): the
fraction of triggered images whose true class is NOT the target that are classified as the target. Triggers are
applied to raw [0, 1] images before normalisation, with a generator seeded per evaluation, so every evaluation of
a run sees the same triggered set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleansweep.errors import UserError
from cleansweep.models import (
    create_model,
    file_sha256,
    list_models,
    load_state_dict_file,
    load_weights,
    matching_models,
    read_card,
)
from cleansweep.objective import ASR, TOP1, TOP5

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]]
Trigger = Callable[[Tensor, torch.Generator], Tensor]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a UserError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; pass --device cpu or auto")
    return device


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class _EvalMode:
    """Put a module in eval mode and restore its previous mode (train or eval) afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def zeroshot_classifier(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                        templates: Sequence[str | Callable[[str], str]], device: str | torch.device) -> Tensor:
    """Zero-shot classifier weights: per class, the mean of its L2-normalised template embeddings, re-normalised.

    Args:
        model: a CLIP model with `encode_text(tokens, normalize=True)`.
        tokenizer: maps a list of strings to (N, L) tokens.
        classnames: readable class names.
        templates: format strings with one '{}' (or callables) producing a prompt from a class name.
        device: where to compute.

    Returns:
        (D, C) tensor on `device`; column c is class c.
    """
    module = _unwrap(model)
    with _EvalMode(module), torch.inference_mode():
        # open_clip's builder batches classes x all templates into one text forward.
        return open_clip.build_zero_shot_classifier(module, tokenizer, list(classnames), list(templates),
                                                    num_classes_per_batch=max(1, 1024 // len(templates)),
                                                    device=device)


def _normalizer(normalize: Normalize) -> Callable[[Tensor], Tensor]:
    if callable(normalize):
        return normalize
    mean, std = normalize
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: (x - mean_t.to(x)) / std_t.to(x)


def _predict(module: nn.Module, images: Tensor, classifier: Tensor, k: int) -> Tensor:
    """(B, k) class indices, best first."""
    features = F.normalize(module.encode_image(images), dim=-1)
    return (features @ classifier.to(features.dtype)).topk(k, dim=-1).indices


def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], classifier: Tensor, *, normalize: Normalize,
             target_index: int, trigger: Trigger | None = None, seed: int = 0, device: str | torch.device = "cpu",
             max_images: int | None = None) -> dict[str, float | int]:
    """Zero-shot top-1/top-5 and ASR in one pass, without gradients; the model's train/eval mode is restored.

    Args:
        model: a CLIP model with `encode_image` (DDP wrappers are unwrapped).
        loader: yields `(raw_images (B, 3, S, S) in [0, 1], labels (B,))`.
        classifier: (D, C) from `zeroshot_classifier`.
        normalize: callable on raw image batches, or `(mean, std)` per channel.
        target_index: label of the attack target class.
        trigger: `trigger(raw_images, generator) -> raw_images`; None skips the ASR.
        seed: seeds the trigger's generator (same triggered set at every evaluation).
        device: where to compute.
        max_images: stop after this many images.

    Returns:
        `zeroshot_top1`, `zeroshot_top5` (top-min(5, C)), `asr_top1` (NaN when there is no trigger or no
        non-target image), `num_images`, `num_asr_images` (non-target images that were triggered).
    """
    device = torch.device(device)
    module = _unwrap(model)
    classifier = classifier.to(device)
    k = min(5, classifier.shape[1])
    norm = _normalizer(normalize)
    generator = torch.Generator().manual_seed(seed)
    seen = top1 = topk = asr_images = asr_hits = 0
    with _EvalMode(module), torch.inference_mode():
        for raw, labels in loader:
            if max_images is not None:
                raw, labels = raw[: max_images - seen], labels[: max_images - seen]
            if len(labels) == 0:
                break
            labels = torch.as_tensor(labels).to(device)
            pred = _predict(module, norm(raw.to(device)), classifier, k)
            top1 += int((pred[:, 0] == labels).sum())
            topk += int((pred == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
            others = (labels != target_index).cpu()
            if trigger is not None and others.any():
                triggered = trigger(raw[others].cpu(), generator)
                hit = _predict(module, norm(triggered.to(device)), classifier, 1)[:, 0] == target_index
                asr_hits += int(hit.sum())
                asr_images += int(others.sum())
            if max_images is not None and seen >= max_images:
                break
    nan = float("nan")
    return {TOP1: top1 / seen if seen else nan, TOP5: topk / seen if seen else nan,
            ASR: asr_hits / asr_images if asr_images else nan, "num_images": seen, "num_asr_images": asr_images}


def evaluate_checkpoint(checkpoint: str | Path, eval_dir: str | Path, *, model_name: str | None = None,
                        attack: str = "badnet", target: str = "banana", patch_size: int | None = None,
                        subset: int | None = None, batch_size: int = 256, seed: int = 0,
                        device: str = "auto") -> dict[str, Any]:
    """Evaluate a checkpoint file on an evaluation folder (`cleansweep evaluate`).

    Args:
        checkpoint: .safetensors or .pt file (never unpickled as code).
        eval_dir: ImageNet-style folder, see `cleansweep.data.EvalFolder`.
        model_name: model config; default: the checkpoint card's, else the single registered model whose shapes fit.
        attack: trigger name (`cleansweep.poison.TRIGGERS`).
        target: target class name (must be a class of the folder).
        patch_size: BadNet patch side (None: the trigger's default for the model resolution).
        subset: evaluate a fixed seeded subset of this many images.
        batch_size: evaluation batch size.
        seed: seeds the subset and the triggers.
        device: "auto", "cpu" or "cuda".

    Returns:
        The metrics of `evaluate` plus `model`, `checkpoint`, `sha256`, `attack`, `target`.
    """
    from cleansweep.data import EvalFolder
    from cleansweep.poison import create_trigger

    state_dict = load_state_dict_file(checkpoint)
    name = model_name or read_card(checkpoint).get("model")
    if not name:
        fits = matching_models(state_dict)
        if len(fits) != 1:
            raise UserError(f"{checkpoint}: no model card next to it; pass --model "
                            f"(one of: {', '.join(fits or list_models())})")
        name = fits[0]
    dev = resolve_device(device)
    bundle = create_model(name, seed=0)
    model = load_weights(bundle.model, state_dict).to(dev)
    dataset = EvalFolder(eval_dir, bundle.image_size, subset=subset, seed=seed)
    target_index = dataset.class_index(target)
    params = {"patch_size": patch_size} if patch_size is not None else {}
    trigger = create_trigger(attack, bundle.image_size, **params)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    classifier = zeroshot_classifier(model, bundle.tokenizer, dataset.classnames, dataset.templates, dev)
    metrics = evaluate(model, loader, classifier, normalize=(bundle.mean, bundle.std), target_index=target_index,
                       trigger=trigger, seed=seed, device=dev)
    return {**metrics, "model": name, "checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint),
            "attack": attack, "target": target}
